"""The `kvexport` command line: thin click wrappers that build typed configs and call the library."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from adaptive_kv.policy import POLICY_NAMES

err = Console(stderr=True)


def _load(model: str | None):
    from adaptive_kv.decoder import PackedLlama
    from adaptive_kv.model import load_model

    with err.status(f"loading {model or 'SmolLM2-135M-Instruct (default)'} ..."):
        hf, tok = load_model(model)
    return PackedLlama(hf), tok


def _policy_names(names: tuple[str, ...]) -> list[str]:
    from adaptive_kv.policy import POLICY_NAMES, PolicyError

    flat = [n.strip() for name in names for n in name.split(",") if n.strip()]
    for n in flat:  # fail before the model loads
        if n not in POLICY_NAMES and not n.startswith("static-"):
            raise PolicyError(f"unknown policy '{n}'; choose one of {', '.join(POLICY_NAMES)}")
    return flat


def _query_bits(spec: str) -> list[int]:
    """'32', '8' or '32,8' -> [32, 8] (checked before the model loads)."""
    from adaptive_kv.formats import QUERY_BITS

    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part.isdigit() or int(part) not in QUERY_BITS:
            raise click.BadParameter(f"'{part}': the attention's query is 32 (fp32) or 8 (int8 rows); give one or '32,8'", param_hint="--query-bits")
        out.append(int(part))
    return out


def _policies(names: list[str], controller: str | None, budget: float | None, decoder):
    from adaptive_kv.model import model_id
    from adaptive_kv.policy import make_policy

    mid = model_id(decoder.model)
    return [make_policy(n, controller=controller, model_id=mid, budget_bits=budget) for n in names]


class _Errors(click.Group):
    """Library errors become one clear line and exit code 2, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError) as e:
            err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Errors)
@click.version_option(package_name="kvexport")
def main() -> None:
    """kvexport: adaptive mixed-precision KV cache for small llama models."""
    from .quiet import install

    install()


@main.command("eval")
@click.option("--model", default=None, help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct).")
@click.option("--policy", "policy_names", multiple=True, default=("fp16",), show_default=True,
              help=f"One of {', '.join(POLICY_NAMES)}; repeat or comma-separate to compare several on the same items.")
@click.option("--controller", default=None, type=click.Path(), help="Controller file for --policy learned (default: the bundled SmolLM2-135M one).")
@click.option("--kv-budget-bits", "budget", default=None, type=float, help="KV memory budget in bits/value (scales included) for rule / learned / oracle.")
@click.option("--task", required=True, help="hellaswag, arc_easy, arc_challenge, openbookqa, piqa, wikitext2 or passkey.")
@click.option("--data", default=None, type=click.Path(path_type=Path), help="Data file (default: ../shared/data/...).")
@click.option("--limit", default=None, type=int, help="Cap on items (questions, perplexity windows, passkey trials).")
@click.option("--context", default=2048, show_default=True, help="Window (wikitext2) / prompt length (passkey) in tokens.")
@click.option("--chunk-size", default=32, show_default=True, help="Prefill chunk: tokens of one chunk see each other at full precision.")
@click.option("--hadamard/--no-hadamard", default=True, show_default=True, help="Rotate K/V by a Hadamard matrix before quantization.")
@click.option("--group-size", default=64, show_default=True, help="Values per quantization group (scale + zero each).")
@click.option("--query-bits", "query_bits", default="32", show_default=True,
              help="Attention query precision: 32 (fp32) or 8 (int8 rows, integer key dot products); '32,8' evaluates each policy at both.")
@click.option("--seed", default=0, show_default=True)
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(path_type=Path),
              help="Evaluate an exported bundle (its model, policy and cache) instead of --model/--policy.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "executorch", "onnxruntime"]),
              help="With --bundle: the eager reference (torch), its model.pte (executorch) or its model.onnx (onnxruntime).")
