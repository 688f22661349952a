"""Baseline for the end-to-end decode benchmark: transformers' stock ExecuTorch export.

    OMP_NUM_THREADS=1 python bench/stock_executorch.py --weights 8da4w --depth 4096

SmolLM2 goes through ``transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM``
(a ``StaticCache`` of ``max_seq_len`` fp32 slots held as mutable buffers, one token per call:
``forward(input_ids [1, 1], cache_position [1]) -> logits [1, 1, V]``), then
``to_edge_transform_and_lower`` with the XNNPACK partitioner and ``to_executorch`` with default
settings: no custom SDPA/KV ops, no reinplacing. It is what our packed cache is compared against.

Why decode cost does not depend on depth here: ``StaticLayer.update`` returns the whole
``[1, H_kv, max_seq_len, D]`` buffers and ``StaticLayer.get_mask_sizes`` gives
``kv_length = max_seq_len``, so every step attends over all slots under a causal mask, whatever
they hold. The timer therefore starts at ``cache_position = depth`` without a prefill (checked by
timing depth 0 against 4096).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

WEIGHTS = ("fp32", "8da4w")


def _stock_wrapper(model, max_seq_len: int) -> torch.nn.Module:
    """transformers' exportable wrapper. Its static-cache check wants
    ``generation_config.cache_implementation == "static"``, so set it while the wrapper is built
    and then restore the caller's setting."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    gen = model.generation_config
    saved = gen.cache_implementation
    gen.cache_implementation = "static"
    try:
        return TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    finally:
        gen.cache_implementation = saved


def export_stock_pte(model, max_seq_len: int, weights: str, out_path) -> dict:
    """Export ``model`` (HF LlamaForCausalLM, fp32) the stock way to ``out_path``.

    ``weights="8da4w"`` quantizes the linears first, the same way as the repo's own export
    (``export.weight_quant.quantize_8da4w``), so only the KV cache differs between the two programs.
    Returns the size, the time of each stage, the forward's input signature and the cache dtype."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if weights == "8da4w":
        from export.weight_quant import quantize_8da4w

        model = quantize_8da4w(model)  # quantized deep copy; the caller's model is untouched
    seconds["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    wrapper = _stock_wrapper(model.eval(), max_seq_len)
    input_ids = torch.zeros(1, 1, dtype=torch.long)  # [1, 1]: one token per call
    cache_position = torch.zeros(1, dtype=torch.long)  # [1]: its slot in the cache
    with torch.no_grad():
        ep = wrapper.export(input_ids=input_ids, cache_position=cache_position)
    seconds["torch.export"] = time.perf_counter() - t0
    caches = {n: b for n, b in ep.named_buffers() if "key_cache" in n or "value_cache" in n}
    cache_dtypes = sorted({str(b.dtype) for b in caches.values()})  # each [1, H_kv, max_seq_len, D]
    cache_shape = list(next(iter(caches.values())).shape)

    t0 = time.perf_counter()
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods={"get_max_seq_len": max_seq_len})
    seconds["to_edge_transform_and_lower"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = edge.to_executorch().buffer
    seconds["to_executorch"] = time.perf_counter() - t0

    from export.pte import write_atomically

    out = Path(out_path)
    write_atomically(data, out)  # readers never see a half-written program
    example = {"input_ids": input_ids, "cache_position": cache_position}
    return {
        "path": str(out),
        "bytes": len(data),
        "weights": weights,
        "max_seq_len": max_seq_len,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "inputs": [{"name": n, "shape": list(example[n].shape), "dtype": str(example[n].dtype)} for n in ep.graph_signature.user_inputs],
        "cache_dtypes": cache_dtypes,
        "cache_shape": cache_shape,
        "cache_fp32": cache_dtypes == ["torch.float32"],
    }


def _load_forward(pte_path, threads: int):
    """(forward method, max_seq_len). ExecuTorch's XNNPACK threadpool defaults to one thread per
    core and ignores OMP_NUM_THREADS, so size it to ``threads`` explicitly."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    program = Runtime.get().load_program(str(pte_path))
    return program.load_method("forward"), int(program.load_method("get_max_seq_len").execute([])[0])


def greedy_decode(pte_path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` through the .pte from position 0, token by token
    (the stock forward takes one token per call): for checking parity with eager HF."""
    forward, _ = _load_forward(pte_path, torch.get_num_threads())
    out: list[int] = []
    tokens = list(prompt)
    for pos in range(len(prompt) + new_tokens - 1):
        logits = forward.execute([torch.tensor([[tokens[pos]]]), torch.tensor([pos])])[0]  # [1, 1, V]
        if pos >= len(prompt) - 1:
            tokens.append(int(logits[0, -1].argmax()))
            out.append(tokens[-1])
    return out


def time_decode(pte_path, depth: int, steps: int, warmup: int) -> dict:
    """ms per single-token decode call at context ``depth``: ``warmup`` untimed then ``steps``
    timed calls at positions depth, depth+1, ... No prefill: see the module docstring."""
    threads = torch.get_num_threads()
    forward, max_seq_len = _load_forward(pte_path, threads)
    if depth + warmup + steps > max_seq_len:
        raise ValueError(f"depth + warmup + steps = {depth + warmup + steps} > the program's max_seq_len={max_seq_len}")
    token = torch.tensor([[1]])  # [1, 1]
    positions = [torch.tensor([depth + i]) for i in range(warmup + steps)]  # each [1]
    ms = []
    for i, pos in enumerate(positions):
        t0 = time.perf_counter()
        forward.execute([token, pos])
        if i >= warmup:
            ms.append(1000 * (time.perf_counter() - t0))
    return {
        "depth": depth,
        "steps": steps,
        "warmup": warmup,
        "threads": threads,
        "ms_per_token_median": round(statistics.median(ms), 3),
        "ms_per_token_mean": round(statistics.fmean(ms), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", choices=WEIGHTS, default="fp32")
    p.add_argument("--max-seq-len", type=int, default=4160)
    p.add_argument("--depth", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="default /tmp/stock/stock-<weights>.pte")
    p.add_argument("--reuse", action="store_true", help="time an existing --out instead of exporting")
    args = p.parse_args()
    out = args.out or Path(f"/tmp/stock/stock-{args.weights}.pte")
    result: dict = {"path": str(out), "weights": args.weights}
    if not (args.reuse and out.is_file()):
        from adaptive_kv.model import load_model

        hf, _ = load_model(None)
        result = export_stock_pte(hf, args.max_seq_len, args.weights, out)
        del hf
    result["mb"] = round(out.stat().st_size / 1e6, 2)
    result.update(time_decode(out, args.depth, args.steps, args.warmup))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
