"""Training the precision controller on measured sensitivity, under a KV bit budget.

Rows come from calibration windows: each token's features exactly as the inference session
computes them (chunked prefill), its first-order damage at every width (sensitivity.py), and
its label from the budget-optimal allocation of that window (allocation.exact). The loss is
the paper's three terms with measured quantities:

    alpha * CE(logits, label) + beta * E_p[cost_k / 16] + gamma * (1 - E_p[q_k]),
    q_k = exp(-damage_k / D)      (D: median 4-bit damage of the training rows)

so the quality term uses each token's own damage per class, and the cost term the real
storage cost (bits per value with scales: 2.5 / 4.5 / 8.5 / 16).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .allocation import exact
from .controller import ControllerMeta, PrecisionController
from .decoder import PackedLlama
from .features import FEATURE_NAMES, TokenFeatures
from .formats import BIT_WIDTHS, RowFormat
from .sensitivity import first_order_damage
from .session import Session, SessionConfig

FEATURE_SETS: dict[str, tuple[str, ...]] = {"paper": FEATURE_NAMES, "extended": FEATURE_NAMES + ("position",)}


@dataclass(frozen=True)
class TrainConfig:
    budget_bits: float = 4.0
    features: str = "paper"
    alpha: float = 1.0
    beta: float = 0.05
    gamma: float = 1.0
    epochs: int = 400
    lr: float = 3e-3
    patience: int = 40
    seed: int = 0
    chunk_size: int = 32

    def __post_init__(self) -> None:
        if self.features not in FEATURE_SETS:
            raise ValueError(f"unknown feature set '{self.features}'; choose one of {', '.join(FEATURE_SETS)}")
        costs = class_costs()
        if not costs.min() <= self.budget_bits <= costs.max():
            raise ValueError(f"--kv-budget-bits {self.budget_bits} is outside [{min(costs)}, {max(costs)}]")


@dataclass
class Rows:
    features: torch.Tensor  # [N, F] raw features in FEATURE_SETS[cfg.features] order
    damage: torch.Tensor  # [N, 4] first-order damage per width (2, 4, 8, 16)
    labels: torch.Tensor  # [N] class index of the budget-optimal width
    digest: str  # sha256 of the token ids the rows came from


class _FeatureRecorder:
    """A policy that stores everything at 16 bits and keeps the features it is shown."""

    name, needs_features = "recorder", True

    def __init__(self):
        self.seen: list[TokenFeatures] = []

    def layout(self, max_seq_len: int):
        from .cache import CacheLayout

        return CacheLayout.uniform(max_seq_len, 16)

    def choose(self, features: TokenFeatures) -> torch.Tensor:
        self.seen.append(features)
        return torch.full_like(features.token_ids, 16)


def class_costs(group_size: int = 64, head_dim: int = 64) -> np.ndarray:
    return np.array([RowFormat(b, head_dim, group_size).bits_per_value for b in BIT_WIDTHS])


def collect(decoder: PackedLlama, windows: list[torch.Tensor], cfg: TrainConfig, hadamard: bool = True) -> Rows:
    """Features, damage and budget-optimal labels for every token of every window [T]."""
    names = FEATURE_SETS[cfg.features]
    feats, damages, labels, h = [], [], [], hashlib.sha256()
    for ids in windows:
        rec = _FeatureRecorder()
        Session(decoder, rec, SessionConfig(max_seq_len=ids.numel(), chunk_size=cfg.chunk_size, hadamard=hadamard)).feed(ids)
        f = torch.cat([x.matrix(names) for x in rec.seen])
        dmg = first_order_damage(decoder.model, ids, BIT_WIDTHS, hadamard)
        feats.append(f), damages.append(dmg.float())
        labels.append(torch.from_numpy(exact(dmg.numpy(), class_costs(), cfg.budget_bits)))
        h.update(ids.numpy().astype(np.int64).tobytes())
    return Rows(torch.cat(feats), torch.cat(damages), torch.cat(labels), h.hexdigest())


def stratified_split(labels: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, validation) with each class split ``1 - frac`` / ``frac``."""
    g = torch.Generator().manual_seed(seed)
    tr, va = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = int(round(frac * idx.numel()))
        va.append(idx[:n_val]), tr.append(idx[n_val:])
    return torch.cat(tr), torch.cat(va)


def controller_loss(logits: torch.Tensor, labels: torch.Tensor, damage: torch.Tensor, cfg: TrainConfig, damage_scale: float) -> torch.Tensor:
    costs = torch.tensor(class_costs(), dtype=logits.dtype) / 16.0
    p = torch.softmax(logits, -1)
    quality = torch.exp(-damage / damage_scale)  # [N, 4] in (0, 1]: 1 = no damage
    ce = torch.nn.functional.cross_entropy(logits, labels)
    return cfg.alpha * ce + cfg.beta * (p * costs).sum(-1).mean() + cfg.gamma * (1 - (p * quality).sum(-1).mean())


@dataclass
class TrainReport:
    epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_avg_bits: float  # mean storage bits/value of the controller's choices on held-out rows
    label_avg_bits: float  # the same for the budget-optimal labels


def train(rows: Rows, cfg: TrainConfig, model_id: str = "", extra: dict | None = None) -> tuple[PrecisionController, TrainReport]:
    """Adam on the three-term loss, stratified 80/20 split, early stopping on validation loss."""
    torch.manual_seed(cfg.seed)
    tr, va = stratified_split(rows.labels, 0.2, cfg.seed)
    x, y, d = rows.features, rows.labels, rows.damage
    damage_scale = float(d[tr, BIT_WIDTHS.index(4)].median().clamp_min(1e-12))
    meta = ControllerMeta(
        feature_names=FEATURE_SETS[cfg.features],
        budget_bits=cfg.budget_bits,
        class_fractions=tuple((torch.bincount(y[tr], minlength=len(BIT_WIDTHS)).float() / tr.numel()).tolist()),
        model=model_id,
        extra={"data_sha256": rows.digest, "damage_scale": damage_scale, **(extra or {})},
    )
    ctrl = PrecisionController(meta)
    ctrl.feature_mean.copy_(x[tr].mean(0))
    ctrl.feature_std.copy_(x[tr].std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(ctrl.mlp.parameters(), lr=cfg.lr)
    best, best_state, since, epoch = float("inf"), None, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        ctrl.train()
        opt.zero_grad()
        loss = controller_loss(ctrl(x[tr]), y[tr], d[tr], cfg, damage_scale)
        loss.backward()
        opt.step()
        ctrl.eval()
        with torch.no_grad():
            val = float(controller_loss(ctrl(x[va]), y[va], d[va], cfg, damage_scale))
        if val < best - 1e-6:
            best, best_state, since = val, {k: v.clone() for k, v in ctrl.state_dict().items()}, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    ctrl.load_state_dict(best_state)
    ctrl.eval()
    costs = torch.tensor(class_costs())
    with torch.no_grad():
        pred = ctrl(x[va]).argmax(-1)
        report = TrainReport(
            epochs=epoch,
            train_loss=float(controller_loss(ctrl(x[tr]), y[tr], d[tr], cfg, damage_scale)),
            val_loss=best,
            val_accuracy=float((pred == y[va]).float().mean()),
            val_avg_bits=float(costs[pred].mean()),
            label_avg_bits=float(costs[y[va]].mean()),
        )
    return ctrl, report
