"""The ``kvq`` ops in standard ONNX: the translations ``torch.onnx.export`` uses for them.

Each function receives the op's arguments as the exporter passes them (tensors as graph values,
``None`` for absent pools, ints and floats as Python values) and records ONNX ops (opset 18)
doing what :func:`adaptive_kv.ops.reference_pack_rows` / :func:`~adaptive_kv.ops.reference_packed_attention`
do, so the model runs in a stock onnxruntime with no custom library:

- pack_rows: the clip search of :func:`adaptive_kv.formats.quantize_rows` op for op (same fp32
  arithmetic, fp16 rounding of scale/zero, round-half-even, errors summed in ``fold_sum``'s
  fixed order, first minimum), then codes shifted
  into bytes with integer multiplies and a sum (the split-halves layout of ``pack_codes``);
- packed_attention: each pool's filled rows sliced (``lengths`` as Slice ends, so a step reads
  what is filled, not the capacity), codes unpacked with BitShift/BitwiseAnd and dequantized,
  then one masked softmax over [cache, chunk]. GQA without copying K/V per query head: the
  g query heads of a KV head are folded into the row dimension of one MatMul;
- logit_stats: LogSoftmax, then -sum p log p and max p (the op's reference).

pack_rows and packed_attention keep the layout contract of the C++ kernels (see ``adaptive_kv/ops.py``), so the cache an
ONNX model writes is the cache the ``.pte`` reads, byte for byte up to rare rounding ties.
"""

from __future__ import annotations

import numpy as np
from onnxscript import FLOAT, FLOAT16, INT64, UINT8, ir
from onnxscript import opset18 as op

from adaptive_kv.formats import BIT_WIDTHS, CLIP_RATIOS
from adaptive_kv.ops import POOL_ARGS

OPSET = 18


def _const(array: np.ndarray):
    return op.Constant(value=ir.tensor(array))


def _i64(*values: int):
    return _const(np.array(values, dtype=np.int64))


def _f32(value):
    return _const(np.array(value, dtype=np.float32))


def _fold_sum(e, n: int):
    """Sum over the last dim (n values) in :func:`adaptive_kv.formats.fold_sum`'s order: the second
    half added onto the first until one value is left. The clip search's candidates can tie to
    the last bit, and ReduceSum's order is the runtime's to choose."""
    while n > 1:
        h = n // 2
        s = op.Add(op.Slice(e, _i64(0), _i64(h), _i64(-1)), op.Slice(e, _i64(h), _i64(2 * h), _i64(-1)))
        e = op.Concat(s, op.Slice(e, _i64(2 * h), _i64(n), _i64(-1)), axis=-1) if n % 2 else s
        n = h + n % 2
    return op.Squeeze(e, _i64(-1))


