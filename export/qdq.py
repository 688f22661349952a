"""8da4w linears as XNNPACK's quantized_decomposed ops: the same delegate, lowered in half the time.

torchao's 8da4w linear traces to ``torchao.choose_qparams_affine`` / ``quantize_affine`` /
``dequantize_affine`` (per-token int8 activations) and ``dequantize_affine`` (int4 weights in
groups). Those ops are CompositeImplicitAutograd: every pass of ``to_edge_transform_and_lower``
that re-traces the graph (EXIR's edge passes, then ~17 XNNPACK passes per delegate) runs their
Python bodies op by op on fake tensors again; on SmolLM2-135M that was ~30% of the lowering.
``quantized_decomposed.choose_qparams_per_token_asymmetric`` / ``quantize_per_token`` /
``dequantize_per_token`` / ``dequantize_per_channel_group`` say the same thing with meta kernels,
and XNNPACK's partitioner takes either spelling of the pattern to the same dynamically quantized
fully-connected node (its activation qparams are computed at run time, in the delegate, by either
spelling). The lowered program is byte-identical to lowering torchao's ops (tests,
bench/bench_export.py).

Only the exact patterns are rewritten: a per-token int8 asymmetric choose_qparams whose scale
and zero point feed nothing but its own quantize -> dequantize chains, and 2-D int8 weights
dequantized in groups along the input dimension. Anything else is left as traced.
"""

from __future__ import annotations

import operator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import has_free_symbols

INT8_RANGE = (-128, 127)


def _torchao_ops():
    import torchao.quantization.quant_primitives  # noqa: F401  (defines torch.ops.torchao)

    ao = torch.ops.torchao
    return ao.choose_qparams_affine.default, ao.quantize_affine.default, ao.dequantize_affine.default


def _is_per_token_int8(choose: torch.fx.Node) -> bool:
    x, mapping, block, dtype, qmin, qmax = (list(choose.args) + [None] * 6)[:6]
    shape = x.meta["val"].shape
    return (
        mapping == "ASYMMETRIC" and dtype == torch.int8 and (qmin, qmax) == INT8_RANGE
        and list(block[:-1]) == [1] * (len(shape) - 1) and block[-1] == shape[-1]
    )


def _int8_qdq_of(node: torch.fx.Node, src: torch.fx.Node, scale: torch.fx.Node, zero: torch.fx.Node) -> bool:
    """node(src, block, scale, zero, int8, -128, 127, ...): quantize_affine or dequantize_affine."""
    a = node.args
    return a[0] is src and a[2] is scale and a[3] is zero and a[4] == torch.int8 and tuple(a[5:7]) == INT8_RANGE


def _activation_chains(choose, quantize_op, dequantize_op):
    """(x, scale, zero, quantizes, dequantizes) of a per-token choose_qparams, or None."""
    x = choose.args[0]
    items = {u.args[1]: u for u in choose.users if u.target is operator.getitem}
    if sorted(items) != [0, 1] or len(choose.users) != 2:
        return None
    scale, zero = items[0], items[1]
    quantizes = [u for u in scale.users if u.target is quantize_op]
    dequantizes = [d for q in quantizes for d in q.users]
    if not quantizes or not all(_int8_qdq_of(q, x, scale, zero) for q in quantizes):
        return None
    if not all(d.target is dequantize_op and _int8_qdq_of(d, d.args[0], scale, zero) for d in dequantizes):
        return None
    if set(scale.users) | set(zero.users) != set(quantizes) | set(dequantizes):
        return None
    return x, scale, zero, quantizes, dequantizes


def _output_dtype(dequantize: torch.fx.Node) -> torch.dtype:
    return dequantize.args[7] if len(dequantize.args) > 7 else dequantize.kwargs.get("output_dtype", torch.float32)


def _set(node: torch.fx.Node, target, args: tuple) -> None:
    node.target, node.args, node.kwargs = target, args, {}


def _fake_val(node: torch.fx.Node):
    """The node's output on its inputs' fake values (call inside the program's fake mode)."""
    return node.target(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args))


def rewrite_8da4w(ep: torch.export.ExportedProgram) -> int:
    """Rewrite ``ep``'s torchao 8da4w q/dq ops in place (node meta recomputed on its fake
    tensors); -> how many activation chains and weight dequantizes were rewritten."""
    graph = ep.graph_module.graph
    if not any(n.op == "call_function" and getattr(n.target, "namespace", None) == "torchao" for n in graph.nodes):
        return 0
    choose_op, quantize_op, dequantize_op = _torchao_ops()
    qd = torch.ops.quantized_decomposed
    fake = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    count = 0
    for node in list(graph.nodes):
        if node.target is choose_op and _is_per_token_int8(node):
            chains = _activation_chains(node, quantize_op, dequantize_op)
            if chains is None:
                continue
            x, scale, zero, quantizes, dequantizes = chains
            _set(node, qd.choose_qparams_per_token_asymmetric.default, (x, torch.int8))
            for q in quantizes:
                _set(q, qd.quantize_per_token.default, (x, scale, zero, *INT8_RANGE, torch.int8))
            for d in dequantizes:
                _set(d, qd.dequantize_per_token.default, (d.args[0], scale, zero, *INT8_RANGE, torch.int8, _output_dtype(d)))
            with fake:
                node.meta["val"] = _fake_val(node)  # scale [..., 1] fp64, zero [..., 1] int64
                scale.meta["val"], zero.meta["val"] = node.meta["val"]
                for n in (*quantizes, *dequantizes):
                    n.meta["val"] = _fake_val(n)
            count += 1
        elif node.target is dequantize_op:
            w, block, scale, zero = node.args[:4]
            wv = w.meta["val"]
            if not (wv.dim() == 2 and len(block) == 2 and block[0] == 1 and node.args[4] == torch.int8 and zero is not None):
                continue
            if has_free_symbols(wv.shape):  # a weight has a static shape; a dynamic one is an activation
                continue
            if scale.meta["val"].shape != (wv.shape[0], wv.shape[1] // block[1]) or wv.shape[1] % block[1]:
                continue
            qmin, qmax = node.args[5:7]
            _set(node, qd.dequantize_per_channel_group.default, (w, scale, zero, qmin, qmax, torch.int8, block[1], _output_dtype(node)))
            with fake:
                node.meta["val"] = _fake_val(node)
            count += 1
    ep.graph_module.recompile()
    return count
