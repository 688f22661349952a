"""The exportable decoder step: llama + packed mixed-precision cache + features + policy, one graph.

:class:`ExportableDecoder` does, in one ``forward(ids)``, what :class:`adaptive_kv.session.Session`
does for one chunk (forward, features, choose, commit), with all sequence state held in buffers
that the graph mutates in place, so ``torch.export`` records them as mutable buffers and an
ExecuTorch program keeps them between calls:

- the pools, named and shaped as :class:`~adaptive_kv.cache.PackedKVCache` names them
  (``k4``: uint8 [layers, Hkv, C_4, D/2], ``k4_scale``/``k4_zero``: fp16 [layers, Hkv, C_4, D/G],
  ``k16``: fp16 [layers, Hkv, C_16, D], ...);
- ``lengths`` int64 [4] (filled slots per width 2/4/8/16, the packed_attention argument),
  ``seq_len`` int64 [1], ``token_bits`` int8 [max_seq_len], ``spent_bits`` float64 [1];
- ``rarity_counts`` int64 [vocab] with ``rarity_sequence`` int64 [vocab] (the sequence number a
  count belongs to: a new sequence bumps ``sequence`` [1] instead of clearing the vocab-sized
  counts on every call), ``rarity_seen`` / ``rarity_distinct`` int64 [1].

The layers run the model's own linears on [T, C] rows; the norms (``model.rms_norm``) and RoPE
are written as ops XNNPACK takes, so each layer lowers to one delegate between two attention
calls (HF's mean.dim, rotate_half slices and symbolic-size views split it into five or six, and
every delegate costs export time). Attention is ``kvq::packed_attention`` over one layer's pools
plus the chunk (one node per layer);
packing is ``kvq::pack_rows`` (K and V per packed width; its ``active`` flag skips a width no
token of the chunk goes to). Writes are ``index_put_`` on the slot dimension, the form
ExecuTorch's reinplace pass turns into an in-place copy of just those rows.

Writing a data-dependent number of tokens into each pool with static shapes: every chunk token
writes one row into every pool. A token placed in pool b writes its row at its slot; the others
write bytes their target slot ends up holding anyway (the first placed token's row at its slot,
or, when pool b gets no token, the pool's own row at its fill level / last slot, read back), so
the write is row gathers plus one index_put_ per buffer, without an element-wise select (taking
only the tokens placed in b, a ``nonzero``, would give a data-dependent size, which ExecuTorch
1.5's passes fail to re-trace next to the price search's scan).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from adaptive_kv.cache import CacheConfig, CacheLayout, ContextOverflowError, PackedKVCache
from adaptive_kv.formats import BIT_WIDTHS
from adaptive_kv.hadamard import hadamard_matrix
from adaptive_kv.model import head_dim_of, mean_row, rms_norm
from adaptive_kv.ops import POOL_ARGS  # importing ops also registers torch.ops.kvq

from .graph_policy import graph_policy
from .placement import fallback_ranks, place


class ExportConfigError(ValueError):
    """A model, policy or layout the exportable decoder cannot serve."""


# The bookkeeping buffers (token_bits: int8 [max_seq_len], the width each position is stored at):
# small, and the only state a new sequence must start from zero (pools are read below lengths only).
STATE_BUFFERS: tuple[str, ...] = (
    "lengths", "seq_len", "token_bits", "spent_bits", "rarity_counts", "rarity_sequence", "rarity_seen", "rarity_distinct", "sequence",
)
# What forward zeroes when input_pos is 0 (token_bits is written before it is read; the counts are
# dropped by bumping `sequence`).
RESTART_BUFFERS: tuple[str, ...] = ("lengths", "seq_len", "spent_bits", "rarity_seen", "rarity_distinct")


def feed_in_chunks(step, ids: torch.Tensor, used: int, max_seq_len: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N] through ``step`` (ids [T] -> (logits [T, V], bits [T])) in chunks of chunk_size,
    all or nothing: -> (last logits [V], bits [N]). ``used``: tokens already in the cache."""
    ids = ids.reshape(-1)
    if used + ids.numel() > max_seq_len:
        raise ContextOverflowError(f"{ids.numel()} tokens on top of {used} exceed max_seq_len={max_seq_len}")
    bits = []
    for chunk in ids.split(chunk_size):
        logits, b = step(chunk)
        bits.append(b)
    return logits[-1], torch.cat(bits)


