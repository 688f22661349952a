"""``kvexport bench``: prefill and decode ms/token of bundles at given cache depths, on a target.

llama-bench's conventions: depth = tokens already in the cache when decoding starts; warm-up
runs first, then repetitions reported as mean +- stddev; prefill and decode timed apart; the
hardware, versions and commit printed beside the numbers. The prefill is real text (WikiText-2
through the bundle's tokenizer), and decoding is greedy with EOS ignored so that every
repetition decodes exactly ``gen`` tokens.

Engines take turns (``run_rounds``): at each depth, repetition r runs every engine once, in
reverse order on odd rounds, so a burst of load on the machine lands on all of them alike
instead of on whichever ran during it. Each repetition starts from an empty cache (for the
native runner: a fresh process, ``--reps 1``). The warm-up runs come first, per engine, at the
smallest depth: they page the program in and start the thread pool; a repetition's own prefill
warms its decode.

Achieved GB/s = (weight bytes + KV bytes read per decoded token) / decode time. The weight
bytes are the program's bytes less the fp32 embedding table (both weight schemes keep it fp32,
8da4w quantizes linear layers only, and a step reads one row of it); the KV bytes read are those
cached at the middle of the decode.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Protocol

from . import bundle as B
from .device_targets import Target

RECORD_FIELDS = ("target", "engine", "bundle", "policy", "weights", "depth", "gen", "threads", "reps", "warmup",
                 "prefill_ms_per_token", "prefill_ms_std", "decode_ms_per_token", "decode_ms_std", "first_token_ms",
                 "kv_bytes", "weights_bytes", "gb_per_s")


@dataclass(frozen=True)
class BenchConfig:
    depths: tuple[int, ...] = (512, 2048, 4096, 8192)
    gen: int = 64
    reps: int = 3
    warmup: int = 1
    threads: int = 2
    timeout_s: float = 7200.0  # one runner process (all repetitions of one depth), qemu included

    def __post_init__(self) -> None:
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"--depth takes positive token counts, got {self.depths}")
        if self.gen < 2:
            raise ValueError("--gen must be at least 2 (decode time is measured after the first token)")
        if self.reps < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("--reps and --threads must be >= 1 and --warmup >= 0")


def parse_depths(text: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--depth takes comma-separated token counts like 512,2048, got {text!r}") from None
    return tuple(sorted(set(depths)))


def policy_label(manifest: dict) -> str:
    """learned@4.0, rule@3.0, static-4, fp16 ... (the budget when the policy has one), + " q8" for
    a bundle whose attention uses the int8 query (cache.query_bits 8)."""
    pol = manifest["policy"]
    budget = pol.get("kv_budget_bits")
    label = f"{pol['name']}@{budget:g}" if budget is not None and pol["name"] in ("learned", "rule", "oracle") else pol["name"]
    return label + (" q8" if manifest.get("cache", {}).get("query_bits") == 8 else "")


def depth_prompt(bundle: B.Bundle, n: int) -> list[int]:
    """``n`` token ids of WikiText-2 test text through the bundle's tokenizer (repeated if short)."""
    from tokenizers import Tokenizer

    from adaptive_kv.tasks import load_text

    tok = Tokenizer.from_file(str(bundle.path / B.TOKENIZER))
    ids = tok.encode(load_text()[: 8 * n + 4096], add_special_tokens=False).ids  # ~4 characters a token
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def check_fits(bundle: B.Bundle, cfg: BenchConfig) -> None:
    cap = bundle.manifest["cache"]["max_seq_len"]
    worst = max(cfg.depths) + cfg.gen
    if worst > cap:
        raise B.BundleError(f"{bundle.path.name} holds {cap} tokens, depth {max(cfg.depths)} + gen {cfg.gen} needs {worst}: "
                            f"re-export with `kvexport export --max-seq-len {worst} ...` or lower --depth/--gen")


