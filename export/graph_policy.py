"""The precision policies as graph modules: features in, each token's requested width out.

Each mirrors the ``choose`` of its :mod:`adaptive_kv.policy` counterpart exactly (same ops, same
dtypes), so an exported decoder picks the widths the eager Session picks. Outputs are indices
into ``BIT_WIDTHS`` (2, 4, 8, 16), which is what :func:`export.placement.place` takes.

The learned policy's running budget price (``allocation.price_to_fit``) is a data-dependent
doubling loop plus a 40-step bisection in Python floats; here the doubling candidates are
constants (they depend only on the controller's calibrated price), all evaluated at once, and
the bisection (run, under a ``cond``, only when the floor price does not fit) runs its fixed
iteration count as a ``scan`` (ExecuTorch 1.5 emits scan, not
while_loop; unrolled, the 40 steps were a third of the graph and of the lowering time). Prices stay float64, as Python's are,
and are rounded to float32 exactly where PyTorch rounds a Python float scalar multiplying a
float32 tensor, so the price found is the same one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch._higher_order_ops.scan import scan

from adaptive_kv.formats import BIT_WIDTHS
from adaptive_kv.policy import LearnedPolicy, OraclePolicy, RulePolicy, SinkRecentPolicy, StaticPolicy

BISECTION_STEPS = 40  # allocation.price_to_fit's default
PRICE_CEILING = 1e6  # price_to_fit stops doubling here


def branch(pred: torch.Tensor, true_fn, false_fn, operands: tuple):
    """``torch.cond`` when exporting (the program skips the branch not taken), a Python ``if`` in
    eager (torch.cond there would compile both branches with dynamo on every call).

    ExecuTorch 1.5 plans sibling conds' branches over the same memory and hands a branch's outputs
    over without a copy: a cond's outputs must be read before a sibling cond runs. A dynamic dim
    of an operand is assumed >= 2 (pass rows flattened)."""
    if torch.compiler.is_exporting():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


class GraphPolicyError(ValueError):
    """A policy with no in-graph form."""


class GraphStatic(nn.Module):
    needs: tuple[str, ...] = ()

    def __init__(self, policy: StaticPolicy):
        super().__init__()
        self.width_index = BIT_WIDTHS.index(policy.bits)

    def forward(self, feats: dict[str, torch.Tensor], spent: torch.Tensor, n_after: torch.Tensor) -> torch.Tensor:
        return torch.full_like(feats["rarity"], self.width_index, dtype=torch.int64)  # [T]


class GraphRule(nn.Module):
    needs = ("entropy",)

    def __init__(self, policy: RulePolicy):
        super().__init__()
        self.register_buffer("thresholds", torch.tensor(policy.thresholds), persistent=False)  # [3] float32

    def forward(self, feats: dict[str, torch.Tensor], spent: torch.Tensor, n_after: torch.Tensor) -> torch.Tensor:
        # bucketize(entropy, thresholds, right=True) = how many thresholds are <= entropy -> 2/4/8/16
        return (feats["entropy"][:, None] >= self.thresholds[None, :]).long().sum(-1)  # [T]


def doubling_prices(floor: float) -> list[float]:
    """The prices price_to_fit's doubling loop visits: floor + 1, floor + 2, floor + 4, ... up to
    the first >= PRICE_CEILING (the same float expressions, so the same doubles)."""
    hi, out = floor + 1.0, []
    while True:
        out.append(hi)
        if hi >= PRICE_CEILING:
            return out
        hi = floor + 2 * (hi - floor)


class GraphLearned(nn.Module):
    """LearnedPolicy.choose: controller log-probabilities, priced to keep the running budget."""

    def __init__(self, policy: LearnedPolicy, steps: int = BISECTION_STEPS):
        super().__init__()
        ctrl = policy.controller
        self.controller = copy.deepcopy(ctrl).eval()
        self.needs = tuple(ctrl.meta.feature_names)
        self.budget = float(policy.budget)
        self.floor = float(ctrl.meta.price)
        self.register_buffer("steps", torch.zeros(steps), persistent=False)  # [steps] what the scan runs over
        self.register_buffer("costs", ctrl.class_costs().float(), persistent=False)  # [C] bits/value per class
        self.register_buffer("class_width", torch.tensor([BIT_WIDTHS.index(b) for b in ctrl.meta.class_bits]), persistent=False)  # [C]
        # candidate prices: the floor, then the doubling sequence; the last one always stops the loop
        self.register_buffer("candidates", torch.tensor([self.floor, *doubling_prices(self.floor)], dtype=torch.float64), persistent=False)  # [K]

    def _spend(self, logp: torch.Tensor, prices: torch.Tensor) -> torch.Tensor:
        """logp: [T, C], prices: [K] float64 -> [K] float64 total cost of the choices at each price."""
        scores = logp[None] - prices.float()[:, None, None] * self.costs  # [K, T, C]
        return self.costs[scores.argmax(-1)].sum(-1).double()  # [K]

    def price(self, logp: torch.Tensor, allowance: torch.Tensor) -> torch.Tensor:
        """allocation.price_to_fit: logp [T, C], allowance [1] float64 -> price [1] float64."""
        k = self.candidates.shape[0]
        fits = self._spend(logp, self.candidates) <= allowance  # [K]
        fits = fits | (torch.arange(k) == k - 1)  # the ceiling ends the doubling whatever it spends
        first = fits.long().argmax(0, keepdim=True)  # [1] first fitting candidate (argmax: first max)
        lo = self.candidates[(first - 1).clamp(min=0)]  # [1]
        hi = self.candidates[first]  # [1]

        def halve(carry, step):  # one bisection step; a scan keeps the graph one body long
            lo, hi = carry
            mid = (lo + hi) / 2
            over = self._spend(logp, mid) > allowance  # [1]
            return (torch.where(over, mid, lo), torch.where(over, hi, mid)), step.clone()

        def floor(lo, hi):  # the floor fits: no search (every decode step on ordinary text)
            return self.candidates[:1].clone()

        def search(lo, hi):
            (lo, hi), _ = scan(halve, (lo, hi), self.steps)
            return hi

        # a cond, not a where over both: the search is ~1000 small kernel calls, skipped when not needed
        return branch(first[0] == 0, floor, search, (lo, hi))

    def forward(self, feats: dict[str, torch.Tensor], spent: torch.Tensor, n_after: torch.Tensor) -> torch.Tensor:
        """spent: [1] float64 bits/value summed over cached tokens; n_after: [1] int64 tokens after this chunk."""
        x = torch.stack([feats[n] for n in self.needs], dim=-1).float()  # [T, F], TokenFeatures.matrix order
        logp = self.controller(x).log_softmax(-1)  # [T, C]
        allowance = self.budget * n_after.double() - spent  # [1] float64, as LearnedPolicy.choose
        price = self.price(logp, allowance)
        return self.class_width[(logp - price.float() * self.costs).argmax(-1)]  # [T]


GraphPolicy = GraphStatic | GraphRule | GraphLearned


def graph_policy(policy) -> GraphPolicy:
    """The in-graph form of an adaptive_kv policy, or a GraphPolicyError naming why not."""
    if isinstance(policy, StaticPolicy):
        return GraphStatic(policy)
    if isinstance(policy, RulePolicy):
        return GraphRule(policy)
    if isinstance(policy, LearnedPolicy):
        return GraphLearned(policy)
    if isinstance(policy, SinkRecentPolicy):
        raise GraphPolicyError(
            "sink-recent demotes old tokens out of an fp16 ring, which the exported cache does not do yet; "
            "export fp16, static-{8,4,2}, rule or learned"
        )
    if isinstance(policy, OraclePolicy):
        raise GraphPolicyError("the oracle policy needs the whole text in advance and cannot be deployed; export rule or learned")
    raise GraphPolicyError(f"no in-graph form for policy {getattr(policy, 'name', type(policy).__name__)!r}")
