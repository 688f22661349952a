"""Budget-optimal bit allocation: which token gets which width, given each choice's damage.

Given damage[t, c] (how much storing token t at class c hurts later outputs) and the storage
cost of each class in bits per value (scales included: 2.5 / 4.5 / 8.5 / 16), choose one class
per token to minimize total damage subject to mean cost <= budget. This is a multiple-choice
knapsack. Costs are multiples of 1/2 bit at group 64, so it is solved exactly by dynamic
programming over the budget in cost units (``exact``); ``lagrangian`` is the fast
approximation (one price per bit, bisected) that a streaming policy can apply token by token.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch


class AllocationError(ValueError):
    """An infeasible budget or malformed damage table."""


def _units(costs: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer cost units and the scale (units per bit) that makes every cost integral."""
    fr = [Fraction(float(c)).limit_denominator(64) for c in costs]
    scale = int(np.lcm.reduce([f.denominator for f in fr]))
    return np.array([int(f * scale) for f in fr]), scale


def _check(damage: np.ndarray, costs: np.ndarray, budget: float) -> None:
    if damage.ndim != 2 or damage.shape[1] != costs.shape[0]:
        raise AllocationError(f"damage must be [tokens, {costs.shape[0]}], got {damage.shape}")
    if budget < costs.min():
        raise AllocationError(f"budget {budget} bits/value is below the cheapest class ({costs.min()}); raise the budget")


def exact(damage: np.ndarray, costs: np.ndarray, budget: float) -> np.ndarray:
    """[T] class indices minimizing sum damage with mean cost <= budget (optimal, O(T * T*max_cost))."""
    damage, costs = np.asarray(damage, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    _check(damage, costs, budget)
    t_count, n_cls = damage.shape
    unit, scale = _units(costs)
    cap = int(np.floor(budget * scale * t_count + 1e-9))
    cap = min(cap, int(unit.max()) * t_count)
    inf = np.inf
    best = np.full(cap + 1, inf)  # best[w]: min damage of the tokens so far using exactly w units
    best[0] = 0.0
    choice = np.zeros((t_count, cap + 1), dtype=np.int8)
    for t in range(t_count):
        nxt = np.full(cap + 1, inf)
        for c in range(n_cls):
            u = unit[c]
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + damage[t, c]
            better = cand < nxt
            nxt[better] = cand[better]
            choice[t, better] = c
        best = nxt
    w = int(np.argmin(best))
    if not np.isfinite(best[w]):
        raise AllocationError("no assignment fits the budget")
    out = np.zeros(t_count, dtype=np.int64)
    for t in range(t_count - 1, -1, -1):
        out[t] = choice[t, w]
        w -= unit[out[t]]
    return out


def lagrangian(damage: np.ndarray, costs: np.ndarray, budget: float, iters: int = 60) -> np.ndarray:
    """[T] classes from argmin(damage + lam * cost) with lam bisected so mean cost <= budget,
    then the leftover budget spent greedily on the best damage reduction per extra bit."""
    damage, costs = np.asarray(damage, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    _check(damage, costs, budget)
    t_count = damage.shape[0]
    limit = budget * t_count

    def pick(lam: float) -> np.ndarray:
        return np.argmin(damage + lam * costs[None], axis=1)

    lo, hi = 0.0, 1.0
    while costs[pick(hi)].sum() > limit:
        hi *= 2
        if hi > 1e30:
            break
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if costs[pick(mid)].sum() > limit else (lo, mid)
    out = pick(hi)
    spent = costs[out].sum()
    while True:  # greedy upgrades with the slack the price left unused
        gain = damage[np.arange(t_count), out][:, None] - damage  # [T, C] damage saved by switching
        extra = costs[None] - costs[out][:, None]
        ok = (extra > 0) & (gain > 0) & (spent + extra <= limit + 1e-9)
        if not ok.any():
            return out
        ratio = np.where(ok, gain / np.where(extra > 0, extra, 1), -np.inf)
        t, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += extra[t, c]
        out[t] = c


def price_to_fit(logp: torch.Tensor, costs: torch.Tensor, floor: float, allowance: float, iters: int = 40) -> float:
    """Smallest price >= ``floor`` at which the tokens' choices argmax(logp - price * costs) [T]
    cost at most ``allowance`` in total (bisection; the total is non-increasing in the price)."""

    def total(price: float) -> float:
        return float(costs[(logp - price * costs).argmax(-1)].sum())

    if total(floor) <= allowance:
        return floor
    lo, hi = floor, floor + 1.0
    while total(hi) > allowance and hi < 1e6:
        lo, hi = hi, floor + 2 * (hi - floor)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > allowance else (lo, mid)
    return hi
