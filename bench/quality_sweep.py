"""Accuracy sweep: every policy variant on every task, through the packed cache, one model load.

    python bench/quality_sweep.py --task wikitext2 --limit 8 --out bench/results/quality.json
    python bench/quality_sweep.py --task hellaswag --limit 1000 ...

Variants are policy names, optionally suffixed ``:nohad`` (no Hadamard rotation). Each task's
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
from adaptive_kv.model import load_model
from adaptive_kv.policy import make_policy

DEFAULT_VARIANTS = "fp16,static-8,static-4,static-4:nohad,static-2,static-2:nohad,rule,sink-recent"


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
    names = [v.split(":")[0] for v in variants.split(",")]
    rot = [not v.endswith(":nohad") for v in variants.split(",")]
    hf, tok = load_model(model)
    decoder = PackedLlama(hf)
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        t0 = time.time()
        cfg = EvalConfig(task=task, limit=limit, context=context, chunk_size=chunk_size)
        results = Evaluator(decoder, tok, [make_policy(n) for n in names], cfg, hadamard=rot).run()
        merge(out, [r.to_dict() | {"limit": limit} for r in results])
        print(f"{task}: {time.time() - t0:.0f}s", flush=True)
        for r in results:
            print(json.dumps(r.to_dict()), flush=True)


if __name__ == "__main__":
    main()
