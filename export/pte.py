"""Export an :class:`~export.graph.ExportableDecoder` to an ExecuTorch ``.pte``, stage by stage.

Stages (each logged with its time): build the decoder (and quantize its linears for ``8da4w``),
``torch.export`` its methods, ``to_edge_transform_and_lower`` with the XNNPACK partitioner,
``to_executorch``, write (temp file, then rename).

The program's methods:
- ``forward(tokens [1, T], input_pos [1]) -> logits [1, T, V]``, 1 <= T <= chunk_size (dynamic):
  the signature ExecuTorch's LLM runners (``TextLLMRunner``) call; input_pos 0 starts a new sequence;
- ``token_bits() -> int8 [max_seq_len]``: the width each cached position is stored at (entries past the sequence are stale);
  (no ``reset`` method: calling forward at input_pos 0 is the reset, as for stock runners; a
  second state-mutating method also made ExecuTorch 1.5 emit a program whose ``reset`` failed
  to load, "offset index out of range", for the fp16-pool SmolLM2 layout);
- ``state()`` (only with ``state_method=True``, for tests and debugging): copies of every
  state buffer, in ``ExportableDecoder.state_names()`` order;
- constant methods ExecuTorch's LLM runners read, with their meanings: ``get_max_seq_len`` = the
  most tokens one forward call takes (the prefill chunk), ``get_max_context_len`` = the cache's
  capacity in tokens, ``get_bos_id``, ``get_eos_ids``, ``get_vocab_size``, ``use_kv_cache``,
  ``enable_dynamic_shape``; plus the KV plan (``kv_pool_bits``, ``kv_pool_capacities``,
  ``kv_group_size``, ``kv_hadamard``, ``get_chunk_size``).

The cache lives in the program as mutable buffers shared by all methods
(``share_mutable_buffers``). The program needs no initial state: forward at input_pos 0 zeroes
the bookkeeping, the pools are never read past ``lengths``, token_bits is written before it is
read, and rarity counts count only when tagged with the current sequence number (initial
values would need ExecuTorch's InitializedMutableBufferPass, whose offsets 1.5 emits wrong for
a second method sharing the buffers: "offset index 63 out of range" at load).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptive_kv.formats import QUERY_BITS

from .graph import ExportableDecoder
from .weight_quant import WeightQuantConfig, quantize_8da4w

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "8da4w")


class PteExportError(ValueError):
    """Bad export options."""


@dataclass(frozen=True)
class PteConfig:
    max_seq_len: int = 512
    chunk_size: int = 32  # prefill chunk = largest T of one forward call
    weights: str = "fp32"  # "8da4w": int8 dynamic activations x int4 grouped weights (torchao), run by XNNPACK
    weight_group_size: int = 32  # 8da4w weight group (must divide every quantized linear's in_features)
    kv_group_size: int = 64
    hadamard: bool = True
    query_bits: int = 32  # 8: attention scores the packed keys with int8 query rows (kvq_kernels.h)
    state_method: bool = False  # also export `state` (copies of the whole cache: tests, debugging)
    check_ir: bool = False  # run EXIR's edge-dialect validator while lowering (tests; see lower)
    processes: int | None = None  # XNNPACK preprocesses partitions in this many forked workers (None: the cores available)

    @property
    def weight_quant(self) -> WeightQuantConfig:
        """How ``weights="8da4w"`` chooses its int4 weights (export/weight_quant.py)."""
        return WeightQuantConfig(group_size=self.weight_group_size)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise PteExportError(f"weights={self.weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.max_seq_len <= 0 or not 1 <= self.chunk_size <= self.max_seq_len:
            raise PteExportError(f"need max_seq_len > 0 and 1 <= chunk_size <= max_seq_len, got max_seq_len={self.max_seq_len}, chunk_size={self.chunk_size}")
        if self.weight_group_size <= 0:
            raise PteExportError(f"weight_group_size must be positive, got {self.weight_group_size}")
        if self.processes is not None and self.processes < 1:
            raise PteExportError(f"processes must be at least 1, got {self.processes}")
        if self.query_bits not in QUERY_BITS:
            raise PteExportError(f"query_bits={self.query_bits}: the attention's query is fp32 (32) or int8 rows (8)")


@dataclass
class PteReport:
    path: Path
    bytes: int
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    methods: tuple[str, ...] = ()
    decoder: ExportableDecoder | None = None  # the eager module that was exported (its state untouched)


@contextlib.contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    log.info("export stage %s ...", name)
    yield
    seconds[name] = time.perf_counter() - t0
    log.info("export stage %s: %.1f s", name, seconds[name])


@contextlib.contextmanager
def _as_forward(module: torch.nn.Module, fn: Callable) -> Iterator[torch.nn.Module]:
    """Export another method of ``module`` under its own buffer names (shadows forward)."""
    module.forward = fn
    try:
        yield module
    finally:
        del module.forward


def build_decoder(model, policy, config: PteConfig) -> ExportableDecoder:
    """The decoder the .pte will run (weights quantized as configured); also the eager reference."""
    if config.weights == "8da4w":
        model = quantize_8da4w(model, config.weight_quant)
    return ExportableDecoder(
        model, policy, config.max_seq_len, chunk_size=config.chunk_size, group_size=config.kv_group_size, hadamard=config.hadamard,
        query_bits=config.query_bits,
    ).eval()


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def metadata(decoder: ExportableDecoder, tokenizer=None) -> dict:
    """Constant methods: what ExecuTorch's LLM runners read, plus the KV precision plan."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return {
        "get_max_seq_len": decoder.chunk_size,  # per forward call, as TextLLMRunner's prefill reads it
        "get_max_context_len": decoder.max_seq_len,
        "get_vocab_size": decoder.vocab_size,
        "get_bos_id": -1 if bos is None else int(bos),
        "get_eos_ids": _eos_ids(decoder.model, tokenizer) or [-1],
        "get_n_layers": decoder.num_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": decoder.chunk_size > 1,
        "get_chunk_size": decoder.chunk_size,
        "kv_pool_bits": list(decoder.pool_bits),
        "kv_pool_capacities": list(decoder.capacities),
        "kv_group_size": decoder.group_size,
        "kv_hadamard": decoder.hadamard,
    }