@click.option("--threads", default=None, type=int, help="With --bundle: threads for ExecuTorch / onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def eval_cmd(ctx, model, policy_names, controller, budget, task, data, limit, context, chunk_size, hadamard, group_size, query_bits, seed, bundle_dir,
             backend, threads, as_json):
    """Accuracy / perplexity of policies on a task, through the packed cache (or of a bundle through a backend)."""
    from adaptive_kv.evaluate import EvalConfig, Evaluator

    qbits = _query_bits(query_bits)
    cfg = EvalConfig(task=task, data=data, limit=limit, context=context, chunk_size=chunk_size, hadamard=hadamard, group_size=group_size, seed=seed,
                     query_bits=qbits[0])
    if bundle_dir is not None:
        given = [f"--{p.replace('_names', '').replace('_', '-')}" for p in ("model", "policy_names", "controller", "budget", "chunk_size", "hadamard", "group_size",
                                                                              "query_bits")
                 if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)} cannot be combined with --bundle: the bundle fixes its model, policy and cache")
        from .backend_eval import BundleEvaluator

        with err.status(f"loading {bundle_dir} ({backend}) ..."):
            ev = BundleEvaluator(bundle_dir, backend, cfg, threads=threads, progress=not as_json)
        results = [ev.run().to_dict()]
    else:
        if ctx.get_parameter_source("backend") == click.core.ParameterSource.COMMANDLINE and backend != "torch":
            raise click.UsageError(f"--backend {backend} runs an exported bundle: pass --bundle DIR")
        names = _policy_names(policy_names)
        decoder, tok = _load(model)
        policies, per_policy_qbits = [], []
        for qb in qbits:  # one policy object per (policy, query precision): policies may keep per-run state
            ps = _policies(names, controller, budget, decoder)
            policies += ps
            per_policy_qbits += [qb] * len(ps)
        results = [r.to_dict() for r in Evaluator(decoder, tok, policies, cfg, progress=not as_json, query_bits=per_policy_qbits).run()]
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else {"results": results}, indent=2))
        return
    table = Table(title=f"{task} (n={results[0]['n']}, chunk {chunk_size}, hadamard {'on' if hadamard else 'off'})")
    for col in ("policy", "query", "acc", "acc_norm", "ppl", "avg bits", "KV B/token", "s"):
        table.add_column(col, justify="right")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in results:
        table.add_row(r["policy"], "int8" if r.get("query_bits") == 8 else "fp32", fmt(r["accuracy"], ".4f"), fmt(r["accuracy_norm"], ".4f"), fmt(r["perplexity"], ".3f"),
                      f"{r['avg_bits']:.2f}", f"{r['kv_bytes_per_token']:.0f}", f"{r['seconds']:.0f}")
    Console().print(table)


@main.command()
@click.option("--model", default=None, help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct).")
@click.option("--policy", default="static-4", show_default=True, help=f"One of {', '.join(POLICY_NAMES)}.")
@click.option("--controller", default=None, type=click.Path())
@click.option("--kv-budget-bits", "budget", default=None, type=float, help="KV memory budget in bits/value for rule / learned.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--max-seq-len", default=2048, show_default=True)
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
def generate(model, policy, controller, budget, prompt, max_new_tokens, temperature, max_seq_len, chat):
    """Generate text with the packed cache (PyTorch), streaming, then cache statistics."""
    import torch

    from adaptive_kv.session import Session, SessionConfig

    names = _policy_names((policy,))
    decoder, tok = _load(model)
    (pol,) = _policies(names, controller, budget, decoder)
    session = Session(decoder, pol, SessionConfig(max_seq_len=max_seq_len))
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok.encode(prompt, add_special_tokens=False)
    eos = tuple(i for i in (tok.eos_token_id,) if i is not None)
    t0 = time.perf_counter()
    out, t_first = [], None
    for tok_id in session.generate(torch.tensor(ids), max_new_tokens, temperature, eos):
        t_first = t_first or time.perf_counter()
        out.append(tok_id)
        click.echo(tok.decode(out[-1:]), nl=False)
    t1 = time.perf_counter()
    click.echo()
    cache = session.cache
    n_dec = max(len(out) - 1, 1)
    err.print(f"policy {pol.name}: prefill {len(ids)} tokens {len(ids) / (t_first - t0):.1f} tok/s, "
              f"decode {n_dec / (t1 - t_first):.1f} tok/s (PyTorch reference path)")
    err.print(f"KV cache: {cache.seq_len} tokens at {cache.bits_per_value():.2f} bits/value; "
              f"in use by precision {cache.used_bytes_by_bits()} bytes; allocated {cache.nbytes():,} bytes for {cache.max_seq_len} tokens")


