"""Precision policies: which bit-width each token's K/V is stored at, and the cache layout.

A policy is data plus one decision function: ``layout(max_seq_len)`` sizes the pools (so the
memory it promises is what gets allocated) and ``choose(features)`` returns [T] bit-widths.
Overflow beyond a pool's capacity is the cache's business (fallback / demotion, cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import CacheLayout
from .controller import PrecisionController
from .allocation import price_to_fit
from .features import TokenFeatures
from .formats import nominal_bits_per_value  # noqa: F401  (re-exported: the class cost table)

POLICY_NAMES = ("fp16", "static-8", "static-4", "static-2", "rule", "sink-recent", "learned", "oracle")


class PolicyError(ValueError):
    """Unknown policy or bad policy options."""


@dataclass(frozen=True)
class StaticPolicy:
    """Every token at the same width (``fp16`` = 16 bits stored as fp16)."""

    bits: int
    needs_features = False

    @property
    def name(self) -> str:
        return "fp16" if self.bits == 16 else f"static-{self.bits}"

    def layout(self, max_seq_len: int) -> CacheLayout:
        return CacheLayout.uniform(max_seq_len, self.bits)

    def choose(self, features: TokenFeatures) -> torch.Tensor:
        return torch.full_like(features.token_ids, self.bits)


@dataclass(frozen=True)
class RulePolicy:
    """Entropy thresholds (the paper's rule baseline): the more uncertain the model, the more bits.

    H < t[0] -> 2, H < t[1] -> 4, H < t[2] -> 8, else 16. The default thresholds are the
    0.45 / 0.85 / 0.95 quantiles of SmolLM2-135M's next-token entropy on the calibration text
    (wiki.valid.tokens; `python -m adaptive_kv.calibrate_rule` recomputes them), so on text
    like it the classes take ~45/40/10/5% of tokens (~4.6 bits/value): the pools are sized so.
    """

    thresholds: tuple[float, float, float] = (2.6811, 4.8977, 5.8368)
    fractions: tuple[float, float, float, float] = (0.45, 0.40, 0.10, 0.05)
    budget_bits: float | None = None  # KV memory budget (bits/value); None = the fractions as they are
    name = "rule"
    needs_features = True

    def __post_init__(self) -> None:
        if list(self.thresholds) != sorted(self.thresholds):
            raise PolicyError(f"rule thresholds {self.thresholds} must be increasing")

    def layout(self, max_seq_len: int) -> CacheLayout:
        return mixed_layout(max_seq_len, dict(zip((2, 4, 8, 16), self.fractions)), self.budget_bits)

    def choose(self, features: TokenFeatures) -> torch.Tensor:
        widths = torch.tensor([2, 4, 8, 16])
        return widths[torch.bucketize(features.entropy, torch.tensor(self.thresholds), right=True)]


@dataclass(frozen=True)
class SinkRecentPolicy:
    """First ``sinks`` tokens and the ``window`` most recent at fp16, older ones at ``bits``."""

    sinks: int = 4
    window: int = 60
    bits: int = 4
    name = "sink-recent"
    needs_features = False

    def layout(self, max_seq_len: int) -> CacheLayout:
        return CacheLayout.sink_recent(max_seq_len, self.sinks, self.window, self.bits)

    def choose(self, features: TokenFeatures) -> torch.Tensor:
        # New tokens enter the fp16 ring; the cache demotes the oldest non-sink one when full.
        return torch.full_like(features.token_ids, 16)


@dataclass(frozen=True)
class LearnedPolicy:
    """A trained controller picks each token's class, held to the KV budget as it goes.

    Each chunk takes argmax_k(log p_k - price * cost_k) with the smallest price >= the file's
    calibrated one (which brought the training text to the budget) at which the sequence's running average stays <= the budget (bits/value,
    scales included): on text unlike the calibration text the price rises instead of the cache
    overflowing, so the memory promised is the memory used. Pools are sized by the
    controller's class mix reshaped to the budget.
    """

    controller: PrecisionController
    budget_bits: float | None = None  # None = the budget the controller was trained for
    name = "learned"
    needs_features = True
    budgeted = True

    @property
    def budget(self) -> float:
        return self.budget_bits if self.budget_bits is not None else self.controller.meta.budget_bits

    def layout(self, max_seq_len: int) -> CacheLayout:
        meta = self.controller.meta
        if not meta.class_fractions:
            raise PolicyError("the controller file has no class_fractions to size the cache pools")
        return mixed_layout(max_seq_len, dict(zip(meta.class_bits, meta.class_fractions)), self.budget)

    def choose(self, features: TokenFeatures, spent: float = 0.0) -> torch.Tensor:
        """``spent``: storage bits/value summed over the tokens already cached."""
        ctrl = self.controller
        with torch.no_grad():
            logp = ctrl(features.matrix(ctrl.meta.feature_names)).log_softmax(-1)  # [T, C]
        costs = ctrl.class_costs()
        allowance = self.budget * (int(features.positions[0]) + logp.shape[0]) - spent
        price = price_to_fit(logp, costs, ctrl.meta.price, allowance)
        return torch.tensor(ctrl.meta.class_bits)[(logp - price * costs).argmax(-1)]


class OraclePolicy:
    """Upper bound, not deployable: knows the whole text in advance (future attention included).

    ``prepare`` receives each sequence's per-token damage (sensitivity.first_order_damage on the
    full text) and fixes the budget-optimal plan (allocation.exact); ``choose`` reads it by
    position. Pools are sized for any plan (every width can hold every token): the memory
    reported for it is the memory its tokens use.
    """

    needs_features = False
    budgeted = False

    def __init__(self, budget_bits: float = 4.0):
        self.budget_bits = budget_bits
        self.name = "oracle"
        self.plan = torch.empty(0, dtype=torch.long)

    def layout(self, max_seq_len: int) -> CacheLayout:
        return CacheLayout(max_seq_len, tuple((b, max_seq_len) for b in (2, 4, 8, 16)))

    def prepare(self, damage: torch.Tensor, tail: int = 0) -> None:
        """damage: [T, 4] for the tokens that will be cached, in order; ``tail`` more tokens
        (generated ones, whose future is unknown) get the cheapest width."""
        from .allocation import exact

        costs = [nominal_bits_per_value(b) for b in (2, 4, 8, 16)]
        plan = torch.tensor([2, 4, 8, 16])[torch.from_numpy(exact(damage.double().numpy(), costs, self.budget_bits))]
        self.plan = torch.cat([plan, torch.full((tail,), 2)])

    def choose(self, features: TokenFeatures) -> torch.Tensor:
        pos = features.positions
        if int(pos[-1]) >= self.plan.numel():
            raise PolicyError(f"the oracle plan covers {self.plan.numel()} tokens, asked for position {int(pos[-1])}; call prepare() with the whole text")
        return self.plan[pos]


Policy = StaticPolicy | RulePolicy | SinkRecentPolicy | LearnedPolicy | OraclePolicy


def mixed_layout(max_seq_len: int, fractions: dict[int, float], budget_bits: float | None) -> CacheLayout:
    """Pools for a mixed policy: its class mix as is, or reshaped to spend ``budget_bits``."""
    if budget_bits is None:
        return CacheLayout.from_fractions(max_seq_len, fractions)
    cost = {b: nominal_bits_per_value(b) for b in (2, 4, 8, 16)}
    return CacheLayout.from_budget(max_seq_len, budget_bits, fractions, cost)


def make_policy(name: str, controller: str | None = None, model_id: str | None = None, budget_bits: float | None = None) -> Policy:
    """Build a policy by CLI name; ``learned`` needs a controller file; ``budget_bits`` sizes the
    pools of the mixed policies (rule, learned) to that many storage bits per value."""
    if budget_bits is not None and name not in ("rule", "learned", "oracle"):
        raise PolicyError(f"--kv-budget-bits applies to the mixed policies (rule, learned, oracle), not '{name}', whose memory is fixed by its widths")
    if name == "fp16":
        return StaticPolicy(16)
    if name.startswith("static-") and name[7:] in ("2", "4", "8"):
        return StaticPolicy(int(name[7:]))
    if name == "rule":
        return RulePolicy(budget_bits=budget_bits)
    if name == "sink-recent":
        return SinkRecentPolicy()
    if name == "learned":
        if controller is None:
            controller = default_controller_path()
        return LearnedPolicy(PrecisionController.load(controller, model_id=model_id), budget_bits=budget_bits)
    if name == "oracle":
        return OraclePolicy(4.0 if budget_bits is None else budget_bits)
    raise PolicyError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")


DEFAULT_CONTROLLER = "smollm2-135m-4.0.safetensors"


def default_controller_path() -> Path:
    """The controller shipped in the package (SmolLM2-135M, 4.0 bits; command in controllers/README.md)."""
    return Path(__file__).parent / "controllers" / DEFAULT_CONTROLLER