def export_programs(decoder: ExportableDecoder, state_method: bool = False) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of forward (dynamic T in 1..chunk_size), token_bits and optionally state
    (tracing runs on fake tensors: the decoder's own state is left as it was)."""
    t_max = decoder.chunk_size
    example = (torch.zeros(1, min(2, t_max), dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    dynamic = ({1: torch.export.Dim("t", min=1, max=t_max)}, None) if t_max > 1 else None
    with torch.no_grad():
        programs = {"forward": torch.export.export(decoder, example, dynamic_shapes=dynamic)}
        for name, fn in (("token_bits", decoder.token_widths),):
            with _as_forward(decoder, fn) as m:
                programs[name] = torch.export.export(m, ())
        if state_method:
            with _as_forward(decoder, decoder.state) as m:
                programs["state"] = torch.export.export(m, ())
    return programs


def lower(
    programs: dict[str, torch.export.ExportedProgram],
    constants: dict,
    seconds: dict[str, float] | None = None,
    check_ir: bool = False,
    stock: bool = False,
    processes: int | None = None,
):
    """-> ExecutorchProgramManager: XNNPACK for what it runs, portable + kvq kernels for the rest.

    ``check_ir``: run EXIR's edge-dialect validator (every op's dtypes against its kernel
    schema). It changes nothing in the program and takes ~14% of to_edge_transform_and_lower, so
    user exports skip it, as ExecuTorch's own LLM export does; the tests turn it on.
    Three things make kvexport's lowering cheaper than the stock flow and leave the program byte
    for byte the same: :class:`~export.partition.XnnpackLinearPartitioner` (one whole-program
    re-trace fewer), :func:`~export.qdq.rewrite_8da4w` (8da4w q/dq ops with meta kernels; it
    rewrites ``programs`` in place) and :func:`~export.preprocess_pool.parallel_preprocess`
    (XNNPACK's partitions compiled in ``processes`` forked workers; default: the cores this
    process may use). ``stock=True`` lowers as ExecuTorch's flow does: XNNPACK's own partitioner,
    the ops as traced, partitions compiled one after another (tests and bench/bench_export.py
    compare)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    from .partition import XnnpackLinearPartitioner
    from .preprocess_pool import parallel_preprocess
    from .qdq import rewrite_8da4w

    seconds = {} if seconds is None else seconds
    pool = contextlib.nullcontext() if stock else parallel_preprocess(processes)
    with _stage("to_edge_transform_and_lower", seconds), pool as stats:
        if not stock:
            for ep in programs.values():
                rewrite_8da4w(ep)
        edge = to_edge_transform_and_lower(
            programs,
            partitioner={"forward": [XnnpackPartitioner() if stock else XnnpackLinearPartitioner()]},
            constant_methods=constants,
            compile_config=EdgeCompileConfig(_check_ir_validity=check_ir),
        )
        if stats is not None:
            work = f", {stats.work:.1f} s of work" if stats.processes > 1 else ""
            log.info("XNNPACK preprocessed %d partitions in %d process(es): %.1f s%s", stats.partitions, stats.processes, stats.seconds, work)
    with _stage("to_executorch", seconds):
        return edge.to_executorch(
            ExecutorchBackendConfig(
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
                emit_mutable_buffer_names=True,
                run_reinplace_pass=True,  # index_put on the pools -> index_put_: writes the window, not a copy of the pool
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),  # plan memory for the largest T
                extract_delegate_segments=True,
            )
        )


def write_atomically(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def export_pte(
    model,
    tokenizer,
    policy,
    max_seq_len: int,
    weights: str = "fp32",
    out_path: str | Path = "model.pte",
    **options,
) -> PteReport:
    """Export ``model`` (an HF LlamaForCausalLM) with ``policy``'s packed cache to ``out_path``.

    ``options``: the other :class:`PteConfig` fields (chunk_size, weight_group_size, kv_group_size,
    hadamard, query_bits, state_method, check_ir, processes). Returns the path, size and per-stage seconds."""
    config = PteConfig(max_seq_len=max_seq_len, weights=weights, **options)
    seconds: dict[str, float] = {}
    with _stage("build", seconds):
        decoder = build_decoder(model, policy, config)
    with _stage("torch.export", seconds):
        programs = export_programs(decoder, config.state_method)
    program = lower(programs, metadata(decoder, tokenizer), seconds, config.check_ir, processes=config.processes)
    out = Path(out_path)
    with _stage("write", seconds):
        data = program.buffer
        write_atomically(data, out)
    log.info("wrote %s (%.1f MB)", out, len(data) / 1e6)
    return PteReport(out, len(data), seconds, tuple(programs) + tuple(metadata(decoder, tokenizer)), decoder)
