"""The ``kvq`` custom ops: packing KV rows, fused attention over the packed cache, logit statistics.

Three layers, always in this order:

1. Schemas (``torch.library``), fake kernels (shapes only, for ``torch.export``) and a readable
   pure-PyTorch reference, registered as the CompositeExplicitAutograd implementation, so the ops
   run and export on any machine.
2. :func:`load_library` loads the compiled ATen library (``runtime_ops/build/libkvq_aten.so``, built
   by ``make setup``), whose CPU kernels then take over from the reference.
3. :func:`executorch_library_path` is the ExecuTorch kernel library to ``ctypes``-load before a
   ``.pte`` that calls the ops is run (:func:`load_executorch_library` does that).

Schemas (every op also has an ``.out`` variant with keyword-only mutable outputs, the form an
ExecuTorch program calls):

    kvq::pack_rows(Tensor x, int bits, int group_size=64, Tensor? active=None) -> (Tensor, Tensor, Tensor)
        x: [..., D] float32 -> codes uint8 [..., D*bits/8], scale fp16 [..., D/G], zero fp16 [..., D/G],
        bit-exact with :func:`adaptive_kv.formats.quantize_rows` (clip search on). ``active``: a
        one-element bool tensor; false gives zeros without packing (an exported graph skips a width
        no token goes to with this flag instead of a cond).

    kvq::packed_attention(Tensor q, Tensor k_chunk, Tensor v_chunk, Tensor lengths,
                          Tensor? k2, Tensor? k2_scale, Tensor? k2_zero, Tensor? v2, Tensor? v2_scale, Tensor? v2_zero,
                          ... the same six for 4 and 8 bits ..., Tensor? k16, Tensor? v16,
                          float scale, int group_size=64, int layer=-1, int query_bits=32) -> (Tensor, Tensor)
        q: [B, Hq, T, D], k_chunk / v_chunk: [B, Hkv, T, D] float32 (the current chunk, attended
        causally); pools: one layer of :class:`~adaptive_kv.cache.PackedKVCache` (``k4``: uint8
        [Hkv, C, D*4/8], ``k4_scale``: fp16 [Hkv, C, D/G], ``k16``: fp16 [Hkv, C, D], ...), absent
        pools None; lengths: int64 [4], the filled slots of the 2-, 4-, 8- and 16-bit pools (a
        tensor, so it stays dynamic in an exported graph). With ``layer >= 0`` the pools are every
        layer's ([layers, Hkv, C, ...], the cache's own buffers) and layer ``layer`` is read in place
        (an exported graph that selected the layer itself would copy it on every call). Returns out
        [B, Hq, T, D] float32 and sum_p2 [B, Hq, T] (sum_j p_j^2 of each query row). Query head h
        uses KV head h // (Hq/Hkv). ``query_bits=8`` defines the op on the int8 query rows of
        :func:`~adaptive_kv.formats.quantize_query` (q * scale quantized per row), which the
        kernel scores packed keys with in integer arithmetic; 32 keeps q in fp32.

    kvq::logit_stats(Tensor logits) -> (Tensor, Tensor)
        logits: [..., V] float32 -> entropy [...] (nats) and confidence [...] (max probability) of
        softmax(logits): the controller's next-token features (:func:`~adaptive_kv.features.next_token_stats`)
        in two passes over the vocabulary instead of five.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .formats import BIT_WIDTHS, PACKED_BIT_WIDTHS, QUERY_BITS, RowFormat, dequantize_rows, quantize_query, quantize_rows

BUILD_DIR = Path(__file__).resolve().parent.parent / "runtime_ops" / "build"
ATEN_LIBRARY = BUILD_DIR / "libkvq_aten.so"
EXECUTORCH_LIBRARY = BUILD_DIR / "libkvq_executorch.so"
BUILD_HINT = "run `make setup` (or `.venv/bin/python runtime_ops/build.py`) to build it"

# Pool tensor names in schema order: the PackedKVCache buffer names of one layer.
POOL_ARGS: tuple[str, ...] = tuple(
    f"{kv}{b}{suffix}" for b in PACKED_BIT_WIDTHS for kv in "kv" for suffix in ("", "_scale", "_zero")
) + ("k16", "v16")

_POOL_SCHEMA = ", ".join(f"Tensor? {name}" for name in POOL_ARGS)
_PACK_ARGS = "Tensor x, int bits, int group_size=64, Tensor? active=None"
_ATTN_ARGS = f"Tensor q, Tensor k_chunk, Tensor v_chunk, Tensor lengths, {_POOL_SCHEMA}, float scale, int group_size=64, int layer=-1, int query_bits=32"

torch.library.define("kvq::pack_rows", f"({_PACK_ARGS}) -> (Tensor, Tensor, Tensor)")
torch.library.define(
    "kvq::pack_rows.out",
    f"({_PACK_ARGS}, *, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!) zero) -> (Tensor(a!), Tensor(b!), Tensor(c!))",
)
torch.library.define("kvq::logit_stats", "(Tensor logits) -> (Tensor, Tensor)")
torch.library.define("kvq::logit_stats.out", "(Tensor logits, *, Tensor(a!) entropy, Tensor(b!) confidence) -> (Tensor(a!), Tensor(b!))")
torch.library.define("kvq::packed_attention", f"({_ATTN_ARGS}) -> (Tensor, Tensor)")
torch.library.define(
    "kvq::packed_attention.out", f"({_ATTN_ARGS}, *, Tensor(a!) out, Tensor(b!) sum_p2) -> (Tensor(a!), Tensor(b!))"
)


# ---- shape validation, shared by the fake kernels and the reference --------------------------
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"kvq: {msg}")


def _pack_shapes(x: torch.Tensor, bits: int, group_size: int, active: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """Validated output shapes of pack_rows: (codes, scale/zero)."""
    if active is not None:
        _check(active.dtype == torch.bool and active.numel() == 1, f"active must be a one-element bool tensor, got {active.dtype} {tuple(active.shape)}")
    _check(x.dim() >= 1 and x.dtype == torch.float32, f"x must be float32 rows [..., head_dim], got {x.dtype} {tuple(x.shape)}")
    _check(bits in PACKED_BIT_WIDTHS, f"bits={bits}: pack_rows packs {PACKED_BIT_WIDTHS} (16-bit rows are stored as fp16)")
    RowFormat(bits, x.shape[-1], group_size)  # group_size vs head_dim, with its own message
    d = x.shape[-1]
    return [*x.shape[:-1], d * bits // 8], [*x.shape[:-1], d // group_size]


def _attention_shapes(q, k_chunk, v_chunk, lengths, pools: Mapping[str, torch.Tensor | None], group_size: int) -> None:
    """Shape/dtype checks that need no tensor data (the kernels also check lengths <= capacity)."""
    _check(q.dim() == 4 and q.dtype == torch.float32, f"q must be float32 [B, Hq, T, D], got {q.dtype} {tuple(q.shape)}")
    b, hq, t, d = q.shape
    _check(k_chunk.dim() == 4 and k_chunk.dtype == torch.float32, f"k_chunk must be float32 [B, Hkv, T, D], got {k_chunk.dtype} {tuple(k_chunk.shape)}")
    hkv = k_chunk.shape[1]
    for name, x in (("k_chunk", k_chunk), ("v_chunk", v_chunk)):
        _check(x.dtype == torch.float32 and tuple(x.shape) == (b, hkv, t, d), f"{name} must be float32 {[b, hkv, t, d]}, got {x.dtype} {tuple(x.shape)}")
    _check(hq % hkv == 0, f"q heads ({hq}) must be a multiple of KV heads ({hkv})")
    _check(lengths.dtype == torch.int64 and tuple(lengths.shape) == (len(BIT_WIDTHS),), f"lengths must be int64 [{len(BIT_WIDTHS)}], got {lengths.dtype} {tuple(lengths.shape)}")
    for bits in BIT_WIDTHS:
        names = [n for n in POOL_ARGS if n[1:].split("_")[0] == str(bits)]
        given = [pools.get(n) is not None for n in names]
        _check(all(given) or not any(given), f"the {bits}-bit pool needs all of {names} or none")
        if not any(given):
            continue
        cap = pools[names[0]].shape[1] if pools[names[0]].dim() == 3 else -1
        for n in names:
            x = pools[n]
            if bits == 16:
                want, dt = (hkv, cap, d), torch.float16
            elif n.endswith(("_scale", "_zero")):
                want, dt = (hkv, cap, d // group_size), torch.float16
            else:
                RowFormat(bits, d, group_size)
                want, dt = (hkv, cap, d * bits // 8), torch.uint8
            _check(x.dtype == dt and tuple(x.shape) == want, f"{n} must be {dt} {list(want)}, got {x.dtype} {tuple(x.shape)}")


_ATTN_NAMES = ("q", "k_chunk", "v_chunk", "lengths", *POOL_ARGS, "scale", "group_size", "layer", "query_bits")


def _bind(args: tuple, kwargs: dict) -> dict:
    """packed_attention arguments by name (the dispatcher may pass any of them as keywords)."""
    bound = {n: None for n in POOL_ARGS} | {"group_size": 64, "layer": -1, "query_bits": 32}
    bound.update(zip(_ATTN_NAMES, args))
    bound.update(kwargs)
    return bound


def _attention_call(args: tuple, kwargs: dict):
    """-> (q, k_chunk, v_chunk, lengths, pools, scale, group_size, query_bits), shapes validated."""
    a = _bind(args, kwargs)
    _check(a["query_bits"] in QUERY_BITS, f"query_bits={a['query_bits']}: the query is fp32 (32) or int8 rows (8)")
    pools = {n: a[n] for n in POOL_ARGS}
    if a["layer"] >= 0:  # whole-model pools: read one layer
        for n, x in pools.items():
            if x is not None:
                _check(x.dim() >= 2 and a["layer"] < x.shape[0], f"layer={a['layer']}: {n} must be [layers, Hkv, capacity, X] with more layers, got {tuple(x.shape)}")
                pools[n] = x[a["layer"]]
    _attention_shapes(a["q"], a["k_chunk"], a["v_chunk"], a["lengths"], pools, a["group_size"])
    return a["q"], a["k_chunk"], a["v_chunk"], a["lengths"], pools, a["scale"], a["group_size"], a["query_bits"]


# ---- fake kernels: what torch.export traces --------------------------------------------------
@torch.library.register_fake("kvq::pack_rows")
def _pack_rows_fake(x, bits, group_size=64, active=None):
    codes_shape, aff_shape = _pack_shapes(x, bits, group_size, active)
    return x.new_empty(codes_shape, dtype=torch.uint8), x.new_empty(aff_shape, dtype=torch.float16), x.new_empty(aff_shape, dtype=torch.float16)


@torch.library.register_fake("kvq::packed_attention")
def _packed_attention_fake(*args, **kwargs):
    q = _attention_call(args, kwargs)[0]
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:3], dtype=torch.float32)


def _logit_shape(logits: torch.Tensor) -> list[int]:
    _check(logits.dim() >= 1 and logits.dtype == torch.float32 and logits.shape[-1] >= 1,
           f"logits must be float32 [..., vocab] with a vocabulary, got {logits.dtype} {tuple(logits.shape)}")
    return list(logits.shape[:-1])


@torch.library.register_fake("kvq::logit_stats")
def _logit_stats_fake(logits):
    shape = _logit_shape(logits)
    return logits.new_empty(shape), logits.new_empty(shape)


@torch.library.impl("kvq::logit_stats.out", "Meta")
def _logit_stats_out_meta(logits, *, entropy, confidence):
    _logit_shape(logits)
    return entropy, confidence


# The .out variants only need shapes at compile time (ExecuTorch re-traces its out-variant graph).
@torch.library.impl("kvq::pack_rows.out", "Meta")
def _pack_rows_out_meta(x, bits, group_size=64, active=None, *, codes, scale, zero):
    _pack_shapes(x, bits, group_size, active)
    return codes, scale, zero


@torch.library.impl("kvq::packed_attention.out", "Meta")
def _packed_attention_out_meta(*args, out, sum_p2, **kwargs):
    _attention_call(args, kwargs)
    return out, sum_p2


# ---- the readable reference (CompositeExplicitAutograd: used until load_library()) -----------
def reference_pack_rows(
    x: torch.Tensor, bits: int, group_size: int = 64, active: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_rows, with the op's argument checks; zeros when ``active`` is false."""
    codes_shape, aff_shape = _pack_shapes(x, bits, group_size, active)
    if active is not None and not bool(active):
        return torch.zeros(codes_shape, dtype=torch.uint8), torch.zeros(aff_shape, dtype=torch.float16), torch.zeros(aff_shape, dtype=torch.float16)
    return quantize_rows(x, RowFormat(bits, x.shape[-1], group_size))


