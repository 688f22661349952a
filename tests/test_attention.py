import pytest
import torch

from adaptive_kv.attention import attend_blocks, attend_reference, causal_chunk_mask


@pytest.mark.parametrize("cache_lens", [[], [5], [7, 0, 33], [64, 64, 1]])
@pytest.mark.parametrize("b,g,t", [(1, 3, 1), (2, 2, 5)])
def test_blockwise_lse_merge_equals_naive_attention(cache_lens, b, g, t):
    torch.manual_seed(0)
    hkv, d, scale = 2, 16, 0.25
    q = torch.randn(b, hkv, g * t, d) * 2
    blocks = [(torch.randn(hkv, n, d) * 2, torch.randn(hkv, n, d)) for n in cache_lens]
    kc, vc = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    state = attend_blocks(q, iter(blocks), kc, vc, scale, with_stats=True)
    n = sum(cache_lens)
    k_all = torch.cat([torch.cat([k for k, _ in blocks] + [torch.zeros(hkv, 0, d)], 1).expand(b, -1, -1, -1), kc], 2)
    v_all = torch.cat([torch.cat([v for _, v in blocks] + [torch.zeros(hkv, 0, d)], 1).expand(b, -1, -1, -1), vc], 2)
    mask = torch.cat([torch.ones(g * t, n, dtype=torch.bool), causal_chunk_mask(g * t, t, q.device)], 1)
    ref = attend_reference(q, k_all, v_all, mask, scale)
    assert torch.allclose(state.output(), ref, atol=1e-5)
    p = torch.softmax((q @ k_all.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), -1)
    assert torch.allclose(state.sum_p_squared(), (p * p).sum(-1), atol=1e-6)


def test_causal_mask_rows_are_grouped_by_head():
    m = causal_chunk_mask(6, 3, torch.device("cpu"))  # G=2, T=3
    assert m[0].tolist() == [True, False, False] and m[3].tolist() == [True, False, False]
    assert m[5].tolist() == [True, True, True]
