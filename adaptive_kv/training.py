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
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .allocation import exact, price_to_fit
from .controller import ControllerMeta, PrecisionController
from .decoder import PackedLlama
from .features import FEATURE_NAMES, TokenFeatures
from .formats import BIT_WIDTHS, nominal_bits_per_value
from .sensitivity import first_order_damage
from .session import Session, SessionConfig

FEATURE_SETS: dict[str, tuple[str, ...]] = {"paper": FEATURE_NAMES, "extended": FEATURE_NAMES + ("position",)}
ALL_FEATURES: tuple[str, ...] = FEATURE_SETS["extended"]  # the columns Rows keep


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
        if min(self.alpha, self.beta, self.gamma) < 0 or self.epochs <= 0 or self.lr <= 0:
            raise ValueError("alpha, beta, gamma must be >= 0 and epochs, lr > 0")


@dataclass
class Rows:
    """One row per calibration token: budget-independent, so one collection serves every budget."""

    features: torch.Tensor  # [N, len(ALL_FEATURES)] raw features as the inference session computes them
    damage: torch.Tensor  # [N, 4] first-order damage per width (2, 4, 8, 16)
    sequence: torch.Tensor  # [N] index of the sequence the row came from (allocation is per sequence)
    digest: str  # sha256 of the token ids the rows came from

    def select(self, feature_set: str) -> torch.Tensor:
        return self.features[:, [ALL_FEATURES.index(n) for n in FEATURE_SETS[feature_set]]]

    def labels(self, budget_bits: float) -> torch.Tensor:
        """[N] class of each token in its sequence's budget-optimal allocation (allocation.exact)."""
        out = torch.empty(self.sequence.numel(), dtype=torch.long)
        for s in self.sequence.unique():
            idx = (self.sequence == s).nonzero()[:, 0]
            out[idx] = torch.from_numpy(exact(self.damage[idx].double().numpy(), class_costs(), budget_bits))
        return out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"features": self.features, "damage": self.damage, "sequence": self.sequence}
        save_file(tensors, str(tmp), metadata={"digest": self.digest, "features": json.dumps(ALL_FEATURES)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Rows:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("features", "null")) != list(ALL_FEATURES):
                raise ValueError(f"{path} holds rows with features {meta.get('features')}, expected {list(ALL_FEATURES)}; collect them again")
            return cls(f.get_tensor("features"), f.get_tensor("damage"), f.get_tensor("sequence"), meta["digest"])


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
    return np.array([nominal_bits_per_value(b, head_dim, group_size) for b in BIT_WIDTHS])


def collect(
    decoder: PackedLlama, sequences: list[torch.Tensor], chunk_size: int = 32, hadamard: bool = True, progress: bool = False
) -> Rows:
    """Features and damage for every token of every sequence [T] (budget-independent)."""
    feats, damages, seq = [], [], []
    for n, ids in enumerate(tqdm(sequences, desc="sensitivity", disable=not progress, dynamic_ncols=True)):
        rec = _FeatureRecorder()
        Session(decoder, rec, SessionConfig(max_seq_len=ids.numel(), chunk_size=chunk_size, hadamard=hadamard)).feed(ids)
        feats.append(torch.cat([x.matrix(ALL_FEATURES) for x in rec.seen]))
        damages.append(first_order_damage(decoder.model, ids, BIT_WIDTHS, hadamard).float())
        seq.append(torch.full((ids.numel(),), n, dtype=torch.long))
    return Rows(torch.cat(feats), torch.cat(damages), torch.cat(seq), sequences_digest(sequences))


def price_for_budget(logits: torch.Tensor, budget_bits: float) -> float:
    """The price lam (nats per bit/value; negative = spend more) at which the mean cost of
    argmax(log p - lam * cost) is the largest that stays <= the budget."""
    logp = logits.log_softmax(-1)
    return float(price_to_fit(logp, torch.tensor(class_costs(), dtype=logits.dtype), -64.0, budget_bits * logits.shape[0]))


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
    val_avg_bits: float  # mean storage bits/value of the controller's argmax on held-out rows
    price: float  # calibrated price (nats per bit/value) that brings the training rows to the budget
    val_avg_bits_priced: float  # the same with the price applied: what inference starts from
    label_avg_bits: float  # the budget-optimal labels on held-out rows
    rows: int = 0


def train(rows: Rows, cfg: TrainConfig, model_id: str = "", extra: dict | None = None) -> tuple[PrecisionController, TrainReport]:
    """Adam on the three-term loss, stratified 80/20 split, early stopping on validation loss."""
    torch.manual_seed(cfg.seed)
    x, y, d = rows.select(cfg.features), rows.labels(cfg.budget_bits), rows.damage
    tr, va = stratified_split(y, 0.2, cfg.seed)
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
        price = price_for_budget(ctrl(x[tr]), cfg.budget_bits)
        ctrl.meta = replace(meta, price=price)
        logits_va = ctrl(x[va])
        pred = logits_va.argmax(-1)
        priced = (logits_va.log_softmax(-1) - price * costs.float()).argmax(-1)
        report = TrainReport(
            epochs=epoch,
            train_loss=float(controller_loss(ctrl(x[tr]), y[tr], d[tr], cfg, damage_scale)),
            val_loss=best,
            val_accuracy=float((pred == y[va]).float().mean()),
            val_avg_bits=float(costs[pred].mean()),
            price=price,
            val_avg_bits_priced=float(costs[priced].mean()),
            label_avg_bits=float(costs[y[va]].mean()),
            rows=int(y.numel()),
        )
    return ctrl, report


# ---- calibration data ------------------------------------------------------------------------
DEFAULT_MC_RANGE = ("hellaswag", 2500, 2800)  # HellaSwag items never evaluated here (eval reads 0-999)


def default_data_specs() -> list[str]:
    from .tasks import calibration_path, default_path

    task, a, b = DEFAULT_MC_RANGE
    return [str(calibration_path()), f"{default_path(task)}@{a}:{b}"]


def _mc_task_of(path: Path) -> str:
    from .tasks import MC_TASKS, DataError

    name = str(path).lower().replace("-", "_")
    for task in MC_TASKS:
        if task in name:
            return task
    raise DataError(f"cannot tell which task {path} belongs to (its path names none of {', '.join(MC_TASKS)}); rename it or pass text instead")


def calibration_sequences(tokenizer, specs: list[str], window: int = 2048, max_windows: int = 6) -> list[torch.Tensor]:
    """Token sequences [T] for controller training.

    A spec is a text file (cut into ``max_windows`` windows of ``window`` tokens, evenly spaced
    over the file) or ``FILE.jsonl@A:B``: items A..B-1 of a multiple-choice file, each as its
    context followed by the gold answer. WikiText-2's test split is refused: it is evaluation text.
    """
    from .tasks import DataError, load_multiple_choice, load_text

    out: list[torch.Tensor] = []
    for spec in specs:
        path_s, _, rng = spec.partition("@")
        path = Path(path_s)
        if path.name == "wiki.test.raw":
            raise DataError(f"{path} is the WikiText-2 evaluation text; train on wiki.valid.tokens (or other text) instead")
        if path.suffix == ".jsonl":
            task = _mc_task_of(path)
            try:
                a, b = (int(x) for x in rng.split(":")) if rng else (0, None)
            except ValueError:
                raise DataError(f"bad item range in '{spec}': write FILE.jsonl@START:END") from None
            items = load_multiple_choice(task, path, b)[a:]
            if not items:
                raise DataError(f"'{spec}' selects no items")
            out += [torch.tensor(tokenizer.encode(it.context + it.continuations[it.label], add_special_tokens=False)) for it in items]
        else:
            if rng:
                raise DataError(f"'{spec}': item ranges apply to .jsonl files only")
            ids = torch.tensor(tokenizer.encode(load_text(path), add_special_tokens=False))
            if ids.numel() < window:
                raise DataError(f"{path} has {ids.numel()} tokens, fewer than one --window of {window}")
            n = min(max_windows, ids.numel() // window)
            stride = (ids.numel() - window) // max(n - 1, 1)
            out += [ids[i * stride : i * stride + window] for i in range(n)]
    return out


def sequences_digest(sequences: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for ids in sequences:
        h.update(ids.numpy().astype(np.int64).tobytes())
    return h.hexdigest()
