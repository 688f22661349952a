"""The kvq C++ kernels (runtime_ops/) against the readable reference, at every level: eager op,
exported graph, .pte in the ExecuTorch runtime, and the header's own sanitized C++ test.

Grid choice (which case reaches which kernel path):
- pool mixes: each width alone (packed 2/4/8-bit sources, the fp16 source), all four together,
  each pool absent / empty / partial / full -> every row source and the "pool has tensors but
  no tokens" case;
- GQA group 1 and 3, chunk T = 1 (decode), 5 and 33 -> row tiles of 1..4 rows, the causal chunk
  and, at T = 33, the unsplit (many tiles) schedule; T = 1 and 5 use the cache-split schedule;
- fills 7 (below one 8-token reduction), 45 (ragged 32-token block), 600 (> 512: several splits).
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adaptive_kv import ops
from adaptive_kv.attention import attend_blocks
from adaptive_kv.cache import CacheConfig, CacheLayout, PackedKVCache
from adaptive_kv.formats import RowFormat, quantize_rows
from test_formats import ORDER_SENSITIVE_GROUP  # tests/ is on sys.path under pytest

D = 64
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """The compiled ATen kernels replace the reference for CPU calls from here on."""
    return ops.load_library()


# "avx2": the AVX2 loops of an AVX-512 build (elsewhere "best" already is, or there are none).
ISAS = ["scalar", "avx2", "best"]


def isa_ctx(name: str):
    if name == "avx2" and ops.best_kernel_isa() != "avx512":
        pytest.skip("the AVX2 loops are the best path of this build, or not compiled in")
    return ops.kernel_isa(ops.best_kernel_isa() if name == "best" else name)


# ---- pack_rows: bit-exact with formats.quantize_rows ------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [64, 32, 16])
def test_pack_rows_bit_exact(bits, group_size):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    x = torch.randn(4, 3, 37, D, generator=g) * torch.logspace(-6, 3, 37)[:, None]  # scales from tiny to large
    x[0, 0, 0] = 0.7  # constant row: span 0
    x[0, 0, 1, :5] = 40.0  # outliers: the clip search cuts them
    x[0, 0, 2] = torch.randn(D, generator=g) * 1e-9  # fp16 scale underflow guard
    fmt = RowFormat(bits, D, group_size)
    for got, want in zip(ops.pack_rows(x, bits, group_size), quantize_rows(x, fmt)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays("float32", (6, D), elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
    bits=st.sampled_from([2, 4, 8]),
)
def test_pack_rows_bit_exact_hypothesis(x, bits):
    t = torch.from_numpy(x)
    for got, want in zip(ops.pack_rows(t, bits), quantize_rows(t, RowFormat(bits, D))):
        assert torch.equal(got, want)


def test_pack_rows_bit_exact_on_an_order_sensitive_group():
    """A group whose clip choice flips with the order the candidates' errors are summed in: the
    kernel must add like formats.fold_sum. (It used to mimic torch.sum's lane order and assumed
    16 lanes on AVX-512 hosts, where torch 2.13 sums in 8: eager and the .pte packed the same K/V
    differently.)"""
    x = torch.stack([ORDER_SENSITIVE_GROUP, ORDER_SENSITIVE_GROUP.flip(0), -ORDER_SENSITIVE_GROUP])  # [3, D]
    for got, want in zip(ops.pack_rows(x, 4), quantize_rows(x, RowFormat(4, D))):
        assert torch.equal(got, want)


def test_pack_rows_out_variant_writes_into_given_tensors():
    x = torch.randn(3, 5, D)
    codes, scale, zero = torch.empty(3, 5, 32, dtype=torch.uint8), torch.empty(3, 5, 1, dtype=torch.half), torch.empty(3, 5, 1, dtype=torch.half)
    res = torch.ops.kvq.pack_rows.out(x, 4, 64, codes=codes, scale=scale, zero=zero)
    assert res[0] is codes
    for got, want in zip((codes, scale, zero), quantize_rows(x, RowFormat(4, D))):
        assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_pack_rows_active_flag_packs_or_zero_fills(impl):
    """active true packs exactly as without the flag; false zero-fills (also the .out variant's
    given outputs) without packing."""
    pack = ops.pack_rows if impl == "kernel" else ops.reference_pack_rows
    x = torch.randn(2, 3, 5, D)
    for bits in (2, 4, 8):
        plain = pack(x, bits, 32)
        for got, want in zip(pack(x, bits, 32, torch.tensor(True)), plain):
            assert torch.equal(got, want)
        for got, want in zip(pack(x, bits, 32, torch.tensor([False])), plain):
            assert got.dtype == want.dtype and got.shape == want.shape and not got.any()
    outs = [torch.full((2, 3, 5, 32), 7, dtype=torch.uint8), torch.ones(2, 3, 5, 2, dtype=torch.half), torch.ones(2, 3, 5, 2, dtype=torch.half)]
    torch.ops.kvq.pack_rows.out(x, 4, 32, torch.tensor(False), codes=outs[0], scale=outs[1], zero=outs[2])
    assert not any(t.any() for t in outs)


# ---- packed_attention vs the reference --------------------------------------------------------
def filled_cache(fills: dict[int, tuple[int, int]], seed: int) -> PackedKVCache:
    """A one-layer cache whose pool b holds fills[b] = (length, capacity) tokens (rotated K/V)."""
    caps = tuple(sorted((b, cap) for b, (_, cap) in fills.items()))
    total = sum(n for n, _ in fills.values())
    cache = PackedKVCache(CacheConfig(1, 3, D, CacheLayout(max(total, sum(c for _, c in caps), 1), caps)))
    want = [b for b, (n, _) in sorted(fills.items()) for _ in range(n)]
    if want:
        g = torch.Generator().manual_seed(seed)
        k, v = torch.randn(1, 3, len(want), D, generator=g), torch.randn(1, 3, len(want), D, generator=g)
        used = cache.commit(k, v, want)
        assert used.tolist() == want  # each width landed in its own pool
    return cache


# (length, capacity) per width; 0 capacity = pool absent
MIXES = {
    "2-bit partial": {2: (45, 60)},
    "4-bit full": {4: (45, 45)},
    "8-bit partial": {8: (7, 20)},
    "16-bit full": {16: (45, 45)},
    "4-bit empty": {4: (0, 30)},
    "no pools": {},
    "all four": {2: (45, 50), 4: (40, 40), 8: (9, 16), 16: (17, 30)},
    "all four, long": {2: (600, 600), 4: (610, 700), 8: (30, 40), 16: (5, 5)},
    "2+16, 8 empty": {2: (33, 33), 8: (0, 8), 16: (20, 24)},
}


# The long mix runs at T <= 5 only (keeps the file fast); every other mix at every (GQA, T).
GRID = [(m, g, t) for m in MIXES for g, t in [(1, 1), (3, 1), (3, 5), (1, 33), (3, 33)] if not (m == "all four, long" and t == 33)]


@pytest.mark.parametrize("mix,gqa,t", GRID)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("query_bits", [32, 8])
def test_packed_attention_matches_reference(mix, gqa, t, isa, query_bits):
    if MIXES[mix]:
        pools, lengths = ops.cache_pools(filled_cache(MIXES[mix], seed=len(mix) + t), 0)
    else:  # only the chunk itself
        pools, lengths = {}, torch.zeros(4, dtype=torch.long)
    g = torch.Generator().manual_seed(gqa * 7 + t)
    q = torch.randn(1, 3 * gqa, t, D, generator=g) * 2  # sharper softmax than unit scale
    kc, vc = torch.randn(1, 3, t, D, generator=g), torch.randn(1, 3, t, D, generator=g)
    with isa_ctx(isa):
        out, sp = ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5, query_bits=query_bits)
    ref_out, ref_sp = ops.reference_packed_attention(q, kc, vc, lengths, *(pools.get(n) for n in ops.POOL_ARGS), D**-0.5, 64, -1, query_bits)
    assert out.shape == (1, 3 * gqa, t, D) and sp.shape == (1, 3 * gqa, t)
    assert (out - ref_out).abs().max().item() <= TOL
    assert (sp - ref_sp).abs().max().item() <= TOL


def test_packed_attention_matches_decoder_attention():
    """Same numbers as attention.attend_blocks, the decoder's blockwise path (GQA row layout)."""
    cache = filled_cache(MIXES["all four"], seed=3)
    pools, lengths = ops.cache_pools(cache, 0)
    q, kc, vc = torch.randn(2, 9, 4, D), torch.randn(2, 3, 4, D), torch.randn(2, 3, 4, D)
    out, sp = ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5)
    state = attend_blocks(q.reshape(2, 3, 12, D), cache.blocks(0, block_size=16), kc, vc, D**-0.5, with_stats=True)
    assert (out - state.output().view(2, 9, 4, D)).abs().max().item() <= TOL
    assert (sp - state.sum_p_squared().view(2, 9, 4)).abs().max().item() <= TOL


