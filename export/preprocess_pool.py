"""XNNPACK's delegate preprocessing spread over forked processes.

``to_edge_transform_and_lower`` hands the partitions of a program to ``XnnpackBackend.preprocess``
one after another (``BackendDetails.preprocess_multimethod``). Each call runs XNNPACK's passes
over its partition on fake tensors, single-threaded Python: ~40% of lowering SmolLM2-135M. The
calls are independent: each gets its own deep copy of its partition and its own named-data
store, and returns plain bytes and dicts. :func:`parallel_preprocess` therefore runs them in
forked workers, one partition per task. The program is the same byte for byte
(tests/test_export_graph.py).

Fork, not spawn: the partitions (edge-dialect programs holding their weights) are inherited by
the workers instead of pickled, and the workers are created after all tracing, at the point
their inputs exist. Workers run torch with one thread, as DataLoader's forked workers do.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
_JOBS: list[tuple] = []  # (partition program, compile specs), read by the forked workers


@dataclass
class PoolStats:
    partitions: int = 0  # preprocessed in the last call
    processes: int = 0  # 1: serial, in the calling process
    seconds: float = 0.0  # wall time of the call
    work: float = 0.0  # sum of the partitions' preprocess times (forked workers only)


# Default cap: a forked worker's memory grows with every page it touches (copy-on-write, and
# reference counting writes to every object read), and a program has a few dozen partitions.
MAX_PROCESSES = 8


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_init() -> None:
    torch.set_num_threads(1)


def _preprocess(i: int):
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    t0 = time.perf_counter()
    result = XnnpackBackend.preprocess(*_JOBS[i])
    return result, time.perf_counter() - t0


@contextlib.contextmanager
def parallel_preprocess(processes: int | None = None) -> Iterator[PoolStats]:
    """Within the block, XNNPACK preprocesses partitions in ``processes`` forked workers
    (default: the cores this process may run on, at most MAX_PROCESSES; 1, or a platform
    without fork, keeps ExecuTorch's serial loop). A worker that dies (say, killed for memory)
    costs time, not the export: the partitions are then compiled in this process."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    processes = min(available_cores(), MAX_PROCESSES) if processes is None else processes
    if "fork" not in multiprocessing.get_all_start_methods():
        processes = 1
    stats = PoolStats()
    saved = XnnpackBackend.__dict__.get("preprocess_multimethod")  # None: inherited from BackendDetails
    serial = XnnpackBackend.preprocess_multimethod  # bound to the class

    def multimethod(cls, edge_programs, compile_specs):
        global _JOBS
        t0 = time.perf_counter()
        keys = [(m, i) for m, progs in edge_programs.items() for i in range(len(progs))]
        n, done = min(processes, len(keys)), None
        if n > 1:
            _JOBS = [(edge_programs[m][i], compile_specs[m][i]) for m, i in keys]
            # biggest partitions first (the passes' cost grows with the nodes), so no worker is
            # left with a big one at the end while the others idle
            order = sorted(range(len(keys)), key=lambda j: -len(_JOBS[j][0].graph.nodes))
            try:
                with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init) as pool:
                    done = dict(zip(order, pool.map(_preprocess, order)))
            except BrokenProcessPool as e:
                log.warning("an XNNPACK preprocessing worker died (%s); compiling the partitions in this process", e)
            finally:
                _JOBS = []
        if done is None:
            n, stats.work = 1, 0.0
            out = serial(edge_programs, compile_specs)
        else:
            out = {m: [None] * len(progs) for m, progs in edge_programs.items()}
            for j, (m, i) in enumerate(keys):
                out[m][i] = done[j][0]
            stats.work = sum(t for _, t in done.values())
        stats.partitions, stats.processes, stats.seconds = len(keys), n, time.perf_counter() - t0
        return out

    XnnpackBackend.preprocess_multimethod = classmethod(multimethod)
    try:
        yield stats
    finally:
        if saved is not None:
            XnnpackBackend.preprocess_multimethod = saved
        else:
            del XnnpackBackend.preprocess_multimethod