class ExportableDecoder(nn.Module):
    """One decoder step of ``model`` over a packed cache laid out for ``policy``.

    forward(tokens [1, T], input_pos [1]) -> logits [1, T, V] float32, 1 <= T <= chunk_size: the
    signature ExecuTorch's LLM runners call. The tokens sit at positions seq_len .. seq_len + T - 1
    of the program's own cache; input_pos must be that seq_len, or 0 to start a new sequence (what
    a stock runner passes after its reset). The width each token was stored at lands in
    ``token_bits`` (see :meth:`step`).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        policy,
        max_seq_len: int,
        *,
        layout: CacheLayout | None = None,
        chunk_size: int = 32,
        group_size: int = 64,
        hadamard: bool = True,
        query_bits: int = 32,
    ):
        super().__init__()
        cfg = model.config
        if getattr(cfg, "model_type", None) != "llama":
            raise ExportConfigError(f"expected a llama model, got '{getattr(cfg, 'model_type', type(model).__name__)}'")
        if max_seq_len > cfg.max_position_embeddings:
            raise ExportConfigError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
        if not 1 <= chunk_size <= max_seq_len:
            raise ExportConfigError(f"chunk_size={chunk_size} must be in 1..max_seq_len={max_seq_len}")
        in_graph = graph_policy(policy)  # raises for policies with no in-graph form (sink-recent, oracle)
        layout = layout if layout is not None else policy.layout(max_seq_len)
        if layout.demote is not None:
            raise ExportConfigError(
                f"layout demotes {layout.demote[0]}-bit tokens to {layout.demote[1]} bits (sink-recent); the exported cache "
                "implements the fallback layouts only: export fp16, static-{8,4,2}, rule or learned"
            )
        if layout.max_seq_len != max_seq_len:
            raise ExportConfigError(f"layout is for max_seq_len={layout.max_seq_len}, not {max_seq_len}")
        self.model = model
        self.policy = in_graph
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = max_seq_len
        self.chunk_size = chunk_size
        self.scale = self.head_dim**-0.5
        self.cache_config = CacheConfig(self.num_layers, self.num_kv_heads, self.head_dim, layout, group_size, hadamard, query_bits)
        self.group_size = group_size
        self.hadamard = hadamard
        self.query_bits = query_bits
        self.pool_bits = layout.pool_bits  # widths with capacity > 0, ascending
        self.capacities = tuple(layout.capacity(b) for b in self.pool_bits)

        # ---- the packed cache: PackedKVCache's own buffers (same names, shapes, dtypes, token_bits too)
        for name, buf in PackedKVCache(self.cache_config).named_buffers():
            self.register_buffer(name, buf)
        self.pool_names = [n for n in POOL_ARGS if n in self._buffers]  # packed_attention order
        self.register_buffer("lengths", torch.zeros(len(BIT_WIDTHS), dtype=torch.int64))  # [4] filled slots of 2/4/8/16
        self.register_buffer("seq_len", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("spent_bits", torch.zeros(1, dtype=torch.float64))  # sum of bits/value over cached tokens
        self.register_buffer("rarity_counts", torch.zeros(self.vocab_size, dtype=torch.int64))
        self.register_buffer("rarity_sequence", torch.zeros(self.vocab_size, dtype=torch.int64))
        self.register_buffer("sequence", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("rarity_seen", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("rarity_distinct", torch.zeros(1, dtype=torch.int64))

        # ---- constants
        if hadamard:
            self.register_buffer("rotation", hadamard_matrix(self.head_dim), persistent=False)  # [D, D]
        self.register_buffer("fallback_ranks", fallback_ranks(self.pool_bits), persistent=False)  # [4, P]
        self.register_buffer("pool_caps", torch.tensor(self.capacities, dtype=torch.int64), persistent=False)  # [P]
        self.register_buffer("pool_width", torch.tensor(self.pool_bits, dtype=torch.int64), persistent=False)  # [P]
        self.register_buffer("pool_lengths_index", torch.tensor([BIT_WIDTHS.index(b) for b in self.pool_bits]), persistent=False)  # [P]
        self.register_buffer("pool_onehot", torch.nn.functional.one_hot(self.pool_lengths_index, len(BIT_WIDTHS)), persistent=False)  # [P, 4]
        cost = [self.cache_config.row_format(b).bits_per_value for b in self.pool_bits]
        self.register_buffer("pool_cost", torch.tensor(cost, dtype=torch.float64), persistent=False)  # [P] bits/value
        self.register_buffer("mean_row", mean_row(cfg.hidden_size), persistent=False)  # [1, C]: rms_norm's mean
        half = torch.arange(self.head_dim // 2)
        turn = torch.zeros(self.head_dim, self.head_dim)  # [D, D]: rotate_half(x) = x @ turn.T
        turn[half, half + self.head_dim // 2] = -1.0
        turn[half + self.head_dim // 2, half] = 1.0
        self.register_buffer("rotate_half", turn, persistent=False)

    # ---- host-side helpers (eager) ------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> torch.Tensor:
        """Start a new sequence: zero the bookkeeping (pools are reused, never read past lengths).
        Also the body of the exported ``reset`` method; returns seq_len [1]."""
        for name in STATE_BUFFERS:
            getattr(self, name).zero_()
        return self.seq_len.clone()

    def state(self) -> tuple[torch.Tensor, ...]:
        """Copies of every state buffer, in :meth:`state_names` order (the exported ``state`` method)."""
        return tuple(getattr(self, n).clone() for n in self.state_names())

    def state_names(self) -> list[str]:
        return self.pool_names + list(STATE_BUFFERS)

    def token_widths(self) -> torch.Tensor:
        """Copy of token_bits: int8 [max_seq_len], the width each position < seq_len is stored at
        (later entries are stale); the body of the exported ``token_bits`` method."""
        return self.token_bits.clone()

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T] at the end of the sequence -> (logits [T, V], bits [T] int64 widths stored)."""
        ids = ids.reshape(-1)
        self.check_room(ids.numel())
        start = int(self.seq_len)
        logits = self(ids[None], self.seq_len.clone())
        return logits[0], self.token_bits[start : start + ids.numel()].long()

    def check_room(self, t: int) -> None:
        """Raise ContextOverflowError unless T more tokens fit (the graph itself cannot raise)."""
        n = int(self.seq_len)
        if not 1 <= t <= self.chunk_size:
            raise ValueError(f"a step takes 1..{self.chunk_size} tokens (the exported chunk size), got {t}")
        if n + t > self.max_seq_len:
            raise ContextOverflowError(f"context of {n + t} tokens exceeds max_seq_len={self.max_seq_len}; export with a larger max sequence length")

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N] in chunks of chunk_size, each committed, as Session.feed -> (last logits [V], bits [N])."""
        return feed_in_chunks(self.step, ids, int(self.seq_len), self.max_seq_len, self.chunk_size)

    # ---- the graph ---------------------------------------------------------------------------
    def _pools(self) -> list[torch.Tensor | None]:
        """Every layer's pools in kvq::packed_attention argument order (absent widths None); the op
        takes the layer index, so the program reads them in place instead of copying a slice."""
        return [self._buffers.get(n) for n in POOL_ARGS]

    @staticmethod
    def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] (contiguous) @ w.T as a linear on 2-d rows [T*H, D]: one XNNPACK
        fully-connected op with a constant weight (a matmul lowers to expand + batched matmul),
        and 2-d keeps export's decompositions off the reshape arithmetic of a symbolic T."""
        return torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), w).view(-1, x.shape[1], x.shape[2])

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] @ H (H is symmetric)."""
        return self._per_head(x, self.rotation) if self.hadamard else x

    def _rarity(self, ids: torch.Tensor, now: dict[str, torch.Tensor]) -> torch.Tensor:
        """RarityTracker.observe: ids [T] -> rarity [T], then counts them (buffer updates).
        ``now``: the bookkeeping of this call (see :meth:`_bookkeeping`)."""
        t = ids.shape[0]
        order = torch.arange(t)
        earlier = order[None, :] < order[:, None]  # [T, T] [i, j]: j before i
        equal = ids[:, None] == ids[None, :]  # [T, T]
        same = equal & earlier
        current = self.rarity_sequence.index_select(0, ids) == now["sequence"]  # [T] counted in this sequence
        prev = torch.where(current, self.rarity_counts.index_select(0, ids), 0)  # [T] counts before the chunk
        c = prev + same.long().sum(1)
        first_here = (prev == 0) & ~same.any(1)  # new to the sequence at i
        new_before = torch.cumsum(first_here.long(), 0) - first_here.long()
        n = now["rarity_seen"] + order
        v_obs = now["rarity_distinct"] + new_before
        rarity = -torch.log((c + 1).float() / (n + v_obs + 1).float())  # [T]
        # duplicates in the chunk all write the same final count, so write order does not matter
        self.rarity_counts.index_put_((ids,), prev + equal.long().sum(1))
        self.rarity_sequence.index_put_((ids,), now["sequence"].expand(t))
        self.rarity_seen.copy_(now["rarity_seen"] + t)
        self.rarity_distinct.copy_(now["rarity_distinct"] + first_here.long().sum())
        return rarity

    def _targets(self, p: int, pool: torch.Tensor, slot: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pool p's writes for this chunk: (dest [T] slots, src [T] rows of cat(chunk rows, anchor row), anchor [1] slot).

        pool, slot: [T] placement; fill: 0-d filled slots of pool p before the chunk.
        Every chunk token writes one row into every pool (static shapes): a token placed here
        writes its own row at its slot; any other writes bytes its target slot ends up holding
        anyway: the row of the first token placed here, at that token's slot (duplicate indices,
        equal values), or, when no token is, the pool's own row at the anchor slot (the fill
        level, or the last slot of a full pool), read back unchanged. So the write is two row
        gathers and one index_put_, with no element-wise select over the rows."""
        t = pool.shape[0]
        mine = pool == p  # [T]
        some = mine.any()  # 0-d
        first = mine.long().argmax(0, keepdim=True)  # [1]: the first token placed here (0 when none is)
        anchor = fill.clamp(max=self.capacities[p] - 1).reshape(1)  # [1]
        dest = torch.where(mine, slot, torch.where(some, slot.index_select(0, first), anchor))  # [T]
        src = torch.where(mine, torch.arange(t), torch.where(some, first, t))  # [T] t: the anchor row
        return dest, src, anchor

    def _pack(self, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor) -> list[torch.Tensor]:
        """The chunk packed at every packed width (in pool order, 6 tensors per width: k codes,
        k scale, k zero, v codes, v scale, v zero; [layers, Hkv, T, D*b/8 | D/G]). A width no
        token of the chunk goes to (``pool`` [T]: each token's pool) gets zeros from pack_rows'
        ``active`` flag, never written (see _targets): a decode step packs its token at one width,
        not three, and the graph has no cond (nested conds, each branch re-traced by every
        lowering pass, were an eighth of the export time)."""
        g = self.group_size
        out = []
        for p, b in enumerate(self.pool_bits):
            if b != 16:
                active = (pool == p).any()
                out += [*torch.ops.kvq.pack_rows(k, b, g, active), *torch.ops.kvq.pack_rows(v, b, g, active)]
        return out

    def _write(self, name: str, rows: torch.Tensor, dest: torch.Tensor, src: torch.Tensor, anchor: torch.Tensor) -> None:
        """rows: [layers, Hkv, T, X] every chunk token in buffer ``name``'s format -> its slots (see _targets)."""
        buf = getattr(self, name)  # [layers, Hkv, C, X]
        rows = torch.cat([rows, buf.index_select(2, anchor)], 2).index_select(2, src)  # [layers, Hkv, T, X]
        # index_put_ on the slot dim, called directly: `buf[:, :, dest] = x` would strip x's leading
        # size-1 dims (1-layer models), which ExecuTorch's in-place index_put_ kernel rejects
        torch.ops.aten.index_put_.default(buf, [None, None, dest], rows)

    def _commit(self, k: torch.Tensor, v: torch.Tensor, want: torch.Tensor, now: dict[str, torch.Tensor]) -> torch.Tensor:
        """Place and pack the chunk. k/v: [layers, Hkv, T, D] in the stored basis; want: [T] index
        into BIT_WIDTHS -> [T] int64 widths used (PackedKVCache.commit's fallback on overflow)."""
        t = k.shape[2]
        fill = now["lengths"].index_select(0, self.pool_lengths_index)  # [P]
        pool, slot = place(want, fill, self.pool_caps, self.fallback_ranks)  # [T], [T]
        packed = iter(self._pack(k, v, pool))
        for p, b in enumerate(self.pool_bits):
            targets = self._targets(p, pool, slot, fill[p])
            if b == 16:
                self._write("k16", k.half(), *targets)
                self._write("v16", v.half(), *targets)
                continue
            for kv in "kv":
                for suffix in ("", "_scale", "_zero"):
                    self._write(f"{kv}{b}{suffix}", next(packed), *targets)
        # bookkeeping, after every read of the old state
        placed = (pool[:, None] == torch.arange(len(self.pool_bits))[None, :]).long().sum(0)  # [P]
        self.lengths.copy_(now["lengths"] + placed @ self.pool_onehot)  # [P] @ [P, 4] -> [4]
        used = self.pool_width[pool]  # [T]
        self.token_bits.index_put_((now["seq_len"] + torch.arange(t),), used.to(torch.int8))
        self.spent_bits.copy_(now["spent_bits"] + self.pool_cost[pool].sum())
        self.seq_len.copy_(now["seq_len"] + t)
        self.sequence.copy_(now["sequence"])
        return used

    def _bookkeeping(self, input_pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """This call's view of the small state: zeroed when input_pos is 0 (reset() inside the
        graph), and a new sequence number. Values, not in-place updates: the buffers are written
        once, at the end of the call (an in-place update followed by another write of the same
        buffer miscompiles to garbage in ExecuTorch 1.5's memory planning)."""
        fresh = input_pos == 0  # [1]
        now = {name: getattr(self, name) * (~fresh).to(getattr(self, name).dtype) for name in RESTART_BUFFERS}
        now["sequence"] = self.sequence + fresh.long()
        return now

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """apply_rotary_pos_emb on x [T, H, D] (cos, sin: [T, 1, D]), rotate_half as a linear with a
        signed permutation (exact: one +-1 term per output), not slices and a cat."""
        return x * cos + self._per_head(x, self.rotate_half) * sin

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """ids: [1, T] int64, input_pos: [1] int64 -> logits [1, T, V] float32.

        The caller keeps seq_len + T <= max_seq_len (see :meth:`check_room`) and passes
        input_pos = seq_len (or 0: new sequence): the graph cannot raise on data, and a call past
        the end fails (token_bits index out of range) with the cache state undefined. How the
        layers are written (one XNNPACK delegate each): the module docstring."""
        t = ids.shape[1]
        now = self._bookkeeping(input_pos)
        torch._check(t <= self.chunk_size, lambda: f"a step takes at most chunk_size={self.chunk_size} tokens, got {t}")
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        m = self.model.model
        start = now["seq_len"]  # [1]
        positions = start + torch.arange(t)  # [T]
        h = m.embed_tokens(ids[0])  # [T, C]
        cos, sin = m.rotary_emb(h, positions[None])  # [1, T, D]
        cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
        ks, vs, sum_p2 = [], [], None
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = rms_norm(h, layer.input_layernorm, self.mean_row)
            q = self._rope(attn.q_proj(x).view(-1, hq, d), cos, sin)  # [T, Hq, D]
            k = self._rope(attn.k_proj(x).view(-1, hkv, d), cos, sin)  # [T, Hkv, D]
            v = attn.v_proj(x).view(-1, hkv, d)
            # the cache holds rotated K/V: attend in that basis, rotate the output back (H = H^T = H^-1)
            q, k, v = (self._rotate(y).transpose(0, 1) for y in (q, k, v))  # [H, T, D]
            ks.append(k), vs.append(v)
            o, sum_p2 = torch.ops.kvq.packed_attention(
                q[None], k[None], v[None], now["lengths"], *self._pools(), self.scale, self.group_size, i, self.query_bits
            )  # o: [1, Hq, T, D], sum_p2: [1, Hq, T]
            o = o[0].transpose(0, 1)  # [T, Hq, D], strided: rotated as 3-d rows (flat rows would need a copy)
            o = torch.nn.functional.linear(o, self.rotation) if self.hadamard else o
            h = h + attn.o_proj(o.reshape(-1, hq * d))
            h = h + layer.mlp(rms_norm(h, layer.post_attention_layernorm, self.mean_row))
        logits = self.model.lm_head(rms_norm(h, m.norm, self.mean_row))  # [T, V]
        logits = logits if logits.dtype == torch.float32 else logits.float()

        # ---- features, as Session.features computes them (sum_p2 is the final layer's)
        feats = {"rarity": self._rarity(ids[0], now), "position": positions.float()}
        needs = set(self.policy.needs)
        if needs & {"entropy", "confidence"}:
            feats["entropy"], feats["confidence"] = torch.ops.kvq.logit_stats(logits)  # [T] each
        if "attn_var" in needs:
            n = (start + torch.arange(1, t + 1)).float()  # [T] keys each query sees
            feats["attn_var"] = (sum_p2[0] / n - 1.0 / (n * n)).mean(0)  # features.attention_variance
        want = self.policy(feats, now["spent_bits"], start + t)  # [T] index into BIT_WIDTHS

        # ---- commit
        self._commit(torch.stack(ks), torch.stack(vs), want, now)  # stacks: [layers, Hkv, T, D]
        return logits[None]  # [1, T, V]