@main.command("train-controller")
@click.option("--model", default=None, help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct).")
@click.option("--data", "data_specs", multiple=True,
              help="Text file (cut into windows) or FILE.jsonl@START:END (multiple-choice items, context + gold answer); "
                   "repeatable. Default: wiki.valid.tokens and HellaSwag items 2500-2799.")
@click.option("--window", default=2048, show_default=True, help="Tokens per text window.")
@click.option("--windows", "max_windows", default=6, show_default=True, help="Windows taken per text file (evenly spaced).")
@click.option("--kv-budget-bits", "budget", default=4.0, show_default=True, help="Average storage bits/value (scales included) the labels and the controller spend.")
@click.option("--features", default="paper", show_default=True, type=click.Choice(["paper", "extended"]),
              help="paper = entropy, rarity, attn_var, confidence; extended adds position.")
@click.option("--alpha", default=1.0, show_default=True, help="Weight of the cross-entropy to the budget-optimal labels.")
@click.option("--beta", default=0.05, show_default=True, help="Weight of the expected storage cost.")
@click.option("--gamma", default=1.0, show_default=True, help="Weight of 1 - expected quality (from each token's measured damage).")
@click.option("--epochs", default=400, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--patience", default=40, show_default=True, help="Early stopping: epochs without validation improvement.")
@click.option("--chunk-size", default=32, show_default=True, help="Prefill chunk used when computing features (as at inference).")
@click.option("--seed", default=0, show_default=True)
@click.option("--rows", "rows_path", default=None, type=click.Path(path_type=Path),
              help="Cache of collected rows (features + damage): reused when its data digest matches, else written.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Controller file to write (.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Print the training report as JSON.")
def train_controller(model, data_specs, window, max_windows, budget, features, alpha, beta, gamma, epochs, lr, patience,
                     chunk_size, seed, rows_path, out, as_json):
    """Train the precision controller on measured sensitivity under a KV bit budget."""
    import dataclasses
    import shlex

    import torch

    from adaptive_kv.model import model_id
    from adaptive_kv.training import Rows, TrainConfig, calibration_sequences, collect, default_data_specs, sequences_digest, train

    cfg = TrainConfig(budget_bits=budget, features=features, alpha=alpha, beta=beta, gamma=gamma, epochs=epochs, lr=lr,
                      patience=patience, seed=seed, chunk_size=chunk_size)
    if out.suffix != ".safetensors":
        raise click.BadParameter("the controller file must end in .safetensors", param_hint="--out")
    torch.manual_seed(seed)
    decoder, tok = _load(model)
    specs = list(data_specs) or default_data_specs()
    seqs = calibration_sequences(tok, specs, window=window, max_windows=max_windows)
    digest = sequences_digest(seqs)
    rows = Rows.load(rows_path) if rows_path is not None and rows_path.is_file() else None
    if rows is None or rows.digest != digest:
        t0 = time.perf_counter()
        err.print(f"collecting features and sensitivity of {sum(s.numel() for s in seqs):,} tokens in {len(seqs)} sequences")
        rows = collect(decoder, seqs, chunk_size=chunk_size, progress=not as_json)
        err.print(f"collected in {time.perf_counter() - t0:.0f} s")
        if rows_path is not None:
            rows.save(rows_path)
    else:
        err.print(f"reusing rows from {rows_path} ({rows.sequence.numel():,} tokens)")
    command = "kvexport train-controller " + shlex.join(sys.argv[2:])
    ctrl, report = train(rows, cfg, model_id=model_id(decoder.model),
                         extra={"data": [Path(s.partition("@")[0]).name + (("@" + s.partition("@")[2]) if "@" in s else "") for s in specs],
                                "command": command, "config": dataclasses.asdict(cfg)})
    ctrl.meta = dataclasses.replace(ctrl.meta, extra={**ctrl.meta.extra, "report": dataclasses.asdict(report)})
    out.parent.mkdir(parents=True, exist_ok=True)
    ctrl.save(out)
    rep = {**dataclasses.asdict(report), "out": str(out), "features": list(ctrl.meta.feature_names),
           "class_fractions": list(ctrl.meta.class_fractions)}
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    table = Table(title=f"controller @{budget} bits/value ({features} features) -> {out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rep.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


@main.command("export")
@click.option("--model", default=None, help="HF checkpoint folder or .gguf file (default: bundled SmolLM2-135M-Instruct).")
@click.option("--policy", default="learned", show_default=True, help="fp16, static-8, static-4, static-2, rule or learned.")
@click.option("--controller", default=None, type=click.Path(), help="Controller file for --policy learned (default: the bundled SmolLM2-135M one).")
@click.option("--kv-budget-bits", "budget", default=None, type=float, help="KV memory budget in bits/value for rule / learned (default: the controller's).")
@click.option("--weights", default="fp32", show_default=True, help="fp32, or 8da4w (int8 dynamic activations x int4 weights, XNNPACK).")
@click.option("--max-seq-len", default=2048, show_default=True, help="Context the cache holds, in tokens (prompt + generated).")
@click.option("--chunk-size", default=32, show_default=True, help="Most tokens one forward call takes (prefill chunk).")
@click.option("--hadamard/--no-hadamard", default=True, show_default=True)
@click.option("--query-bits", default=None, type=click.Choice(["32", "8"]),
              help="Attention query precision: 32 (fp32) or 8 (int8 rows: packed keys scored with integer dot products, ~15-25% faster "
                   "attention). [default: 8, or 32 for --policy fp16, which has no packed keys]")
@click.option("--formats", default="pte,onnx", show_default=True,
              help="Comma-separated: pte (ExecuTorch program + kvq kernels), onnx (model.onnx + model.onnx.data, stock onnxruntime).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--jobs", default=None, type=int,
              help="Processes that compile XNNPACK's partitions of the .pte (forked workers; 1: in this process). [default: the cores available, at most 8]")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(model, policy, controller, budget, weights, max_seq_len, chunk_size, hadamard, query_bits, formats, out, force, jobs, as_json):
    """Export a device bundle: model.pte and model.onnx (model + packed cache + features + controller), tokenizer, manifest."""
    from .pipeline import ExportOptions, export_bundle

    opts = ExportOptions(out=out, model=model, policy=policy, controller=controller, budget_bits=budget, weights=weights,
                         max_seq_len=max_seq_len, chunk_size=chunk_size, hadamard=hadamard, query_bits=None if query_bits is None else int(query_bits), force=force,
                         formats=tuple(f.strip() for f in formats.split(",") if f.strip()), jobs=jobs)
    logger = logging.getLogger("export")
    logger.setLevel(logging.INFO)
    with err.status("export") as status:
        handler = _StatusHandler(status)
        logger.addHandler(handler)
        logger.propagate = False  # stage lines once, on our console (libraries configure the root logger)
        try:
            manifest = export_bundle(opts, status=lambda msg: (status.update(msg), _log(msg)))
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    _print_manifest(manifest, out, verified=True)


def _log(msg: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", soft_wrap=True, highlight=False)


class _StatusHandler(logging.Handler):
    """Export stage log lines -> the console (timestamps) and the spinner."""

    def __init__(self, status):
        super().__init__()
        self.status = status

    def emit(self, record) -> None:
        msg = record.getMessage()
        _log(msg)
        self.status.update(msg)


def _print_manifest(m: dict, path: Path, verified: bool) -> None:
    pol, cache, model = m["policy"], m["cache"], m["model"]
    budget = f" @ {pol['kv_budget_bits']} bits/value" if pol.get("kv_budget_bits") else ""
    head = Table(title=f"bundle {path}" + (" (checksums verified)" if verified else ""), show_header=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", f"{model['id']} ({model['source']})")
    head.add_row("policy", pol["name"] + budget + (f", controller {pol['controller']['file']}" if "controller" in pol else ""))
    head.add_row("weights", m["weights"]["scheme"])
    head.add_row("context", f"{cache['max_seq_len']} tokens, chunks of {cache['chunk_size']}, group {cache['group_size']}, "
                            f"hadamard {'on' if cache['hadamard'] else 'off'}, query {'int8' if cache.get('query_bits') == 8 else 'fp32'}")
    head.add_row("versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if m.get("export_seconds"):
        head.add_row("export", ", ".join(f"{k} {v:.0f} s" for k, v in m["export_seconds"].items()))
    Console().print(head)
    pools = Table(title="KV cache pools")
    for col in ("bits", "capacity (tokens)", "bytes/token", "allocated"):
        pools.add_column(col, justify="right")
    for p in cache["pools"]:
        pools.add_row(str(p["bits"]), f"{p['capacity_tokens']:,}", f"{p['bytes_per_token']:,}", f"{p['bytes_allocated'] / 1e6:.1f} MB")
    pools.add_row("total", "", "", f"{cache['bytes_allocated'] / 1e6:.1f} MB (fp16 cache: {cache['fp16_bytes_same_context'] / 1e6:.1f} MB)")
    Console().print(pools)
    files = Table(title="files")
    for col in ("file", "bytes", "sha256"):
        files.add_column(col, justify="right" if col == "bytes" else "left")
    for name, e in m["files"].items():
        files.add_row(name, f"{e['bytes']:,}", e["sha256"][:16] + "…")
    Console().print(files)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle_dir, as_json):
    """Print a bundle's manifest and verify every file's checksum."""
    from .bundle import verify

    b = verify(bundle_dir)
    if as_json:
        click.echo(json.dumps(b.manifest, indent=2))
        return
    _print_manifest(b.manifest, bundle_dir, verified=True)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed (temperature > 0).")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
@click.option("--threads", default=None, type=int, help="ExecuTorch thread pool size (default: one per core).")
@click.option("--json", "as_json", is_flag=True, help="Print text and statistics as JSON instead of streaming.")
def run(bundle_dir, prompt, max_new_tokens, temperature, seed, chat, threads, as_json):
    """Generate from a bundle's model.pte in the ExecuTorch runtime (checksums verified first)."""
    from .bundle_runner import BundleRunner

    if max_new_tokens < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-new-tokens")
    with err.status(f"loading {bundle_dir} ..."):
        runner = BundleRunner(bundle_dir, threads=threads)
    ids = runner.encode(prompt, chat)
    tok = runner.tokenizer
    shown: list[int] = []
    printed = ""

    def stream(token: int) -> None:  # decode the whole tail: multi-byte characters span tokens
        nonlocal printed
        shown.append(token)
        if token in runner.decoder.eos_ids:
            return
        text = tok.decode(shown, skip_special_tokens=True)
        if not as_json:
            click.echo(text[len(printed):], nl=False)
        printed = text

    out, stats = runner.generate(ids, max_new_tokens, temperature, seed, on_token=stream)
    if as_json:
        click.echo(json.dumps({"text": printed, "tokens": out, **stats.to_dict(),
                               "kv_bits_per_value": stats.kv_bits_per_value(runner.values_per_token)}, indent=2))
        return
    click.echo()
    pol = runner.bundle.manifest["policy"]
    err.print(f"prefill {stats.prompt_tokens} tokens: {stats.prefill_tok_s:.1f} tok/s · decode {stats.new_tokens} tokens: "
              f"{stats.decode_tok_s:.1f} tok/s (stopped: {stats.stopped}; {pol['name']}, {runner.bundle.manifest['weights']['scheme']} weights)")
    used = ", ".join(f"{b}-bit {stats.kv_tokens_by_bits[b]} tok / {stats.kv_bytes_by_bits[b]:,} B" for b in sorted(stats.kv_bytes_by_bits))
    err.print(f"KV cache in use: {used}; {sum(stats.kv_bytes_by_bits.values()):,} B at "
              f"{stats.kv_bits_per_value(runner.values_per_token):.2f} bits/value (allocated {stats.kv_bytes_allocated:,} B)")


@main.command()
@click.argument("bundle_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--target", default="host", show_default=True, help="host, qemu-aarch64, ssh:USER@HOST[:PORT] or adb[:SERIAL].")
@click.option("--depth", "depths", default="512,2048,4096,8192", show_default=True, help="Tokens already in the cache when decoding starts (comma-separated).")
@click.option("--gen", default=64, show_default=True, help="Tokens decoded per repetition (EOS ignored).")
@click.option("--reps", default=3, show_default=True, help="Timed repetitions (mean +- stddev).")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs per bundle first (at the smallest depth).")
@click.option("--threads", default=2, show_default=True, help="ExecuTorch thread pool size on the target.")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [records], ...} instead of a table.')
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path), help="Write a PNG: decode ms/token and KV MiB vs depth.")
@click.option("--ssh-identity", default=None, type=click.Path(path_type=Path), help="ssh: private key file.")
@click.option("--ssh-option", "ssh_options", multiple=True, help="ssh: extra -o option, e.g. UserKnownHostsFile=/dev/null (repeat).")
@click.option("--remote-dir", default=None, help="ssh/adb: folder for the runner and bundles (default /tmp/kvexport; /data/local/tmp/kvexport on adb).")
def bench(bundle_dirs, target, depths, gen, reps, warmup, threads, as_json, plot_path, ssh_identity, ssh_options, remote_dir):
    """Prefill and decode ms/token of bundles at given depths, through the native runner on a target."""
    from rich.progress import Progress

    from . import bundle as B
    from .device_bench import BenchConfig, parse_depths, plot, provenance, run_bench
    from .device_targets import open_target

    cfg = BenchConfig(depths=parse_depths(depths), gen=gen, reps=reps, warmup=warmup, threads=threads)
    with err.status("verifying bundles ..."):
        bundles = [B.verify(d) for d in bundle_dirs]
    with err.status(f"connecting to {target} ..."):
        tgt = open_target(target, ssh_identity, tuple(ssh_options), remote_dir)
        meta = provenance(tgt)
    hw = meta["hardware"]
    err.print(f"target {tgt.name}: {hw.get('arch')} · {hw.get('cpu') or 'cpu ?'} · {hw.get('cores')} cores · {hw.get('os')}")
    err.print(f"kvexport {meta['versions']['kvexport']} · executorch {meta['versions']['executorch']} · commit {meta['commit']} · "
              f"{threads} threads · warm-up {warmup} · {reps} reps · gen {gen}")
    if tgt.relative:
        err.print("[yellow]emulated: qemu-user has no memory-system model; compare these rows with each other only, "
                  "they are not device latencies[/]")
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("pushing" if target.startswith(("ssh:", "adb")) else "benchmarking",
                                 total=len(bundles) * (cfg.warmup + cfg.reps * len(cfg.depths)))

        def done(rec: dict) -> None:
            err.print(f"{rec['bundle']} @ {rec['depth']}: {rec['decode_ms_per_token']:.2f} ms/token")

        def ran(what: str) -> None:
            progress.update(task, advance=1, description=what)

        records = run_bench(bundles, tgt, cfg, on_result=done, on_rep=ran)
    if plot_path is not None:
        plot(records, plot_path, f"kvexport bench on {tgt.name} ({hw.get('cpu') or hw.get('arch')}), {threads} threads, gen {gen}"
             + (" - emulated, relative only" if tgt.relative else ""))
        err.print(f"plot: {plot_path}")
    if as_json:
        click.echo(json.dumps({"results": records, **meta}, indent=2))
        return
    table = Table(title=f"kvexport bench · {tgt.name}" + (" (emulated: relative timings)" if tgt.relative else ""))
    for col in ("bundle", "policy", "weights", "depth", "prefill ms/tok", "decode ms/tok", "first token ms", "KV MiB", "GB/s", "peak RSS MiB"):
        table.add_column(col, justify="left" if col in ("bundle", "policy", "weights") else "right")
    for r in records:
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else "n/a"
        table.add_row(r["bundle"], r["policy"], r["weights"], str(r["depth"]),
                      f"{r['prefill_ms_per_token']:.2f} ± {r['prefill_ms_std']:.2f}",
                      f"{r['decode_ms_per_token']:.2f} ± {r['decode_ms_std']:.2f}", f"{r['first_token_ms']:.0f}",
                      f"{r['kv_bytes'] / 2**20:.1f}", f"{r['gb_per_s']:.2f}", rss)
    console = Console()
    Console(width=max(console.width, 150)).print(table)  # piped output too: one line a row


@main.group()
def android() -> None:
    """The Android demo app (android_demo/): put bundles on a phone."""


@android.command("push")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--serial", default=None, help="adb device serial (see `adb devices`); needed when several are attached.")
@click.option("--name", default=None, help="Folder name on the phone (default: the bundle folder's name).")
@click.option("--remote-dir", default=None, help="Parent folder on the phone (default: the app's /sdcard/Android/data/dev.kvexport.demo/files/bundles).")
def android_push(bundle_dir, serial, name, remote_dir):
    """Verify a bundle and push model.pte, tokenizer.json and manifest.json to the demo app over adb."""
    from .android import push_bundle

    with err.status(f"verifying and pushing {bundle_dir} ..."):
        remote = push_bundle(bundle_dir, serial, name=name, remote_root=remote_dir)
    err.print(f"pushed to {remote}: tap Load in the app")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", default=None, type=click.Path(path_type=Path), help="Text file, one prompt per line (default: five built-in prompts).")
@click.option("--steps", default=64, show_default=True, help="Greedy decode steps per prompt after the prefill.")
@click.option("--backend", "backends", multiple=True, default=("executorch", "onnxruntime"), show_default=True,
              help="Backends to check against the torch reference (repeat).")
@click.option("--threads", default=None, type=int, help="Threads for ExecuTorch and onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def validate(bundle_dir, prompts_file, steps, backends, threads, as_json):
    """Check that the torch reference, the .pte and the ONNX model agree step by step (exit 1 if not)."""
    from .validate import Validator, read_prompts

    if steps < 0:
        raise click.BadParameter("must be >= 0", param_hint="--steps")
    prompts = read_prompts(prompts_file)
    with err.status(f"loading {bundle_dir} (reference model, .pte, ONNX) ..."):
        v = Validator(bundle_dir, tuple(backends), threads=threads)  # progress on stderr, also with --json
    report = v.run(prompts, steps)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for w in report["warnings"]:
            err.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
        tol = report["tolerances"]
        table = Table(title=f"validate {bundle_dir.name}: {report['prompts']} prompts x {steps} steps, vs torch from the same state")
        for col in ("backend", "max |dlogit|", "top-1", "bits", "cache bytes", "free top-1", "ok"):
            table.add_column(col, justify="left" if col == "backend" else "right")
        for name, r in report["backends"].items():
            cache = "n/a" if r["cache_bytes_equal"] is None else f"{r['cache_bytes_equal']:.3%}"
            free = "n/a" if r["free_running_top1"] is None else f"{r['free_running_top1']:.1%}"
            table.add_row(name + ("" if r["synced"] else "*"), f"{r['max_abs_logit_diff']:.1e}", f"{r['top1_agreement']:.1%}",
                          f"{r['bits_agreement']:.1%}", cache, free, "[green]yes[/]" if r["ok"] else "[red]no[/]")
        Console().print(table)
        for name, r in report["backends"].items():
            if not r["synced"]:
                click.echo(f"* {name}: no state to share (a .pte without a `state` method): compared free-running")
            if (div := r["first_divergence"]) is not None:
                click.echo(f"{name}: first divergence at prompt {div['prompt']} {div['phase']} step {div['step']}: {div['what']}")
        err.print(f"tolerances: logits <= {tol['max_abs_logit_diff']}, top-1 >= {tol['top1_agreement']:.0%}, bits >= {tol['bits_agreement']:.1%}, "
                  f"cache bytes >= {tol['cache_bytes_equal']:.1%}")
    sys.exit(0 if report["ok"] else 1)
