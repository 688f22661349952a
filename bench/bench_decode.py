"""Eager decode speed: the fused C++ attention kernel vs the blockwise PyTorch reference path.

    python bench/bench_decode.py --depth 2048,4096 --gen 16 --reps 3 --threads 1

For each policy and depth: prefill ``depth`` tokens of WikiText-2 validation text (once per
path), then time ``gen`` greedy decode steps (each one forward + commit), ``reps`` times after
one warm-up step, alternating the two paths rep by rep so background load hits both alike.
Reports mean +- std ms/token and the ratio reference / fused; JSON to bench/results/.
This is the PyTorch host path (HF modules for the dense layers); the device numbers come from
the .pte (kvexport bench).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from adaptive_kv.decoder import PackedLlama
from adaptive_kv.model import load_model
from adaptive_kv.policy import make_policy
from adaptive_kv.session import Session, SessionConfig
from adaptive_kv.tasks import calibration_path, load_text


def decode_ms(session: Session, first: int, gen: int) -> float:
    tok = first
    t0 = time.perf_counter()
    for _ in range(gen):
        tok = int(session.feed(torch.tensor([tok]), logits="last").argmax())
    return 1000 * (time.perf_counter() - t0) / gen


@click.command()
@click.option("--policies", default="fp16,static-4,learned", show_default=True)
@click.option("--depth", default="2048,4096", show_default=True, help="Tokens already in the cache.")
@click.option("--gen", default=16, show_default=True, help="Decode steps per repetition.")
@click.option("--reps", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--out", default="bench/results/decode_eager.json", type=click.Path(path_type=Path))
def main(policies, depth, gen, reps, threads, out):
    torch.set_num_threads(threads)
    hf, tok = load_model(None)
    paths = {"fused": PackedLlama(hf, kernel="fused"), "reference": PackedLlama(hf, kernel="reference")}
    text = torch.tensor(tok.encode(load_text(calibration_path()), add_special_tokens=False))
    records = []
    for d in (int(x) for x in depth.split(",")):
        for name in policies.split(","):
            sessions = {}
            for p, dec in paths.items():
                s = Session(dec, make_policy(name), SessionConfig(max_seq_len=d + (reps + 1) * gen + 8))
                s.feed(text[:d])
                decode_ms(s, int(text[d]), 1)  # warm-up
                sessions[p] = s
            times = {p: [] for p in paths}
            for _ in range(reps):
                for p, s in sessions.items():
                    times[p].append(decode_ms(s, int(text[d]), gen))
            rec = {"policy": name, "depth": d, "gen": gen, "reps": reps, "threads": threads,
                   "bits_per_value": sessions["fused"].cache.bits_per_value()}
            for p, ts in times.items():
                rec[f"{p}_ms"] = statistics.mean(ts)
                rec[f"{p}_std"] = statistics.stdev(ts) if len(ts) > 1 else 0.0
            rec["speedup"] = rec["reference_ms"] / rec["fused_ms"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__, "threads": threads}
    out.write_text(json.dumps({"host": host, "records": records}, indent=1))
    table = Table(title=f"eager decode ms/token, {threads} thread(s), {gen} steps x {reps} reps after 1 warm-up")
    for c in ("policy", "depth", "bits", "fused", "reference", "ref/fused"):
        table.add_column(c, justify="right")
    for r in records:
        table.add_row(r["policy"], str(r["depth"]), f"{r['bits_per_value']:.2f}", f"{r['fused_ms']:.1f} ± {r['fused_std']:.1f}",
                      f"{r['reference_ms']:.1f} ± {r['reference_std']:.1f}", f"{r['speedup']:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
