"""The exportable decoder step (export/graph.py) and its .pte (export/pte.py, export/pte_runner.py).

Three levels, as for the kvq ops: eager ExportableDecoder vs adaptive_kv.session.Session (the
reference), the torch.export graph, the .pte in executorch.runtime. Each level computes the same
floats in a different order (the Hadamard rotation as a linear here, a matmul in Session; XNNPACK
sums in the .pte), so a K/V value sitting on a rounding boundary can land one code (or fp16 ulp)
away: pool rows are compared up to a rare such row, everything else exactly. The .pte is compared
step by step from the same state: after each step the eager decoder takes over the .pte's state.
"""

from __future__ import annotations

import logging
import random
import re

import pytest
import torch

from adaptive_kv import ops
from adaptive_kv.cache import CacheConfig, CacheLayout, ContextOverflowError, PackedKVCache
from adaptive_kv.controller import ControllerMeta, PrecisionController
from adaptive_kv.decoder import PackedLlama
from adaptive_kv.formats import BIT_WIDTHS
from adaptive_kv.model import tiny_llama
from adaptive_kv.policy import LearnedPolicy, OraclePolicy, RulePolicy, SinkRecentPolicy, StaticPolicy
from adaptive_kv.session import Session, SessionConfig
from export.graph import STATE_BUFFERS, ExportableDecoder, ExportConfigError
from export.graph_policy import GraphPolicyError, doubling_prices
from export.placement import fallback_ranks, place
from export.pte import PteConfig, PteExportError, build_decoder, export_programs, export_pte, lower, metadata, write_atomically
from export.pte_runner import PteDecoder

MAX_SEQ, CHUNK = 64, 8
IDS = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def kernels():
    ops.load_library()  # C++ kernels in eager too (what the .pte runs)


def learned_policy() -> LearnedPolicy:
    """A random controller leaning to 8/16 bits, held to 4 bits/value: the price search works on
    every chunk and the small 4/8/16-bit pools overflow (fallback)."""
    torch.manual_seed(0)
    meta = ControllerMeta(feature_names=("entropy", "rarity", "attn_var", "confidence", "position"), class_fractions=(0.1, 0.2, 0.3, 0.4), budget_bits=4.0)
    ctrl = PrecisionController(meta).eval()
    with torch.no_grad():
        ctrl.mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0]))
        ctrl.feature_std.fill_(3.0)
    return LearnedPolicy(ctrl)


POLICIES = {
    "static-4": lambda: StaticPolicy(4),
    # thresholds inside the tiny model's entropy range (~5-6.2 nats): all four widths, and the
    # 64-slot layout (29/26/6/3) overflows its 8- and 16-bit pools
    "rule": lambda: RulePolicy(thresholds=(5.0, 5.6, 6.0)),
    "learned": learned_policy,
}


def requested(decoder: ExportableDecoder) -> list[torch.Tensor]:
    """Record the policy's requested widths (before fallback) on every call."""
    seen: list[torch.Tensor] = []
    decoder.policy.register_forward_hook(lambda m, i, out: seen.append(torch.tensor(BIT_WIDTHS)[out]))
    return seen


def cache_state(cache: PackedKVCache, rarity) -> dict[str, torch.Tensor]:
    """A Session's state under ExportableDecoder's buffer names."""
    state = {n: b.clone() for n, b in cache.named_buffers()}
    state["lengths"] = torch.tensor([cache.lengths.get(b, 0) for b in BIT_WIDTHS])
    state["seq_len"] = torch.tensor([cache.seq_len])
    state["spent_bits"] = torch.tensor([cache.spent_bits()], dtype=torch.float64)
    state |= {"rarity_counts": rarity.counts.clone(), "rarity_seen": torch.tensor([rarity.seen]), "rarity_distinct": torch.tensor([rarity.distinct])}
    # the first sequence since load is number 1; its tokens' counts are tagged with it
    state |= {"sequence": torch.tensor([1]), "rarity_sequence": (rarity.counts > 0).long()}
    return state


