"""Where a decode step's time goes: an ETDump per-op profile of a bundle's ``.pte`` at a depth.

    python bench/profile_pte.py bundles/side-learned@4.0-8da4w --depth 8128 --steps 16 --threads 2 [--json]

The program is loaded in the ExecuTorch Python runtime with ETDump on, prefilled with ``depth``
tokens of WikiText-2 (in the bundle's chunks), then ``steps`` greedy single-token steps run.
ExecuTorch records every kernel call (``native_call_*``: our kvq ops and the portable /
optimized kernels) and every XNNPACK delegate call; this script keeps the decode steps only
(the executions of ``forward`` shaped like the last one) and reports ms per step by op, grouped as: the
kvq attention kernel, the kvq pack kernel, XNNPACK (the lowered linears, norms, ...), and
everything else, beside the whole ``Method::execute``. The per-call profiling costs a little
time itself, so compare shares, not absolute numbers, with ``kvexport bench``.
Writes bench/results/profile_<bundle>_<depth>.json.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def category(name: str) -> str:
    if "packed_attention" in name:
        return "kvq attention"
    if "pack_rows" in name:
        return "kvq pack"
    if name == "DELEGATE_CALL":
        return "XNNPACK delegate"
    return "other ExecuTorch kernels"


def profile(bundle_dir: Path, depth: int, steps: int, threads: int) -> dict:
    import torch
    from executorch.devtools import Inspector

    from export import bundle as B
    from export.bundle_runner import set_runtime_threads
    from export.device_bench import depth_prompt
    from export.pte_runner import PteDecoder

    bundle = B.verify(bundle_dir)
    if depth + steps > bundle.manifest["cache"]["max_seq_len"]:
        raise click.BadParameter(f"depth {depth} + steps {steps} exceeds the bundle's {bundle.manifest['cache']['max_seq_len']}-token context")
    set_runtime_threads(threads)
    dec = PteDecoder(bundle.path / B.PROGRAM, etdump=True)
    with Console(stderr=True).status(f"prefilling {depth} tokens (profiled) ..."):
        logits, _ = dec.feed(torch.tensor(depth_prompt(bundle, depth)))
    tok = int(logits.argmax())
    for _ in range(steps):
        tok = int(dec.forward(torch.tensor([tok]))[-1].argmax())
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        dec.write_etdump(etdump)
        inspector = Inspector(etdump_path=str(etdump))
    # The Inspector groups executions with the same event sequence into a block, each event's
    # perf_data.raw holding one entry per execution: the last big block holds the decode steps.
    block = [b for b in inspector.event_blocks if b.name == "Execute" and len(b.events) > 100][-1]
    by_op: dict[str, float] = collections.Counter()
    inside_xnnpack: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    step_ms, runs = None, 0
    for ev in block.events:
        if ev.perf_data is None:
            continue
        raw = list(ev.perf_data.raw)[-steps:]  # prefill chunks can share the block: the decode steps ran last
        runs = max(runs, len(raw))
        ms = sum(raw) / len(raw)
        if ev.name == "Method::execute":
            step_ms = ms
        elif ev.name.startswith("native_call_") or ev.name == "DELEGATE_CALL":
            name = ev.name.removeprefix("native_call_")
            by_op[name] += ms
            calls[name] += 1
        elif ev.name not in ("OPERATOR_CALL", "MOVE_CALL", "JF_CALL"):  # the wrappers; the rest: XNNPACK's own ops
            inside_xnnpack[ev.name.split(" #")[0]] += ms
    if step_ms is None:
        step_ms = sum(by_op.values())
    cats: dict[str, float] = collections.Counter()
    for name, ms in by_op.items():
        cats[category(name)] += ms
    m = bundle.manifest
    return {"bundle": bundle.path.name, "policy": m["policy"]["name"], "kv_budget_bits": m["policy"].get("kv_budget_bits"),
            "weights": m["weights"]["scheme"], "depth": depth, "steps": steps, "threads": threads,
            "profiled_runs": runs, "method_execute_ms": step_ms, "by_category_ms": dict(cats),
            "inside_xnnpack_ms": dict(sorted(inside_xnnpack.items(), key=lambda kv: -kv[1])),
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "calls_per_step": dict(calls)}


@click.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--depth", default=8128, show_default=True, help="Tokens in the cache before the profiled steps.")
@click.option("--steps", default=16, show_default=True, help="Profiled decode steps.")
@click.option("--threads", default=2, show_default=True, help="ExecuTorch thread pool size.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the table.")
def main(bundle_dir, depth, steps, threads, as_json):
    res = profile(bundle_dir, depth, steps, threads)
    res["command"] = "python bench/profile_pte.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile_{res['bundle']}_{depth}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    total = res["method_execute_ms"]
    table = Table(title=f"{res['bundle']}: ms per decode step at depth {depth}, {threads} threads, {steps} steps (ETDump)")
    for col in ("op", "ms/step", "share"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for name, ms in sorted(res["by_category_ms"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"[bold]{name}[/]", f"{ms:.2f}", f"{ms / total:.0%}")
    for name, ms in list(res["by_op_ms"].items())[:12]:
        table.add_row(f"  {name} (x{res['calls_per_step'][name]})", f"{ms:.3f}", f"{ms / total:.1%}")
    for name, ms in list(res["inside_xnnpack_ms"].items())[:6]:
        table.add_row(f"  inside XNNPACK: {name}", f"{ms:.3f}", f"{ms / total:.1%}")
    table.add_row("Method::execute", f"{total:.2f}", "100%")
    Console().print(table)
    Console(stderr=True).print(f"wrote {out}")


if __name__ == "__main__":
    main()