@pytest.mark.parametrize("isa", ISAS)
def test_layer_index_reads_whole_model_pools_in_place(isa):
    """layer=i over [layers, ...] pools == the call on layer i's slice, for the kernel and the reference."""
    g = torch.Generator().manual_seed(11)
    cache = PackedKVCache(CacheConfig(3, 3, D, CacheLayout(60, ((2, 20), (4, 20), (8, 10), (16, 10)))))
    cache.commit(torch.randn(3, 3, 40, D, generator=g), torch.randn(3, 3, 40, D, generator=g), [2, 4, 8, 16] * 10)
    whole = dict(cache.named_buffers())
    pools = {n: whole[n] for n in ops.POOL_ARGS if n in whole}
    q, kc, vc = torch.randn(1, 9, 3, D, generator=g), torch.randn(1, 3, 3, D, generator=g), torch.randn(1, 3, 3, D, generator=g)
    with isa_ctx(isa):
        for layer in range(3):
            sliced, lengths = ops.cache_pools(cache, layer)
            want = ops.packed_attention(q, kc, vc, sliced, lengths, D**-0.5)
            got = ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5, layer=layer)
            ref = ops.reference_packed_attention(q, kc, vc, lengths, *(pools.get(n) for n in ops.POOL_ARGS), D**-0.5, 64, layer)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert all((a - r).abs().max().item() <= TOL for a, r in zip(got, ref))
        with pytest.raises(RuntimeError, match="layer=3 outside"):
            ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5, layer=3)


