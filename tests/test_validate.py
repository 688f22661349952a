"""`kvexport validate` and `kvexport eval --bundle --backend` on a tiny learned-policy bundle:
the three backends agree, a tampered bundle fails naming its first diverging step, and every
backend gives the same accuracy on the same items."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from export import bundle as B
from export.cli import main
from test_export_graph import learned_policy


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def json_of(res) -> dict:
    return json.loads(res.output[res.output.index("{"):])


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    path = tmp_path_factory.mktemp("ctrl") / "ctrl.safetensors"
    learned_policy().controller.save(path)
    return path


def export_learned(tiny_checkpoint, controller, out, query_bits: str):
    res = invoke("export", "--model", str(tiny_checkpoint), "--policy", "learned", "--controller", str(controller),
                 "--max-seq-len", "96", "--chunk-size", "8", "--query-bits", query_bits, "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def learned_bundle(tiny_checkpoint, controller, tmp_path_factory):
    # fp32 query: the backends agree to the last cache byte (the checks below are exact)
    return export_learned(tiny_checkpoint, controller, tmp_path_factory.mktemp("bundles") / "tiny-learned", "32")


def resign(folder) -> None:
    """Rewrite the manifest's checksums: a bundle that is consistent but not what export wrote."""
    m = json.loads((folder / B.MANIFEST).read_text())
    m.pop("files")
    B.write_manifest(folder, m)


def test_validate_passes_with_every_backend_in_agreement(learned_bundle):
    res = invoke("validate", str(learned_bundle), "--steps", "6", "--json")
    assert res.exit_code == 0, res.output
    rep = json_of(res)
    assert rep["ok"] and rep["prompts"] == 5 and rep["steps"] == 6 and rep["warnings"] == []
    assert set(rep["backends"]) == {"executorch", "onnxruntime"}
    for name, r in rep["backends"].items():
        assert r["ok"] and r["top1_agreement"] == 1.0 and r["bits_agreement"] >= 0.995, name
        assert r["max_abs_logit_diff"] <= 1e-2 and r["cache_bytes_equal"] >= 0.999 and r["first_divergence"] is None, name
    table = invoke("validate", str(learned_bundle), "--steps", "2")
    assert table.exit_code == 0 and "onnxruntime" in table.output and "executorch" in table.output


def test_validate_int8_query_bundle_within_tolerances(tiny_checkpoint, controller, tmp_path):
    """The int8 query (export's default) rounds q: a last-bit difference upstream (XNNPACK vs torch
    matmuls) can move a q8 value by one and then a cache code, so rare byte differences are expected;
    validate's tolerances hold."""
    bundle = export_learned(tiny_checkpoint, controller, tmp_path / "tiny-learned-q8", "8")
    res = invoke("validate", str(bundle), "--steps", "6", "--json")
    assert res.exit_code == 0, res.output
    rep = json_of(res)
    for name, r in rep["backends"].items():
        assert r["ok"] and r["top1_agreement"] == 1.0 and r["bits_agreement"] >= 0.995 and r["cache_bytes_equal"] >= 0.999, name


def test_validate_names_the_first_diverging_step_of_an_altered_weight(learned_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(learned_bundle, copy)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    norm = next(t for t in model.graph.initializer if t.name.endswith("norm.weight") and "layers" not in t.name)
    where = {e.key: e.value for e in norm.external_data}
    offset, length = int(where["offset"]), int(where["length"])
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[offset : offset + length] = bytes(length)  # the final norm's weights zeroed: every logit becomes 0
    (copy / "model.onnx.data").write_bytes(bytes(data))
    resign(copy)
    res = invoke("validate", str(copy), "--steps", "4", "--json")
    assert res.exit_code == 1
    rep = json_of(res)
    bad = rep["backends"]["onnxruntime"]
    assert not rep["ok"] and not bad["ok"] and rep["backends"]["executorch"]["ok"]
    assert bad["first_divergence"]["prompt"] == 0 and bad["first_divergence"]["phase"] == "prefill"
    assert "logits differ" in bad["first_divergence"]["what"]
    table = invoke("validate", str(copy), "--steps", "1")
    assert table.exit_code == 1 and "prompt 0 prefill step 0" in table.output


def test_validate_catches_a_swapped_controller(learned_bundle, tmp_path):
    """The reference is rebuilt with another controller: the stored widths diverge, and the
    report says the controller is not the one the bundle was exported with."""
    import torch

    other = tmp_path / "other.safetensors"
    policy = learned_policy()
    with torch.no_grad():
        policy.controller.mlp[-1].bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # leans to 2 bits
    policy.controller.save(other)
    copy = tmp_path / "b"
    shutil.copytree(learned_bundle, copy)
    m = json.loads((copy / B.MANIFEST).read_text())
    m["options"]["controller"] = str(other)
    (copy / B.MANIFEST).write_text(json.dumps(m))
    res = invoke("validate", str(copy), "--steps", "4", "--json")
    assert res.exit_code == 1
    rep = json_of(res)
    assert any("sha256 differs" in w for w in rep["warnings"])
    for r in rep["backends"].values():
        assert not r["ok"] and r["bits_agreement"] < 0.995
        assert r["first_divergence"]["prompt"] == 0


def test_eval_through_every_backend_gives_the_same_accuracy(learned_bundle):
    results = {}
    for backend in ("torch", "executorch", "onnxruntime"):
        res = invoke("eval", "--bundle", str(learned_bundle), "--backend", backend, "--task", "hellaswag", "--limit", "6", "--context", "96", "--json")
        assert res.exit_code == 0, res.output
        r = json_of(res)
        assert r["n"] == 6 and r["policy"].endswith(f"[{backend}]") and 2.0 <= r["avg_bits"] <= 16.0
        results[backend] = (r["accuracy"], r["accuracy_norm"])
    assert len(set(results.values())) == 1, results
    ppl = {b: json_of(invoke("eval", "--bundle", str(learned_bundle), "--backend", b, "--task", "wikitext2", "--limit", "1", "--context", "64", "--json"))["perplexity"]
           for b in ("torch", "onnxruntime")}
    assert abs(ppl["torch"] - ppl["onnxruntime"]) <= 1e-3 * ppl["torch"]


@pytest.mark.parametrize("args,message", [
    (["--backend", "onnxruntime", "--task", "hellaswag"], "pass --bundle DIR"),
    (["--bundle", "B", "--policy", "static-4", "--task", "hellaswag"], "--policy cannot be combined with --bundle"),
])
def test_eval_backend_usage_errors(args, message):
    res = invoke("eval", *args)
    assert res.exit_code == 2 and message in res.output


def test_validate_and_eval_need_the_format(tiny_checkpoint, tmp_path):
    out = tmp_path / "pte-only"
    res = invoke("export", "--model", str(tiny_checkpoint), "--policy", "static-4", "--formats", "pte",
                 "--max-seq-len", "64", "--chunk-size", "8", "--out", str(out), "--json")
    assert res.exit_code == 0 and "model.onnx" not in json_of(res)["files"]
    res = invoke("eval", "--bundle", str(out), "--backend", "onnxruntime", "--task", "hellaswag", "--limit", "1")
    assert res.exit_code == 2 and "has no model.onnx" in res.output and "--formats pte,onnx" in res.output
    rep = json_of(invoke("validate", str(out), "--steps", "2", "--json"))
    assert set(rep["backends"]) == {"executorch"} and rep["ok"]
