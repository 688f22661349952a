"""Microbenchmark of the fused packed-cache attention kernel (kvq::packed_attention).

SmolLM2-135M shapes (Hq=9, Hkv=3, D=64), one decode step (T=1), at 4096 and 8192 cached tokens;
policies static-4 and a 2/4/8/16-bit mix (45/40/10/5 %); 1 and 2 threads. Per case it reports
the time per call, GB/s over the bytes the kernel must read (codes + scales + zeros, or fp16
rows), that figure as a fraction of this machine's memory-copy bandwidth, and the speedup over
fp32 attention (``F.scaled_dot_product_attention`` over an fp32 cache of the same length).

Cold caches, like a real decode step (30 layers plus the weights pass between two visits of a
layer's cache): each case cycles through enough copies of the layer ("layers") that the working
set exceeds 4x the last-level cache. Copy bandwidth: one 256 MiB torch copy, reported both as
bytes copied / s and as bytes moved (read + written) / s; the fraction uses the larger, moved
(``fraction_of_copied_bw`` has the other). Last, the cost of one (token, KV head) at each width
with hot and with cold caches: the kernel's arithmetic apart from memory.

Every kernel figure is taken for both query precisions (``query_bits`` 32: fp32 query, 8: int8
query rows scored with integer dot products), taking turns within each case so host drift hits
both alike.

    .venv/bin/python bench/bench_attention.py [--reps 60] [--warmup 10] [--out bench/results/attention.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptive_kv import ops
from adaptive_kv.formats import BIT_WIDTHS, RowFormat

HQ, HKV, D, G = 9, 3, 64, 64
POLICIES = {"static-4": {4: 1.0}, "mix 2/4/8/16 = 45/40/10/5%": {2: 0.45, 4: 0.40, 8: 0.10, 16: 0.05}}
CONTEXTS = (4096, 8192)
THREADS = (1, 2)
COLD_BYTES = 4 * 32 * 2**20  # 4x this host's 32 MiB L3: every visit of a layer misses the caches
QUERY_BITS = (32, 8)


def split_counts(n: int, fractions: dict[int, float]) -> dict[int, int]:
    counts = {b: int(n * f) for b, f in fractions.items()}
    counts[max(fractions, key=fractions.get)] += n - sum(counts.values())
    return counts


def make_layer(counts: dict[int, int], seed: int) -> dict[str, torch.Tensor]:
    """One layer's pools, full to the given counts, packed by the kernel from random rows."""
    g = torch.Generator().manual_seed(seed)
    pools: dict[str, torch.Tensor] = {}
    for b, n in counts.items():
        if n == 0:
            continue
        for kv in "kv":
            x = torch.randn(HKV, n, D, generator=g)
            if b == 16:
                pools[f"{kv}16"] = x.half()
            else:
                pools[f"{kv}{b}"], pools[f"{kv}{b}_scale"], pools[f"{kv}{b}_zero"] = ops.pack_rows(x, b, G)
    return pools


def cold_copies(layer: dict[str, torch.Tensor], nbytes: int) -> list[dict[str, torch.Tensor]]:
    """Copies of a layer in separate memory, enough that cycling through them misses the caches."""
    return [{k: t.clone() for k, t in layer.items()} for _ in range(max(2, math.ceil(COLD_BYTES / nbytes)))]


def lengths_of(counts: dict[int, int]) -> torch.Tensor:
    """Filled slots of the 2/4/8/16-bit pools: packed_attention's lengths [4] int64."""
    return torch.tensor([counts.get(b, 0) for b in BIT_WIDTHS], dtype=torch.int64)


def bytes_read(counts: dict[int, int]) -> int:
    """K and V bytes of the filled slots (scales and zeros included)."""
    return sum(2 * HKV * n * RowFormat(b, D, G).row_bytes for b, n in counts.items())


def time_calls(fn, n_layers: int, warmup: int, reps: int) -> list[float]:
    for i in range(warmup):
        fn(i % n_layers)
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn((warmup + i) % n_layers)
        out.append(time.perf_counter() - t0)
    return out