@pytest.mark.parametrize("query_bits", [32, 8])
def test_avx512_loops_bit_identical_to_avx2(query_bits):
    """The 16-lane value loops and VNNI key dots accumulate like the 8-lane ones: equal bits."""
    if ops.best_kernel_isa() != "avx512":
        pytest.skip("no AVX-512 path in this build")
    pools, lengths = ops.cache_pools(filled_cache(MIXES["all four, long"], seed=5), 0)
    g = torch.Generator().manual_seed(query_bits)
    for gqa, t in [(3, 1), (1, 1), (2, 1), (4, 1), (3, 5)]:
        q = torch.randn(1, 3 * gqa, t, D, generator=g) * 2
        kc, vc = torch.randn(1, 3, t, D, generator=g), torch.randn(1, 3, t, D, generator=g)
        outs = []
        for isa in ("avx2", "avx512"):
            with ops.kernel_isa(isa):
                outs.append(ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5, query_bits=query_bits))
        assert all(torch.equal(a, b) for a, b in zip(*outs)), (gqa, t)


def test_packed_attention_threads_do_not_change_the_result():
    cache = filled_cache(MIXES["all four, long"], seed=5)
    pools, lengths = ops.cache_pools(cache, 0)
    q, kc, vc = torch.randn(1, 9, 1, D), torch.randn(1, 3, 1, D), torch.randn(1, 3, 1, D)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5)
        torch.set_num_threads(2)
        two = ops.packed_attention(q, kc, vc, pools, lengths, D**-0.5)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # the work split ignores the thread count


