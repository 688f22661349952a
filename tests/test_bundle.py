"""`kvexport export / inspect / run` on a tiny checkpoint: the bundle, its checks and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from adaptive_kv import ops
from export import bundle as B
from export.bundle_runner import BundleRunner
from export.cli import main
from export.pipeline import ExportOptions

PROMPT = "The capital of France is"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle):
    return tiny_bundle


def test_export_writes_a_complete_verified_bundle(bundle_dir, tiny_checkpoint):
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["tiny-rule"]  # no temp folder left
    m = json.loads((bundle_dir / B.MANIFEST).read_text())
    assert {"model.pte", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"} <= set(m["files"])
    onnx = m["onnx"]  # the ONNX model's documented state I/O, pairing past.<name> with present.<name>
    assert onnx["model"] == "model.onnx" and onnx["data"] == "model.onnx.data" and onnx["sequence_length"] == {"min": 1, "max": 8}
    assert [i["name"] for i in onnx["inputs"][2:]] == [f"past.{n}" for n in onnx["state"]] == [f"past.{n}" for n in m["methods"]["state_names"]]
    assert [o["name"] for o in onnx["outputs"][1:]] == [f"present.{n}" for n in onnx["state"]]
    for name, e in m["files"].items():
        assert (bundle_dir / name).stat().st_size == e["bytes"] and B.sha256_of(bundle_dir / name) == e["sha256"]
    assert m["policy"]["name"] == "rule" and m["policy"]["kv_budget_bits"] == 4.0 and m["weights"]["scheme"] == "fp32"
    assert m["model"]["layers"] == 2 and m["model"]["source"] == str(tiny_checkpoint)
    cache = m["cache"]
    assert cache["max_seq_len"] == 96 and sum(p["capacity_tokens"] for p in cache["pools"]) >= 96
    # bytes per token from the buffers: 2 (K, V) x 2 layers x 2 KV heads x row bytes (64 values + fp16 scale/zero)
    assert {p["bits"]: p["bytes_per_token"] for p in cache["pools"]} == {b: 8 * (64 * b // 8 + (4 if b < 16 else 0)) for b in (2, 4, 8, 16)}
    assert cache["bytes_allocated"] < cache["fp16_bytes_same_context"]
    consts = m["methods"]["constants"]
    assert consts["get_max_seq_len"] == 8 and consts["get_max_context_len"] == 96
    assert set(m["versions"]) >= {"torch", "executorch", "transformers"} and m["versions"]["torch"].startswith("2.13")
    assert set(m["export_seconds"]) >= {"torch.export", "to_edge_transform_and_lower", "write"}
    res = invoke("inspect", str(bundle_dir))
    assert res.exit_code == 0 and "checksums verified" in res.output and "tokenizer.json" in res.output


def test_run_matches_the_eager_decoder(bundle_dir, tiny_checkpoint):
    """The bundle's program, fed by `run`, gives the tokens and widths of the eager ExportableDecoder."""
    from adaptive_kv.model import load_model
    from adaptive_kv.policy import make_policy
    from export.pte import PteConfig, build_decoder

    ops.load_library()
    res = invoke("run", str(bundle_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--no-chat", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    runner = BundleRunner(bundle_dir)
    ids = runner.encode(PROMPT, chat=False)
    model, _ = load_model(str(tiny_checkpoint))
    eager = build_decoder(model, make_policy("rule", budget_bits=4.0), PteConfig(max_seq_len=96, chunk_size=8))
    logits, bits = eager.feed(torch.tensor(ids))
    want = []
    for _ in range(out["new_tokens"]):
        want.append(int(logits.argmax()))
        if len(want) < out["new_tokens"]:
            lg, b = eager.step(torch.tensor(want[-1:]))
            logits, bits = lg[-1], torch.cat([bits, b])
    assert out["tokens"] == want and out["prompt_tokens"] == len(ids)
    assert out["stopped"] in ("eos", "max_new_tokens")
    stored = eager.token_bits[: len(ids) + len(want) - 1].long()
    assert out["kv_tokens_by_bits"] == {str(b): int((stored == b).sum()) for b in (2, 4, 8, 16)}
    per_token = runner.bundle.bytes_per_token()
    assert sum(out["kv_bytes_by_bits"].values()) == sum(per_token[int(b)] * n for b, n in out["kv_tokens_by_bits"].items())
    streamed = invoke("run", str(bundle_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--no-chat")
    assert streamed.exit_code == 0 and "tok/s" in streamed.output and "KV cache in use" in streamed.output


def test_sampling_is_seeded(bundle_dir):
    runner = BundleRunner(bundle_dir)
    ids = runner.encode(PROMPT, chat=False)
    a, _ = runner.generate(ids, 10, temperature=1.0, seed=3)
    b, _ = runner.generate(ids, 10, temperature=1.0, seed=3)
    c, _ = runner.generate(ids, 10, temperature=1.0, seed=4)
    assert a == b and a != c


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.pte").unlink(), "model.pte is missing"),
    (lambda d: (d / "model.onnx.data").write_bytes(b"\0" * 64), "model.onnx.data is 64 bytes"),
    (lambda d: (d / "model.pte").write_bytes((d / "model.pte").read_bytes()[:1000]), "model.pte is 1000 bytes"),
    (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("a", "b", 1)), "tokenizer.json fails its sha256"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda d: (d / "manifest.json").unlink(), "not a kvexport bundle"),
])
def test_damaged_bundle_is_refused_naming_the_file(bundle_dir, tmp_path, damage, message):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    damage(copy)
    for cmd in (["inspect", str(copy)], ["run", str(copy), "--prompt", "hi"]):
        res = invoke(*cmd)
        assert res.exit_code == 2 and message in res.output and "kvexport export" in res.output


def test_prompt_longer_than_the_context_is_refused(bundle_dir):
    res = invoke("run", str(bundle_dir), "--prompt", "word " * 200, "--no-chat")
    assert res.exit_code == 2 and "holds 96 tokens" in res.output and "--max-seq-len" in res.output


def test_missing_kernel_library_names_the_fix(bundle_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "EXECUTORCH_LIBRARY", tmp_path / "libkvq_executorch.so")
    monkeypatch.setattr(ops, "_executorch_handle", None)
    res = invoke("run", str(bundle_dir), "--prompt", "hi")
    assert res.exit_code == 2 and "make setup" in res.output


@pytest.mark.parametrize("args,message", [
    (["--policy", "nope"], "policy 'nope' is unknown"),
    (["--policy", "oracle"], "no exportable form"),
    (["--weights", "int3"], "unknown weight scheme 'int3'"),
    (["--policy", "static-4", "--kv-budget-bits", "3"], "applies to rule and learned"),
    (["--controller", "missing.safetensors"], "controller file missing.safetensors not found"),
    (["--formats", "pte,tflite"], "choose one or more of pte,onnx"),
    (["--jobs", "0"], "--jobs 0: give at least 1 process"),
])
def test_bad_export_options_fail_before_loading(tmp_path, args, message):
    out = tmp_path / "never"
    res = invoke("export", "--model", str(tmp_path / "no-such-model"), *args, "--out", str(out))
    assert res.exit_code == 2 and message in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(bundle_dir):
    with pytest.raises(B.BundleError, match="--force"):
        ExportOptions(out=bundle_dir, policy="static-4")


def test_failed_export_leaves_nothing(tmp_path):
    """A model that is not llama fails inside the export: no bundle, no temp folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(ckpt)
    res = invoke("export", "--model", str(ckpt), "--policy", "static-4", "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and "llama" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]
    import multiprocessing

    assert not multiprocessing.active_children()  # the ONNX process started beside it was stopped


def test_job_beside_the_export_returns_reraises_and_is_stopped_with_the_export():
    """The ONNX export's second process: its result or its error comes back; when the export
    fails first, the process is killed rather than waited for."""
    import multiprocessing
    import time

    from export.pipeline import _beside

    with _beside(sum, [1, 2, 3]) as job:
        assert job.get() == 6
    with pytest.raises(ValueError, match="invalid literal"), _beside(int, "x") as job:
        job.get()
    with pytest.raises(KeyboardInterrupt), _beside(time.sleep, 600):
        raise KeyboardInterrupt  # Ctrl-C during the .pte lowering
    assert not multiprocessing.active_children()


def test_quiet_hides_only_the_known_third_party_lines(caplog):
    """export/quiet.py (installed by every command): torchao's CUDA-extension line goes, any
    other torchao warning still prints; the tree-spec FutureWarning goes, others stay."""
    import logging
    import warnings

    from export.quiet import install

    log = logging.getLogger("torchao")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        install()
        install()  # idempotent: one filter per logger
        with caplog.at_level(logging.WARNING, logger="torchao"):
            log.warning("Failed to load %s: Could not load this library", "/x/_C_mxfp8.so")
            log.warning("Skipping import of cpp extensions due to incompatible torch version")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [r.getMessage() for r in caplog.records] == ["Skipping import of cpp extensions due to incompatible torch version"]
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    assert sum(type(f).__name__ == "_DropKnown" for f in log.filters) == 1
