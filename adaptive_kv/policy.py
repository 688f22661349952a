"""Precision policies: which bit-width each token's K/V is stored at, and the cache layout.

A policy is data plus one decision function: ``layout(max_seq_len)`` sizes the pools (so the
memory it promises is what gets allocated) and ``choose(features)`` returns [T] bit-widths.
Overflow beyond a pool's capacity is the cache's business (fallback / demotion, cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import CacheLayout
from .controller import PrecisionController
from .features import TokenFeatures
from .formats import RowFormat

POLICY_NAMES = ("fp16", "static-8", "static-4", "static-2", "rule", "sink-recent", "learned")


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
    """A trained controller picks each token's class; pools sized by its expected class mix."""

    controller: PrecisionController
    budget_bits: float | None = None  # None = the budget the controller was trained for
    name = "learned"
    needs_features = True

    def layout(self, max_seq_len: int) -> CacheLayout:
        meta = self.controller.meta
        if not meta.class_fractions:
            raise PolicyError("the controller file has no class_fractions to size the cache pools")
        budget = self.budget_bits if self.budget_bits is not None else meta.budget_bits
        return mixed_layout(max_seq_len, dict(zip(meta.class_bits, meta.class_fractions)), budget)

    def choose(self, features: TokenFeatures) -> torch.Tensor:
        with torch.no_grad():
            return self.controller.choose_bits(features.matrix(self.controller.meta.feature_names))


Policy = StaticPolicy | RulePolicy | SinkRecentPolicy | LearnedPolicy


def mixed_layout(max_seq_len: int, fractions: dict[int, float], budget_bits: float | None) -> CacheLayout:
    """Pools for a mixed policy: its class mix as is, or reshaped to spend ``budget_bits``."""
    if budget_bits is None:
        return CacheLayout.from_fractions(max_seq_len, fractions)
    cost = {b: nominal_bits_per_value(b) for b in (2, 4, 8, 16)}
    return CacheLayout.from_budget(max_seq_len, budget_bits, fractions, cost)


def make_policy(name: str, controller: str | None = None, model_id: str | None = None, budget_bits: float | None = None) -> Policy:
    """Build a policy by CLI name; ``learned`` needs a controller file; ``budget_bits`` sizes the
    pools of the mixed policies (rule, learned) to that many storage bits per value."""
    if budget_bits is not None and name not in ("rule", "learned"):
        raise PolicyError(f"--kv-budget-bits applies to the mixed policies (rule, learned), not '{name}', whose memory is fixed by its widths")
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
            raise PolicyError("policy 'learned' needs a controller file: pass --controller PATH (train one with `kvexport train-controller`)")
        return LearnedPolicy(PrecisionController.load(controller, model_id=model_id), budget_bits=budget_bits)
    raise PolicyError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")


def nominal_bits_per_value(bits: int, head_dim: int = 64, group_size: int = 64) -> float:
    """Storage bits per value of one width, scales included (4 -> 4.5 at group 64)."""
    return RowFormat(bits, head_dim, group_size).bits_per_value
