"""bench/peer_llamacpp.py: KV byte math, and a tiny real run on the SmolLM2 GGUF (skipped without llama_cpp)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

_PATH = Path(__file__).resolve().parent.parent / "bench" / "peer_llamacpp.py"
_spec = importlib.util.spec_from_file_location("peer_llamacpp", _PATH)
peer = sys.modules["peer_llamacpp"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(peer)

SCHEMA = {"target", "engine", "bundle", "policy", "weights", "kv_type", "depth", "gen", "threads", "reps", "warmup",
          "prefill_ms_per_token", "prefill_ms_std", "decode_ms_per_token", "decode_ms_std", "decode_ms_reps", "first_token_ms",
          "kv_bytes", "weights_bytes", "gb_per_s", "versions"}


def test_row_bytes_include_block_scales() -> None:
    # 192 values = SmolLM2's 3 KV heads x 64; q8_0/q4_0 blocks of 32 carry a 2-byte fp16 scale
    assert peer.row_bytes("f16", 192) == 384
    assert peer.row_bytes("q8_0", 192) == 6 * 34
    assert peer.row_bytes("q4_0", 192) == 6 * 18
    with pytest.raises(ValueError, match="blocks of 32"):
        peer.row_bytes("q8_0", 48)


def test_kv_shape_counts_k_and_v_per_layer() -> None:
    shape = peer.KvShape(n_layers=2, n_kv_heads=2, k_head_dim=64, v_head_dim=32)
    assert shape.bytes_per_token("f16") == 2 * (2 * 64 * 2 + 2 * 32 * 2)


def test_config_rejects_unknown_kv_type_and_rounds_ctx() -> None:
    with pytest.raises(ValueError, match="q3_k"):
        peer.PeerConfig(kv_types=("q3_k",))
    assert peer.PeerConfig(gen=64).n_ctx(512) == 768 and peer.PeerConfig(gen=16).n_ctx(240) == 256


def _llama_cpp_ready() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        return peer.default_gguf().is_file()
    except peer.PeerError:
        return False


@pytest.mark.skipif(not _llama_cpp_ready(), reason="llama_cpp or the SmolLM2 GGUF missing: see bench/requirements-peers.txt")
def test_tiny_run_schema_and_kv_bytes(tmp_path) -> None:
    out = tmp_path / "peer.json"
    res = CliRunner().invoke(peer.main, ["--depth", "16,32", "--gen", "3", "--reps", "2", "--warmup", "0",
                                         "--threads", "1", "--kv", "f16,q8_0,q4_0", "--json", "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())["results"]
    assert len(recs) == 6 and all(set(r) == SCHEMA for r in recs)
    assert all(r["engine"] == "llama.cpp" and r["weights"] == "Q4_1" and r["decode_ms_per_token"] > 0 for r in recs)
    kv = {(r["kv_type"], r["depth"]): r["kv_bytes"] for r in recs}
    for t in ("f16", "q8_0", "q4_0"):
        assert kv[(t, 32)] * 19 == kv[(t, 16)] * 35  # proportional to depth + gen
    assert kv[("f16", 16)] > kv[("q8_0", 16)] > kv[("q4_0", 16)]
    # SmolLM2-135M: 30 layers x (K + V) x 3 KV heads x 64 values at 2 bytes, 19 tokens
    assert kv[("f16", 16)] == 30 * 2 * 3 * 64 * 2 * 19