def filled(name: str, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A pool's filled slots (what attention reads), token_bits' filled positions; other buffers whole."""
    if name == "token_bits":
        return x[: int(lengths.sum())]
    if name in STATE_BUFFERS:
        return x
    return x[:, :, : int(lengths[BIT_WIDTHS.index(int(name[1:].split("_")[0]))])]


def assert_same_state(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Bookkeeping exactly; pool rows equal but for a rare one off a rounding boundary (module docstring)."""
    lengths = ref["lengths"]
    # counts live only where tagged with the current sequence (other entries are stale by design)
    live = {k: (x["rarity_sequence"] == x["sequence"]) for k, x in (("got", got), ("ref", ref))}
    assert torch.equal(live["got"], live["ref"])
    assert torch.equal(got["rarity_counts"] * live["got"], ref["rarity_counts"] * live["ref"])
    for n, want in ref.items():
        if n in ("rarity_counts", "rarity_sequence", "sequence"):  # sequence numbers are relative
            continue
        a, b = filled(n, got[n], lengths), filled(n, want, lengths)
        if n in STATE_BUFFERS:
            assert torch.equal(a, b), n
            continue
        if n.endswith("16") and a.numel():
            assert (a.float() - b.float()).abs().max() <= 1e-3, n
        rows_differ = int((a != b).any(-1).sum())
        assert rows_differ <= max(2, 0.02 * a[..., 0].numel()), f"{n}: {rows_differ} rows differ"


# ---- eager: ExportableDecoder == Session ------------------------------------------------------
@pytest.mark.parametrize("name", POLICIES)
def test_eager_decoder_matches_session(tiny_model, name):
    policy = POLICIES[name]()
    session = Session(PackedLlama(tiny_model), policy, SessionConfig(max_seq_len=MAX_SEQ, chunk_size=CHUNK))
    dec = ExportableDecoder(tiny_model, policy, MAX_SEQ, chunk_size=CHUNK)
    want = requested(dec)
    # the pools are PackedKVCache's buffers: same names, shapes, dtypes
    assert {n: (b.shape, b.dtype) for n, b in session.cache.named_buffers() if n != "token_bits"} == {
        n: (b.shape, b.dtype) for n, b in dec.named_buffers() if n[0] in "kv"
    }
    prompt, steps = IDS[:30], IDS[30:40]
    ref_logits = session.feed(prompt, logits="all")  # [30, V], chunks of 8
    logits, bits = [], []
    for chunk in prompt.split(CHUNK):
        lg, b = dec.step(chunk)
        logits.append(lg), bits.append(b)
    assert (torch.cat(logits) - ref_logits).abs().max() <= 1e-3
    for t in steps:  # decode: one token per commit
        lg, b = dec.step(t[None])
        bits.append(b)
        assert (lg[-1] - session.feed(t[None], logits="last")).abs().max() <= 1e-3
    assert torch.cat(bits).tolist() == session.cache.stored_bits().tolist()
    assert_same_state({n: getattr(dec, n) for n in dec.state_names()}, cache_state(session.cache, session.rarity))
    if name != "static-4":
        assert len(set(torch.cat(bits).tolist())) > 1  # a real mix
    if name == "rule":  # some tokens overflowed into another pool, as PackedKVCache placed them
        assert not torch.equal(torch.cat(want), torch.cat(bits))


def test_reset_starts_a_new_sequence(tiny_model):
    dec = ExportableDecoder(tiny_model, POLICIES["rule"](), MAX_SEQ, chunk_size=CHUNK)
    first = dec.feed(IDS[:20])
    dec.reset()
    again = dec.feed(IDS[:20])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert int(dec.seq_len) == 20 and int(dec.rarity_seen) == 20


# ---- the fallback rule, in tensors == PackedKVCache._plan -------------------------------------
def test_placement_matches_packed_cache_fallback():
    rng = random.Random(0)
    for _ in range(60):
        bits = rng.sample(BIT_WIDTHS, rng.randint(1, 4))
        caps = {b: rng.randint(1, 8) for b in bits}
        layout = CacheLayout(sum(caps.values()), tuple(sorted(caps.items())))
        cache = PackedKVCache(CacheConfig(1, 1, 64, layout))
        pools = layout.pool_bits
        ranks, cap_t = fallback_ranks(pools), torch.tensor([layout.capacity(b) for b in pools])
        pos = 0
        while pos < layout.max_seq_len:
            t = rng.randint(1, min(6, layout.max_seq_len - pos))
            want = [rng.choice(BIT_WIDTHS) for _ in range(t)]
            plan = cache._plan(want, pos)
            fill = torch.tensor([cache.lengths[b] for b in pools])
            pool, slot = place(torch.tensor([BIT_WIDTHS.index(w) for w in want]), fill, cap_t, ranks)
            assert [(pools[p], s) for p, s in zip(pool.tolist(), slot.tolist())] == plan.placement
            cache.lengths, pos = plan.lengths, pos + t


def test_doubling_prices_are_price_to_fits():
    assert doubling_prices(0.0)[:3] == [1.0, 2.0, 4.0] and doubling_prices(0.0)[-1] >= 1e6 > doubling_prices(0.0)[-2]
    assert doubling_prices(0.3)[1] == 0.3 + 2 * ((0.3 + 1.0) - 0.3)


def test_unsupported_policies_and_layouts_are_rejected(tiny_model):
    with pytest.raises(GraphPolicyError, match="sink-recent demotes"):
        ExportableDecoder(tiny_model, SinkRecentPolicy(), MAX_SEQ)
    with pytest.raises(GraphPolicyError, match="oracle"):
        ExportableDecoder(tiny_model, OraclePolicy(), MAX_SEQ)
    with pytest.raises(ExportConfigError, match="demotes"):
        ExportableDecoder(tiny_model, StaticPolicy(4), MAX_SEQ, layout=CacheLayout.sink_recent(MAX_SEQ, 4, 8))
    with pytest.raises(ExportConfigError, match="max_position_embeddings"):
        ExportableDecoder(tiny_model, StaticPolicy(4), 10**6)
    with pytest.raises(PteExportError, match="weights='int3'"):
        PteConfig(weights="int3")
    dec = ExportableDecoder(tiny_model, StaticPolicy(4), 16, chunk_size=8)
    with pytest.raises(ContextOverflowError, match="max_seq_len=16"):
        dec.feed(IDS[:17])
    with pytest.raises(RuntimeError, match="at most chunk_size=8"):
        dec(IDS[:9][None], torch.zeros(1, dtype=torch.int64))


def test_input_pos_zero_starts_a_new_sequence(tiny_model):
    """What ExecuTorch's stock runner does after its reset(): call forward at position 0 again."""
    dec = ExportableDecoder(tiny_model, POLICIES["rule"](), MAX_SEQ, chunk_size=CHUNK)
    first = dec(IDS[:8][None], torch.tensor([0]))
    dec(IDS[8:12][None], torch.tensor([8]))
    assert int(dec.seq_len) == 12
    again = dec(IDS[:8][None], torch.tensor([0]))
    assert torch.equal(first, again) and int(dec.seq_len) == 8
    assert int(dec.lengths.sum()) == 8 and int(dec.rarity_seen) == 8


# ---- torch.export ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned_programs(tiny_model):
    """forward, token_bits and state of the learned-policy decoder, exported once for the module."""
    policy = learned_policy()
    decoder = ExportableDecoder(tiny_model, policy, MAX_SEQ, chunk_size=CHUNK)
    return decoder, policy, export_programs(decoder, state_method=True)


def test_export_keeps_kvq_ops_single_nodes_and_state_mutable(tiny_model, learned_programs):
    dec, policy, programs = learned_programs
    ep = programs["forward"]
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.kvq.packed_attention.default) == dec.num_layers  # one fused node per layer
    # the price bisection (a scan) runs under a cond, only when the floor price does not fit
    (price,) = [n for n in ep.graph.nodes if n.target is torch.ops.higher_order.cond]
    search = getattr(ep.graph_module, price.args[2].target)
    assert [n.target for n in search.graph.nodes if n.op == "call_function"].count(torch.ops.higher_order.scan) == 1
    # K and V are packed at 2, 4 and 8 bits, each pack flagged active only when a token goes there
    packs = [n for n in ep.graph.nodes if n.target == torch.ops.kvq.pack_rows.default]
    assert [n.args[1] for n in packs] == [2, 2, 4, 4, 8, 8]
    assert all(n.args[3].meta["val"].dtype == torch.bool for n in packs)
    # pools are read in place by packed_attention (whole buffers + layer index) and written by the
    # commit's index_put_ of the chunk's rows: no op that would copy a layer's pools on every call
    pool_inputs = {i for i, buf in ep.graph_signature.inputs_to_buffers.items() if buf in dec.pool_names}
    users = {u.target for n in ep.graph.nodes if n.name in pool_inputs for u in n.users}
    assert users <= {torch.ops.kvq.packed_attention.default, torch.ops.aten.index_select.default, torch.ops.aten.index_put_.default}, users
    mutated = set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())
    assert mutated == set(dec.state_names())  # every pool and counter is program state
    assert set(programs) == {"forward", "token_bits", "state"}
    assert not programs["token_bits"].run_decompositions().graph_signature.buffers_to_mutate  # reads only
    # the graph (dynamic T) behaves like the module, state included
    graph, eager = ep.module(), ExportableDecoder(tiny_model, policy, MAX_SEQ, chunk_size=CHUNK)
    for chunk in (IDS[:8], IDS[8:11], IDS[11:12], IDS[12:13]):
        pos = eager.seq_len.clone()
        lg, lg_ref = graph(chunk[None], pos), eager(chunk[None], pos)
        assert (lg - lg_ref).abs().max() <= 1e-5 and torch.equal(graph.token_bits, eager.token_bits)
    assert torch.equal(graph.lengths, eager.lengths) and torch.equal(graph.token_bits, eager.token_bits)