def weights_read_per_token(manifest: dict) -> int:
    """Program bytes less the fp32 embedding table (a lookup reads one row of it)."""
    model = manifest["model"]
    return manifest["files"][B.PROGRAM]["bytes"] - 4 * model["vocab_size"] * model["hidden_size"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def make_record(raw: dict, bundle: B.Bundle, target: Target, cfg: BenchConfig, depth: int) -> dict:
    """The runner's per-repetition numbers -> one benchmark row."""
    prefill, prefill_std = mean_std(raw["prefill_ms_per_token"])
    decode, decode_std = mean_std(raw["decode_ms_per_token"])
    kv_end = int(raw["kv_bytes_total"])
    cached_end = int(raw["cached_tokens"])  # depth + gen - 1: the last token is chosen, never fed
    kv_read = kv_end * (depth + (cached_end - depth) / 2) / cached_end  # the cache grows through the decode
    weights_bytes = weights_read_per_token(bundle.manifest)
    return {
        "target": target.name, "engine": "kvexport", "relative": target.relative, "arch": raw.get("arch"),
        "bundle": bundle.path.name, "policy": policy_label(bundle.manifest), "weights": bundle.manifest["weights"]["scheme"],
        "depth": depth, "gen": cfg.gen, "threads": cfg.threads, "reps": cfg.reps, "warmup": cfg.warmup,
        "prefill_ms_per_token": prefill, "prefill_ms_std": prefill_std,
        "decode_ms_per_token": decode, "decode_ms_std": decode_std,
        # every repetition's figure: a shared host's noise comes in bursts, so readers can take
        # medians or pair the engines' repetitions of one round
        "decode_ms_median": statistics.median(raw["decode_ms_per_token"]),
        "decode_ms_reps": list(raw["decode_ms_per_token"]), "prefill_ms_reps": list(raw["prefill_ms_per_token"]),
        "first_token_ms": statistics.fmean(raw["first_token_ms"]),
        "kv_bytes": kv_end, "kv_bytes_by_bits": {int(k): int(v) for k, v in raw["kv_bytes"].items()},
        "kv_bytes_allocated": int(raw["kv_bytes_allocated"]),
        "weights_bytes": weights_bytes,
        "gb_per_s": (weights_bytes + kv_read) / (decode * 1e-3) / 1e9,
        "peak_rss_bytes": raw.get("peak_rss_bytes"), "load_ms": raw.get("load_ms"),
    }


class Engine(Protocol):
    """One thing being timed (a bundle on a target, a peer) as ``run_rounds`` drives it."""

    label: str

    def fits(self, depth: int) -> bool: ...

    def rep(self, depth: int) -> dict:
        """One repetition from an empty cache: prefill ``depth`` tokens, decode; its raw timings."""
        ...

    def record(self, depth: int, reps: list[dict]) -> dict:
        """The repetitions of one depth -> one benchmark row."""
        ...


def run_rounds(engines: Sequence[Engine], cfg: BenchConfig, on_result: Callable[[dict], None] | None = None,
               on_rep: Callable[[str], None] | None = None) -> list[dict]:
    """Warm-up runs, then per depth ``cfg.reps`` rounds over the engines that fit it (turns alternate)."""
    for e in engines:
        fitting = [d for d in cfg.depths if e.fits(d)]
        for _ in range(cfg.warmup if fitting else 0):
            e.rep(fitting[0])
            if on_rep is not None:
                on_rep(f"{e.label}: warm-up")
    records = []
    for depth in cfg.depths:
        active = [e for e in engines if e.fits(depth)]
        reps: list[list[dict]] = [[] for _ in active]
        for r in range(cfg.reps):
            for i in (range(len(active)) if r % 2 == 0 else reversed(range(len(active)))):
                reps[i].append(active[i].rep(depth))
                if on_rep is not None:
                    on_rep(f"{active[i].label} @ {depth}: rep {r + 1}/{cfg.reps}")
        for e, raws in zip(active, reps):
            rec = e.record(depth, raws)
            records.append(rec)
            if on_result is not None:
                on_result(rec)
    return records


def rounds_total(engines: Sequence[Engine], cfg: BenchConfig) -> int:
    """How many ``on_rep`` calls ``run_rounds`` makes (for a progress bar)."""
    return sum((cfg.warmup if any(e.fits(d) for d in cfg.depths) else 0) + cfg.reps * sum(e.fits(d) for d in cfg.depths)
               for e in engines)


class BundleEngine:
    """A bundle through the native runner on a target: one runner process per repetition."""

    def __init__(self, bundle: B.Bundle, target: Target, cfg: BenchConfig):
        self.bundle, self.target, self.cfg = bundle, target, cfg
        self.label = bundle.path.name
        fitting = [d for d in cfg.depths if self.fits(d)]
        self.ids = depth_prompt(bundle, max(fitting)) if fitting else []

    def fits(self, depth: int) -> bool:
        return depth + self.cfg.gen <= self.bundle.manifest["cache"]["max_seq_len"]

    def rep(self, depth: int) -> dict:
        args = ["--depth", str(depth), "--gen", str(self.cfg.gen), "--reps", "1", "--warmup", "0",
                "--threads", str(self.cfg.threads), "--ignore-eos"]
        return self.target.run(self.bundle.path, args, {"--prompt-ids-file": " ".join(map(str, self.ids[:depth]))},
                               self.cfg.timeout_s)

    def record(self, depth: int, reps: list[dict]) -> dict:
        raw = dict(reps[-1])  # sizes from the last; the timings of all
        for key in ("prefill_ms_per_token", "decode_ms_per_token", "first_token_ms"):
            raw[key] = [x for r in reps for x in r[key]]
        return make_record(raw, self.bundle, self.target, self.cfg, depth)


def run_bench(bundles: list[B.Bundle], target: Target, cfg: BenchConfig,
              on_result: Callable[[dict], None] | None = None, on_rep: Callable[[str], None] | None = None) -> list[dict]:
    """Every bundle at every depth on ``target`` (bundles pushed first when remote), taking turns."""
    for b in bundles:
        check_fits(b, cfg)
    target.prepare([b.path for b in bundles])
    return run_rounds([BundleEngine(b, target, cfg) for b in bundles], cfg, on_result, on_rep)


def provenance(target: Target) -> dict:
    """Hardware of the target, toolchain versions and the commit that ran the benchmark."""
    versions = {}
    for name in ("kvexport", "executorch", "torch"):
        try:
            versions[name] = pkg_metadata.version(name)
        except pkg_metadata.PackageNotFoundError:
            versions[name] = None
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"hardware": target.describe(), "versions": versions, "commit": commit,
            "timings": "relative only: qemu-user models no memory system" if target.relative else "measured"}


def series_label(rec: dict) -> str:
    return f"{rec['policy']} ({rec['weights']})" if rec.get("engine", "kvexport") == "kvexport" else rec["policy"]


def plot(records: list[dict], path: Path, title: str) -> None:
    """Decode ms/token and KV MB against depth, one line per policy and weight scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for r in records:
        series.setdefault(series_label(r), []).append(r)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["depth"])
        depths = [r["depth"] for r in rows]
        ax_t.errorbar(depths, [r["decode_ms_per_token"] for r in rows], yerr=[r["decode_ms_std"] for r in rows],
                      marker="o", capsize=3, label=label)
        ax_m.plot(depths, [r["kv_bytes"] / 2**20 for r in rows], marker="o", label=label)
    for ax, ylabel in ((ax_t, "decode ms/token"), (ax_m, "KV cache MiB (in use)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (tokens in the cache)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
