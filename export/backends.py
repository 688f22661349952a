"""One bundle, three implementations of its decoder step, behind one interface.

- ``torch``: the eager :class:`~export.graph.ExportableDecoder` rebuilt from the bundle's source
  model, policy (controller) and options, on the kvq ops' pure-PyTorch reference unless the
  compiled ATen kernels were loaded: the reference the other two are checked against;
- ``executorch``: ``model.pte`` in the ExecuTorch runtime with the kvq kernel library;
- ``onnxruntime``: ``model.onnx`` in stock onnxruntime (CPU execution provider).

Each backend: ``reset()``, ``forward(ids [T]) -> logits [T, V]`` (commits the tokens),
``step(ids) -> (logits, bits)``, ``feed(ids [N]) -> (last logits, bits [N])``, ``seq_len``,
``token_bits()``, ``max_seq_len``, ``chunk_size``, ``state()`` (the packed cache and bookkeeping,
by ExportableDecoder state name) and ``snapshot()`` / ``restore()`` (a prefix to score several
continuations from; the .pte keeps its state inside, so its snapshot is the token prefix,
replayed on restore).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import bundle as B
from .graph import ExportableDecoder, feed_in_chunks

BACKENDS = ("torch", "executorch", "onnxruntime")


class BackendError(ValueError):
    """A backend that cannot run this bundle."""


def reference_decoder(bundle: B.Bundle) -> tuple[ExportableDecoder, list[str]]:
    """The eager decoder the bundle was exported from, rebuilt from its manifest -> (decoder, warnings).

    Warnings name what differs from export time (a controller file whose sha256 changed)."""
    from adaptive_kv.model import load_model, model_id
    from adaptive_kv.policy import default_controller_path, make_policy

    from .pte import PteConfig, build_decoder

    o = bundle.manifest["options"]
    warnings = []
    model, _ = load_model(o.get("model"))
    controller = None
    if o["policy"] == "learned":
        controller = o.get("controller") or str(default_controller_path())
        if not Path(controller).is_file():
            raise BackendError(f"the bundle's controller {controller} is not on this machine; the torch reference needs it")
        want = (bundle.manifest["policy"].get("controller") or {}).get("sha256")
        if want and B.sha256_of(Path(controller)) != want:
            warnings.append(f"controller {controller} is not the file the bundle was exported with (sha256 differs)")
    policy = make_policy(o["policy"], controller=controller, model_id=model_id(model), budget_bits=o.get("budget_bits"))
    config = PteConfig(max_seq_len=o["max_seq_len"], weights=o["weights"], chunk_size=o["chunk_size"], kv_group_size=o["kv_group_size"], hadamard=o["hadamard"],
                       query_bits=o.get("query_bits", 32))  # bundles from before query_bits: fp32
    return build_decoder(model, policy, config), warnings


class TorchBackend:
    """The eager ExportableDecoder (state in its buffers)."""

    name = "torch"

    def __init__(self, decoder: ExportableDecoder):
        self.decoder = decoder.eval()
        self.max_seq_len, self.chunk_size = decoder.max_seq_len, decoder.chunk_size
        self.reset()

    @property
    def seq_len(self) -> int:
        return int(self.decoder.seq_len)

    def reset(self) -> None:
        self.decoder.reset()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(ids)[0]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, input_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T] -> (logits [T, V], widths [T]); ``input_pos`` (default: the cached length) as the
        program takes it: 0 restarts the sequence in-graph, whatever the state holds."""
        if input_pos is None:
            return self.decoder.step(ids)
        ids = ids.reshape(-1)
        logits = self.decoder(ids[None], torch.tensor([input_pos]))[0]
        return logits, self.decoder.token_bits[input_pos : input_pos + ids.numel()].long()

    def feed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.feed(ids)

    def token_bits(self) -> torch.Tensor:
        return self.decoder.token_widths()

    def state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.decoder.state_names(), self.decoder.state()))

    def snapshot(self):
        return self.state()

    def restore(self, snap) -> None:
        for name, value in snap.items():
            getattr(self.decoder, name).copy_(value)


class OnnxBackend:
    """model.onnx in onnxruntime (state held on this side)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        from .onnx_runner import OnnxDecoder

        self.runner = OnnxDecoder(path, threads)
        self.max_seq_len, self.chunk_size = self.runner.max_seq_len, self.runner.chunk_size

    @property
    def seq_len(self) -> int:
        return self.runner.seq_len

    def reset(self) -> None:
        self.runner.reset()

    def forward(self, ids):
        return self.runner.forward(ids)

    def step(self, ids):
        return self.runner.step(ids)

    def feed(self, ids):
        return self.runner.feed(ids)

    def token_bits(self):
        return self.runner.token_bits()

    def state(self) -> dict[str, torch.Tensor]:
        return self.runner.state()

    def snapshot(self):
        return self.runner.snapshot()

    def restore(self, snap) -> None:
        self.runner.restore(snap)


class PteBackend:
    """model.pte in the ExecuTorch runtime (state inside the program)."""

    name = "executorch"

    def __init__(self, path: Path, threads: int | None = None, state_names: list[str] | None = None):
        from adaptive_kv import ops

        from .bundle_runner import set_runtime_threads
        from .pte_runner import PteDecoder

        ops.load_executorch_library()
        if threads is not None:
            set_runtime_threads(threads)
        self.runner = PteDecoder(path)
        self.max_seq_len, self.chunk_size = self.runner.max_seq_len, self.runner.chunk_size
        self._tokens: list[int] = []  # the sequence so far: what a snapshot replays
        self.state_names = state_names

    @property
    def seq_len(self) -> int:
        return self.runner.seq_len

    def reset(self) -> None:
        self.runner.reset()
        self._tokens = []

    def forward(self, ids):
        out = self.runner.forward(ids)
        self._tokens += ids.reshape(-1).tolist()
        return out

    def step(self, ids):
        start = self.seq_len
        logits = self.forward(ids)
        return logits, self.runner.token_bits()[start : self.seq_len].long()

    def feed(self, ids):
        return feed_in_chunks(self.step, ids, self.seq_len, self.max_seq_len, self.chunk_size)

    def token_bits(self):
        return self.runner.token_bits()

    def state(self) -> dict[str, torch.Tensor]:
        """Every state tensor when the program has a ``state`` method, else token_bits only."""
        if self.state_names and self.runner.has_state_method():
            return self.runner.state(self.state_names)
        return {"token_bits": self.token_bits()}

    def snapshot(self):
        return list(self._tokens)

    def restore(self, snap) -> None:
        self.reset()
        if snap:
            self.feed(torch.tensor(snap))


def open_backend(name: str, bundle: B.Bundle, reference: ExportableDecoder | None = None, threads: int | None = None):
    """The named backend for ``bundle`` (``reference``: a prebuilt torch decoder to reuse)."""
    if name == "torch":
        return TorchBackend(reference if reference is not None else reference_decoder(bundle)[0])
    if name == "executorch":
        return PteBackend(bundle.program, threads, (bundle.manifest.get("onnx") or {}).get("state") or bundle.manifest["methods"].get("state_names"))
    if name == "onnxruntime":
        return OnnxBackend(bundle.onnx_model, threads)
    raise BackendError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