# ---- logit_stats: entropy and max probability of softmax(logits) -------------------------------
def logit_rows(shape, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g) * 3
    z[..., 0] += 25.0  # one confident row entry: p_max near 1, entropy near 0
    if shape[-1] > 3:
        z[..., 1:3] = -1e4  # exponents far below fp32's range (no 0 * -inf in the sums)
    return z


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1, 49152), (5, 1000), (2, 3, 17), (3, 1), (4, 16)])
def test_logit_stats_matches_reference(isa, shape):
    for z in (logit_rows(shape, 0), torch.randn(*shape) * 0.1, logit_rows(shape, 1) * 0.2):
        with isa_ctx(isa):
            h, c = torch.ops.kvq.logit_stats(z)
        rh, rc = ops.reference_logit_stats(z)
        assert h.shape == rh.shape == tuple(shape[:-1]) and c.shape == rc.shape
        assert (h - rh).abs().max().item() <= 2e-5 * max(1.0, rh.abs().max().item()), (h - rh).abs().max()
        assert (c - rc).abs().max().item() <= 1e-5


def test_logit_stats_rejects_bad_logits():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.kvq.logit_stats(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="vocabulary"):
        torch.ops.kvq.logit_stats(torch.zeros(2, 0))


# ---- fake kernels, export ---------------------------------------------------------------------
def test_fake_kernels_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        codes, scale, zero = torch.ops.kvq.pack_rows(torch.empty(2, 3, 7, 128), 2, 32)
        assert (codes.shape, codes.dtype, scale.shape, zero.dtype) == ((2, 3, 7, 32), torch.uint8, (2, 3, 7, 4), torch.float16)
        pools = {"k4": torch.empty(3, 10, 32, dtype=torch.uint8), "v4": torch.empty(3, 10, 32, dtype=torch.uint8)}
        pools |= {f"{kv}4_{s}": torch.empty(3, 10, 1, dtype=torch.half) for kv in "kv" for s in ("scale", "zero")}
        out, sp = ops.packed_attention(torch.empty(2, 9, 5, D), torch.empty(2, 3, 5, D), torch.empty(2, 3, 5, D), pools, torch.empty(4, dtype=torch.long), 0.1)
        assert out.shape == (2, 9, 5, D) and sp.shape == (2, 9, 5)
        with pytest.raises(ValueError, match="k4 must be"):
            ops.packed_attention(torch.empty(1, 9, 1, D), torch.empty(1, 3, 1, D), torch.empty(1, 3, 1, D), pools | {"k4": torch.empty(3, 10, 31, dtype=torch.uint8)}, torch.empty(4, dtype=torch.long), 0.1)


class TinyAttention(torch.nn.Module):
    """One layer's pools as buffers; packs the chunk's keys and attends over pools + chunk."""

    def __init__(self, cache: PackedKVCache):
        super().__init__()
        pools, lengths = ops.cache_pools(cache, 0)
        for name, t in pools.items():
            self.register_buffer(name, t.clone())
        self.register_buffer("lengths", lengths)
        self.names = list(pools)

    def forward(self, q, k, v):
        out, sp = ops.packed_attention(q, k, v, {n: getattr(self, n) for n in self.names}, self.lengths, D**-0.5)
        codes, scale, zero = ops.pack_rows(k, 4)
        entropy, confidence = torch.ops.kvq.logit_stats(out * 4.0)  # rows of 64 "logits"
        return out, sp, codes, scale, zero, entropy, confidence


def chunk(t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 9, t, D, generator=g), torch.randn(1, 3, t, D, generator=g), torch.randn(1, 3, t, D, generator=g)