# ---- the .pte -------------------------------------------------------------------------------
class _LinearOf(torch.nn.Module):
    def forward(self, x, w):  # a weight that is an input: XNNPACK's filter leaves it to the portable kernels
        return torch.nn.functional.linear(x, w)


def test_partitioner_drops_xnnpacks_filter_only_when_it_accepts_every_linear(learned_programs):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from export.partition import XnnpackLinearPartitioner

    ep = torch.export.export(_LinearOf(), (torch.randn(3, 8), torch.randn(4, 8))).run_decompositions({})
    ops_kept, keep = XnnpackLinearPartitioner().ops_to_not_decompose(ep)
    assert keep is not None and not keep(next(n for n in ep.graph.nodes if n.target == torch.ops.aten.linear.default))
    assert ops_kept == XnnpackPartitioner().ops_to_not_decompose(ep)[0]
    ep = learned_programs[2]["forward"].run_decompositions({})  # the learned decoder: its cond and scan branches too
    assert XnnpackLinearPartitioner().ops_to_not_decompose(ep)[1] is None


@pytest.fixture(scope="module")
def learned_pte(learned_programs, tmp_path_factory):
    dec, policy, programs = learned_programs
    path = tmp_path_factory.mktemp("pte") / "tiny-learned.pte"
    write_atomically(lower(programs, metadata(dec), check_ir=True).buffer, path)  # export_pte's last stages, edge IR validated
    return path, policy


