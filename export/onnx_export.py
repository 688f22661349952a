"""Export an :class:`~export.graph.ExportableDecoder` to ONNX: the same step, state as explicit I/O.

An ONNX model cannot keep mutable state, so the decoding state travels the way
``past_key_values`` does in the ONNX LLM ecosystem: every buffer the ``.pte`` keeps between
calls (the pools, their scales and zero points, ``lengths``, ``seq_len``, ``token_bits``,
``spent_bits``, the rarity counts, the sequence number) is a graph input ``past.<name>`` and
comes back updated as the output ``present.<name>``; the caller feeds each step's ``present``
into the next step's ``past``. A new sequence starts from all-zero state (or any state at
``input_pos`` 0, exactly as the ``.pte`` restarts).

    inputs:  input_ids int64 [1, sequence_length] (1..chunk_size), input_pos int64 [1], past.<name> ...
    outputs: logits float32 [1, sequence_length, vocab], present.<name> ...

The kvq ops become standard ONNX (:mod:`export.onnx_ops`), so stock onnxruntime runs the
model; 8da4w weights stay int4 values in int8 tensors with their scales, dequantized in the
graph, and activations are quantized per token as torchao does in eager. Weights are stored as
external data (``model.onnx.data``) beside the model.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from .graph import ExportableDecoder

log = logging.getLogger(__name__)

ONNX_OPSET = 18
INPUT_IDS, INPUT_POS, LOGITS = "input_ids", "input_pos", "logits"
PAST, PRESENT = "past.", "present."
SEQUENCE_DIM = "sequence_length"


class OnnxExportError(RuntimeError):
    """The ONNX model could not be built or fails its own checks."""


class StatefulStep(nn.Module):
    """``decoder.forward`` with its state passed in and returned: (ids, input_pos, *state) -> (logits, *state')."""

    def __init__(self, decoder: ExportableDecoder):
        super().__init__()
        self.decoder = decoder
        self.names = decoder.state_names()

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the decoder writes its buffers in place: give it copies, which the graph then returns
        live = {n: s.clone() for n, s in zip(self.names, state)}
        logits = torch.func.functional_call(self.decoder, live, (ids, input_pos))
        return (logits, *(live[n] for n in self.names))


def state_spec(decoder: ExportableDecoder) -> list[dict]:
    """Every state tensor: name, dtype, shape (what the manifest documents and a runner allocates)."""
    return [
        {"name": n, "dtype": str(getattr(decoder, n).dtype).removeprefix("torch."), "shape": list(getattr(decoder, n).shape)}
        for n in decoder.state_names()
    ]


def io_spec(decoder: ExportableDecoder) -> dict:
    """The model's inputs and outputs, for the manifest."""
    state = state_spec(decoder)
    return {
        "opset": ONNX_OPSET,
        "inputs": [
            {"name": INPUT_IDS, "dtype": "int64", "shape": [1, SEQUENCE_DIM]},
            {"name": INPUT_POS, "dtype": "int64", "shape": [1]},
            *({**s, "name": PAST + s["name"]} for s in state),
        ],
        "outputs": [
            {"name": LOGITS, "dtype": "float32", "shape": [1, SEQUENCE_DIM, decoder.vocab_size]},
            *({**s, "name": PRESENT + s["name"]} for s in state),
        ],
        "state": [s["name"] for s in state],
        "sequence_length": {"min": 1, "max": decoder.chunk_size},
        "note": f"feed each {PRESENT}<name> output back as {PAST}<name>; all-zero state (or input_pos 0) starts a sequence",
    }


def _name_sequence_dim(model) -> None:
    """The exporter names the dynamic dim after its symbol (s27); give it a documented name."""
    from onnxscript import ir

    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.name in (INPUT_IDS, LOGITS) and value.shape is not None:
            dims = list(value.shape)
            dims[1] = ir.SymbolicDim(SEQUENCE_DIM)
            value.shape = ir.Shape(dims)


def check_standard(model_path: Path) -> None:
    """onnx.checker on the saved model (with its external data), and no custom op domain."""
    import onnx

    try:
        onnx.checker.check_model(str(model_path))
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"{model_path.name} fails onnx.checker: {e}") from e
    model = onnx.load(str(model_path), load_external_data=False)
    domains = {n.domain for n in model.graph.node} | {o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")}
    custom = sorted(d for d in domains if d not in ("", "ai.onnx"))
    if custom or model.functions:
        raise OnnxExportError(f"{model_path.name} uses non-standard ops (domains {custom}, {len(model.functions)} local functions)")


def export_onnx(decoder: ExportableDecoder, path: str | Path, metadata: dict | None = None, seconds: dict[str, float] | None = None) -> Path:
    """Write ``path`` (+ ``<path>.data``, the weights) for ``decoder`` and check it. ``metadata``:
    key/values stored in the model's metadata_props (lists comma-joined), as the .pte's constant
    methods. The decoder's own state is untouched (tracing runs on fake tensors). Files are
    written under temporary names and renamed into place."""
    from .onnx_ops import translation_table

    seconds = {} if seconds is None else seconds
    path = Path(path)
    step = StatefulStep(decoder).eval()
    state = tuple(getattr(decoder, n) for n in step.names)
    t_max = decoder.chunk_size
    example = (torch.zeros(1, min(2, t_max), dtype=torch.int64), torch.zeros(1, dtype=torch.int64), *state)
    dynamic = ({1: torch.export.Dim("t", min=1, max=t_max)} if t_max > 1 else None, None, (None,) * len(state))  # *state: one tuple
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(step, example, dynamic_shapes=dynamic)
    seconds["onnx: torch.export"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        custom_translation_table=translation_table(),
        opset_version=ONNX_OPSET,
        input_names=[INPUT_IDS, INPUT_POS, *(PAST + n for n in step.names)],
        output_names=[LOGITS, *(PRESENT + n for n in step.names)],
        verbose=False,
        # the default optimizer's pattern rewriter takes minutes on 30 layers and made the tiny
        # model's decode step slower in onnxruntime (6.0 vs 1.7 ms): fold constants and prune only
        optimize=False,
    )
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants_ir(onnx_program.model)
    onnxscript.optimizer.remove_unused_nodes(onnx_program.model)
    _name_sequence_dim(onnx_program.model)
    props = {"chunk_size": decoder.chunk_size, "max_seq_len": decoder.max_seq_len, **(metadata or {})}
    onnx_program.model.metadata_props.update(
        {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in props.items()}
    )
    seconds["onnx: translate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the external data file is named after the model file: save under the final stem in a temp folder
    tmp_dir = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        onnx_program.save(str(tmp_dir / path.name), external_data=True)
        check_standard(tmp_dir / path.name)
        data = data_path(path)
        (tmp_dir / data.name).replace(data)
        (tmp_dir / path.name).replace(path)
    finally:
        for f in tmp_dir.glob("*"):
            f.unlink()
        tmp_dir.rmdir()
    seconds["onnx: save + check"] = time.perf_counter() - t0
    log.info("wrote %s (+ %s, %.1f MB)", path.name, data_path(path).name, data_path(path).stat().st_size / 1e6)
    return path


def data_path(model_path: str | Path) -> Path:
    """Where the exporter puts the weights of ``model_path``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")