def kvq_pack_rows(x, bits: int, group_size: int = 64, active=None):
    """x: float32 [..., D] -> (codes uint8 [..., D*bits/8], scale fp16 [..., D/G], zero fp16 [..., D/G]);
    zeros where ``active`` (one-element bool) is false."""
    d = x.shape[-1]
    if not isinstance(d, int):
        raise ValueError("kvq::pack_rows in ONNX needs a static head_dim")
    groups, levels = d // group_size, (1 << bits) - 1
    lead = op.Shape(x, end=-1)  # [...]
    g = op.Reshape(x, _i64(-1, groups, 1, group_size))  # [N, G, 1, gs]
    lo, hi = op.ReduceMin(g, _i64(-1), keepdims=0), op.ReduceMax(g, _i64(-1), keepdims=0)  # [N, G, 1]
    ratios = _f32(CLIP_RATIOS)  # [R]
    mid = op.Div(op.Add(lo, hi), _f32(2.0))
    lo = op.Sub(mid, op.Mul(op.Sub(mid, lo), ratios))  # [N, G, R]
    hi = op.Add(mid, op.Mul(op.Sub(hi, mid), ratios))
    zero = op.Cast(lo, to=FLOAT16.dtype)
    zero_f = op.Cast(zero, to=FLOAT.dtype)
    span = op.Sub(hi, zero_f)
    scale = op.Cast(op.Where(op.Greater(span, _f32(0.0)), op.Div(span, _f32(float(levels))), _f32(1.0)), to=FLOAT16.dtype)
    tiny = _const(np.array(2.0**-24, dtype=np.float16))  # fp16 underflow guard
    scale = op.Where(op.Greater(op.Cast(scale, to=FLOAT.dtype), _f32(0.0)), scale, tiny)
    scale_f = op.Cast(scale, to=FLOAT.dtype)
    zero_e, scale_e = op.Unsqueeze(zero_f, _i64(-1)), op.Unsqueeze(scale_f, _i64(-1))  # [N, G, R, 1]
    codes = op.Clip(op.Round(op.Div(op.Sub(g, zero_e), scale_e)), _f32(0.0), _f32(float(levels)))  # [N, G, R, gs]
    e = op.Sub(op.Add(op.Mul(codes, scale_e), zero_e), g)
    err = _fold_sum(op.Mul(e, e), group_size)  # [N, G, R]
    best = op.ArgMin(err, axis=-1, keepdims=1)  # [N, G, 1] first minimum, as torch.argmin
    codes = op.GatherElements(codes, op.Expand(op.Unsqueeze(best, _i64(-1)), _i64(1, 1, 1, group_size)), axis=2)  # [N, G, 1, gs]
    scale, zero = op.GatherElements(scale, best, axis=2), op.GatherElements(zero, best, axis=2)  # [N, G, 1]
    codes = op.Cast(codes, to=INT64.dtype)
    if bits < 8:
        per_byte = 8 // bits
        lanes = op.Reshape(codes, _i64(0, groups, per_byte, group_size // per_byte))  # lane s: codes s*gs/k ...
        weights = _const(np.array([[1 << (s * bits)] for s in range(per_byte)], dtype=np.int64))  # [k, 1]
        codes = op.ReduceSum(op.Mul(lanes, weights), _i64(2), keepdims=0)  # [N, G, gs/k]
    out_shape = op.Concat(lead, _i64(d * bits // 8), axis=0)
    aff_shape = op.Concat(lead, _i64(groups), axis=0)
    outs = (op.Reshape(op.Cast(codes, to=UINT8.dtype), out_shape), op.Reshape(scale, aff_shape), op.Reshape(zero, aff_shape))
    if active is None:
        return outs
    # computed either way (a Where, not an If): the graph never stores the rows of an inactive width
    on = op.Reshape(active, _i64())  # scalar
    return tuple(op.Where(on, t, _const(np.zeros((), dtype=dt))) for t, dt in zip(outs, (np.uint8, np.float16, np.float16)))


def _filled(pool, n, layer: int):
    """Rows [0, n) of one layer's pool: [Hkv, n, X]."""
    if layer >= 0:
        rows = op.Slice(pool, op.Concat(_i64(layer, 0), axis=0), op.Concat(_i64(layer + 1), n, axis=0), _i64(0, 2))
        return op.Squeeze(rows, _i64(0))
    return op.Slice(pool, _i64(0), n, _i64(1))


def _dequantized(codes, scale, zero, bits: int, head_dim: int, group_size: int):
    """codes uint8 [Hkv, n, D*bits/8], scale/zero fp16 [Hkv, n, G] -> float32 [Hkv, n, D]."""
    groups = head_dim // group_size
    per_group = op.Reshape(codes, _i64(0, 0, groups, group_size * bits // 8))  # [Hkv, n, G, B]
    if bits < 8:
        per_byte = 8 // bits
        shifts = _const(np.array([[s * bits] for s in range(per_byte)], dtype=np.uint8))  # [k, 1]
        lanes = op.BitShift(op.Unsqueeze(per_group, _i64(3)), shifts, direction="RIGHT")  # [Hkv, n, G, k, B]
        lanes = op.BitwiseAnd(lanes, _const(np.array(1 << bits, dtype=np.uint8) - np.uint8(1)))
        per_group = op.Reshape(lanes, _i64(0, 0, groups, group_size))  # [Hkv, n, G, gs]
    x = op.Add(
        op.Mul(op.Cast(per_group, to=FLOAT.dtype), op.Unsqueeze(op.Cast(scale, to=FLOAT.dtype), _i64(-1))),
        op.Unsqueeze(op.Cast(zero, to=FLOAT.dtype), _i64(-1)),
    )
    return op.Reshape(x, _i64(0, 0, head_dim))


def _quantized_query(qs):
    """q_hat = q8 * s per row (last axis), s = max|row| / 127: :func:`adaptive_kv.formats.quantize_query`."""
    s = op.Div(op.ReduceMax(op.Abs(qs), _i64(-1), keepdims=1), _f32(127.0))
    nonzero = op.Greater(s, _f32(0.0))
    q8 = op.Clip(op.Round(op.Div(qs, op.Where(nonzero, s, _f32(1.0)))), _f32(-127.0), _f32(127.0))  # Round: half to even
    return op.Mul(op.Where(nonzero, q8, _f32(0.0)), s)


def kvq_packed_attention(q, k_chunk, v_chunk, lengths, *pools_and_consts, **kwargs):
    """The op's arguments in schema order (pools by position or name) -> (out [B, Hq, T, D], sum_p2 [B, Hq, T])."""
    names = (*POOL_ARGS, "scale", "group_size", "layer", "query_bits")
    a = {"group_size": 64, "layer": -1, "query_bits": 32} | {n: None for n in POOL_ARGS}
    a.update(zip(names, pools_and_consts))
    a.update(kwargs)
    group_size, layer, query_bits = int(a["group_size"]), int(a["layer"]), int(a["query_bits"])
    if query_bits not in (32, 8):
        raise ValueError(f"kvq::packed_attention: query_bits={query_bits}, expected 32 or 8")
    b, hq, _, d = q.shape
    hkv = k_chunk.shape[1]
    if not all(isinstance(s, int) for s in (hq, d, hkv)):
        raise ValueError("kvq::packed_attention in ONNX needs static head counts and head_dim")
    g = hq // hkv
    keys, values = [], []
    for i, bits in enumerate(BIT_WIDTHS):
        if a[f"k{bits}"] is None:
            continue
        n = op.Slice(lengths, _i64(i), _i64(i + 1))  # [1] filled slots of this pool
        if bits == 16:
            keys.append(op.Cast(_filled(a["k16"], n, layer), to=FLOAT.dtype))
            values.append(op.Cast(_filled(a["v16"], n, layer), to=FLOAT.dtype))
            continue
        for kv, out in (("k", keys), ("v", values)):
            parts = (_filled(a[f"{kv}{bits}{s}"], n, layer) for s in ("", "_scale", "_zero"))
            out.append(_dequantized(*parts, bits, d, group_size))  # [Hkv, n, D]
    # [B, Hkv, N + T, D]: the cache (shared by the batch), then the chunk
    batch = op.Shape(q, start=0, end=1)
    def with_chunk(cached, chunk):
        if not cached:
            return chunk
        cached = op.Concat(*cached, axis=1) if len(cached) > 1 else cached[0]
        cached = op.Expand(op.Unsqueeze(cached, _i64(0)), op.Concat(batch, _i64(hkv, 1, d), axis=0))
        return op.Concat(cached, chunk, axis=2)
    k_all, v_all = with_chunk(keys, k_chunk), with_chunk(values, v_chunk)
    t = op.Shape(q, start=2, end=3)  # [1]
    s_len = op.Shape(k_all, start=2, end=3)  # [1] N + T
    # the g query heads of KV head h are rows of one matmul: [B, Hkv, g*T, D] @ [B, Hkv, D, N+T]
    qg = op.Reshape(q, op.Concat(batch, _i64(hkv, -1, d), axis=0))
    if query_bits == 8:  # the int8 rows of q * scale (formats.quantize_query: same fp32 steps, ties to even), no scale after
        qg = _quantized_query(op.Mul(qg, _f32(float(a["scale"]))))
        s = op.MatMul(qg, op.Transpose(k_all, perm=[0, 1, 3, 2]))  # [B, Hkv, g*T, N+T]
    else:
        s = op.Mul(op.MatMul(qg, op.Transpose(k_all, perm=[0, 1, 3, 2])), _f32(float(a["scale"])))
    s = op.Reshape(s, op.Concat(batch, _i64(hkv, g), t, s_len, axis=0))  # [B, Hkv, g, T, N+T]
    # cache key j (< N) is visible to every query; chunk key N + j to query i when j <= i
    zero64, one64 = _i64(0), _i64(1)
    rows = op.Unsqueeze(op.Range(op.Squeeze(zero64), op.Squeeze(t), op.Squeeze(one64)), _i64(1))  # [T, 1]
    cols = op.Range(op.Squeeze(op.Sub(t, s_len)), op.Squeeze(t), op.Squeeze(one64))  # [N+T]: j - N
    visible = op.LessOrEqual(op.Unsqueeze(cols, _i64(0)), rows)  # [T, N+T]
    s = op.Where(visible, s, _f32(float("-inf")))
    p = op.Softmax(s, axis=-1)
    o = op.MatMul(op.Reshape(p, op.Concat(batch, _i64(hkv, -1), s_len, axis=0)), v_all)  # [B, Hkv, g*T, D]
    out = op.Reshape(o, op.Concat(batch, _i64(hq), t, _i64(d), axis=0))
    sum_p2 = op.Reshape(op.ReduceSum(op.Mul(p, p), _i64(-1), keepdims=0), op.Concat(batch, _i64(hq), t, axis=0))
    return out, sum_p2


def aten_amin(x, dim=(), keepdim: bool = False):
    """aten.amin; torch's ONNX library requires ``dim``, which means every dim when empty."""
    axes = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if not axes:
        return op.ReduceMin(x, keepdims=int(keepdim))
    return op.ReduceMin(x, _i64(*axes), keepdims=int(keepdim))


def kvq_logit_stats(logits):
    """logits [..., V] -> (entropy, confidence) [...]: :func:`adaptive_kv.ops.reference_logit_stats`."""
    logp = op.LogSoftmax(logits, axis=-1)
    p = op.Exp(logp)
    return op.Neg(op.ReduceSum(op.Mul(p, logp), _i64(-1), keepdims=0)), op.ReduceMax(p, _i64(-1), keepdims=0)


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``."""
    import torch

    from adaptive_kv import ops  # noqa: F401  (registers torch.ops.kvq)

    return {
        torch.ops.kvq.pack_rows.default: kvq_pack_rows,
        torch.ops.kvq.packed_attention.default: kvq_packed_attention,
        torch.ops.kvq.logit_stats.default: kvq_logit_stats,
        torch.ops.aten.amin.default: aten_amin,
    }
