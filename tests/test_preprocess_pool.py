"""export/preprocess_pool.py without a lowering: XNNPACK's preprocess replaced by a recorder, so
the tests see which process compiled which partition. (That a real lowering through the pool
gives the serial program byte for byte: tests/test_export_graph.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
from executorch.exir.backend.backend_details import BackendDetails, PreprocessResult

from export.preprocess_pool import parallel_preprocess


def _programs(n: int) -> list[torch.export.ExportedProgram]:
    """n programs of different sizes (i + 1 linears), so the pool's biggest-first order differs from theirs."""
    return [torch.export.export(torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(i + 1)]), (torch.randn(1, 2),)) for i in range(n)]


def _recorder(parent: int, die_in_worker: bool = False):
    def preprocess(program, specs):
        if die_in_worker and os.getpid() != parent:
            os._exit(3)
        layers = sum(1 for node in program.graph.nodes if node.op == "placeholder") // 2
        return PreprocessResult(processed_bytes=f"{specs[0]}:{layers}:{os.getpid()}".encode())

    return staticmethod(preprocess)


def _call(programs, tags):
    return XnnpackBackend.preprocess_multimethod({"forward": programs[:3], "other": programs[3:]}, {"forward": [[t] for t in tags[:3]], "other": [[t] for t in tags[3:]]})


def test_workers_compile_every_partition_and_results_keep_their_order(monkeypatch):
    monkeypatch.setattr(XnnpackBackend, "preprocess", _recorder(os.getpid()))
    programs, tags = _programs(5), list("abcde")
    with parallel_preprocess(2) as stats:
        out = _call(programs, tags)
    got = [r.processed_bytes.decode().split(":") for m in ("forward", "other") for r in out[m]]
    assert [(tag, int(layers)) for tag, layers, _ in got] == [(t, i + 1) for i, t in enumerate(tags)]
    assert os.getpid() not in {int(pid) for *_, pid in got}  # all compiled in forked workers
    assert (stats.partitions, stats.processes) == (5, 2) and stats.work > 0
    assert XnnpackBackend.preprocess_multimethod.__func__ is BackendDetails.preprocess_multimethod.__func__


@pytest.mark.parametrize("processes", [1, 8])
def test_one_process_or_one_partition_stays_serial(monkeypatch, processes):
    monkeypatch.setattr(XnnpackBackend, "preprocess", _recorder(os.getpid()))
    programs = _programs(5 if processes == 1 else 1)
    with parallel_preprocess(processes) as stats:
        out = XnnpackBackend.preprocess_multimethod({"forward": programs}, {"forward": [["x"]] * len(programs)})
    assert {int(r.processed_bytes.decode().split(":")[2]) for r in out["forward"]} == {os.getpid()}
    assert stats.processes == 1


def test_a_dead_worker_falls_back_to_this_process(monkeypatch, caplog):
    monkeypatch.setattr(XnnpackBackend, "preprocess", _recorder(os.getpid(), die_in_worker=True))
    programs, tags = _programs(5), list("abcde")
    with parallel_preprocess(2) as stats:
        out = _call(programs, tags)
    got = [r.processed_bytes.decode().split(":") for m in ("forward", "other") for r in out[m]]
    assert [tag for tag, *_ in got] == tags and {int(pid) for *_, pid in got} == {os.getpid()}
    assert stats.processes == 1 and "worker died" in caplog.text