def copy_bandwidth(threads: int, reps: int = 10) -> dict[str, float]:
    torch.set_num_threads(threads)
    src = torch.ones(256 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = min(time_calls(lambda _: dst.copy_(src), 1, 0, reps))
    return {"copied_GBps": src.numel() / best / 1e9, "moved_GBps": 2 * src.numel() / best / 1e9}


def summary(ts: list[float]) -> dict[str, float]:
    return {
        "median_us": 1e6 * statistics.median(ts),
        "mean_us": 1e6 * statistics.fmean(ts),
        "std_us": 1e6 * statistics.pstdev(ts),
        "best_us": 1e6 * min(ts),  # the uncontended figure when other work shares the cores
    }


def bench_case(n_ctx: int, policy: str, threads: int, warmup: int, reps: int, copy_bw: float) -> dict:
    torch.set_num_threads(threads)
    counts = split_counts(n_ctx, POLICIES[policy])
    nbytes = bytes_read(counts)
    layers = cold_copies(make_layer(counts, seed=n_ctx), nbytes)
    n_layers, lengths = len(layers), lengths_of(counts)
    q, kc, vc = torch.randn(1, HQ, 1, D), torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D)
    per_qb: dict[int, list[float]] = {qb: [] for qb in QUERY_BITS}
    for _ in range(3):  # the query precisions take turns
        for qb in QUERY_BITS:
            per_qb[qb] += time_calls(lambda i: ops.packed_attention(q, kc, vc, layers[i], lengths, D**-0.5, query_bits=qb), n_layers, warmup, reps // 3)
    del layers

    # fp32 baseline: the same number of keys (cache + the chunk) in an fp32 cache, GQA via SDPA
    fp32_bytes = 2 * HKV * (n_ctx + 1) * D * 4
    n_fp = max(2, math.ceil(COLD_BYTES / fp32_bytes))
    kv32 = [(torch.randn(1, HKV, n_ctx + 1, D), torch.randn(1, HKV, n_ctx + 1, D)) for _ in range(n_fp)]
    sdpa = time_calls(lambda i: F.scaled_dot_product_attention(q, *kv32[i], enable_gqa=True), n_fp, warmup, reps)
    del kv32

    def figures(kvq: list[float]) -> dict:
        t = statistics.median(kvq)
        return {
            "kvq": summary(kvq),
            "GBps": nbytes / t / 1e9,
            "fraction_of_copy_bw": nbytes / t / 1e9 / copy_bw,
            "fraction_of_copied_bw": nbytes / t / 1e9 / (copy_bw / 2),  # the other convention: bytes copied / s
            "speedup_vs_sdpa": statistics.median(sdpa) / t,
            "best": {"GBps": nbytes / min(kvq) / 1e9, "fraction_of_copy_bw": nbytes / min(kvq) / 1e9 / copy_bw,
                     "fraction_of_copied_bw": nbytes / min(kvq) / 1e9 / (copy_bw / 2), "speedup_vs_sdpa": min(sdpa) / min(kvq)},
        }

    return {
        "context": n_ctx,
        "policy": policy,
        "threads": threads,
        "counts": {str(b): n for b, n in counts.items()},
        "bytes_read": nbytes,
        "layers_cycled": n_layers,
        "sdpa_fp32": summary(sdpa) | {"bytes_read": fp32_bytes, "GBps": fp32_bytes / statistics.median(sdpa) / 1e9},
        "query_bits": {str(qb): figures(ts) for qb, ts in per_qb.items()},
        "q8_speedup_vs_q32": statistics.median(per_qb[32]) / statistics.median(per_qb[8]),
    }


def compute_per_width(warmup: int, reps: int, n_ctx: int = 2048, rounds: int = 7) -> list[dict]:
    """Hot-cache cost of one (token, KV head) per width, 1 thread: one layer called over and over
    (<= 1.6 MB at 2048 tokens, inside L2), so the figure is the kernel's arithmetic, not memory.
    Side by side with the same call on cold layers, it says whether a width is compute- or
    memory-bound. This host's speed drifts by tens of percent over minutes, so the widths take
    turns: ``rounds`` rounds of (every width hot, then cold), ``reps`` calls each, median of all."""
    torch.set_num_threads(1)
    cases = []
    for bits in BIT_WIDTHS:
        counts = {bits: n_ctx}
        nbytes = bytes_read(counts)
        base = make_layer(counts, seed=bits)
        cases.append((bits, nbytes, base, cold_copies(base, nbytes), lengths_of(counts)))
    q, kc, vc = torch.randn(1, HQ, 1, D), torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D)
    keys = [(bits, qb) for bits in BIT_WIDTHS for qb in QUERY_BITS]
    hot: dict[tuple[int, int], list[float]] = {k: [] for k in keys}
    cold: dict[tuple[int, int], list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        for bits, _, base, layers, lengths in cases:
            for qb in QUERY_BITS:
                call = lambda x: ops.packed_attention(q, kc, vc, x, lengths, D**-0.5, query_bits=qb)  # noqa: E731
                hot[bits, qb] += time_calls(lambda i: call(base), 1, warmup, reps)
                cold[bits, qb] += time_calls(lambda i: call(layers[i]), len(layers), warmup, reps)
    per = 1e9 / (n_ctx * HKV)
    size = {bits: nbytes for bits, nbytes, *_ in cases}
    return [{"bits": bits, "query_bits": qb, "context": n_ctx, "bytes_read": size[bits], "rounds": rounds, "calls": len(hot[bits, qb]),
             "hot_us": 1e6 * statistics.median(hot[bits, qb]), "cold_us": 1e6 * statistics.median(cold[bits, qb]),
             "hot_ns_per_token_head": statistics.median(hot[bits, qb]) * per, "cold_ns_per_token_head": statistics.median(cold[bits, qb]) * per}
            for bits, qb in keys]


def host_info() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {
        "cpu": sh("lscpu | grep 'Model name' | sed 's/.*: *//'") or platform.processor(),
        "cores": os.cpu_count(),
        "l3": sh("lscpu | grep 'L3' | sed 's/.*: *//'"),
        "loadavg_at_start": sh("cat /proc/loadavg"),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_isa": ops.best_kernel_isa(),
        "commit": sh("git -C " + str(Path(__file__).resolve().parent) + " rev-parse --short HEAD"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "attention.json")
    args = ap.parse_args()
    ops.load_library()
    info = host_info()
    copy = {th: copy_bandwidth(th) for th in THREADS}
    cases = [
        bench_case(n, pol, th, args.warmup, args.reps, copy[th]["moved_GBps"]) for n in CONTEXTS for pol in POLICIES for th in THREADS
    ]
    per_width = compute_per_width(args.warmup, args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "host": info,
        "method": f"decode step T=1, Hq={HQ}, Hkv={HKV}, D={D}, group {G}; {args.warmup} warm-up + {args.reps} timed calls per case, "
        f"median (and best) reported; working set cycled over >= {COLD_BYTES >> 20} MiB of layer copies (cold caches)",
        "copy_bandwidth": {str(k): v for k, v in copy.items()},
        "cases": cases,
        "compute_per_width": per_width,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"host: {info['cpu']}, {info['cores']} cores, L3 {info['l3']}, torch {info['torch']} ({info['torch_cpu_capability']}), "
          f"kernel {info['kernel_isa']}, load avg at start {info['loadavg_at_start']}")
    load1 = float(info["loadavg_at_start"].split()[0] or 0)
    if load1 >= 0.5 * (os.cpu_count() or 1):
        # Fork-join kernels (ours and SDPA alike) wait for a descheduled worker: one scheduler
        # slice (~8 ms here) per call, so multi-thread rows then measure the scheduler.
        print(f"WARNING: load average {load1} on {os.cpu_count()} cores at start: other work competes for the cores; "
              "multi-thread timings are not meaningful in this run")
    for th, c in copy.items():
        print(f"copy bandwidth, {th} thread(s): {c['copied_GBps']:.1f} GB/s copied = {c['moved_GBps']:.1f} GB/s moved (read + write)")
    print(f"\n{result['method']}\n")
    print("median of the timed calls, and in brackets the best call (the uncontended figure on a shared machine)\n")
    print("| context | policy | threads | query | MB read | kvq us | GB/s | % of copy bw (moved) | % of copied bw | fp32 SDPA us | speedup vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        s = c["sdpa_fp32"]
        for qb, f in c["query_bits"].items():
            k, b = f["kvq"], f["best"]
            print(f"| {c['context']} | {c['policy']} | {c['threads']} | {'fp32' if qb == '32' else 'int8'} | {c['bytes_read'] / 1e6:.2f} | "
                  f"{k['median_us']:.0f} ({k['best_us']:.0f}) | {f['GBps']:.2f} ({b['GBps']:.2f}) | "
                  f"{100 * f['fraction_of_copy_bw']:.0f}% ({100 * b['fraction_of_copy_bw']:.0f}%) | "
                  f"{100 * f['fraction_of_copied_bw']:.0f}% ({100 * b['fraction_of_copied_bw']:.0f}%) | "
                  f"{s['median_us']:.0f} ({s['best_us']:.0f}) | {f['speedup_vs_sdpa']:.2f}x ({b['speedup_vs_sdpa']:.2f}x) |")
    print("\ncost of one (token, KV head) by width and query precision, 1 thread, 2048 tokens: hot (one layer, in L2) vs cold "
          "(layers cycled); widths taking turns over 7 rounds, median\n")
    print("| bits | query | MB read | hot ns | cold ns |")
    print("|---|---|---|---|---|")
    for r in per_width:
        print(f"| {r['bits']} | {'fp32' if r['query_bits'] == 32 else 'int8'} | {r['bytes_read'] / 1e6:.2f} | "
              f"{r['hot_ns_per_token_head']:.2f} | {r['cold_ns_per_token_head']:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
