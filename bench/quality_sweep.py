"""Accuracy sweep: every policy variant on every task, through the packed cache, one model load.

    python bench/quality_sweep.py --task wikitext2 --limit 8 --out bench/results/quality.json
    python bench/quality_sweep.py --task hellaswag --limit 1000 ...

A variant is ``[LABEL=]POLICY[@BUDGET][:nohad][#CONTROLLER]``: a policy name, its KV budget
(bits/value, for rule / learned / oracle), ``:nohad`` for no Hadamard rotation, a controller
file for learned (default: the bundled one); the label names its rows (default POLICY[@BUDGET]). Each task's
records are merged into the JSON file as soon as the task finishes (a long sweep can be run
task by task); `bench/render_quality.py` turns the file into the markdown table in docs/.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import torch

from adaptive_kv.decoder import PackedLlama
from adaptive_kv.evaluate import EvalConfig, Evaluator
from adaptive_kv.model import load_model, model_id
from adaptive_kv.policy import make_policy

DEFAULT_VARIANTS = "fp16,static-8,static-4,static-4:nohad,static-2,static-2:nohad,rule,sink-recent"


def parse_variant(v: str) -> tuple[str, str, float | None, bool, str | None]:
    """-> (label, policy, budget, hadamard, controller)."""
    label, _, spec = v.rpartition("=")
    spec, _, controller = spec.partition("#")
    had = not spec.endswith(":nohad")
    spec = spec.removesuffix(":nohad")
    name, _, budget = spec.partition("@")
    return label or spec + ("" if had else ":nohad"), name, float(budget) if budget else None, had, controller or None


def merge(out: Path, records: list[dict]) -> None:
    data = json.loads(out.read_text()) if out.exists() else {"records": []}
    keys = {(r["task"], r["policy"], r["hadamard"]) for r in records}
    data["records"] = [r for r in data["records"] if (r["task"], r["policy"], r["hadamard"]) not in keys] + records
    data["host"] = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


@click.command()
@click.option("--model", default=None)
@click.option("--task", "tasks", multiple=True, required=True)
@click.option("--limit", default=None, type=int)
@click.option("--context", default=2048, show_default=True)
@click.option("--chunk-size", default=32, show_default=True)
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True)
@click.option("--out", default="bench/results/quality.json", type=click.Path(path_type=Path))
def main(model, tasks, limit, context, chunk_size, variants, out):
    parsed = [parse_variant(v) for v in variants.split(",")]
    rot = [p[3] for p in parsed]
    hf, tok = load_model(model)
    decoder = PackedLlama(hf)
    policies = [make_policy(n, controller=c, model_id=model_id(hf), budget_bits=b) for _, n, b, _, c in parsed]
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        t0 = time.time()
        cfg = EvalConfig(task=task, limit=limit, context=context, chunk_size=chunk_size)
        results = Evaluator(decoder, tok, policies, cfg, hadamard=rot).run()
        for r, p in zip(results, parsed):
            r.policy = p[0].removesuffix(":nohad")
        merge(out, [r.to_dict() | {"limit": limit} for r in results])
        print(f"{task}: {time.time() - t0:.0f}s", flush=True)
        for r in results:
            print(json.dumps(r.to_dict()), flush=True)


if __name__ == "__main__":
    main()