@pytest.mark.parametrize("dynamic", [False, True])
def test_export_keeps_each_op_one_node(dynamic):
    m = TinyAttention(filled_cache(MIXES["all four"], seed=1))
    t_dim = torch.export.Dim("t", min=1, max=64)
    shapes = ({2: t_dim}, {2: t_dim}, {2: t_dim}) if dynamic else None
    ep = torch.export.export(m, chunk(5), dynamic_shapes=shapes)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.kvq.packed_attention.default) == 1
    assert targets.count(torch.ops.kvq.pack_rows.default) == 1
    assert targets.count(torch.ops.kvq.logit_stats.default) == 1
    for t in ([5, 1, 12] if dynamic else [5]):
        for got, want in zip(ep.module()(*chunk(t, t)), m(*chunk(t, t))):
            assert torch.equal(got, want)


# ---- ExecuTorch: the .pte runs the registered .out kernels -------------------------------------
@pytest.fixture(scope="module")
def pte(tmp_path_factory):
    from executorch.exir import to_edge_transform_and_lower

    m = TinyAttention(filled_cache(MIXES["all four"], seed=2))
    t_dim = torch.export.Dim("t", min=1, max=64)
    ep = torch.export.export(m, chunk(5), dynamic_shapes=({2: t_dim}, {2: t_dim}, {2: t_dim}))
    program = to_edge_transform_and_lower(ep).to_executorch()
    path = tmp_path_factory.mktemp("kvq") / "kvq.pte"
    path.write_bytes(program.buffer)
    ops.load_executorch_library()
    return m, path


def test_executorch_program_matches_eager(pte):
    from executorch.runtime import Runtime

    m, path = pte
    method = Runtime.get().load_program(str(path)).load_method("forward")
    for t in (5, 1, 17):  # dynamic chunk length, decode included
        outs = method.execute(list(chunk(t, 10 + t)))
        for got, want in zip(outs, m(*chunk(t, 10 + t))):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert (got.float() - want.float()).abs().max().item() <= TOL


def test_executorch_pack_rows_is_bit_exact_on_an_order_sensitive_group(pte):
    from executorch.runtime import Runtime

    m, path = pte
    method = Runtime.get().load_program(str(path)).load_method("forward")
    q, k, v = chunk(3, 7)
    k[0, 1, 2] = ORDER_SENSITIVE_GROUP
    got, eager = method.execute([q, k, v])[2:5], m(q, k, v)[2:5]  # codes, scale, zero of pack_rows(k, 4)
    for g, e, want in zip(got, eager, quantize_rows(k, RowFormat(4, D))):
        assert torch.equal(g, want) and torch.equal(e, want)


class FlaggedPack(torch.nn.Module):
    def forward(self, x, active):
        return ops.pack_rows(x, 2, 32, active)


