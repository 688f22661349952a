"""Third-party log lines the kvexport commands hide: known, harmless on this toolchain, and
printed by the dozen on every export, where they bury the stage log and the result tables.

Each entry names the logger (or warning category) and the exact message; anything else from
these libraries still prints. ``install()`` runs before each command and in the ONNX export's
worker process (before that imports torchao), never on import.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> text the (formatted) message contains
LOG_LINES: dict[str, tuple[str, ...]] = {
    # torchao's CPU wheel also carries CUDA-only extensions (mxfp8, cutlass) it tries to load
    "torchao": ("Failed to load ",),
    # torchao registers its config enums with pytree, which torch >= 2.11 handles natively
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    # torch.onnx registers torchvision's ops when torchvision is there; kvexport does not use it
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
    # empty int lists (e.g. a reduction over no axes) in onnxscript's translation: INTS is right
    "onnx_ir._convenience": ("Attribute type is ambiguous because it is an empty sequence",),
}
# (category, message regex): torch.export's run_decompositions deep-copies its own module call graph's tree specs
WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


class _DropKnown(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(t in message for t in self.texts)


def install() -> None:
    """Hide the lines above in this process (idempotent)."""
    for name, texts in LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(texts))
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
