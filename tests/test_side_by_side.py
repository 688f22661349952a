"""bench/bench_side_by_side.py (bars, quality columns, the report, a tiny real run) and bench/profile_pte.py (ETDump by op)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

BENCH = Path(__file__).resolve().parent.parent / "bench"
RUNNER = BENCH.parent / "runtime_ops" / "build" / "dist" / "kvq_runner"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


side = _load("bench_side_by_side")
prof = _load("profile_pte")


def _rec(engine: str, policy: str, depth: int, ms: float, weights: str = "8da4w") -> dict:
    return {"engine": engine, "policy": policy, "weights": weights, "depth": depth, "decode_ms_per_token": ms, "decode_ms_std": 0.1,
            "prefill_ms_per_token": 1.0, "prefill_ms_std": 0.0, "kv_bytes": 2**20, "gb_per_s": 3.0, "peak_rss_bytes": 2**28}


def test_bars_divide_the_right_rows_and_say_what_was_not_measured():
    recs = [_rec("kvexport", "learned@4", 8128, 10.0), _rec("kvexport", "fp16", 8128, 20.0), _rec("kvexport", "static-4", 8128, 9.0),
            _rec("kvexport", "learned@4", 8128, 99.0, weights="fp32"),  # other weights: not a bar row
            _rec("llama.cpp", "llama.cpp kv=f16", 8128, 25.0), _rec("llama.cpp", "llama.cpp kv=q4_0", 8128, 40.0),
            _rec("kvexport", "learned@4", 2048, 8.0), _rec("llama.cpp", "llama.cpp kv=f16", 2048, 9.0)]
    bars = {b["bar"]: b for b in side.bars(recs, 8128)}
    assert bars["adaptive@4.0 / fp16 cache, depth 8128"]["ratio"] == pytest.approx(0.5)
    assert bars["adaptive@4.0 / fp16 cache, depth 8128"]["met"] is True
    assert bars["adaptive@4.0 / static-4, depth 8128"]["ratio"] == pytest.approx(10 / 9)
    assert bars["adaptive@4.0 / static-4, depth 8128"]["met"] is False
    assert bars["adaptive@3.0 / static-4, depth 8128"]["ratio"] is None  # no learned@3 row
    assert bars["adaptive@4.0 / llama.cpp fastest KV, depth 8128"]["ratio"] == pytest.approx(10 / 25)  # the faster KV type
    assert bars["adaptive@4.0 / llama.cpp fastest KV, depth 2048"]["ratio"] == pytest.approx(8 / 9)


def test_int8_query_bundles_get_their_own_bar_rows():
    recs = [_rec("kvexport", "fp16", 8128, 20.0), _rec("kvexport", "static-4", 8128, 10.0), _rec("kvexport", "learned@4", 8128, 10.0),
            _rec("kvexport", "static-4 q8", 8128, 8.0), _rec("kvexport", "learned@4 q8", 8128, 8.4), _rec("kvexport", "learned@3 q8", 8128, 7.6)]
    bars = {b["bar"]: b for b in side.bars(recs, 8128)}
    assert bars["adaptive@4.0 / static-4, depth 8128"]["ratio"] == pytest.approx(1.0)  # fp32 query vs fp32 query
    assert bars["adaptive@4.0 (int8 query) / static-4 (int8 query), depth 8128"]["ratio"] == pytest.approx(8.4 / 8.0)
    assert bars["adaptive@3.0 (int8 query) / static-4 (int8 query), depth 8128"]["ratio"] == pytest.approx(7.6 / 8.0)
    assert bars["adaptive@4.0 (int8 query) / fp16 cache, depth 8128"]["ratio"] == pytest.approx(8.4 / 20.0)  # the one fp16 bundle
    quality = [{"task": "wikitext2", "policy": "static-4", "perplexity": 19.50}, {"task": "wikitext2", "policy": "static-4", "query_bits": 8, "perplexity": 19.49}]
    assert side.quality_row("static-4 q8", quality)["wikitext2"]["perplexity"] == 19.49
    assert side.quality_row("static-4", quality)["wikitext2"]["perplexity"] == 19.50


def test_paired_ratio_pairs_repetitions_of_the_same_round():
    num, den = _rec("kvexport", "learned@4", 8128, 12.0), _rec("kvexport", "static-4", 8128, 11.0)
    num["decode_ms_reps"], den["decode_ms_reps"] = [10.0, 20.0, 6.0], [10.0, 16.0, 6.0]  # round 2 was a slow burst for both
    assert side.paired_ratio(num, den) == pytest.approx(1.0)  # median of 1.0, 1.25, 1.0
    den["decode_ms_reps"] = den["decode_ms_reps"][:2]
    assert side.paired_ratio(num, den) is None  # unequal rounds: nothing to pair
    assert side.bars([num, _rec("kvexport", "fp16", 8128, 24.0)], 8128)[0]["paired"] is None  # records without repetitions


def test_quality_columns_match_policy_labels_to_eval_records():
    quality = [{"task": "hellaswag", "policy": "learned@4.0", "hadamard": True, "accuracy": 0.4, "accuracy_norm": 0.414},
               {"task": "hellaswag", "policy": "learned@3.0", "hadamard": True, "accuracy": 0.4, "accuracy_norm": 0.401},
               {"task": "wikitext2", "policy": "static-4", "hadamard": False, "perplexity": 25.2},
               {"task": "wikitext2", "policy": "static-4", "hadamard": True, "perplexity": 24.6}]
    assert side.quality_row("learned@4", quality)["hellaswag"]["accuracy_norm"] == 0.414
    assert side.quality_row("static-4", quality)["wikitext2"]["perplexity"] == 24.6  # the Hadamard variant, as exported
    assert side.quality_cell("wikitext2", {"perplexity": 24.647}) == "24.65"
    assert side.quality_cell("hellaswag", None) == "—"


@pytest.mark.skipif(not RUNNER.is_file(), reason="native runner not built (make setup)")
def test_a_tiny_run_writes_json_plot_and_report(tiny_bundle, tmp_path):
    md = tmp_path / "RESULTS.md"
    res = CliRunner().invoke(side.main, ["--bundle", str(tiny_bundle), "--llamacpp", "", "--depth", "16,40", "--gen", "4", "--reps", "2",
                                         "--warmup", "1", "--threads", "1", "--results-dir", str(tmp_path), "--out", "s",
                                         "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "s.json").read_text())
    assert [r["depth"] for r in out["results"]] == [16, 40]
    assert all(r["reps"] == 2 and r["decode_ms_per_token"] > 0 for r in out["results"])
    assert out["config"]["depths"] == [16, 40] and out["hardware"]["cores"]
    assert (tmp_path / "s.png").stat().st_size > 1000
    text = md.read_text()
    assert "| kvexport | rule@4 q8 | fp32 |" in text and "## Bars" in text
    assert "not measured in this run" in text  # no fp16 / static-4 bundles given
    assert all(len(r["decode_ms_reps"]) == 2 for r in out["results"])
    assert not (tmp_path / "s.partial.json").exists()  # a finished run leaves no partial file

    # --from-json: the bars and the report again from the records, nothing run
    md.unlink()
    res = CliRunner().invoke(side.main, ["--from-json", str(tmp_path / "s.json"), "--results-dir", str(tmp_path), "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    assert "| kvexport | rule@4 q8 | fp32 |" in md.read_text()
    assert json.loads((tmp_path / "s.json").read_text())["results"] == out["results"]


@pytest.mark.skipif(not RUNNER.is_file(), reason="native runner not built (make setup)")
def test_a_run_that_dies_leaves_the_finished_depths(tiny_bundle, tmp_path, monkeypatch):
    real_rep = side.BundleEngine.rep

    def rep(self, depth):
        if depth == 40:
            raise RuntimeError("the device went away")
        return real_rep(self, depth)

    monkeypatch.setattr(side.BundleEngine, "rep", rep)
    args = ["--bundle", str(tiny_bundle), "--llamacpp", "", "--depth", "16,40", "--gen", "4", "--reps", "1", "--warmup", "0",
            "--threads", "1", "--results-dir", str(tmp_path), "--out", "s", "--markdown", str(tmp_path / "R.md")]
    res = CliRunner().invoke(side.main, args)
    assert isinstance(res.exception, RuntimeError)
    partial = json.loads((tmp_path / "s.partial.json").read_text())
    assert partial["partial"] is True and [r["depth"] for r in partial["results"]] == [16]
    assert not (tmp_path / "s.json").exists()
    res = CliRunner().invoke(side.main, ["--from-json", str(tmp_path / "s.partial.json"), "--results-dir", str(tmp_path),
                                         "--markdown", str(tmp_path / "R.md")])
    assert res.exit_code == 0, res.output
    assert "unfinished run" in (tmp_path / "R.md").read_text()


def test_profile_names_the_kvq_kernels(tiny_bundle):
    res = prof.profile(tiny_bundle, depth=40, steps=4, threads=1)
    cats = res["by_category_ms"]
    assert cats["kvq attention"] > 0 and cats["kvq pack"] > 0 and cats["XNNPACK delegate"] > 0
    assert res["calls_per_step"]["kvq::packed_attention.out"] == 2  # one per layer of the tiny model
    assert res["profiled_runs"] >= 4
    assert sum(cats.values()) <= res["method_execute_ms"] * 1.01