def test_pte_matches_eager_step_by_step(tiny_model, learned_pte):
    path, policy = learned_pte
    pte = PteDecoder(path)
    eager = build_decoder(tiny_model, policy, PteConfig(max_seq_len=MAX_SEQ, chunk_size=CHUNK))
    want = requested(eager)
    names = eager.state_names()
    used = []
    for chunk in [IDS[:8], IDS[8:16], IDS[16:21]] + list(IDS[21:33].split(1)):  # prefill, then decode
        logits, bits = pte.step(chunk)
        ref_logits, ref_bits = eager.step(chunk)
        assert (logits - ref_logits).abs().max() <= 1e-3
        assert torch.equal(bits, ref_bits)
        state = pte.state(names)
        assert_same_state(state, {n: getattr(eager, n) for n in names})
        with torch.no_grad():  # continue both from the .pte's state
            for n in names:
                getattr(eager, n).copy_(state[n])
        used.append(bits)
    assert int(state["seq_len"]) == pte.seq_len == 33
    assert not torch.equal(torch.cat(want), torch.cat(used))  # pools overflowed: fallback ran in the .pte


def test_pte_reset_metadata_and_overflow(tiny_model, learned_pte):
    path, policy = learned_pte
    pte = PteDecoder(path)
    names = ExportableDecoder(tiny_model, policy, MAX_SEQ, chunk_size=CHUNK).state_names()
    assert (pte.max_seq_len, pte.chunk_size, pte.vocab_size) == (MAX_SEQ, CHUNK, 512)
    constants = {n: pte._constant(n, all_values=True) for n in ("use_kv_cache", "kv_pool_bits", "kv_group_size", "get_n_layers", "get_max_seq_len", "get_max_context_len")}
    assert constants == {"use_kv_cache": [True], "kv_pool_bits": [2, 4, 8, 16], "kv_group_size": [64], "get_n_layers": [2],
                         "get_max_seq_len": [CHUNK], "get_max_context_len": [MAX_SEQ]}  # TextLLMRunner's meanings
    first = pte.feed(IDS[:20])
    pte.feed(IDS[20:30])
    before = int(pte.state(names)["sequence"])
    pte.reset()  # the next forward runs at input_pos 0: what a stock runner does after its reset
    again = pte.feed(IDS[:20])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    state = pte.state(names)
    assert int(state["seq_len"]) == 20 and int(state["lengths"].sum()) == 20 and int(state["sequence"]) == before + 1
    with pytest.raises(ContextOverflowError, match="max_seq_len=64"):
        pte.feed(torch.zeros(MAX_SEQ - 19, dtype=torch.int64))
    with pytest.raises(ValueError, match="1..8 tokens"):
        pte.step(IDS[:9])


