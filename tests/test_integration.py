"""A few checks on the real SmolLM2-135M-Instruct (loaded once, ~30 s)."""

import json

import pytest
import torch
from click.testing import CliRunner

from adaptive_kv.decoder import PackedLlama
from adaptive_kv.policy import make_policy
from adaptive_kv.session import Session, SessionConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol(real_model):
    model, tok = real_model
    return model, tok, PackedLlama(model)


def test_smollm2_dimensions(smol):
    model, _, dec = smol
    assert (dec.num_layers, dec.num_heads, dec.num_kv_heads, dec.head_dim) == (30, 9, 3, 64)
    s = Session(dec, make_policy("static-4"), SessionConfig(max_seq_len=8192))
    assert s.cache.config.values_per_token == 11520
    assert s.cache.nbytes() == 8192 * 11520 * 4.5 / 8  # 53 MB for 8K tokens at 4-bit + scales


def test_fp16_policy_matches_hf_on_smollm2(smol):
    model, tok, dec = smol
    ids = torch.tensor(tok.encode("The capital of France is", add_special_tokens=False))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
        hf = model.generate(ids[None], max_new_tokens=8, do_sample=False)[0, ids.numel() :].tolist()
    s = Session(dec, make_policy("fp16"), SessionConfig(max_seq_len=128, chunk_size=4))
    diff = (s.feed(ids, logits="all") - ref).abs().amax(-1)
    # The first chunk reads nothing from the cache: the decoder itself matches HF to fp32 noise.
    assert diff[:4].max() <= 1e-3
    # Later chunks read K/V stored as fp16 (relative rounding 2^-11): logits move by a few 1e-3.
    assert diff.max() <= 1e-2
    s.reset()
    out = list(s.generate(ids, 8))
    assert out == hf and tok.decode(out).startswith(" Paris")


def test_static4_is_close_to_fp16_static2_is_not(smol):
    model, tok, dec = smol
    with torch.no_grad():
        text = "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of Constantinople. " * 4
        ids = torch.tensor(tok.encode(text, add_special_tokens=False))
        ref = model(ids[None]).logits[0].log_softmax(-1)
    kl = {}
    for p in ("static-8", "static-4", "static-2"):
        s = Session(dec, make_policy(p), SessionConfig(max_seq_len=256, chunk_size=16))
        lp = s.feed(ids, logits="all").log_softmax(-1)
        kl[p] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert kl["static-8"] < kl["static-4"] < kl["static-2"]
    assert kl["static-4"] < 0.05


def test_hellaswag_through_the_cli(smol, monkeypatch):
    model, tok, _ = smol
    monkeypatch.setattr("adaptive_kv.model.load_model", lambda spec=None, dtype=None: (model, tok))
    from export.cli import main

    res = CliRunner().invoke(main, ["eval", "--task", "hellaswag", "--limit", "4", "--policy", "fp16,static-4", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("{") :])["results"]
    assert [r["policy"] for r in rows] == ["fp16", "static-4"] and all(r["n"] == 4 for r in rows)
    assert rows[0]["kv_bytes_per_token"] == 23040 and rows[1]["kv_bytes_per_token"] == 6480
