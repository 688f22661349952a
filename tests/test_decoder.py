"""The packed decoder against HF's own forward, on the tiny random llama."""

import pytest
import torch

from adaptive_kv.formats import fake_quantize
from adaptive_kv.hadamard import rotate
from adaptive_kv.policy import StaticPolicy, make_policy
from adaptive_kv.session import Session, SessionConfig


def ids(n, seed=0):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fp16_policy_reproduces_hf_logits_and_greedy_tokens(tiny_model, tiny_decoder, chunk):
    prompt = ids(40)
    with torch.no_grad():
        ref = tiny_model(prompt[None]).logits[0]
        hf_tokens = tiny_model.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    s = Session(tiny_decoder, make_policy("fp16"), SessionConfig(max_seq_len=128, chunk_size=chunk))
    logits = s.feed(prompt, logits="all")
    assert (logits - ref).abs().max() <= 1e-3
    s.reset()
    assert list(s.generate(prompt, 12)) == hf_tokens


def test_one_decode_step_matches_hf_with_its_own_cache(tiny_model, tiny_decoder):
    prompt = ids(20, seed=3)
    with torch.no_grad():
        out = tiny_model(prompt[None, :-1], use_cache=True)
        step = tiny_model(prompt[None, -1:], past_key_values=out.past_key_values).logits[0, -1]
    s = Session(tiny_decoder, make_policy("fp16"), SessionConfig(max_seq_len=64))
    s.feed(prompt[:-1])
    assert (s.feed(prompt[-1:], logits="last") - step).abs().max() <= 1e-3


def _naive_logits(model, prompt, bits, chunk, hadamard):
    """Reference: HF modules with plain attention over fake-quantized K/V of earlier chunks."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, n = model.model, prompt.numel()
    h = m.embed_tokens(prompt[None])
    cos, sin = m.rotary_emb(h, torch.arange(n)[None])
    for layer in m.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_proj(x).view(1, n, 4, 64).transpose(1, 2)
        k = a.k_proj(x).view(1, n, 2, 64).transpose(1, 2)
        v = a.v_proj(x).view(1, n, 2, 64).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        quant = (lambda t: rotate(fake_quantize(rotate(t), bits))) if hadamard else (lambda t: fake_quantize(t, bits))
        kq, vq = quant(k), quant(v)
        outs = []
        for i in range(n):
            c0 = (i // chunk) * chunk  # keys before the chunk are stored, inside it full precision
            kk = torch.cat([kq[:, :, :c0], k[:, :, c0 : i + 1]], 2).repeat_interleave(2, 1)
            vv = torch.cat([vq[:, :, :c0], v[:, :, c0 : i + 1]], 2).repeat_interleave(2, 1)
            p = torch.softmax(q[:, :, i : i + 1] @ kk.transpose(-1, -2) / 8.0, -1)
            outs.append(p @ vv)
        o = torch.cat(outs, 2).transpose(1, 2).reshape(1, n, 256)
        h = h + a.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h))[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("hadamard", [False, True])
def test_quantized_prefill_matches_a_naive_reference(tiny_model, tiny_decoder, bits, hadamard):
    prompt, chunk = ids(24, seed=1), 8
    s = Session(tiny_decoder, StaticPolicy(bits), SessionConfig(max_seq_len=64, chunk_size=chunk, hadamard=hadamard))
    with torch.no_grad():
        ref = _naive_logits(tiny_model, prompt, bits, chunk, hadamard)
    assert (s.feed(prompt, logits="all") - ref).abs().max() <= 1e-3


def test_quantization_damage_grows_as_bits_shrink(tiny_model, tiny_decoder):
    prompt = ids(96, seed=2)
    with torch.no_grad():
        ref = tiny_model(prompt[None]).logits[0].log_softmax(-1)
    kl = {}
    for b in (2, 4, 8):
        s = Session(tiny_decoder, StaticPolicy(b), SessionConfig(max_seq_len=128, chunk_size=8))
        lp = s.feed(prompt, logits="all").log_softmax(-1)
        kl[b] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert kl[8] < kl[4] < kl[2]


def test_attention_variance_feature_matches_hf_attention_weights(tiny_model, tiny_decoder):
    prompt = ids(20, seed=4)
    tiny_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = tiny_model(prompt[None], output_attentions=True).attentions[-1][0]  # [H, T, T]
    finally:
        tiny_model.config._attn_implementation = "sdpa"
    n = torch.arange(1, 21).float()
    ref = ((att * att).sum(-1) / n - 1 / n**2).mean(0)
    s = Session(tiny_decoder, make_policy("fp16"), SessionConfig(max_seq_len=64, chunk_size=6))
    got = []
    for c in prompt.split(6):
        out = s.forward(c, logits="all")
        out_var = s.decoder(c[None], s.cache, logits="none", with_stats=True).attn_var[0]
        got.append(out_var)
        s.commit(out, c)
    assert torch.allclose(torch.cat(got), ref, atol=1e-4)


def test_context_longer_than_max_seq_len_is_a_clear_error(tiny_decoder):
    from adaptive_kv.cache import ContextOverflowError

    s = Session(tiny_decoder, make_policy("static-4"), SessionConfig(max_seq_len=32))
    with pytest.raises(ContextOverflowError, match="exceed max_seq_len=32"):
        s.feed(ids(40))
    assert s.seq_len == 0
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Session(tiny_decoder, make_policy("fp16"), SessionConfig(max_seq_len=10**6))


@pytest.mark.parametrize("policy,query_bits", [("static-4", 32), ("rule", 32), ("learned-tiny", 32), ("static-4", 8), ("learned-tiny", 8)])
def test_fused_kernel_and_reference_paths_agree(tiny_model, policy, query_bits):
    """The C++ kvq::packed_attention path vs the blockwise PyTorch reference, through whole sessions."""
    from adaptive_kv.controller import ControllerMeta, PrecisionController
    from adaptive_kv.decoder import PackedLlama
    from adaptive_kv.policy import LearnedPolicy

    try:
        fused = PackedLlama(tiny_model, kernel="fused")
    except FileNotFoundError as e:
        pytest.fail(f"kvq kernel library missing: {e}")
    reference = PackedLlama(tiny_model, kernel="reference")
    if policy == "learned-tiny":
        torch.manual_seed(0)
        pol = LearnedPolicy(PrecisionController(ControllerMeta(class_fractions=(0.3, 0.3, 0.2, 0.2), budget_bits=5.0)).eval())
    else:
        pol = make_policy(policy)
    runs = []
    for dec in (fused, reference):
        s = Session(dec, pol, SessionConfig(max_seq_len=96, chunk_size=9, query_bits=query_bits))
        logits = s.feed(ids(50, seed=5), logits="all")
        steps = [s.feed(torch.tensor([t]), logits="last") for t in ids(6, seed=6)]
        runs.append((logits, torch.stack(steps), s.cache.stored_bits()))
    (lf, sf, bf), (lr, sr, br) = runs
    assert (lf - lr).abs().max() <= 1e-3 and (sf - sr).abs().max() <= 1e-3
    assert torch.equal(bf, br)
