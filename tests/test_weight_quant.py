"""export/weight_quant.py: searched int4 scales, input importance, self-sampled calibration, and
the 8da4w model they build (int4 body, int8 output projection)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_kv.model import tiny_llama
from export.weight_quant import (
    INT4_RANGE,
    WeightQuantConfig,
    group_error,
    input_importance,
    quantize_8da4w,
    sample_calibration,
    search_scales,
)

GROUP = 32


def reference_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """torchao's symmetric absmax scales [out, in / group]: the baseline the search must beat."""
    wg = w.detach().float().reshape(w.shape[0], -1, group_size)
    return (wg.abs().amax(-1) / ((INT4_RANGE[1] - INT4_RANGE[0]) / 2)).clamp_min(torch.finfo(torch.float32).eps)


def _bf16(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.bfloat16).float()


def _heavy_tailed(seed: int, out: int = 24, groups: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((out, groups * GROUP)) * 0.02 + 0.001 * torch.randn(out, groups * GROUP, generator=g)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), weighted=st.booleans())
def test_searched_scales_never_lose_to_absmax_and_are_bf16(seed, weighted):
    """The search includes torchao's absmax / 7.5 (rounded to bf16, as XNNPACK stores it), so no
    group's (weighted) error can exceed it; overall it must be strictly lower on heavy tails."""
    torch.manual_seed(seed)
    w = _heavy_tailed(seed)
    imp = torch.rand(w.shape[1]) ** 4 if weighted else None
    s = search_scales(w, GROUP, imp)
    assert s.shape == (w.shape[0], w.shape[1] // GROUP) and torch.equal(_bf16(s), s) and (s > 0).all()
    ref = _bf16(reference_scales(w, GROUP))
    mine, base = group_error(w, s, GROUP, imp), group_error(w, ref, GROUP, imp)
    assert (mine <= base).all() and mine.sum() < base.sum()


def test_importance_weighting_trades_error_toward_the_channels_that_matter():
    """Searching with importance lowers the importance-weighted error against the plain search,
    and pays for it with (some) unweighted error."""
    w = _heavy_tailed(7, out=64)
    imp = torch.ones(w.shape[1])
    imp[::5] = 50.0  # a few loud input channels, as after an RMSNorm with outlier gains
    plain, weighted = search_scales(w, GROUP), search_scales(w, GROUP, imp)
    assert group_error(w, weighted, GROUP, imp).sum() < group_error(w, plain, GROUP, imp).sum()
    assert group_error(w, plain, GROUP).sum() <= group_error(w, weighted, GROUP).sum()


def test_group_error_is_the_int4_rounding_error():
    w = torch.tensor([[0.0, 0.9, -1.6, 0.35] * (GROUP // 4)])
    s = torch.tensor([[0.2]])
    codes = (w / 0.2).round().clamp(*INT4_RANGE)  # -1.6 / 0.2 = -8 fits; 0.9 -> 4 (not 4.5)
    assert torch.allclose(group_error(w, s, GROUP), ((w - 0.2 * codes) ** 2).sum(-1, keepdim=True))
    assert torch.allclose(group_error(w, s, GROUP, torch.full((GROUP,), 3.0)), 3 * group_error(w, s, GROUP))


def test_input_importance_is_the_mean_square_of_each_linear_input():
    model = tiny_llama(seed=0)
    tokens = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(0))
    imp = input_importance(model, tokens)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens))  # [3, 10, hidden]
    want = (x.float() ** 2).reshape(-1, x.shape[-1]).mean(0)
    assert torch.allclose(imp["model.layers.0.self_attn.q_proj"], want, rtol=1e-5, atol=1e-7)
    assert set(imp) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert not model.model.layers[0].self_attn.q_proj._forward_hooks  # hooks removed


def test_calibration_is_sampled_from_the_model_and_seeded():
    model = tiny_llama(seed=0)
    a = sample_calibration(model, 4, 12, seed=3)
    assert a.shape == (4, 13) and a.dtype == torch.long and (a[:, 0] == model.config.bos_token_id).all()
    assert torch.equal(a, sample_calibration(model, 4, 12, seed=3))
    assert not torch.equal(a, sample_calibration(model, 4, 12, seed=4))
    assert len({tuple(r.tolist()) for r in a}) == 4  # sampled, not greedy: the rows differ


def test_quantize_8da4w_int4_body_int8_head_and_the_original_untouched():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    model = tiny_llama(seed=0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    q = quantize_8da4w(model, WeightQuantConfig(calibration_sequences=4, calibration_length=16))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    linears = {n: m.weight for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    head = linears.pop("lm_head")
    assert isinstance(head, IntxUnpackedToInt8Tensor) and head.target_dtype == torch.int8 and head.block_size == (1, 256)
    for name, w in linears.items():
        assert isinstance(w, IntxUnpackedToInt8Tensor) and w.target_dtype == torch.int4 and w.block_size == (1, GROUP), name
        assert torch.equal(_bf16(w.scale), w.scale.float()) and int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7
    assert isinstance(q.model.embed_tokens.weight, torch.nn.Parameter) and q.model.embed_tokens.weight.dtype == torch.float32
    # closer to the float model than torchao's default 8da4w (absmax scales, int4 head)
    default = copy.deepcopy(model)
    quantize_(default, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP)))
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f, g, d = model(ids).logits, q(ids).logits, default(ids).logits
    assert 0 < (f - g).norm() < (f - d).norm()


def test_searched_weights_beat_torchao_default_on_the_error_the_model_sees():
    """Per linear of the tiny model: importance-weighted weight error of this module's int4 weights
    is at most that of torchao's absmax scales (bf16-rounded, as the .pte would hold them)."""
    model = tiny_llama(seed=0)
    cfg = WeightQuantConfig(calibration_sequences=4, calibration_length=16)
    imp = input_importance(model, sample_calibration(model, 4, 16, cfg.seed))
    q = quantize_8da4w(model, cfg)
    for name, m in q.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            w = model.get_submodule(name).weight
            mine = group_error(w, m.weight.scale.float(), GROUP, imp[name]).sum()
            base = group_error(w, _bf16(reference_scales(w, GROUP)), GROUP, imp[name]).sum()
            assert mine <= base, name


@pytest.mark.parametrize("bad", [dict(group_size=0), dict(candidates=0), dict(head_bits=6), dict(calibration_length=0)])
def test_bad_weight_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        WeightQuantConfig(**bad)


def test_calibration_records_the_sampling_forwards_as_one_forward_over_the_samples():
    """calibrate() reads the importance off the sampling steps (KV-cached, one token each); it
    must equal a single forward over the sampled tokens it fed (all but the last)."""
    from export.weight_quant import calibrate

    model = tiny_llama(seed=0)
    cfg = WeightQuantConfig(calibration_sequences=3, calibration_length=10, seed=5)
    got = calibrate(model, cfg)
    tokens = sample_calibration(model, 3, 10, seed=5)[:, :-1]
    want = input_importance(model, tokens)
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-6), name