def test_8da4w_pte_runs_the_quantized_model(tmp_path, caplog):
    """int8-dynamic-activation x int4-weight linears through XNNPACK: close to torchao's eager
    8da4w (their activation rounding differs slightly), much closer than to the fp32 model. The
    program is byte for byte what the stock lowering gives (XNNPACK's own partitioner, torchao's
    q/dq ops as traced, partitions preprocessed one after another in this process):
    export/partition.py, export/qdq.py and export/preprocess_pool.py change its cost only."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend.backend_details import BackendDetails

    model = tiny_llama(seed=0, num_hidden_layers=1)  # 1 layer: quicker to lower
    policy, config = StaticPolicy(4), PteConfig(max_seq_len=32, chunk_size=4, weights="8da4w")
    with caplog.at_level(logging.INFO, logger="export.pte"):
        report = export_pte(model, None, policy, 32, "8da4w", tmp_path / "q.pte", chunk_size=4, check_ir=True, processes=2)
    runs = re.findall(r"preprocessed (\d+) partitions in (\d+) process", caplog.text)
    assert len(runs) == 1 and int(runs[0][0]) >= 2 and runs[0][1] == "2", runs  # forked workers did preprocess
    assert XnnpackBackend.preprocess_multimethod.__func__ is BackendDetails.preprocess_multimethod.__func__  # restored
    assert report.path.stat().st_size == report.bytes and list(tmp_path.iterdir()) == [report.path]  # no temp file left
    assert set(report.seconds) == {"build", "torch.export", "to_edge_transform_and_lower", "to_executorch", "write"}
    quantized, float_ref = build_decoder(model, policy, config), build_decoder(model, policy, PteConfig(max_seq_len=32, chunk_size=4))
    assert lower(export_programs(quantized), metadata(quantized), stock=True).buffer == report.path.read_bytes()
    pte = PteDecoder(report.path)
    for chunk in (IDS[:4], IDS[4:5]):
        logits, _ = pte.step(chunk)
        (q, _), (f, _) = quantized.step(chunk), float_ref.step(chunk)
        assert (logits - q).abs().max() < 0.25 * (f - q).abs().max()


class _ActivationQdq(torch.nn.Module):
    """torchao's per-token int8 activation q/dq, spelled out; ``leak``: the scale is also used
    outside the chain (not the 8da4w pattern)."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.leak = leak

    def forward(self, x):
        ao, block = torch.ops.torchao, [1, x.shape[-1]]
        s, z = ao.choose_qparams_affine(x, "ASYMMETRIC", block, torch.int8, -128, 127, None, None, torch.int8)
        y = ao.dequantize_affine(ao.quantize_affine(x, block, s, z, torch.int8, -128, 127), block, s, z, torch.int8, -128, 127)
        return y * s.unsqueeze(-1) if self.leak else y


