"""A llama decoder forward over the packed cache, reusing a HF LlamaForCausalLM's modules.

One call processes a chunk of T new tokens for B sequences that share one cached prefix (B > 1
is used to score several continuations against the same context). The chunk attends to the
packed cache plus itself (causal, full precision); nothing is committed here: the session
commits the returned K/V once the policy has seen the chunk's features.

Attention runs either through the fused C++ kernel (``kvq::packed_attention``, runtime_ops/:
reads the packed codes directly) or through the blockwise PyTorch reference (attention.py);
``kernel="auto"`` takes the fused one when its library is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .attention import attend_blocks
from .cache import PackedKVCache
from .features import attention_variance
from .formats import quantize_query
from .hadamard import rotate
from .model import head_dim_of, mean_row, rms_norm


class ModelConfigError(ValueError):
    """The HF model does not fit the packed decoder."""


@dataclass
class ChunkOutput:
    logits: torch.Tensor | None  # [B, T, V] ("all"), [B, 1, V] ("last") or None
    k: torch.Tensor  # [layers, B, Hkv, T, D] post-RoPE keys, model basis (not rotated)
    v: torch.Tensor  # [layers, B, Hkv, T, D]
    attn_var: torch.Tensor | None  # [B, T] final-layer attention variance, head mean


class PackedLlama(nn.Module):
    """Runs ``model``'s weights; attention goes through a :class:`PackedKVCache`."""

    def __init__(self, model: LlamaForCausalLM, block_size: int = 1024, kernel: Literal["auto", "fused", "reference"] = "auto"):
        super().__init__()
        if kernel not in ("auto", "fused", "reference"):
            raise ValueError(f"kernel must be auto, fused or reference, got {kernel!r}")
        if kernel != "reference":
            from . import ops

            try:
                ops.load_library()
                kernel = "fused"
            except FileNotFoundError:
                if kernel == "fused":
                    raise
                kernel = "reference"
        self.kernel = kernel
        if getattr(model.config, "model_type", None) != "llama":
            raise ModelConfigError(f"expected a llama model, got '{getattr(model.config, 'model_type', type(model).__name__)}'")
        cfg = model.config
        self.model = model
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        self.scale = self.head_dim**-0.5
        self.block_size = block_size
        self.register_buffer("mean_row", mean_row(cfg.hidden_size), persistent=False)  # [1, hidden]: rms_norm's mean

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        cache: PackedKVCache,
        logits: Literal["all", "last", "none"] = "all",
        with_stats: bool = True,
    ) -> ChunkOutput:
        """ids: [B, T] new tokens at positions cache.seq_len .. cache.seq_len + T - 1."""
        b, t = ids.shape
        start = cache.seq_len
        if start + t > self.max_positions:
            raise ModelConfigError(f"position {start + t} exceeds the model's max_position_embeddings={self.max_positions}")
        m = self.model.model
        h = m.embed_tokens(ids)  # [B, T, hidden]
        pos = torch.arange(start, start + t).expand(b, t)
        cos, sin = m.rotary_emb(h, pos)
        rotated = cache.config.hadamard
        hq, hkv, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.num_heads // self.num_kv_heads
        ks, vs, attn_var = [], [], None
        if self.kernel == "fused":
            from .formats import BIT_WIDTHS
            from .ops import POOL_ARGS

            lengths = torch.tensor([cache.lengths.get(bits, 0) for bits in BIT_WIDTHS], dtype=torch.int64)
            buffers = dict(cache.named_buffers())
            pool_names = [n if n in buffers else None for n in POOL_ARGS]
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = rms_norm(h, layer.input_layernorm, self.mean_row)
            q = attn.q_proj(x).view(b, t, hq, d).transpose(1, 2)  # [B, Hq, T, D]
            k = attn.k_proj(x).view(b, t, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
            v = attn.v_proj(x).view(b, t, hkv, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            ks.append(k), vs.append(v)
            if rotated:  # the cache stores rotated K/V; attend in that basis, rotate back after
                q, k, v = rotate(q), rotate(k), rotate(v)
            last = i == self.num_layers - 1
            if self.kernel == "fused":
                pools = [None if n is None else buffers[n][i] for n in pool_names]
                o, sum_p2 = torch.ops.kvq.packed_attention(
                    q.float().contiguous(), k.float().contiguous(), v.float().contiguous(), lengths, *pools, self.scale, cache.config.group_size,
                    -1, cache.config.query_bits,
                )  # [B, Hq, T, D], [B, Hq, T]
            else:
                int8_query = cache.config.query_bits == 8  # the op's definition: int8 rows of q * scale, then no scale
                state = attend_blocks(
                    (quantize_query(q.float() * self.scale) if int8_query else q).reshape(b, hkv, g * t, d),  # query head h uses KV head h // G
                    cache.blocks(i, self.block_size),
                    k,
                    v,
                    1.0 if int8_query else self.scale,
                    with_stats=with_stats and last,
                )
                o = state.output().view(b, hq, t, d)
                sum_p2 = state.sum_p_squared().view(b, hq, t) if with_stats and last else None
            if rotated:
                o = rotate(o)
            if with_stats and last:
                n_keys = start + torch.arange(1, t + 1)
                attn_var = torch.stack([attention_variance(sp, n_keys) for sp in sum_p2])
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, hq * d))
            h = h + layer.mlp(rms_norm(h, layer.post_attention_layernorm, self.mean_row))
        out_logits = None
        if logits != "none":
            hs = rms_norm(h if logits == "all" else h[:, -1:], m.norm, self.mean_row)
            out_logits = self.model.lm_head(hs).float()
        return ChunkOutput(out_logits, torch.stack(ks), torch.stack(vs), attn_var)