def test_executorch_pack_rows_active_flag(tmp_path):
    """The runtime kernel honours the flag: packs when true, zero-fills when false."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ops.load_executorch_library()
    x = torch.randn(3, 4, D)
    ep = torch.export.export(FlaggedPack(), (x, torch.tensor(True)))
    path = tmp_path / "flagged.pte"
    path.write_bytes(to_edge_transform_and_lower(ep).to_executorch().buffer)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    for flag in (True, False):
        got = method.execute([x, torch.tensor(flag)])
        for g, want in zip(got, ops.reference_pack_rows(x, 2, 32, torch.tensor(flag))):
            assert torch.equal(g, want)


def test_executorch_kernel_rejects_bad_lengths_without_crashing(pte):
    from executorch.runtime import Runtime

    m, path = pte
    method = Runtime.get().load_program(str(path)).load_method("forward")
    prog_lengths = m.lengths.clone()
    m.lengths[1] = 10_000  # beyond the 4-bit pool's capacity: the kernel must fail, not read past it
    try:
        bad = Runtime.get().load_program(_reexport(m, path)).load_method("forward")
        with pytest.raises(RuntimeError):
            bad.execute(list(chunk(3)))
    finally:
        m.lengths.copy_(prog_lengths)
    assert method.execute(list(chunk(3)))[0].shape == (1, 9, 3, D)  # the runtime is still usable


def _reexport(m: torch.nn.Module, path) -> str:
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(m, chunk(3))
    bad = path.with_name("bad.pte")
    bad.write_bytes(to_edge_transform_and_lower(ep).to_executorch().buffer)
    return str(bad)


# ---- bad arguments raise, never crash ---------------------------------------------------------
def _good_args():
    cache = filled_cache({4: (10, 12), 16: (3, 4)}, seed=9)
    pools, lengths = ops.cache_pools(cache, 0)
    return (*chunk(2), pools, lengths)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: (a[0].double(), *a[1:]), "q must be float32"),
        (lambda a: (a[0], a[1].half(), *a[2:]), "k_chunk must be float32"),
        (lambda a: (a[0], a[1], a[2][:, :, :1], *a[3:]), "v_chunk has size"),
        (lambda a: (*a[:3], {**a[3], "k4": a[3]["k4"][:, :, :31]}, a[4]), "k4"),
        (lambda a: (*a[:3], {n: t for n, t in a[3].items() if n != "v4_zero"}, a[4]), "4-bit pool"),
        (lambda a: (*a[:3], a[3], torch.tensor([0, 13, 0, 3])), "capacity"),
        (lambda a: (*a[:3], a[3], torch.tensor([0, 10, 0, 3], dtype=torch.int32)), "lengths"),
        (lambda a: (*a[:3], a[3], torch.tensor([5, 10, 0, 3])), "2-bit pool"),
    ],
)
def test_bad_arguments_raise(mutate, message):
    q, k, v, pools, lengths = mutate(_good_args())
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.packed_attention(q, k, v, pools, lengths, D**-0.5)


def test_bad_pack_arguments_raise():
    with pytest.raises(RuntimeError, match="float32"):
        ops.pack_rows(torch.randn(2, D, dtype=torch.float64), 4)
    with pytest.raises(RuntimeError, match="bits=3"):
        ops.pack_rows(torch.randn(2, D), 3)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.pack_rows(torch.randn(2, D), 4, 48)
    for flag in (torch.tensor([1.0]), torch.tensor([True, False])):
        with pytest.raises(RuntimeError, match="active must be a one-element bool"):
            ops.pack_rows(torch.randn(2, D), 4, 64, flag)


def test_missing_library_error_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "EXECUTORCH_LIBRARY", tmp_path / "nothing.so")
    with pytest.raises(FileNotFoundError, match="make setup"):
        ops.executorch_library_path()


# ---- the header's own C++ test under AddressSanitizer + UBSan ---------------------------------
def test_cpp_kernel_test_under_sanitizers():
    binary = ops.BUILD_DIR / "kvq_test"
    assert binary.exists(), f"{binary} is not built: {ops.BUILD_HINT}"
    res = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " 0 failed" in res.stdout


def test_cpp_kernel_test_neon_under_qemu(tmp_path):
    """The NEON path, cross-built for aarch64 and run emulated (skipped without the cross tools:
    apt-get install qemu-user g++-aarch64-linux-gnu)."""
    import shutil

    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (cxx and qemu):
        pytest.skip("no aarch64 cross compiler / qemu-aarch64 on this machine")
    binary = ops.BUILD_DIR / "aarch64" / "build" / "kvq_test"  # make setup cross-builds it with the runner
    if not binary.exists():
        src = ops.BUILD_DIR.parent / "tests" / "kvq_test.cpp"
        binary = tmp_path / "kvq_test_aarch64"
        subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-static", "-o", str(binary), str(src), "-lpthread"], check=True, timeout=300)
    res = subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(binary), "quick"], capture_output=True, text=True, timeout=300)
    assert "best isa neon" in res.stdout
    assert res.returncode == 0 and " 0 failed" in res.stdout, res.stdout[-3000:]


def test_unknown_query_bits_raise():
    q, k, v, pools, lengths = _good_args()
    with pytest.raises(RuntimeError, match="query_bits=4"):
        ops.packed_attention(q, k, v, pools, lengths, D**-0.5, query_bits=4)
    with pytest.raises(ValueError, match="query_bits=16"):
        ops.reference_packed_attention(q, k, v, lengths, *(pools.get(n) for n in ops.POOL_ARGS), D**-0.5, 64, -1, 16)
