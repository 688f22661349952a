"""8da4w weights: int4 grouped linears whose scales minimize the error the model sees.

torchao's default 8da4w scale is a group's absmax / 7.5, symmetric. On SmolLM2-135M from the
shipped Q4_1 GGUF (already 4-bit, asymmetric: re-quantizing it to a symmetric grid compounds
the rounding) that raised WikiText-2 perplexity from 22.75 to 37.03; this module's weights
score 27.28 (16 windows of 1024 tokens, ``bench/bench_weights.py``). It stays inside torchao's
own 8da4w tensor (``IntxUnpackedToInt8Tensor``: same graph, same XNNPACK QB4W kernel, same bytes):

- scales searched per group: candidates absmax / d over a grid of d, each rounded to bfloat16
  (XNNPACK stores blockwise scales as bf16, so the eager model and the ``.pte`` share them),
  keeping the one with the least squared rounding error weighted by how large each input
  channel runs (llama.cpp's importance matrix: mean x^2 of the linear's input);
- that importance from text the model samples itself (seeded; no dataset needed at export);
- the output projection at int8 per output channel (llama.cpp keeps the tied embedding/output
  of this GGUF at Q8_0), run by XNNPACK's QC8W kernel: twice the bytes of int4, ~0.7 ms more
  per decode step on the 2-core AVX2 host (README).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

INT4_RANGE = (-8, 7)


@dataclass(frozen=True)
class WeightQuantConfig:
    group_size: int = 32
    weighted: bool = True  # weight the rounding error by input importance (False: plain MSE, no calibration)
    calibration_sequences: int = 16  # sampled in one batch
    calibration_length: int = 32  # tokens sampled per sequence
    seed: int = 0
    candidates: int = 25  # scale candidates absmax / d, d evenly over [6, 9] (7.5: torchao's default)
    head_bits: int = 8  # output projection: 8 (per channel) or 4 (grouped, like the body)

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.calibration_sequences < 1 or self.calibration_length < 1:
            raise ValueError("calibration needs at least one sequence of at least one token")
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if self.head_bits not in (4, 8):
            raise ValueError(f"head_bits={self.head_bits}: the output projection is int4 (4) or int8 (8)")

    def record(self) -> dict:
        """What the manifest says about how the weights were chosen."""
        return {
            "scales": f"{'importance-weighted ' if self.weighted else ''}MSE search over {self.candidates} candidates, bf16",
            "calibration": f"{self.calibration_sequences}x{self.calibration_length} tokens sampled from the model (seed {self.seed})" if self.weighted else None,
            "lm_head": "int8 per channel" if self.head_bits == 8 else f"int4 groups of {self.group_size}",
        }


@torch.inference_mode()
def sample_calibration(model: torch.nn.Module, sequences: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids [sequences, length + 1] the model samples (temperature 1) from its BOS token."""
    g = torch.Generator().manual_seed(seed)
    start = getattr(model.config, "bos_token_id", None)
    x = torch.full((sequences, 1), 0 if start is None else int(start), dtype=torch.long)  # [S, 1]
    out, past = [x], None
    for _ in range(length):
        step = model(x, past_key_values=past, use_cache=True)
        past = step.past_key_values
        x = torch.multinomial(torch.softmax(step.logits[:, -1].float(), -1), 1, generator=g)  # [S, 1]
        out.append(x)
    return torch.cat(out, 1)


@contextlib.contextmanager
def recording_inputs(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, record every nn.Linear's inputs; at exit the yielded dict holds each
    one's mean squared input [in_features] over every row it saw."""
    sums: dict[str, list] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # [rows, in]
            acc = sums.setdefault(name, [0.0, 0])
            acc[0] = acc[0] + (x * x).sum(0)
            acc[1] += x.shape[0]
        return fn

    result: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    result.update({name: s / n for name, (s, n) in sums.items()})


@torch.inference_mode()
def input_importance(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean squared input [in_features] of every nn.Linear of ``model`` over ``tokens`` [S, L]."""
    with recording_inputs(model) as importance:
        model(tokens)
    return importance


def calibrate(model: torch.nn.Module, config: WeightQuantConfig) -> dict[str, torch.Tensor]:
    """Input importance of every linear over ``config``'s self-sampled calibration text, computed
    on one thread: every process that builds these weights (the .pte export, the ONNX export
    beside it, a validation rebuild) gets the same numbers whatever threads it runs with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with recording_inputs(model) as importance:  # the sampling forwards are the calibration
            sample_calibration(model, config.calibration_sequences, config.calibration_length, config.seed)
        return importance
    finally:
        torch.set_num_threads(threads)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1, group_size)  # [out, groups, group]


def _error(wg: torch.Tensor, scales: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    s = scales.float().unsqueeze(-1)
    err = (wg - s * (wg / s).round().clamp(*INT4_RANGE)) ** 2
    if importance is not None:
        err = err * importance.float().reshape(1, -1, wg.shape[-1])
    return err.sum(-1)


def group_error(w: torch.Tensor, scales: torch.Tensor, group_size: int, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Importance-weighted squared int4 rounding error of every group [out, in / group]."""
    return _error(_grouped(w, group_size), scales, importance)


def search_scales(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None, candidates: int = 25) -> torch.Tensor:
    """bf16-representable scales [out, in / group] with the least group_error among absmax / d,
    d in [6, 9] (small d: a coarse grid that holds the extremes; large d: a finer grid that clips them)."""
    wg = _grouped(w, group_size)
    amax = wg.abs().amax(-1).clamp_min(torch.finfo(torch.float32).eps)  # [out, groups]
    best_s = best_e = None
    for d in torch.linspace(6.0, 9.0, candidates).tolist():
        s = (amax / d).to(torch.bfloat16).float().clamp_min(torch.finfo(torch.bfloat16).tiny)
        e = _error(wg, s, importance)
        if best_s is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    return best_s


def _int4_weight(w: torch.Tensor, scales: torch.Tensor, group_size: int):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    s = scales.to(w.dtype)
    return IntxUnpackedToInt8Tensor.from_hp(
        w.detach(), (1, group_size), torch.int4, activation_quantization="int8_asym_per_token",
        intx_choose_qparams_algorithm=None, custom_scale=s, custom_zero_point=torch.zeros_like(s, dtype=torch.int8),
    )


def quantize_8da4w(model: torch.nn.Module, config: WeightQuantConfig = WeightQuantConfig()) -> torch.nn.Module:
    """A copy of ``model`` whose linears hold int4 grouped weights (int8 per channel for the
    output projection) with int8 dynamic activations (torchao; ExecuTorch's 8da4w). Linears whose
    in_features the group does not divide stay float."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    gs = config.group_size
    importance = calibrate(model, config) if config.weighted else {}
    model = copy.deepcopy(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (config.head_bits == 8 and module is head) or module.in_features % gs:
            continue
        scales = search_scales(module.weight, gs, importance.get(name), config.candidates)
        module.weight = torch.nn.Parameter(_int4_weight(module.weight, scales, gs), requires_grad=False)
    if config.head_bits == 8 and isinstance(head, torch.nn.Linear):
        quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)), filter_fn=lambda m, fqn: m is head)
    return model
