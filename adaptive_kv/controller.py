"""The learned precision controller: features in, bit-width class out.

The paper's MLP (4 -> 128 -> 128 -> 4, ReLU), with feature normalization stored beside the
weights. The file is safetensors (no pickle): weights plus JSON metadata naming the feature
order, normalization, class bit-widths, the budget and the model it was trained for.
Training lives in its own module; this one only defines the network and its file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .features import FEATURE_NAMES
from .formats import BIT_WIDTHS

FORMAT_VERSION = 1


class ControllerError(ValueError):
    """A controller file that is missing, malformed, or made for another model/feature set."""


@dataclass(frozen=True)
class ControllerMeta:
    feature_names: tuple[str, ...] = FEATURE_NAMES
    class_bits: tuple[int, ...] = BIT_WIDTHS
    hidden: int = 128
    budget_bits: float = 4.0  # average storage bits per value (scales included) it was trained for
    class_fractions: tuple[float, ...] = ()  # expected share of each class: sizes the cache pools
    price: float = 0.0  # nats per bit/value subtracted per class cost so the training text meets the budget
    model: str = ""  # identifier of the model it was trained for (name + dims)
    extra: dict = field(default_factory=dict)  # training data digest, command, losses ...
    version: int = FORMAT_VERSION


class PrecisionController(nn.Module):
    """features [T, F] (raw) -> class logits [T, len(class_bits)]."""

    def __init__(self, meta: ControllerMeta):
        super().__init__()
        self.meta = meta
        f, h, c = len(meta.feature_names), meta.hidden, len(meta.class_bits)
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        self.mlp = nn.Sequential(nn.Linear(f, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.feature_mean) / self.feature_std)

    def choose_bits(self, features: torch.Tensor, price: float | None = None) -> torch.Tensor:
        """[T, F] -> [T] bit-widths: argmax over classes of log p_k - price * cost_k
        (price None = the calibrated one in the file; 0 = the plain argmax)."""
        bits = torch.tensor(self.meta.class_bits, device=features.device)
        return bits[self.priced_scores(features, self.meta.price if price is None else price).argmax(-1)]

    def class_costs(self) -> torch.Tensor:
        """[C] storage bits per value of each class (scales included, group 64)."""
        from .formats import nominal_bits_per_value

        return torch.tensor([nominal_bits_per_value(b) for b in self.meta.class_bits])

    def priced_scores(self, features: torch.Tensor, price: float) -> torch.Tensor:
        """[T, F] -> [T, C] log p_k - price * cost_k."""
        return self(features).log_softmax(-1) - price * self.class_costs().to(features.device)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        meta = asdict(self.meta)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata={"kvexport_controller": json.dumps(meta)})
        tmp.chmod(0o644)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, model_id: str | None = None, feature_names: tuple[str, ...] | None = None) -> PrecisionController:
        """Load without pickle; reject a controller made for another model or feature set."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ControllerError(f"controller file {path} not found; train one with `kvexport train-controller` or pass --controller PATH")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("kvexport_controller")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ControllerError(f"{path} is not a readable safetensors controller ({e})") from e
        if raw is None:
            raise ControllerError(f"{path} has no 'kvexport_controller' metadata: not a kvexport controller")
        d = json.loads(raw)
        if d.get("version") != FORMAT_VERSION:
            raise ControllerError(f"{path} has controller format version {d.get('version')}, this kvexport reads {FORMAT_VERSION}")
        meta = ControllerMeta(**{**d, "feature_names": tuple(d["feature_names"]), "class_bits": tuple(d["class_bits"]), "class_fractions": tuple(d["class_fractions"])})
        if model_id is not None and meta.model and meta.model != model_id:
            raise ControllerError(f"{path} was trained for model '{meta.model}', not '{model_id}'; train one for this model")
        if feature_names is not None and tuple(feature_names) != meta.feature_names:
            raise ControllerError(f"{path} uses features {meta.feature_names}, expected {tuple(feature_names)}")
        ctrl = cls(meta)
        ctrl.load_state_dict(tensors)
        return ctrl.eval()
