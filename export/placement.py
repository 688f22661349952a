"""Where each token of a chunk lands in the pools, as tensor ops an exported graph can hold.

This is :meth:`adaptive_kv.cache.PackedKVCache.commit`'s fallback rule (non-demoting layouts)
without Python control flow: token i asks for width w_i and goes to the first pool, in the order
(|b - w_i|, b), that still has room *after the tokens before it in the chunk were placed*.

That rule is sequential, but pools only ever fill up, and a pool filling up changes the choice of
exactly the later tokens that were heading for it. So the chunk is placed in at most P phases
(P = pools): with the set of full pools fixed, every unplaced token targets its first non-full
candidate; tokens are accepted in order up to the first one whose target has no room left; that
target is now full, and the next phase re-targets the rest. Each phase fills one pool or places
everything, so P phases always suffice when the pools have room for the chunk (the caller checks
``seq_len + T <= max_seq_len <= sum(capacities)``).
"""

from __future__ import annotations

import torch

from adaptive_kv.formats import BIT_WIDTHS


def fallback_ranks(pool_bits: tuple[int, ...]) -> torch.Tensor:
    """[len(BIT_WIDTHS), P] int64: rank of pool p in the fallback order of a token wanting width w
    (0 = first choice), the order of PackedKVCache._candidates: by (|b - w|, b)."""
    ranks = torch.zeros(len(BIT_WIDTHS), len(pool_bits), dtype=torch.int64)
    for wi, w in enumerate(BIT_WIDTHS):
        order = sorted(pool_bits, key=lambda b: (abs(b - w), b))
        for p, b in enumerate(pool_bits):
            ranks[wi, p] = order.index(b)
    return ranks


def place(want: torch.Tensor, fill: torch.Tensor, caps: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Place a chunk's tokens, in order.

    want: [T] int64, index into BIT_WIDTHS of each token's requested width;
    fill: [P] int64, filled slots of each pool before the chunk; caps: [P] int64 capacities;
    ranks: [len(BIT_WIDTHS), P] from :func:`fallback_ranks`.
    Returns (pool [T] int64 index into the pools, slot [T] int64 slot within that pool).
    """
    n_pools = caps.shape[0]
    t = want.shape[0]
    idx = torch.arange(t)  # [T]
    pools = torch.arange(n_pools)  # [P]
    pref = ranks[want]  # [T, P] fallback rank of each pool for each token
    placed = torch.zeros(t, dtype=torch.bool)
    pool = torch.zeros(t, dtype=torch.int64)
    slot = torch.zeros(t, dtype=torch.int64)
    for _ in range(n_pools):
        full = fill >= caps  # [P]
        target = (pref + full.long() * n_pools).argmin(-1)  # [T] first candidate with room
        mine = (target[:, None] == pools[None, :]) & ~placed[:, None]  # [T, P] unplaced token -> its target
        nth = (mine.long().cumsum(0) * mine.long()).sum(-1)  # [T] 1-based order within its target
        room = (caps - fill)[target]  # [T]
        blocked = ~placed & (nth > room)  # [T] target already full when this token arrives
        first_blocked = torch.where(blocked, idx, t).amin()  # 0-d; T when none is
        accept = ~placed & (idx < first_blocked)  # [T]
        pool = torch.where(accept, target, pool)
        slot = torch.where(accept, fill[target] + nth - 1, slot)
        fill = fill + (mine & accept[:, None]).long().sum(0)
        placed = placed | accept
    return pool, slot