def test_rewrite_8da4w_swaps_torchao_qdq_for_quantized_decomposed_ops():
    """export/qdq.py rewrites every activation chain and int4 weight of an 8da4w decoder (nothing
    torchao is left), computes what the chain computed up to XNNPACK's zero-point choice (one
    step), and leaves a chain alone when its scale escapes it."""
    import torchao.quantization.quant_primitives  # noqa: F401  (torch.ops.torchao)
    from torchao.utils import TorchAOBaseTensor

    from export.qdq import rewrite_8da4w

    x = torch.randn(5, 16) * 3
    ep = torch.export.export(_ActivationQdq(), (x,))
    before = ep.module()(x)
    assert rewrite_8da4w(ep) == 1
    assert {n.target for n in ep.graph.nodes if "quantize" in str(n.target) or "qparams" in str(n.target)} == {
        torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default,
        torch.ops.quantized_decomposed.quantize_per_token.default, torch.ops.quantized_decomposed.dequantize_per_token.default}
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    after = ep.module()(x)
    assert ((after - before).abs() <= step * 1.001).all() and ((after - x).abs() <= step * 1.001).all()

    leaky = torch.export.export(_ActivationQdq(leak=True), (x,))
    targets = [n.target for n in leaky.graph.nodes]
    assert rewrite_8da4w(leaky) == 0 and [n.target for n in leaky.graph.nodes] == targets

    model = tiny_llama(seed=0, num_hidden_layers=1)
    decoder = build_decoder(model, StaticPolicy(4), PteConfig(max_seq_len=32, chunk_size=4, weights="8da4w"))
    linears = sum(isinstance(getattr(m, "weight", None), TorchAOBaseTensor) for m in decoder.modules())
    assert linears >= 7  # q, k, v, o, gate, up, down (and lm_head when the group divides it)
    programs = export_programs(decoder)
    assert rewrite_8da4w(programs["forward"]) == 2 * linears  # an activation chain and a weight each
    assert not [n for n in programs["forward"].graph.nodes if getattr(n.target, "namespace", None) == "torchao"]


def test_int8_query_pte_matches_eager(tiny_model, tmp_path):
    """query_bits=8 end to end: the .pte (ExecuTorch kernel) and the eager decoder (ATen kernel)
    give the same widths and logits, and differ from the fp32-query decoder (the setting is live)."""
    policy = learned_policy()
    report = export_pte(tiny_model, None, policy, MAX_SEQ, "fp32", tmp_path / "q8.pte", chunk_size=CHUNK, query_bits=8, check_ir=True)
    pte = PteDecoder(report.path)
    eager = build_decoder(tiny_model, policy, PteConfig(max_seq_len=MAX_SEQ, chunk_size=CHUNK, query_bits=8))
    fp32_query = build_decoder(tiny_model, policy, PteConfig(max_seq_len=MAX_SEQ, chunk_size=CHUNK))
    gap = 0.0
    for chunk in [IDS[:8], IDS[8:13]] + list(IDS[13:20].split(1)):  # prefill, then decode
        logits, bits = pte.step(chunk)
        ref_logits, ref_bits = eager.step(chunk)
        assert (logits - ref_logits).abs().max() <= 1e-3
        assert torch.equal(bits, ref_bits)
        gap = max(gap, (ref_logits - fp32_query.step(chunk)[0]).abs().max().item())
    assert gap > 1e-5
