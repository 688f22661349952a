"""Run a bundle's ``model.onnx`` (see :mod:`export.onnx_export`) in stock onnxruntime.

The host holds the decoding state (``past.*`` in, ``present.*`` out, kept as onnxruntime values
so a step hands the previous step's outputs straight back without copies) and otherwise behaves
as :class:`~export.pte_runner.PteDecoder`: chunks the prompt, checks the context, picks tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adaptive_kv.cache import ContextOverflowError

from .graph import feed_in_chunks
from .onnx_export import INPUT_IDS, INPUT_POS, LOGITS, PAST, PRESENT

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class OnnxModelError(ValueError):
    """The file is not a loadable kvexport ONNX decoder."""


class OnnxDecoder:
    """One sequence at a time through the ONNX decoder: ``feed`` chunks, ``generate`` greedily."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise OnnxModelError(f"{path} not found; export the bundle with `kvexport export --formats pte,onnx`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise OnnxModelError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:300]}); re-export the bundle") from e
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_IDS not in inputs or INPUT_POS not in inputs:
            raise OnnxModelError(f"{path} is not a kvexport decoder (no {INPUT_IDS}/{INPUT_POS} inputs); re-export the bundle")
        self.names = [n[len(PAST):] for n in inputs if n.startswith(PAST)]
        self._specs = {n: inputs[PAST + n] for n in self.names}
        self._outputs = [LOGITS, *(PRESENT + n for n in self.names)]
        self.max_seq_len = int(self._specs["token_bits"].shape[0])
        seq_dim = inputs[INPUT_IDS].shape[1]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.chunk_size = int(meta.get("chunk_size", seq_dim if isinstance(seq_dim, int) else 1))
        self.eos_ids = tuple(int(x) for x in meta.get("eos_ids", "").split(",") if x)
        self.reset()

    def _zeros(self, name: str) -> np.ndarray:
        spec = self._specs[name]
        return np.zeros(spec.shape, dtype=_NUMPY[spec.type])

    def reset(self) -> None:
        """Start a new sequence from all-zero state (the next step runs at input_pos 0)."""
        self._state = {n: self._zeros(n) for n in self.names}
        self.seq_len = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [T] -> logits [T, V], the state advanced by T tokens."""
        t = ids.numel()
        if not 1 <= t <= self.chunk_size:
            raise ValueError(f"a step takes 1..{self.chunk_size} tokens (the exported chunk size), got {t}")
        if self.seq_len + t > self.max_seq_len:
            raise ContextOverflowError(f"context of {self.seq_len + t} tokens exceeds the model's max_seq_len={self.max_seq_len}")
        feed = {INPUT_IDS: ids.reshape(1, t).to(torch.int64).numpy(), INPUT_POS: np.array([self.seq_len], dtype=np.int64)}
        feed.update({PAST + n: v for n, v in self._state.items()})
        outs = self.session.run(self._outputs, feed)
        self._state = dict(zip(self.names, outs[1:]))
        self.seq_len += t
        return torch.from_numpy(outs[0][0])

    def token_bits(self) -> torch.Tensor:
        """int8 [max_seq_len]: the width each cached position < seq_len is stored at."""
        return torch.from_numpy(np.asarray(self._state["token_bits"]))

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [T] -> (logits [T, V], bits [T] widths stored)."""
        start = self.seq_len
        logits = self.forward(ids)
        return logits, self.token_bits()[start : self.seq_len].long()

    def feed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N] in chunks of chunk_size -> (last logits [V], bits [N])."""
        return feed_in_chunks(self.step, ids, self.seq_len, self.max_seq_len, self.chunk_size)

    def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        """The sequence so far (state and length), to :meth:`restore` later; outputs are never
        written in place, so no copy is needed."""
        return dict(self._state), self.seq_len

    def restore(self, snap: tuple[dict[str, np.ndarray], int]) -> None:
        """Continue from ``snap`` (a :meth:`snapshot`, or any state dict by state name and its length)."""
        state, self.seq_len = snap
        self._state = dict(state)

    def state(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Copies of the state tensors (all, or ``names``)."""
        return {n: torch.from_numpy(np.array(self._state[n])) for n in (names or self.names)}
