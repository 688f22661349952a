import pytest
import torch

from adaptive_kv.attention import attend_blocks, attend_reference, causal_chunk_mask
from adaptive_kv.cache import CacheConfig, CacheError, CacheLayout, ContextOverflowError, PackedKVCache
from adaptive_kv.formats import RowFormat, fake_quantize
from adaptive_kv.hadamard import rotate

SMOL = dict(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M: 11,520 values per token


def make(layout, hadamard=False, layers=2, heads=2):
    return PackedKVCache(CacheConfig(num_layers=layers, num_kv_heads=heads, head_dim=64, layout=layout, hadamard=hadamard))


def kv(t, layers=2, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, heads, t, 64, generator=g), torch.randn(layers, heads, t, 64, generator=g)


@pytest.mark.parametrize(
    "fractions",
    [{16: 1.0}, {8: 1.0}, {4: 1.0}, {2: 1.0}, {2: 0.45, 4: 0.4, 8: 0.1, 16: 0.05}, {2: 0.5, 4: 0.5}, {4: 0.7, 16: 0.3}],
)
def test_allocated_bytes_match_the_formula_for_smollm2(fractions):
    """Allocated bytes within 10% of L x 11,520 x (b + scale overhead) / 8 (here: exact)."""
    L = 2048
    cache = PackedKVCache(CacheConfig(**SMOL, layout=CacheLayout.from_fractions(L, fractions)))
    assert cache.config.values_per_token == 11520
    avg_bits = sum(f * RowFormat(b, 64).bits_per_value for b, f in fractions.items())
    expected = L * 11520 * avg_bits / 8
    assert abs(cache.nbytes() - expected) <= 0.10 * expected
    assert abs(cache.nbytes() - expected) <= 11520 * 2  # rounding of capacities only
    if fractions == {4: 1.0}:
        assert cache.nbytes() == L * 11520 * 4.5 / 8  # 53 MB at 8K in the paper notes' arithmetic


@pytest.mark.parametrize("hadamard", [False, True])
def test_mixed_cache_round_trip_matches_fake_quantization(hadamard):
    cache = make(CacheLayout.from_fractions(64, {2: 1, 4: 1, 8: 1, 16: 1}), hadamard=hadamard)
    k, v = kv(12)
    bits = torch.tensor([2, 4, 8, 16] * 3)
    assert cache.commit(k, v, bits).tolist() == bits.tolist()
    for layer in range(2):
        dk, dv, pos = cache.dequantized(layer)
        assert pos.tolist() == list(range(12))
        for t, b in enumerate(bits.tolist()):
            ref = k[layer, :, t]
            ref = rotate(fake_quantize(rotate(ref), b)) if hadamard else fake_quantize(ref, b)
            assert torch.allclose(dk[:, t], ref, atol=1e-5)
    assert cache.stored_bits().tolist() == bits.tolist()
    assert cache.bits_per_value() == pytest.approx((2.5 + 4.5 + 8.5 + 16) / 4)


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_attention_over_packed_pools_equals_naive_attention_over_dequantized_cache(block):
    cache = make(CacheLayout.from_fractions(128, {2: 1, 4: 1, 8: 1, 16: 1}), hadamard=False)
    k, v = kv(40)
    cache.commit(k, v, torch.tensor([2, 4, 8, 16, 4] * 8))
    torch.manual_seed(1)
    g, t = 2, 3
    q = torch.randn(1, 2, g * t, 64)
    kc, vc = torch.randn(1, 2, t, 64), torch.randn(1, 2, t, 64)
    out = attend_blocks(q, cache.blocks(1, block_size=block), kc, vc, 0.125).output()
    dk, dv, _ = cache.dequantized(1)
    k_all, v_all = torch.cat([dk[None], kc], 2), torch.cat([dv[None], vc], 2)
    mask = torch.cat([torch.ones(g * t, 40, dtype=torch.bool), causal_chunk_mask(g * t, t, q.device)], 1)
    assert torch.allclose(out, attend_reference(q, k_all, v_all, mask, 0.125), atol=1e-5)


def test_full_pool_falls_back_to_nearest_precision_with_room():
    cache = make(CacheLayout(10, ((2, 3), (4, 2), (8, 3), (16, 2))))
    k, v = kv(10)
    used = cache.commit(k, v, [4, 4, 4, 4, 16, 16, 16, 2, 2, 2])
    # 4-bit pool holds 2: the 3rd goes to 2 bits (distance 2, fewer bits win the tie with 8? no: |2-4|=2 < |8-4|=4)
    # the 4th to 2 bits as well; 16-bit pool holds 2: the 3rd 16 goes to 8; the 2-bit pool then has one slot left.
    assert used.tolist() == [4, 4, 2, 2, 16, 16, 8, 2, 8, 8]
    assert cache.lengths == {2: 3, 4: 2, 8: 3, 16: 2}
    assert cache.stored_bits().tolist() == used.tolist()


def test_fallback_ties_prefer_fewer_bits():
    cache = make(CacheLayout(4, ((2, 2), (4, 0), (8, 0), (16, 2))))
    used = cache.commit(*kv(3), [16, 16, 16])
    assert used.tolist() == [16, 16, 2]
    cache = make(CacheLayout(4, ((2, 2), (8, 2))))
    assert cache.commit(*kv(3), [4, 4, 4]).tolist() == [2, 2, 8]  # |2-4| = 2 < |8-4| = 4


def test_context_overflow_is_a_clear_error():
    cache = make(CacheLayout.uniform(8, 4))
    cache.commit(*kv(6), [4] * 6)
    with pytest.raises(ContextOverflowError, match="exceeds the cache's max_seq_len=8"):
        cache.commit(*kv(3), [4] * 3)
    assert cache.seq_len == 6  # nothing half-written


def test_layouts_that_cannot_hold_max_seq_len_are_rejected():
    with pytest.raises(CacheError, match="hold fewer than max_seq_len"):
        CacheLayout(10, ((4, 5), (16, 4)))
    with pytest.raises(CacheError, match="at most once"):
        CacheLayout(10, ((4, 5), (4, 5)))
    with pytest.raises(ValueError, match="not in"):
        make(CacheLayout.uniform(8, 4)).commit(*kv(1), [3])


@pytest.mark.parametrize("chunks", [[30], [1] * 30, [7, 1, 13, 9]])
def test_sink_recent_demotes_the_oldest_non_sink_tokens(chunks):
    """Sinks + most recent window stay fp16, older tokens are 4-bit, however the commits are chunked."""
    sinks, window, n = 2, 5, sum(chunks)
    cache = make(CacheLayout.sink_recent(64, sinks, window, 4))
    k, v = kv(n)
    s = 0
    for c in chunks:
        cache.commit(k[:, :, s : s + c], v[:, :, s : s + c], [16] * c)
        s += c
    expect_hot = set(range(sinks)) | set(range(n - window, n))
    bits = cache.stored_bits().tolist()
    assert {p for p, b in enumerate(bits) if b == 16} == expect_hot
    assert all(b == 4 for p, b in enumerate(bits) if p not in expect_hot)
    dk, dv, pos = cache.dequantized(0)
    assert pos.tolist() == list(range(n))
    for p in range(n):
        ref = fake_quantize(k[0, :, p], 16)
        if p not in expect_hot:  # demoted rows are re-quantized from their fp16 copy (or packed directly)
            ref = fake_quantize(ref, 4)
        assert torch.allclose(dk[:, p], ref, atol=1e-6), p


def test_save_load_round_trip_is_exact(tmp_path):
    cache = make(CacheLayout.sink_recent(32, 2, 4, 4), hadamard=True)
    cache.commit(*kv(11), [16] * 11)
    cache.save(tmp_path / "c.safetensors")
    again = PackedKVCache.load(tmp_path / "c.safetensors")
    assert again.config == cache.config
    assert (again.seq_len, again.lengths, again.slot_pos, again.ring_next) == (cache.seq_len, cache.lengths, cache.slot_pos, cache.ring_next)
    for (n, a), (_, b) in zip(cache.named_buffers(), again.named_buffers()):
        assert torch.equal(a, b), n
    more = kv(3, seed=5)
    assert torch.equal(cache.commit(*more, [16] * 3), again.commit(*more, [16] * 3))
    assert torch.equal(cache.dequantized(1)[0], again.dequantized(1)[0])


def test_loading_a_foreign_file_says_so(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CacheError, match="not a kvexport cache"):
        PackedKVCache.load(tmp_path / "x.safetensors")


def test_stored_bytes_do_not_depend_on_chunking():
    k, v = kv(40)
    caches = []
    for chunks in ([40], [1] * 40, [3, 17, 20]):
        c = make(CacheLayout.sink_recent(64, 2, 6, 2), hadamard=True)
        s = 0
        for n in chunks:
            c.commit(k[:, :, s : s + n], v[:, :, s : s + n], [16] * n)
            s += n
        caches.append(c)
    for c in caches[1:]:
        for (n, a), (_, b) in zip(caches[0].named_buffers(), c.named_buffers()):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0, 4.58, 6.0, 16.0])
def test_layout_from_a_memory_budget_spends_that_budget(budget):
    cost = {b: RowFormat(b, 64).bits_per_value for b in (2, 4, 8, 16)}
    L = 4096
    lay = CacheLayout.from_budget(L, budget, {2: 0.45, 4: 0.4, 8: 0.1, 16: 0.05}, cost)
    cache = PackedKVCache(CacheConfig(**SMOL, layout=lay))
    promised = L * 11520 * budget / 8
    assert abs(cache.nbytes() - promised) <= 0.01 * promised
    assert sum(c for _, c in lay.capacities) == L


def test_budget_outside_what_the_widths_can_store():
    cost = {b: RowFormat(b, 64).bits_per_value for b in (2, 4, 8, 16)}
    with pytest.raises(CacheError, match="outside"):
        CacheLayout.from_budget(100, 2.0, {4: 1.0}, cost)
