"""The real SmolLM2-135M exported to a .pte (fp32 and 8da4w weights) and run in executorch.runtime.

Each export takes minutes on 2 cores (XNNPACK lowering dominates); one short prompt each.
"""

from __future__ import annotations

import pytest
import torch

from adaptive_kv import ops
from adaptive_kv.model import model_id
from adaptive_kv.policy import make_policy
from export.pte import PteConfig, build_decoder, export_pte
from export.pte_runner import PteDecoder

pytestmark = pytest.mark.integration

PROMPT = "Give me three tips for staying healthy."
MAX_SEQ, NEW = 128, 12


def prompt_ids(tok) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    return torch.tensor(list(ids["input_ids"] if hasattr(ids, "keys") else ids))


def teacher_forced(dec, ids: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ids, then feed ``tokens`` one by one -> (logits [1 + len(tokens), V], bits [N])."""
    logits, bits = dec.feed(ids)
    rows, widths = [logits], [bits]
    for t in tokens:
        lg, b = dec.step(torch.tensor([t]))
        rows.append(lg[-1]), widths.append(b)
    return torch.stack(rows), torch.cat(widths)


@pytest.fixture(scope="module")
def smol(real_model):
    ops.load_library()
    model, tok = real_model
    return model, tok


def test_fp32_pte_matches_eager_greedy(smol, tmp_path):
    """fp16 cache: the .pte and eager PyTorch agree token for token (XNNPACK sums in another order
    than ATen: logits differ by ~1e-4 per call, fp16 storage keeps that from growing)."""
    model, tok = smol
    policy = make_policy("fp16")
    report = export_pte(model, tok, policy, MAX_SEQ, "fp32", tmp_path / "smol.pte")
    pte, ids = PteDecoder(report.path), prompt_ids(tok)
    tokens = pte.generate(ids, NEW)
    eager = build_decoder(model, policy, PteConfig(max_seq_len=MAX_SEQ))
    want = eager.feed(ids)[0]
    ref_tokens = []
    for _ in range(len(tokens)):
        ref_tokens.append(int(want.argmax()))
        want = eager.step(torch.tensor(ref_tokens[-1:]))[0][-1]
    assert tokens == ref_tokens
    pte.reset()
    eager.reset()
    (lp, bp), (le, be) = teacher_forced(pte, ids, tokens), teacher_forced(eager, ids, tokens)
    assert (lp - le).abs().max() <= 1e-2 and torch.equal(bp, be)


def test_8da4w_learned_pte_runs_the_quantized_model(smol, tmp_path):
    """int4 weights + the learned controller in-graph. Not bit-identical to eager: XNNPACK and
    torchao round int8 activations differently, and a 2/4-bit cache turns such differences into
    other codes (see the closing note of issue 4); the .pte must still be the quantized model."""
    model, tok = smol
    policy = make_policy("learned", model_id=model_id(model))
    report = export_pte(model, tok, policy, MAX_SEQ, "8da4w", tmp_path / "smol-8da4w.pte")
    assert report.bytes < 0.4 * 652e6  # int4 linears (the tied fp32 embedding stays)
    pte, ids = PteDecoder(report.path), prompt_ids(tok)
    tokens = pte.generate(ids, NEW)
    pte.reset()
    lp, bp = teacher_forced(pte, ids, tokens)
    lq, bq = teacher_forced(build_decoder(model, policy, PteConfig(max_seq_len=MAX_SEQ, weights="8da4w")), ids, tokens)
    lf, _ = teacher_forced(build_decoder(model, policy, PteConfig(max_seq_len=MAX_SEQ)), ids, tokens)
    assert torch.isfinite(lp).all()
    assert (lp - lq).abs().mean() < (lf - lq).abs().mean()  # nearer the quantized model than fp32 is
    assert len(set(bp.tolist())) > 1  # the controller mixes widths in the program
    # Greedy choices are NOT asserted: on this prompt only 6 of 11 teacher-forced top-1 choices
    # agreed with torchao's eager 8da4w (issue 4 closing note).


def test_onnx_learned_step_matches_eager_from_the_same_state(smol, tmp_path):
    """SmolLM2 + the bundled learned controller as ONNX in onnxruntime: the prompt's chunks and 12
    greedy steps, each from the eager decoder's own state (handed to the ONNX model as its
    past.* inputs): logits within 1e-2, the same widths, the same written cache bytes up to a
    rounding-boundary code."""
    from export.onnx_export import export_onnx
    from export.onnx_runner import OnnxDecoder

    model, tok = smol
    eager = build_decoder(model, make_policy("learned", model_id=model_id(model)), PteConfig(max_seq_len=MAX_SEQ))
    export_onnx(eager, tmp_path / "model.onnx")
    onnx = OnnxDecoder(tmp_path / "model.onnx")
    ids = prompt_ids(tok)
    steps = list(ids.split(eager.chunk_size))
    widths = set()
    for i in range(len(steps) + NEW):
        x = steps[i] if i < len(steps) else logits[-1].argmax().reshape(1)  # noqa: F821 (set below)
        onnx.restore(({n: getattr(eager, n).numpy().copy() for n in onnx.names}, int(eager.seq_len)))
        got_logits, got_bits = onnx.step(x)
        logits, bits = eager.step(x)
        assert (got_logits - logits).abs().max().item() <= 1e-2
        assert torch.equal(got_bits, bits)
        widths |= set(bits.tolist())
        state = onnx.state()
        for n in eager.pool_names:
            assert (state[n] != getattr(eager, n)).sum().item() <= 8, n  # a few bytes of one rounding-boundary flip
    assert len(widths) > 1  # the controller really mixes widths
