"""Decode and prefill ms/token of every KV policy and of the peers, side by side in one run.

    python bench/bench_side_by_side.py --bundle bundles/side-fp16-8da4w --bundle bundles/side-learned@4.0-8da4w ... \
        --stock 8da4w=bundles/stock-8da4w.pte --llamacpp f16,q8_0,q4_0 --depth 512,2048,4096,8128 --gen 64 --reps 3 --threads 2

What runs (all on this host, same thread count, one process driving them):
- our bundles through the native runner (``kvexport bench``'s ``BundleEngine``: a fresh runner
  process per repetition, prefill ``depth`` tokens of WikiText-2, ``gen`` greedy tokens);
- transformers' stock ExecuTorch export (bench/stock_executorch.py, fp32 static cache) in the
  ExecuTorch Python runtime. It attends over every slot of its cache each step whatever the
  depth, so it decodes from position ``depth`` without a prefill (prefill columns empty);
- llama.cpp through llama-cpp-python on the same model's Q4_1 GGUF (bench/peer_llamacpp.py:
  flash attention, the given KV types), when ``llama_cpp`` is installed.
Engines take turns at each depth (``run_rounds``: round r runs each once, alternating the
order), so background load lands on all alike. Warm-up: ``--warmup`` runs per engine at the
smallest depth first.

SmolLM2-135M has 8192 positions and our export refuses a context beyond them, so the deepest
row is 8128 = 8192 - gen by default (every engine gets the same depth). A bundle, a stock program
or a context too small for a depth skips that depth.

Writes bench/results/<out>.json ({"results": records, "bars": ..., hardware, versions, commit}),
<out>.png (decode ms/token and KV MiB vs depth) and bench/RESULTS.md (the tables, the quality
columns from bench/results/quality.json, the bars of the device-benchmark issue).
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling peer scripts
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export import bundle as B  # noqa: E402
from export.device_bench import (BenchConfig, BundleEngine, mean_std, parse_depths, plot,  # noqa: E402
                                 provenance, rounds_total, run_rounds)
from export.device_targets import open_target  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
QUALITY_TASKS = (("wikitext2", "WikiText-2 ppl"), ("hellaswag", "HellaSwag"), ("arc_easy", "ARC-e"),
                 ("arc_challenge", "ARC-c"), ("openbookqa", "OBQA"), ("piqa", "PIQA"))
err = Console(stderr=True)


class StockEngine:
    """transformers' stock ExecuTorch export in the Python runtime: ``steps`` single-token steps
    from position ``depth`` per repetition. No prefill: a step attends over every slot of the cache
    whatever it holds, so its cost does not depend on the depth (and at ~0.9 s a step with 8192
    slots, 63 steps x depths x reps would be most of the run; ``steps`` keeps it to minutes)."""

    def __init__(self, name: str, path: Path, model: dict, cfg: BenchConfig, steps: int):
        from stock_executorch import _load_forward

        self.label, self.path, self.model, self.cfg = f"stock ExecuTorch ({name})", Path(path), model, cfg
        self.weights, self.steps = name, min(steps, cfg.gen - 1)
        self.forward, self.max_seq_len = _load_forward(self.path, cfg.threads)

    def fits(self, depth: int) -> bool:
        return depth + self.cfg.gen <= self.max_seq_len

    def rep(self, depth: int) -> dict:
        import torch

        token, ms = 1, []
        for pos in range(depth, depth + self.steps):
            t0 = time.perf_counter()
            (logits,) = self.forward.execute([torch.tensor([[token]]), torch.tensor([pos])])  # [1, 1, V]
            ms.append(1e3 * (time.perf_counter() - t0))
            token = int(logits[0, -1].argmax())
        return {"decode_ms_per_token": statistics.fmean(ms)}

    def record(self, depth: int, reps: list[dict]) -> dict:
        m = self.model
        decode = [r["decode_ms_per_token"] for r in reps]
        mean, std = mean_std(decode)
        kv_bytes = 2 * m["layers"] * m["kv_heads"] * self.max_seq_len * m["head_dim"] * 4  # fp32 K and V, every slot read
        weights_bytes = self.path.stat().st_size - 4 * m["vocab_size"] * m["hidden_size"]
        return {"target": "host", "engine": "executorch-stock", "bundle": self.path.name,
                "policy": "stock export (fp32 static cache)", "weights": self.weights,
                "depth": depth, "gen": self.steps, "threads": self.cfg.threads, "reps": len(reps), "warmup": self.cfg.warmup,
                "prefill_ms_per_token": None, "prefill_ms_std": None,
                "decode_ms_per_token": mean, "decode_ms_std": std, "decode_ms_reps": decode,
                "first_token_ms": None, "kv_bytes": kv_bytes, "kv_bytes_allocated": kv_bytes, "weights_bytes": weights_bytes,
                "gb_per_s": (weights_bytes + kv_bytes) / (mean * 1e-3) / 1e9, "peak_rss_bytes": None}


class LlamaCppEngine:
    """llama.cpp with one KV type: a fresh context per repetition (bench/peer_llamacpp.py)."""

    def __init__(self, model, kv_type: str, cfg: BenchConfig):
        import peer_llamacpp as P

        self.P, self.model, self.kv_type = P, model, kv_type
        self.label = f"llama.cpp kv={kv_type}"
        self.pcfg = P.PeerConfig(depths=cfg.depths, gen=cfg.gen, reps=cfg.reps, warmup=cfg.warmup, threads=cfg.threads,
                                 kv_types=(kv_type,))
        self.ids = P.depth_tokens(model, max(cfg.depths))

    def fits(self, depth: int) -> bool:
        return True

    def rep(self, depth: int) -> dict:
        with self.model.context(self.pcfg, self.kv_type, depth) as ctx:
            return self.P.run_rep(ctx, self.ids[:depth], self.pcfg.gen)

    def record(self, depth: int, reps: list[dict]) -> dict:
        return {**self.P.make_record(reps, self.model, self.pcfg, self.kv_type, depth), "peak_rss_bytes": None}


# ------------------------------------------------------------------------------------ the report
def _budget(policy: str) -> tuple[str, float | None]:
    name, _, budget = policy.partition("@")
    return name, float(budget) if budget else None


def quality_row(policy: str, quality: list[dict]) -> dict[str, dict]:
    """The eval harness's records for a kvexport policy label (learned@4 finds learned@4.0; a " q8"
    label, the int8 query, finds records with query_bits 8)."""
    policy, q8 = policy.removesuffix(" q8"), policy.endswith(" q8")
    name, budget = _budget(policy)
    out = {}
    for r in quality:
        qname, qbudget = _budget(r["policy"])
        if qname == name and qbudget == budget and (r.get("hadamard", True) or name == "fp16") and (r.get("query_bits", 32) == 8) == q8:
            out[r["task"]] = r
    return out


def quality_cell(task: str, r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['perplexity']:.2f}" if task == "wikitext2" else f"{100 * (r.get('accuracy_norm') or r['accuracy']):.1f}"


def find(records: list[dict], depth: int, engine: str, policy: str | None = None, weights: str | None = None) -> dict | None:
    for r in records:
        if r["depth"] == depth and r["engine"] == engine and (policy is None or r["policy"] == policy) \
                and (weights is None or r["weights"] == weights):
            return r
    return None


def paired_ratio(num: dict, den: dict) -> float | None:
    """Median over rounds of num's repetition / den's repetition of the same round. Engines take
    turns within a round, so a burst of load on a shared host slows both sides of a pair; the
    ratio of means carries such bursts whole. None without per-repetition figures."""
    a, b = num.get("decode_ms_reps"), den.get("decode_ms_reps")
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def bars(records: list[dict], deep: int, mid: int = 2048) -> list[dict]:
    """The device-benchmark issue's bars, from one run's records (8da4w weights)."""
    def ours(policy: str, depth: int) -> dict | None:
        return find(records, depth, "kvexport", policy, "8da4w")

    def fastest_llamacpp(depth: int) -> dict | None:
        rows = [r for r in records if r["depth"] == depth and r["engine"] == "llama.cpp"]
        return min(rows, key=lambda r: r["decode_ms_per_token"]) if rows else None

    # Each query precision the run has bundles for gets its own rows (the int8 query, " q8", is
    # compared with static-4 at the same precision; an fp16 cache has no packed keys to score).
    checks = []
    for q in [s for s in ("", " q8") if any(r["policy"] in (f"learned@4{s}", f"learned@3{s}") for r in records)] or [""]:
        tag = " (int8 query)" if q else ""
        fp16 = lambda d: ours(f"fp16{q}", d) or ours("fp16", d)  # noqa: E731
        checks += [
            (f"adaptive@4.0{tag} / fp16 cache, depth {deep}", ours(f"learned@4{q}", deep), fp16(deep), 0.55),
            (f"adaptive@4.0{tag} / static-4{tag}, depth {deep}", ours(f"learned@4{q}", deep), ours(f"static-4{q}", deep), 1.05),
            (f"adaptive@3.0{tag} / static-4{tag}, depth {deep}", ours(f"learned@3{q}", deep), ours(f"static-4{q}", deep), 0.90),
            (f"adaptive@4.0{tag} / llama.cpp fastest KV, depth {deep}", ours(f"learned@4{q}", deep), fastest_llamacpp(deep), 0.50),
            (f"adaptive@4.0{tag} / llama.cpp fastest KV, depth {mid}", ours(f"learned@4{q}", mid), fastest_llamacpp(mid), 0.80),
        ]
    out = []
    for what, num, den, bar in checks:
        if num is None or den is None:
            out.append({"bar": what, "target": bar, "ratio": None, "met": None, "note": "not measured in this run"})
            continue
        ratio = num["decode_ms_per_token"] / den["decode_ms_per_token"]
        out.append({"bar": what, "target": bar, "ratio": ratio, "met": ratio <= bar, "paired": paired_ratio(num, den),
                    "numerator": f"{num['policy']} {num['decode_ms_per_token']:.2f} ms",
                    "denominator": f"{den['policy']} {den['decode_ms_per_token']:.2f} ms"})
    return out


def _ms(r: dict | None, key: str = "decode_ms_per_token") -> str:
    if r is None or r.get(key) is None:
        return "—"
    std = r.get(key.replace("_per_token", "_std"))
    return f"{r[key]:.2f} ± {std:.2f}" if std is not None else f"{r[key]:.2f}"


def series(records: list[dict]) -> list[tuple[str, str, str]]:
    """(engine, policy, weights) in the order of first appearance."""
    seen: list[tuple[str, str, str]] = []
    for r in records:
        key = (r["engine"], r["policy"], r["weights"])
        if key not in seen:
            seen.append(key)
    return seen


def render_markdown(result: dict, quality: list[dict], quality_src: str) -> str:
    recs, depths, cfg = result["results"], result["config"]["depths"], result["config"]
    hw = result["hardware"]
    lines = [
        "# Side-by-side decode benchmark: SmolLM2-135M on this host",
        "",
        f"Produced by `{result['command']}` on {result['finished']} (commit {result['commit']}; "
        f"executorch {result['versions'].get('executorch')}, torch {result['versions'].get('torch')}, "
        f"llama-cpp-python {result.get('llama_cpp_python') or 'not installed'}).",
        f"Hardware: {hw.get('cpu') or '?'}, {hw.get('cores')} cores, {hw.get('arch')}, {hw.get('os')}. "
        f"{cfg['threads']} threads for every engine; {cfg['warmup']} warm-up run(s) per engine, then {cfg['reps']} repetitions "
        f"per depth taking turns (mean ± std); {cfg['gen']} tokens decoded per repetition, EOS ignored; "
        "depth = tokens in the cache when decoding starts (WikiText-2 text).",
        "",
        "Our rows run the bundle's `.pte` through the native runner (`kvexport bench`'s engine). The stock row is "
        "transformers' ExecuTorch export (fp32 static cache, XNNPACK) in the ExecuTorch Python runtime; it attends over "
        "its whole cache whatever the depth, so it is timed from position = depth without a prefill, "
        f"{cfg['stock_steps']} steps a repetition. llama.cpp runs "
        "the Q4_1 GGUF of the same model (flash attention on) through llama-cpp-python's C API.",
        "",
        "## Decode ms/token by depth",
        "",
        f"Every engine gets the same depths; depth + gen must fit the model's {result['model_positions']} positions "
        "(our export refuses a longer context), so the deepest row stops short of it.",
        "",
        "| engine | KV | weights | " + " | ".join(str(d) for d in depths) + f" | KV MiB @ {depths[-1]} | GB/s @ {depths[-1]} | peak RSS MiB |",
        "|---|---|---|" + "---:|" * (len(depths) + 3),
    ]
    for engine, policy, weights in series(recs):
        rows = [find(recs, d, engine, policy, weights) for d in depths]
        last = next(r for r in reversed(rows) if r is not None)
        at = "" if last is rows[-1] else f" (@ {last['depth']})"
        rss = [r["peak_rss_bytes"] for r in rows if r is not None and r.get("peak_rss_bytes")]
        lines.append(f"| {engine} | {policy} | {weights} | " + " | ".join(_ms(r) for r in rows)
                     + f" | {last['kv_bytes'] / 2**20:.1f}{at} | {last['gb_per_s']:.2f}{at} | "
                     + (f"{max(rss) / 2**20:.0f} |" if rss else "— |"))
    lines += ["", "KV MiB: bytes the cache holds at the end of the deepest run (llama.cpp: its K/V rows at its cache type, "
              "block scales included; stock: its whole fp32 cache, all of which a step reads). GB/s: (weights + KV bytes "
              "a step reads at mid-decode) / decode time.", "",
              "## Prefill ms/token by depth", "",
              "| engine | KV | weights | " + " | ".join(str(d) for d in depths) + " |",
              "|---|---|---|" + "---:|" * len(depths)]
    for engine, policy, weights in series(recs):
        if engine == "executorch-stock":
            continue
        lines.append(f"| {engine} | {policy} | {weights} | "
                     + " | ".join(_ms(find(recs, d, engine, policy, weights), "prefill_ms_per_token") for d in depths) + " |")
    lines += ["", "## Quality next to speed", "",
              f"From the eval harness (`{quality_src}`: the eager packed cache with the same policies, fp32 weights from "
              "the GGUF; WikiText-2 perplexity, the others accuracy % (normalized where the task has it)). The quality "
              "of a policy does not depend on the engine that runs it; llama.cpp and the stock export were not evaluated.",
              "", f"| KV policy | decode ms/token @ {depths[-1]} (8da4w) | KV MiB @ {depths[-1]} | "
              + " | ".join(t for _, t in QUALITY_TASKS) + " |", "|---|---:|---:|" + "---:|" * len(QUALITY_TASKS)]
    for engine, policy, weights in series(recs):
        if engine != "kvexport" or weights != "8da4w":
            continue
        q = quality_row(policy, quality)
        r = find(recs, depths[-1], engine, policy, weights)
        lines.append(f"| {policy} | {_ms(r)} | {r['kv_bytes'] / 2**20:.1f} | " if r else f"| {policy} | — | — | ")
        lines[-1] += " | ".join(quality_cell(t, q.get(t)) for t, _ in QUALITY_TASKS) + " |"
    lines += ["", "## Bars", "",
              "Measured: the ratio of the mean decode times (what `met` judges). Paired: the median over rounds of the ratio of "
              "the two engines' repetitions in the same round, which a burst of load on the host moves less.", "",
              "| bar | target | measured | paired | met | from |", "|---|---:|---:|---:|---|---|"]
    for b in result["bars"]:
        if b["ratio"] is None:
            lines.append(f"| {b['bar']} | ≤ {b['target']} | — | — | — | {b['note']} |")
        else:
            paired = f"{b['paired']:.3f}" if b.get("paired") is not None else "—"
            lines.append(f"| {b['bar']} | ≤ {b['target']} | {b['ratio']:.3f} | {paired} | {'yes' if b['met'] else '**no**'} | "
                         f"{b['numerator']} / {b['denominator']} |")
    lines += ["", f"Plot: `{result['out']}.png`, records: `{result['out']}.json` (in bench/results/ for `make bench`).", ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@click.command()
@click.option("--bundle", "bundle_dirs", multiple=True, type=click.Path(path_type=Path), help="A bundle folder (kvexport export); repeat.")
@click.option("--stock", "stocks", multiple=True, help="WEIGHTS=PATH of a stock .pte (bench/stock_executorch.py); repeat.")
@click.option("--stock-steps", default=8, show_default=True, help="Timed decode steps per repetition of a stock program.")
@click.option("--llamacpp", "kv_types", default="f16,q8_0,q4_0", show_default=True,
              help="llama.cpp KV types ('' to leave llama.cpp out; needs bench/requirements-peers.txt).")
@click.option("--depth", "depths", default="512,2048,4096,8128", show_default=True, help="Tokens in the cache when decoding starts.")
@click.option("--gen", default=64, show_default=True, help="Tokens decoded per repetition (EOS ignored).")
@click.option("--reps", default=3, show_default=True, help="Timed repetitions per depth (engines take turns).")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs per engine first, at the smallest depth.")
@click.option("--threads", default=2, show_default=True, help="Threads for every engine.")
@click.option("--quality", "quality_path", default=RESULTS / "quality.json", show_default=True, type=click.Path(path_type=Path),
              help="Eval-harness records for the quality columns (bench/quality_sweep.py).")
@click.option("--out", "out_name", default="side_by_side", show_default=True, help="Stem of the JSON and PNG.")
@click.option("--results-dir", default=RESULTS, show_default=True, type=click.Path(path_type=Path), help="Folder of the JSON and PNG.")
@click.option("--markdown", "md_path", default=RESULTS_MD, show_default=True, type=click.Path(path_type=Path), help="Markdown report.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of the table.")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Run nothing: recompute the bars of an earlier run's JSON and write its JSON, plot and markdown again.")
def main(bundle_dirs, stocks, stock_steps, kv_types, depths, gen, reps, warmup, threads, quality_path, out_name, results_dir, md_path,
         as_json, from_json):
    if from_json is not None:
        result = json.loads(from_json.read_text())
        result.setdefault("finished", "(an unfinished run: its .partial.json)")
        result["bars"] = bars(result["results"], max(result["config"]["depths"]))
        return write_outputs(result, quality_path, results_dir, md_path, as_json)
    cfg = BenchConfig(depths=parse_depths(depths), gen=gen, reps=reps, warmup=warmup, threads=threads)
    if not bundle_dirs:
        raise click.UsageError("give at least one --bundle")
    bundles = [B.verify(d) for d in bundle_dirs]
    target = open_target("host")
    engines: list = [BundleEngine(b, target, cfg) for b in bundles]
    model = bundles[0].manifest["model"]
    for spec in stocks:
        name, sep, path = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"--stock takes WEIGHTS=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise click.BadParameter(f"--stock {spec}: no such file (export it with bench/stock_executorch.py --out {path})")
        engines.append(StockEngine(name, Path(path), model, cfg, stock_steps))
    llama_version = None
    kv_list = tuple(t.strip() for t in kv_types.split(",") if t.strip())
    if kv_list:
        import peer_llamacpp as P
        from importlib import metadata

        lmodel = P.LlamaCpp(P.default_gguf())
        llama_version = metadata.version("llama_cpp_python")
        engines += [LlamaCppEngine(lmodel, t, cfg) for t in kv_list]
    meta = provenance(target)
    err.print(f"{len(engines)} engines · depths {','.join(map(str, cfg.depths))} · gen {gen} · {reps} reps · "
              f"{threads} threads · {meta['hardware'].get('cpu')}")
    for e in engines:
        skipped = [d for d in cfg.depths if not e.fits(d)]
        if skipped:
            err.print(f"[yellow]{e.label}: context too small for depth {', '.join(map(str, skipped))}: skipped there[/]")
    head = {"command": "python bench/bench_side_by_side.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "config": {"depths": list(cfg.depths), "gen": gen, "reps": reps, "warmup": warmup, "threads": threads,
                       "stock_steps": stock_steps},
            "out": out_name, "model_positions": model.get("max_position_embeddings"), "llama_cpp_python": llama_version,
            "python": platform.python_version(), **meta}
    # A run takes hours: each finished depth is saved, so a run that dies leaves <out>.partial.json
    # (its report can be made with --from-json).
    partial, done = results_dir / f"{out_name}.partial.json", []
    results_dir.mkdir(parents=True, exist_ok=True)

    def on_result(r: dict) -> None:
        done.append(r)
        err.print(f"{r['engine']} {r['policy']} {r['weights']} @ {r['depth']}: {r['decode_ms_per_token']:.2f} ms/token")
        _atomic_write(partial, json.dumps({**head, "partial": True, "results": done}, indent=2) + "\n")

    t0 = time.perf_counter()
    with Progress(console=err) as progress:
        task = progress.add_task("benchmarking", total=rounds_total(engines, cfg))
        records = run_rounds(engines, cfg, on_result=on_result, on_rep=lambda what: progress.update(task, advance=1, description=what))
    result = {**head, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": round(time.perf_counter() - t0, 1),
              "results": records, "bars": bars(records, max(cfg.depths))}
    write_outputs(result, quality_path, results_dir, md_path, as_json)
    partial.unlink(missing_ok=True)


def write_outputs(result: dict, quality_path: Path, results_dir: Path, md_path: Path, as_json: bool) -> None:
    """JSON, plot and markdown of a run; the table and the bars on the console."""
    records, out_name, cfg = result["results"], result["out"], result["config"]
    threads, reps, gen = cfg["threads"], cfg["reps"], cfg["gen"]
    cpu = result.get("hardware", {}).get("cpu") or "host"
    quality = json.loads(Path(quality_path).read_text())["records"] if Path(quality_path).is_file() else []
    results_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(results_dir / f"{out_name}.json", json.dumps(result, indent=2) + "\n")
    plot(records, results_dir / f"{out_name}.png", f"SmolLM2-135M decode on {cpu}, {threads} threads, gen {gen}")
    _atomic_write(Path(md_path), render_markdown(result, quality, str(quality_path)))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"decode ms/token ({threads} threads, {reps} reps, gen {gen})")
    for col in ("engine", "KV", "weights", *map(str, cfg["depths"])):
        table.add_column(col, justify="left" if col in ("engine", "KV", "weights") else "right")
    for engine, policy, weights in series(records):
        table.add_row(engine, policy, weights, *(_ms(find(records, d, engine, policy, weights)) for d in cfg["depths"]))
    Console(width=160).print(table)
    for b in result["bars"]:
        paired = f", paired {b['paired']:.3f}" if b.get("paired") is not None else ""
        err.print(f"{b['bar']}: " + (f"{b['ratio']:.3f}{paired} (target ≤ {b['target']}) {'met' if b['met'] else 'NOT met'}"
                                      if b["ratio"] is not None else b["note"]))
    err.print(f"wrote {results_dir / (out_name + '.json')}, {results_dir / (out_name + '.png')}, {md_path}")


if __name__ == "__main__":
    main()
