"""Attention over a mixed-precision packed cache: blockwise, merged with log-sum-exp.

Keys already carry RoPE, so attention does not depend on where a key sits in memory: each
precision pool is a dense buffer visited block by block (dequantized one block at a time,
never the whole cache), and the current chunk's full-precision K/V is one more block with a
causal mask. Blocks are merged with the online-softmax recurrence (running max ``m``,
normalizer ``l``, unnormalized output ``acc``); ``l2`` accumulates sum(exp(2(s - m))) so the
attention variance feature comes out of the same pass.

Layout: queries are grouped by KV head, ``q: [B, Hkv, G*T, D]`` with row ``g*T + t``, so one
matmul per block serves all G query heads that share a KV head (GQA).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class SoftmaxState:
    """Running state of a streamed softmax for q: [B, Hkv, R, D] (R = G*T rows)."""

    m: torch.Tensor  # [B, Hkv, R] running max of scores
    l: torch.Tensor  # [B, Hkv, R] sum exp(s - m)
    acc: torch.Tensor  # [B, Hkv, R, D] sum exp(s - m) * v
    l2: torch.Tensor | None  # [B, Hkv, R] sum exp(2(s - m)), only when stats are wanted

    @classmethod
    def empty(cls, q: torch.Tensor, with_stats: bool) -> SoftmaxState:
        shape = q.shape[:-1]
        m = torch.full(shape, float("-inf"), dtype=torch.float32, device=q.device)
        zeros = torch.zeros(shape, dtype=torch.float32, device=q.device)
        acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        return cls(m, zeros, acc, zeros.clone() if with_stats else None)

    def update(self, scores: torch.Tensor, v: torch.Tensor) -> None:
        """scores: [B, Hkv, R, n] (masked entries -inf), v: [Hkv, n, D] or [B, Hkv, n, D]."""
        if scores.shape[-1] == 0:
            return
        m_new = torch.maximum(self.m, scores.amax(dim=-1))
        # Rows that have seen only -inf keep m_new = -inf; guard so exp() gives 0, not nan.
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp(self.m - m_safe)
        p = torch.exp(scores - m_safe[..., None])
        self.l = self.l * alpha + p.sum(dim=-1)
        self.acc = self.acc * alpha[..., None] + p @ v
        if self.l2 is not None:
            self.l2 = self.l2 * alpha * alpha + (p * p).sum(dim=-1)
        self.m = m_new

    def output(self) -> torch.Tensor:
        """[B, Hkv, R, D] normalized attention output."""
        return self.acc / self.l[..., None]

    def sum_p_squared(self) -> torch.Tensor:
        """[B, Hkv, R] sum_j p_j^2 of each row's attention distribution."""
        assert self.l2 is not None, "stats were not requested"
        return self.l2 / (self.l * self.l)


def causal_chunk_mask(rows: int, t: int, device: torch.device) -> torch.Tensor:
    """[G*T, T] bool, True where query row (g*T + i) may see chunk key j (j <= i)."""
    i = torch.arange(rows, device=device) % t
    j = torch.arange(t, device=device)
    return j[None, :] <= i[:, None]


def attend_blocks(
    q: torch.Tensor,
    cache_blocks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    k_chunk: torch.Tensor,
    v_chunk: torch.Tensor,
    scale: float,
    with_stats: bool = False,
) -> SoftmaxState:
    """Stream attention of grouped queries over cache blocks, then over the current chunk.

    q: [B, Hkv, G*T, D]; each cache block: (k [Hkv, n, D], v [Hkv, n, D]) already dequantized;
    k_chunk / v_chunk: [B, Hkv, T, D] full precision, attended causally.
    """
    state = SoftmaxState.empty(q, with_stats)
    qs = q.float() * scale
    for k, v in cache_blocks:
        state.update(qs @ k.float().transpose(-1, -2), v.float())
    t = k_chunk.shape[-2]
    scores = qs @ k_chunk.float().transpose(-1, -2)  # [B, Hkv, G*T, T]
    mask = causal_chunk_mask(q.shape[-2], t, q.device)
    state.update(scores.masked_fill(~mask, float("-inf")), v_chunk.float())
    return state


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive softmax attention, the readable reference. q: [..., R, D], k/v: [..., N, D], mask: [R, N] bool."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return p @ v.float()
