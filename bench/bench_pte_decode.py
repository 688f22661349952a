"""End-to-end decode speed of exported programs at a context depth, side by side in one run.

    python bench/bench_pte_decode.py --bundle adaptive=/tmp/bundles/smol-learned-8da4w \
        --bundle fp16-cache=/tmp/bundles/smol-fp16-8da4w --stock stock=/tmp/stock/stock-8da4w.pte \
        --depth 4096 --steps 32 --warmup 4 --threads 1

Bundles (kvexport export) are prefilled with ``depth`` tokens of WikiText-2 validation text in
their own chunks, so a learned policy makes its real choices; then ``steps`` greedy decode steps
are timed one by one after ``warmup`` untimed ones, in wall time and in CPU time of the calling
thread (with --threads 1 every kernel runs on it, so that figure is what the step costs, less
sensitive to other processes on the machine than wall time). The stock program (bench/stock_executorch.py:
transformers' export, fp32 static cache) attends over its whole cache every step whatever it
holds, so it is timed at positions depth.. without a prefill. Programs take turns step by step
(each round prefills all of them, then times one step of each in turn, alternating the order) so
background load hits all alike; the median over every timed step is reported, with ratios to the first program. torch's own thread pool is sized like
ExecuTorch's: the host loop's argmax would otherwise leave OpenMP workers spinning on the other
cores. JSON (+ a bar plot) to bench/results/.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from export.bundle_runner import RunStats

RESULTS = Path(__file__).parent / "results"


def _named(specs: tuple[str, ...]) -> list[tuple[str, Path]]:
    out = []
    for s in specs:
        name, _, path = s.rpartition("=")
        out.append((name or Path(path).name, Path(path)))
    return out


def _timed(fn) -> tuple[object, float, float]:
    """fn() -> (its result, wall ms, CPU ms of this thread)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.thread_time()
    return out, 1000 * (t1 - t0), 1000 * (c1 - c0)


class BundleProgram:
    """A bundle prefilled to ``depth``; each timing round decodes from that same depth again."""

    def __init__(self, path: Path, depth: int, text_ids: torch.Tensor):
        from export.bundle_runner import BundleRunner

        self.runner = BundleRunner(path)
        self.dec = self.runner.decoder
        if depth + 1 >= self.dec.max_seq_len:
            raise click.BadParameter(f"{path}: depth {depth} does not fit its {self.dec.max_seq_len}-token context")
        self.prompt = text_ids[:depth]
        self.kv = {}
        self.tok = 0

    def start(self) -> None:
        """A new sequence: prefill the prompt (untimed)."""
        self.dec.reset()
        logits, _ = self.dec.feed(self.prompt)
        self.tok = int(logits.argmax())

    def step(self) -> tuple[float, float] | None:
        """One greedy decode step -> (wall ms, CPU ms), None when the context is full."""
        if self.dec.seq_len >= self.dec.max_seq_len:
            return None
        x = torch.tensor([self.tok])
        logits, wall, cpu = _timed(lambda: self.dec.forward(x))
        self.tok = int(logits[-1].argmax())
        return wall, cpu

    def finish(self) -> None:
        stats = RunStats(prompt_tokens=len(self.prompt))
        self.runner.kv_usage(stats)
        self.kv = {"kv_bytes_in_use": sum(stats.kv_bytes_by_bits.values()), "kv_tokens_by_bits": stats.kv_tokens_by_bits,
                   "kv_bits_per_value": stats.kv_bits_per_value(self.runner.values_per_token)}

    def describe(self) -> dict:
        m = self.runner.bundle.manifest
        return {"kind": "bundle", "policy": m["policy"]["name"], "kv_budget_bits": m["policy"].get("kv_budget_bits"),
                "weights": m["weights"]["scheme"], "max_seq_len": m["cache"]["max_seq_len"], **self.kv}


class StockProgram:
    def __init__(self, path: Path, depth: int):
        from executorch.runtime import Runtime

        self.path, self.depth = path, depth
        program = Runtime.get().load_program(str(path))
        self.forward = program.load_method("forward")
        self.max_seq_len = int(program.load_method("get_max_seq_len").execute([])[0])
        self.pos, self.tok = depth, 1

    def start(self) -> None:
        self.pos, self.tok = self.depth, 1

    def step(self) -> tuple[float, float] | None:
        if self.pos >= self.max_seq_len:
            return None
        args = [torch.tensor([[self.tok]]), torch.tensor([self.pos])]
        (logits,), wall, cpu = _timed(lambda: self.forward.execute(args))
        self.pos += 1
        self.tok = int(logits[0, -1].argmax())
        return wall, cpu

    def finish(self) -> None:
        pass

    def describe(self) -> dict:
        return {"kind": "stock transformers export (fp32 static cache)", "path": str(self.path)}


