"""Export lowering time: kvexport's lowering vs the stock settings, side by side.

    python bench/bench_export.py                    # SmolLM2-135M, learned controller, fp32, 2048 context
    python bench/bench_export.py --layers 10 --weights 8da4w

Two worker processes start together, each pinned to its own core with one thread. Each loads
the model, builds the default exported decoder (learned controller, int8 query), runs
torch.export, to_edge_transform_and_lower and to_executorch, and hashes the program:

- ``stock``: XNNPACK's own partitioner, EXIR's edge-IR validator on (to_edge's defaults);
- ``kvexport``: ``export.pte.lower`` as ``kvexport export`` runs it (export/partition.py's
  partitioner, no validator, and for 8da4w export/qdq.py's quantized_decomposed q/dq ops).

Reports each stage's seconds, the ratio kvexport / stock, and whether the two programs are the
same bytes (they must be: the difference is work that does not change the program). One run
per worker, no warm-up (an export runs once); the host drifts by ~10% over minutes, which is
why the two run at the same time. JSON + PNG to bench/results/.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("torch.export", "to_edge_transform_and_lower", "to_executorch")


def worker(kind: str, layers: int | None, weights: str, max_seq_len: int) -> dict:
    """One export in this process; -> stage seconds and the program's sha256."""
    import torch

    sys.path.insert(0, str(ROOT))
    from adaptive_kv.model import load_model, model_id
    from adaptive_kv.policy import default_controller_path, make_policy
    from export.pte import PteConfig, build_decoder, export_programs, lower, metadata

    torch.set_num_threads(1)
    model, tok = load_model(None)
    policy = make_policy("learned", controller=str(default_controller_path()), model_id=model_id(model), budget_bits=None)
    if layers:  # after loading the controller, which checks the model it was trained for
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    decoder = build_decoder(model, policy, PteConfig(max_seq_len=max_seq_len, weights=weights, query_bits=8))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    programs = export_programs(decoder)
    seconds["torch.export"] = time.perf_counter() - t0
    if kind == "stock":
        program = lower(programs, metadata(decoder, tok), seconds, check_ir=True, stock=True)
    else:
        program = lower(programs, metadata(decoder, tok), seconds)
    data = program.buffer
    return {"kind": kind, "seconds": seconds, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, r in enumerate(records):
        left = 0.0
        for stage, color in zip(STAGES, ("tab:blue", "tab:orange", "tab:green")):
            w = r["seconds"].get(stage, 0.0)
            ax.barh(i, w, left=left, color=color, label=stage if i == 0 else None)
            left += w
    ax.set_yticks(range(len(records)), [r["kind"] for r in records])
    ax.set_xlabel("seconds (one export, 1 thread, side by side)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--layers", type=int, default=None, help="Cut the model to its first N layers (default: all).")
@click.option("--weights", type=click.Choice(["fp32", "8da4w"]), default="fp32", show_default=True)
@click.option("--max-seq-len", default=2048, show_default=True)
@click.option("--out", default=None, type=click.Path(path_type=Path), help="[default: bench/results/export_lowering[_8da4w].json]")
@click.option("--worker", "worker_kind", type=click.Choice(["stock", "kvexport"]), hidden=True)
def main(layers, weights, max_seq_len, out, worker_kind):
    if worker_kind:  # child: print one JSON record
        print("RECORD " + json.dumps(worker(worker_kind, layers, weights, max_seq_len)), flush=True)
        return
    out = out or ROOT / "bench" / "results" / f"export_lowering{'' if weights == 'fp32' else '_' + weights}.json"
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise click.ClickException("needs two cores to run both exports side by side")
    args = [sys.executable, __file__, "--weights", weights, "--max-seq-len", str(max_seq_len)] + (["--layers", str(layers)] if layers else [])
    procs = []
    for kind, core in zip(("stock", "kvexport"), cores):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(["taskset", "-c", str(core), *args, "--worker", kind], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env))
    with Console().status("two exports running side by side (minutes) ..."):
        outputs = [p.communicate()[0] for p in procs]
    records = []
    for p, text in zip(procs, outputs):
        line = next((ln for ln in text.splitlines() if ln.startswith("RECORD ")), None)
        if p.returncode or line is None:
            raise click.ClickException(f"a worker failed (exit {p.returncode}); run it alone with --worker to see why")
        records.append(json.loads(line[len("RECORD "):]))
    stock, ours = records
    table = Table(title=f"export lowering, SmolLM2-135M{f' ({layers} layers)' if layers else ''}, {weights}, learned, 1 thread each, side by side")
    table.add_column("stage")
    table.add_column("stock s", justify="right")
    table.add_column("kvexport s", justify="right")
    table.add_column("kvexport / stock", justify="right")
    for stage in STAGES:
        a, b = stock["seconds"][stage], ours["seconds"][stage]
        table.add_row(stage, f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}")
    Console().print(table)
    same = stock["sha256"] == ours["sha256"]
    print(f"programs {'identical' if same else 'DIFFER'} ({ours['bytes']:,} bytes)")
    sys.path.insert(0, str(ROOT))
    from bench_attention import host_info  # cpu, cores, torch, kernel ISA, commit
    from export.bundle import versions

    host = host_info()
    print(f"host: {host['cpu']}, {host['cores']} cores; commit {host['commit']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"host": host, "versions": versions(), "layers": layers, "weights": weights, "max_seq_len": max_seq_len,
              "identical_programs": same, "records": records}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    plot(records, out.with_suffix(".png"))
    if not same:
        raise click.ClickException("the two programs differ: the lowering change is not free")


if __name__ == "__main__":
    main()
