"""How much storing one token's K/V at b bits damages the model's later outputs.

``first_order_damage`` estimates it for every token and width from one full-precision pass:
quantizing token t perturbs, in every layer and head, the attention output of each later query
i (> t; a token sees itself at full precision in its own step) by, to first order,

    d o_i = p_it * ( dv_t + c_it * (v_t - o_i) ),   c_it = scale * q_i . dk_t

(the value error weighted by the attention weight, plus the softmax response to the score
error). The damage is the sum over layers, heads and later queries of |d o_i|^2, computed in
closed form from [H, T, T] matrices. ``exact_damage`` is the ground truth it approximates: the
summed KL divergence of the later next-token distributions when only token t is stored at b
bits (one forward per (t, b), so only for validation on samples).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .formats import fake_quantize
from .hadamard import rotate
from .model import head_dim_of


def stored(x: torch.Tensor, bits: int, hadamard: bool, group_size: int = 64) -> torch.Tensor:
    """x as the cache gives it back at ``bits`` (in the model basis)."""
    if hadamard:
        return rotate(fake_quantize(rotate(x), bits, group_size))
    return fake_quantize(x, bits, group_size)


def _dims(model: LlamaForCausalLM) -> tuple[int, int, int, float]:
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = head_dim_of(cfg)
    return hq, hkv, d, d**-0.5


def _qkv(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int, d: int):
    """One layer's post-RoPE q [Hq, T, D] and k, v [Hkv, T, D] for a batch-1 hidden state h [1, T, hidden]."""
    a, t = layer.self_attn, h.shape[1]
    x = layer.input_layernorm(h)
    q = a.q_proj(x).view(1, t, hq, d).transpose(1, 2)
    k = a.k_proj(x).view(1, t, hkv, d).transpose(1, 2)
    v = a.v_proj(x).view(1, t, hkv, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q[0], k[0], v[0]


def _finish_layer(layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Residual updates after attention: o [Hq, T, D] -> next hidden state [1, T, hidden]."""
    h = h + layer.self_attn.o_proj(o.transpose(0, 1).reshape(1, o.shape[1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


@torch.no_grad()
def first_order_damage(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    bits: tuple[int, ...] = (2, 4, 8, 16),
    hadamard: bool = True,
    group_size: int = 64,
    block: int = 256,
) -> torch.Tensor:
    """ids: [T] -> damage [T, len(bits)] (sum over layers, heads and later queries of |d o|^2).

    Queries are processed in blocks of ``block`` rows against the keys before them, and the sum
    over queries is expanded so each width costs two matmuls and a few [H, block, t] passes:
    |d o_i|^2 / p_it^2 = |dv|^2 + 2 c (dv.v_t - dv.o_i) + c^2 (|v_t|^2 - 2 o_i.v_t + |o_i|^2).
    """
    m, t = model.model, ids.numel()
    hq, hkv, d, scale = _dims(model)
    g = hq // hkv
    h = m.embed_tokens(ids[None])
    cos, sin = m.rotary_emb(h, torch.arange(t)[None])
    damage = torch.zeros(t, len(bits), dtype=torch.float64)
    for layer in m.layers:
        q, k, v = _qkv(layer, h, cos, sin, hq, hkv, d)  # [Hq|Hkv, T, D]
        kx, vx = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)  # [Hq, T, D]
        dks = [(stored(k, b, hadamard, group_size) - k).repeat_interleave(g, 0) for b in bits]
        dvs = [(stored(v, b, hadamard, group_size) - v).repeat_interleave(g, 0) for b in bits]
        vv = (vx * vx).sum(-1)  # [Hq, T]
        o = torch.empty_like(q)
        for i0 in range(0, t, block):
            i1 = min(i0 + block, t)
            qb = q[:, i0:i1]  # [Hq, B, D]
            s = (qb @ kx[:, :i1].transpose(-1, -2)) * scale  # [Hq, B, i1]
            rows = torch.arange(i0, i1)[:, None]
            cols = torch.arange(i1)[None]
            p = torch.softmax(s.masked_fill(cols > rows, float("-inf")), -1)
            ob = p @ vx[:, :i1]  # [Hq, B, D]
            o[:, i0:i1] = ob
            p2 = p * p * (cols < rows)  # only later queries feel token t's stored error
            ov = ob @ vx[:, :i1].transpose(-1, -2)  # [Hq, B, i1] o_i . v_t
            oo = (ob * ob).sum(-1, keepdim=True)  # [Hq, B, 1]
            for j in range(len(bits)):
                dk, dv = dks[j][:, :i1], dvs[j][:, :i1]
                c = (qb @ dk.transpose(-1, -2)) * scale  # [Hq, B, i1]
                w = p2 * c
                wc = w * c
                dvo = ob @ dv.transpose(-1, -2)
                per_head = (
                    ((dv * dv).sum(-1) * p2.sum(1))  # [Hq, i1]
                    + 2 * ((dv * vx[:, :i1]).sum(-1) * w.sum(1) - (w * dvo).sum(1))
                    + vv[:, :i1] * wc.sum(1) - 2 * (wc * ov).sum(1) + (wc * oo).sum(1)
                )
                damage[:i1, j] += per_head.sum(0).double()
        h = _finish_layer(layer, h, o)
    return damage


@torch.no_grad()
def exact_damage(model: LlamaForCausalLM, ids: torch.Tensor, token: int, bits: int, hadamard: bool = True, group_size: int = 64) -> float:
    """Sum over positions after ``token`` of KL(p_full || p_quantized) when only ``token``'s K/V
    (all layers) is stored at ``bits`` and every other token stays at full precision."""
    m, t = model.model, ids.numel()
    hq, hkv, d, scale = _dims(model)
    g = hq // hkv
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def run(perturb: bool) -> torch.Tensor:
        h = m.embed_tokens(ids[None])
        cos, sin = m.rotary_emb(h, torch.arange(t)[None])
        for layer in m.layers:
            q, k, v = _qkv(layer, h, cos, sin, hq, hkv, d)
            k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
            s = (q @ k.transpose(-1, -2)) * scale
            if perturb:  # later queries see token's stored K/V; the token itself sees its own exactly
                kq = stored(k[:, token], bits, hadamard, group_size)
                vq = stored(v[:, token], bits, hadamard, group_size)
                s_later = (q @ kq[:, :, None])[..., 0] * scale  # [Hq, i]
                s[:, token + 1 :, token] = s_later[:, token + 1 :]
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            o = p @ v
            if perturb:
                o[:, token + 1 :] += p[:, token + 1 :, token, None] * (vq - v[:, token])[:, None, :]
            h = _finish_layer(layer, h, o)
        return model.lm_head(m.norm(h))[0].float().log_softmax(-1)

    ref, pert = run(False), run(True)
    return float((ref.exp() * (ref - pert)).sum(-1)[token + 1 :].sum())
