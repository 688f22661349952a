"""Decode ms/token of one bundle through its backends (the .pte in ExecuTorch, the ONNX model in
onnxruntime, optionally the eager torch reference), side by side in one run.

    python bench/bench_backends_decode.py bundles/smollm2-135m-learned --depth 2048 --steps 16 --threads 2

Each backend is prefilled with ``depth`` tokens of WikiText-2 validation text in the bundle's
chunks (so a learned policy makes its real choices), then ``warmup`` untimed and ``steps`` timed
greedy decode steps; backends take turns for ``rounds`` rounds so background load hits all
alike. Reported: median (and min) ms/token, and the ratio to the first backend. JSON + a bar
plot go to bench/results/.
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

RESULTS = Path(__file__).parent / "results"


def time_steps(backend, prompt: torch.Tensor, steps: int, warmup: int) -> tuple[list[float], float]:
    """-> (ms of each timed decode step, prefill seconds)."""
    backend.reset()
    t0 = time.perf_counter()
    logits = torch.cat([backend.forward(c) for c in prompt.split(backend.chunk_size)])
    prefill = time.perf_counter() - t0
    tok, times = int(logits[-1].argmax()), []
    for i in range(warmup + steps):
        if backend.seq_len >= backend.max_seq_len:
            break
        t0 = time.perf_counter()
        logits = backend.forward(torch.tensor([tok]))
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
        tok = int(logits[-1].argmax())
    return times, prefill


@click.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True, default=("executorch", "onnxruntime"), show_default=True)
@click.option("--depth", default=2048, show_default=True, help="Tokens in the cache when decode is timed.")
@click.option("--steps", default=16, show_default=True, help="Timed decode steps per round.")
@click.option("--warmup", default=2, show_default=True, help="Untimed decode steps before each round.")
@click.option("--rounds", default=2, show_default=True)
@click.option("--threads", default=2, show_default=True, help="ExecuTorch thread pool / onnxruntime intra-op threads.")
@click.option("--out", "out_name", default=None, help="Result file stem (default backends_decode_<depth>_<threads>t).")
def main(bundle_dir, backends, depth, steps, warmup, rounds, threads, out_name):
    from transformers import AutoTokenizer

    from adaptive_kv.tasks import calibration_path, load_text
    from export import bundle as B
    from export.backends import open_backend

    bundle = B.verify(bundle_dir)
    tok = AutoTokenizer.from_pretrained(str(bundle.path))
    prompt = torch.tensor(tok.encode(load_text(calibration_path()), add_special_tokens=False)[:depth])
    if prompt.numel() < depth:
        raise click.BadParameter(f"the calibration text has only {prompt.numel()} tokens", param_hint="--depth")
    if depth + warmup + steps > bundle.manifest["cache"]["max_seq_len"]:
        raise click.BadParameter(f"depth + warmup + steps exceeds the bundle's {bundle.manifest['cache']['max_seq_len']}-token context", param_hint="--depth")
    torch.set_num_threads(threads)
    opened = {name: open_backend(name, bundle, threads=threads) for name in backends}
    times: dict[str, list[float]] = {n: [] for n in opened}
    prefill: dict[str, list[float]] = {n: [] for n in opened}
    console = Console(stderr=True)
    for r in range(rounds):
        for name, b in opened.items():
            with console.status(f"round {r + 1}/{rounds}: {name} (prefill {depth}, decode {warmup}+{steps})"):
                t, p = time_steps(b, prompt, steps, warmup)
                times[name] += t
                prefill[name].append(p)
    first = next(iter(opened))
    base = statistics.median(times[first])
    rows = [{
        "backend": name, "ms_per_token_median": statistics.median(times[name]), "ms_per_token_min": min(times[name]),
        "ms_per_token_mean": statistics.fmean(times[name]), "timed_steps": len(times[name]),
        "prefill_tok_per_s": depth / statistics.median(prefill[name]),
        "ratio_to_first": statistics.median(times[name]) / base,
    } for name in opened]
    m = bundle.manifest
    result = {
        "bundle": str(bundle.path), "policy": m["policy"]["name"], "kv_budget_bits": m["policy"].get("kv_budget_bits"),
        "weights": m["weights"]["scheme"], "depth": depth, "steps": steps, "warmup": warmup, "rounds": rounds, "threads": threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "versions": B.versions() | {"onnxruntime": __import__("onnxruntime").__version__},
        "command": "python bench/bench_backends_decode.py " + " ".join(sys.argv[1:]), "backends": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = out_name or f"backends_decode_{depth}_{threads}t"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"{bundle.path.name}: decode at {depth} cached tokens, {threads} thread(s), median of {rounds}x{steps} steps")
    for col in ("backend", "ms/token (median)", "min", "prefill tok/s", f"ratio to {first}"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["backend"], f"{row['ms_per_token_median']:.1f}", f"{row['ms_per_token_min']:.1f}",
                      f"{row['prefill_tok_per_s']:.0f}", f"{row['ratio_to_first']:.2f}")
    Console().print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.barh([r["backend"] for r in rows][::-1], [r["ms_per_token_median"] for r in rows][::-1])
    ax.set_xlabel(f"decode ms/token at {depth} cached tokens ({threads} threads)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