@click.command()
@click.option("--bundle", "bundles", multiple=True, help="[NAME=]bundle folder (kvexport export); repeatable.")
@click.option("--stock", "stocks", multiple=True, help="[NAME=]stock .pte (bench/stock_executorch.py); repeatable.")
@click.option("--depth", default=4096, show_default=True, help="Tokens in the cache when decode is timed.")
@click.option("--steps", default=32, show_default=True, help="Timed decode steps per round.")
@click.option("--warmup", default=4, show_default=True, help="Untimed decode steps before each round.")
@click.option("--rounds", default=2, show_default=True, help="Passes over all programs (interleaved).")
@click.option("--threads", default=1, show_default=True, help="ExecuTorch thread pool size.")
@click.option("--out", "out_name", default=None, help="Result file stem (default pte_decode_<depth>_<threads>t).")
def main(bundles, stocks, depth, steps, warmup, rounds, threads, out_name):
    from adaptive_kv import ops
    from adaptive_kv.tasks import calibration_path, load_text
    from transformers import AutoTokenizer

    from export.bundle_runner import set_runtime_threads

    ops.load_executorch_library()
    set_runtime_threads(threads)
    torch.set_num_threads(threads)
    programs: list[tuple[str, object]] = []
    text_ids = None
    for name, path in _named(bundles):
        if text_ids is None:  # the bundle's own tokenizer
            tok = AutoTokenizer.from_pretrained(str(path))
            text_ids = torch.tensor(tok.encode(load_text(calibration_path()), add_special_tokens=False)[:depth])
        programs.append((name, BundleProgram(path, depth, text_ids)))
    for name, path in _named(stocks):
        programs.append((name, StockProgram(path, depth)))
    if not programs:
        raise click.UsageError("give at least one --bundle or --stock")
    times: dict[str, list[float]] = {n: [] for n, _ in programs}
    cpu: dict[str, list[float]] = {n: [] for n, _ in programs}
    console = Console(stderr=True)
    for r in range(rounds):
        with console.status(f"round {r + 1}/{rounds}: prefilling {depth} tokens"):
            for _, prog in programs:
                prog.start()
        with console.status(f"round {r + 1}/{rounds}: decoding"):
            for i in range(warmup + steps):  # one step of each program in turn (alternating order)
                for name, prog in programs if i % 2 == 0 else programs[::-1]:
                    timed = prog.step()
                    if timed is not None and i >= warmup:
                        times[name].append(timed[0])
                        cpu[name].append(timed[1])
        for _, prog in programs:
            prog.finish()
    base = statistics.median(times[programs[0][0]])
    base_cpu = statistics.median(cpu[programs[0][0]])
    rows = []
    for name, prog in programs:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        rows.append({"name": name, **prog.describe(), "ms_per_token_median": med, "ms_per_token_mean": statistics.fmean(times[name]),
                     "ms_per_token_min": min(times[name]), "cpu_ms_per_token_median": med_cpu, "cpu_ms_per_token_min": min(cpu[name]),
                     "timed_steps": len(times[name]), "ratio_to_first": med / base, "cpu_ratio_to_first": med_cpu / base_cpu})
    result = {"depth": depth, "steps": steps, "warmup": warmup, "rounds": rounds, "threads": threads,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
              "command": "python bench/bench_pte_decode.py " + " ".join(sys.argv[1:]), "programs": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = out_name or f"pte_decode_{depth}_{threads}t"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"decode ms/token at {depth} cached tokens, {threads} thread(s), median of {rounds}x{steps} steps")
    for col in ("program", "weights", "KV bits/value", "KV MB in use", "ms/token", f"ratio to {programs[0][0]}", "CPU ms/token", "CPU ratio"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["name"], row.get("weights", "-"), f"{row['kv_bits_per_value']:.2f}" if "kv_bits_per_value" in row else "fp32",
                      f"{row['kv_bytes_in_use'] / 1e6:.1f}" if "kv_bytes_in_use" in row else "-",
                      f"{row['ms_per_token_median']:.1f}", f"{row['ratio_to_first']:.2f}",
                      f"{row['cpu_ms_per_token_median']:.1f}", f"{row['cpu_ratio_to_first']:.2f}")
    Console().print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh([r["name"] for r in rows][::-1], [r["ms_per_token_median"] for r in rows][::-1])
        ax.set_xlabel(f"ms/token at {depth} cached tokens ({threads} thread)")
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
