"""The XNNPACK partitioner as kvexport lowers with it: one whole-program re-trace fewer.

``to_edge_transform_and_lower`` keeps the ops a partitioner names (``aten.linear`` for XNNPACK)
from being decomposed. When the partitioner also gives a per-node filter, as XNNPACK's does (a
linear it cannot run must still be decomposed for the portable kernels), EXIR applies it with
two more ``run_decompositions`` after the first (``EDGE_DO_NOT_DECOMP``); without a filter it
needs one. :class:`XnnpackLinearPartitioner` runs the filter itself on the nodes EXIR would
apply it to (the graph and its control-flow branches) and drops it when it accepts all of them,
which it does for every linear of an exported decoder (constant fp32 or 8da4w weights). The
lowered program is the same byte for byte (tests/test_export_graph.py).
"""

from __future__ import annotations

from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir.graph_module import get_control_flow_submodules


class XnnpackLinearPartitioner(XnnpackPartitioner):
    def ops_to_not_decompose(self, ep):
        ops, keep = super().ops_to_not_decompose(ep)
        if keep is None:
            return ops, None
        preserved = set(ops)
        graphs = [ep.graph_module, *(m for _, m, _ in get_control_flow_submodules(ep.graph_module))]
        nodes = (n for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target in preserved)
        return (ops, None) if all(keep(n) for n in nodes) else (ops, keep)