def reference_packed_attention(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize every filled pool slot, append the chunk, plain causal softmax attention.

    Takes the op's arguments (positional in schema order, or by name)."""
    q, k_chunk, v_chunk, lengths, pools, scale, group_size, query_bits = _attention_call(args, kwargs)
    b, hq, t, d = q.shape
    hkv = k_chunk.shape[1]
    keys, values = [torch.zeros(hkv, 0, d)], [torch.zeros(hkv, 0, d)]
    for bits, n in zip(BIT_WIDTHS, lengths.tolist()):
        if n == 0:
            continue
        _check(pools[f"k{bits}"] is not None and 0 <= n <= pools[f"k{bits}"].shape[1], f"{bits}-bit pool: length {n} outside its capacity")
        if bits == 16:
            keys.append(pools["k16"][:, :n].float()), values.append(pools["v16"][:, :n].float())
            continue
        fmt = RowFormat(bits, d, group_size)
        for kv, out in (("k", keys), ("v", values)):
            out.append(dequantize_rows(*(pools[f"{kv}{bits}{s}"][:, :n] for s in ("", "_scale", "_zero")), fmt))  # [Hkv, n, D]
    n_cache = sum(k.shape[1] for k in keys)
    k_all = torch.cat([torch.cat(keys, 1).expand(b, -1, -1, -1), k_chunk.float()], dim=2)  # [B, Hkv, N+T, D]
    v_all = torch.cat([torch.cat(values, 1).expand(b, -1, -1, -1), v_chunk.float()], dim=2)
    g = hq // hkv  # query head h uses KV head h // g
    k_all, v_all = k_all.repeat_interleave(g, dim=1), v_all.repeat_interleave(g, dim=1)  # [B, Hq, N+T, D]
    if query_bits == 8:  # scale first: the int8 rows are of q * scale
        s = quantize_query(q.float() * scale) @ k_all.transpose(-1, -2)  # [B, Hq, T, N+T]
    else:
        s = (q.float() @ k_all.transpose(-1, -2)) * scale
    # cache keys are all visible; chunk key j is visible to chunk query i when j <= i
    visible = torch.ones(t, n_cache + t, dtype=torch.bool)
    visible[:, n_cache:] = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    return p @ v_all, p.square().sum(-1)


def reference_logit_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-sum p log p and max p of softmax(logits) over the last dim, through log_softmax."""
    _logit_shape(logits)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * logp).sum(-1), p.amax(-1)


@torch.library.impl("kvq::logit_stats", "CompositeExplicitAutograd")
def _logit_stats_reference(logits):
    return reference_logit_stats(logits)


@torch.library.impl("kvq::logit_stats.out", "CompositeExplicitAutograd")
def _logit_stats_out_reference(logits, *, entropy, confidence):
    h, c = reference_logit_stats(logits)
    entropy.resize_(h.shape).copy_(h), confidence.resize_(c.shape).copy_(c)
    return entropy, confidence


@torch.library.impl("kvq::pack_rows", "CompositeExplicitAutograd")
def _pack_rows_reference(x, bits, group_size=64, active=None):
    return reference_pack_rows(x, bits, group_size, active)


@torch.library.impl("kvq::pack_rows.out", "CompositeExplicitAutograd")
def _pack_rows_out_reference(x, bits, group_size=64, active=None, *, codes, scale, zero):
    for dst, src in zip((codes, scale, zero), reference_pack_rows(x, bits, group_size, active)):
        dst.copy_(src)
    return codes, scale, zero


@torch.library.impl("kvq::packed_attention", "CompositeExplicitAutograd")
def _packed_attention_reference(*args, **kwargs):
    return reference_packed_attention(*args, **kwargs)


@torch.library.impl("kvq::packed_attention.out", "CompositeExplicitAutograd")
def _packed_attention_out_reference(*args, out, sum_p2, **kwargs):
    o, sp = reference_packed_attention(*args, **kwargs)
    out.copy_(o), sum_p2.copy_(sp)
    return out, sum_p2


# ---- the compiled libraries ------------------------------------------------------------------
_aten_handle: ctypes.CDLL | None = None
_executorch_handle: ctypes.CDLL | None = None


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"the {what} ({path}) is not built: {BUILD_HINT}")
    return path


def load_library() -> Path:
    """Load the compiled ATen kernels (idempotent); from then on CPU calls run the C++ kernels."""
    global _aten_handle
    path = _require(ATEN_LIBRARY, "kvq ATen kernel library")
    if _aten_handle is None:
        torch.ops.load_library(str(path))
        _aten_handle = ctypes.CDLL(str(path))  # same handle; reaches the ISA switch below
    return path


def library_loaded() -> bool:
    return _aten_handle is not None


def executorch_library_path() -> Path:
    """Path of the ExecuTorch kernel library (``ctypes.CDLL`` it before loading a .pte)."""
    return _require(EXECUTORCH_LIBRARY, "kvq ExecuTorch kernel library")


def load_executorch_library() -> Path:
    """ctypes-load the ExecuTorch kernels (idempotent): registers kvq::*.out with the runtime."""
    global _executorch_handle
    path = executorch_library_path()
    if _executorch_handle is None:
        _executorch_handle = ctypes.CDLL(str(path))
    return path


_ISAS = {"scalar": 0, "avx2": 1, "neon": 2, "avx512": 3}


def best_kernel_isa() -> str:
    """The fastest path compiled into the ATen library ("avx512", "avx2", "neon" or "scalar")."""
    load_library()
    return {v: k for k, v in _ISAS.items()}[_aten_handle.kvq_best_isa()]


def compiled_kernel_isas() -> list[str]:
    """Every path compiled into the ATen library, best last (an AVX-512 build also has the AVX2 loops)."""
    best = best_kernel_isa()
    return ["scalar"] + (["avx2"] if best == "avx512" else []) + ([best] if best != "scalar" else [])


@contextlib.contextmanager
def kernel_isa(name: str) -> Iterator[None]:
    """Run the compiled kernels on one path (one of compiled_kernel_isas()), e.g. to test the scalar reference."""
    load_library()
    handles = [h for h in (_aten_handle, _executorch_handle) if h is not None]
    if name not in _ISAS or any(h.kvq_set_isa(_ISAS[name]) < 0 for h in handles):
        raise ValueError(f"kernel path {name!r} is not compiled in; choose one of {compiled_kernel_isas()}")
    try:
        yield
    finally:
        best = _ISAS[best_kernel_isa()]
        for h in handles:
            h.kvq_set_isa(best)


# ---- convenience wrappers --------------------------------------------------------------------
def pack_rows(x: torch.Tensor, bits: int, group_size: int = 64, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [..., D] float32 -> (codes, scale, zero), as stored in a PackedKVCache pool (zeros if ``active`` is false)."""
    return torch.ops.kvq.pack_rows(x, bits, group_size, active)


def cache_pools(cache, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One layer of a PackedKVCache as op arguments: ({name: [Hkv, C, ...]}, lengths int64 [4])."""
    buffers = dict(cache.named_buffers())
    pools = {name: buffers[name][layer] for name in POOL_ARGS if name in buffers}
    lengths = torch.tensor([cache.lengths.get(b, 0) for b in BIT_WIDTHS], dtype=torch.int64)
    return pools, lengths


def packed_attention(
    q: torch.Tensor,
    k_chunk: torch.Tensor,
    v_chunk: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    lengths: torch.Tensor,
    scale: float,
    group_size: int = 64,
    layer: int = -1,
    query_bits: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention over one layer's pools, or layer ``layer`` of whole-model pools (see the
    module docstring) -> (out, sum_p2)."""
    unknown = set(pools) - set(POOL_ARGS)
    if unknown:
        raise ValueError(f"unknown pool tensors {sorted(unknown)}; expected names from {POOL_ARGS}")
    return torch.ops.kvq.packed_attention(q, k_chunk, v_chunk, lengths, *(pools.get(n) for n in POOL_ARGS), scale, group_size, layer, query_bits)
