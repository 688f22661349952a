import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kv.allocation import AllocationError, exact, lagrangian

COSTS = np.array([2.5, 4.5, 8.5, 16.0])


def brute_force(damage, costs, budget):
    best = np.inf
    for combo in itertools.product(range(len(costs)), repeat=damage.shape[0]):
        if costs[list(combo)].mean() <= budget + 1e-9:
            best = min(best, damage[np.arange(len(combo)), combo].sum())
    return best


def monotone_damage(rng, t):
    """Damage that falls with bits, as measured damage does."""
    base = rng.exponential(1.0, size=(t, 1))
    return base * np.array([1.0, 0.25, 0.02, 0.0]) * rng.uniform(0.5, 1.5, size=(t, 4))


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 6), budget=st.sampled_from([2.5, 3.0, 4.0, 4.5, 6.0, 9.0]), seed=st.integers(0, 10**6))
def test_exact_allocation_is_optimal_and_honors_the_budget(t, budget, seed):
    rng = np.random.default_rng(seed)
    damage = monotone_damage(rng, t)
    out = exact(damage, COSTS, budget)
    assert COSTS[out].mean() <= budget + 1e-9
    assert damage[np.arange(t), out].sum() == pytest.approx(brute_force(damage, COSTS, budget), rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(50, 300), budget=st.sampled_from([3.0, 4.0, 5.0]), seed=st.integers(0, 10**6))
def test_lagrangian_honors_the_budget_and_is_near_optimal(t, budget, seed):
    rng = np.random.default_rng(seed)
    damage = monotone_damage(rng, t)
    lag, opt = lagrangian(damage, COSTS, budget), exact(damage, COSTS, budget)
    assert COSTS[lag].mean() <= budget + 1e-9
    d_lag, d_opt = damage[np.arange(t), lag].sum(), damage[np.arange(t), opt].sum()
    assert d_opt <= d_lag + 1e-12 and d_lag <= 1.05 * d_opt + 1e-9


def test_cheap_tokens_get_few_bits():
    damage = np.array([[10.0, 1.0, 0.1, 0.0], [0.01, 0.001, 0.0, 0.0]])  # token 0 is sensitive
    assert exact(damage, COSTS, 5.5).tolist() == [2, 0]  # 8.5 + 2.5 = 11 <= 2 x 5.5


def test_infeasible_budget_and_bad_shapes():
    with pytest.raises(AllocationError, match="below the cheapest"):
        exact(np.zeros((3, 4)), COSTS, 2.0)
    with pytest.raises(AllocationError, match=r"must be \[tokens, 4\]"):
        lagrangian(np.zeros((3, 3)), COSTS, 4.0)
