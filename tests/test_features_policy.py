import math

import pytest
import torch

from adaptive_kv.controller import ControllerError, ControllerMeta, PrecisionController
from adaptive_kv.features import RarityTracker, TokenFeatures, next_token_stats
from adaptive_kv.allocation import exact, price_to_fit
from adaptive_kv.policy import POLICY_NAMES, LearnedPolicy, PolicyError, RulePolicy, SinkRecentPolicy, StaticPolicy, make_policy
from adaptive_kv.session import Session, SessionConfig


def brute_rarity(stream):
    out, counts = [], {}
    for i, x in enumerate(stream):
        out.append(-math.log((counts.get(x, 0) + 1) / (i + len(counts) + 1)))
        counts[x] = counts.get(x, 0) + 1
    return out


@pytest.mark.parametrize("chunks", [[12], [1] * 12, [5, 7]])
def test_rarity_matches_brute_force_whatever_the_chunking(chunks):
    stream = [3, 3, 7, 1, 3, 7, 9, 9, 9, 2, 3, 1]
    r, got, s = RarityTracker(16), [], 0
    for c in chunks:
        got += r.observe(torch.tensor(stream[s : s + c])).tolist()
        s += c
    assert got == pytest.approx(brute_rarity(stream))


def test_entropy_and_confidence():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    h, c = next_token_stats(logits)
    assert h[0] == pytest.approx(math.log(4)) and c[0] == pytest.approx(0.25)
    assert h[1] < 0.01 and c[1] > 0.99


def feats(entropy):
    t = len(entropy)
    z = torch.zeros(t)
    return TokenFeatures(torch.tensor(entropy), z, z, z, torch.arange(t), torch.arange(t))


def test_policies_by_name_and_unknown_names():
    assert [make_policy(n).name for n in POLICY_NAMES if n != "learned"] == [n for n in POLICY_NAMES if n != "learned"]
    with pytest.raises(PolicyError, match="unknown policy 'static-3'.*fp16"):
        make_policy("static-3")
    # without --controller, learned uses the bundled SmolLM2 controller, which refuses other models
    assert make_policy("learned").controller.meta.budget_bits == 4.0
    with pytest.raises(ControllerError, match="trained for model 'llama:L30:d576:h9/3x64:v49152', not 'tiny'"):
        make_policy("learned", model_id="tiny")


def test_rule_buckets_entropy_into_widths():
    rule = RulePolicy(thresholds=(1.0, 2.0, 3.0))
    assert rule.choose(feats([0.5, 1.0, 1.5, 2.5, 3.5])).tolist() == [2, 4, 4, 8, 16]
    with pytest.raises(PolicyError, match="increasing"):
        RulePolicy(thresholds=(2.0, 1.0, 3.0))


def test_policy_layouts_promise_their_memory():
    assert StaticPolicy(4).layout(100).capacities == ((4, 100),)
    lay = SinkRecentPolicy(sinks=4, window=60).layout(1000)
    assert dict(lay.capacities) == {16: 64, 4: 936} and lay.demote == (16, 4) and lay.pinned == 4
    assert sum(c for _, c in RulePolicy().layout(1000).capacities) == 1000


def _controller(bits_out: int, model="tiny"):
    # budget = the average of its uniform class mix (7.875 bits), so the pools keep that mix
    meta = ControllerMeta(class_fractions=(0.25, 0.25, 0.25, 0.25), budget_bits=7.875, model=model, extra={"note": "test"})
    c = PrecisionController(meta)
    with torch.no_grad():  # constant output: always the class of `bits_out`
        c.mlp[-1].weight.zero_()
        c.mlp[-1].bias.copy_(torch.tensor([1.0 if b == bits_out else 0.0 for b in meta.class_bits]))
    return c


def test_controller_file_round_trip_and_rejections(tmp_path):
    c = _controller(8)
    c.feature_std.fill_(2.0)
    c.save(tmp_path / "c.safetensors")
    again = PrecisionController.load(tmp_path / "c.safetensors", model_id="tiny")
    assert again.meta == c.meta
    for (n, a), (_, b) in zip(c.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randn(5, 4)
    assert torch.equal(c(x), again(x))
    with pytest.raises(ControllerError, match="trained for model 'tiny', not 'other'"):
        PrecisionController.load(tmp_path / "c.safetensors", model_id="other")
    with pytest.raises(ControllerError, match="uses features"):
        PrecisionController.load(tmp_path / "c.safetensors", feature_names=("entropy",))
    with pytest.raises(ControllerError, match="not found"):
        PrecisionController.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ControllerError, match="not a readable"):
        PrecisionController.load(tmp_path / "junk.safetensors")


def test_learned_policy_drives_the_cache(tiny_decoder):
    s = Session(tiny_decoder, LearnedPolicy(_controller(8), budget_bits=9.0), SessionConfig(max_seq_len=64, chunk_size=5))
    s.feed(torch.arange(12))
    # the budget affords 8.5-bit tokens: the controller's choice stands for all 12 tokens
    assert s.cache.stored_bits().tolist() == [8] * 12
    # at 7.875 bits the first chunk cannot afford it (5 x 8.5 > 5 x 7.875): the price rises and
    # the constant controller falls to 2 bits; what that saved pays for 8 bits in the next chunks
    s = Session(tiny_decoder, LearnedPolicy(_controller(8)), SessionConfig(max_seq_len=64, chunk_size=5))
    s.feed(torch.arange(12))
    assert s.cache.stored_bits().tolist() == [2] * 5 + [8] * 7


def test_price_to_fit_is_the_smallest_price_within_the_allowance():
    g = torch.Generator().manual_seed(0)
    costs = torch.tensor([2.5, 4.5, 8.5, 16.0])
    for _ in range(20):
        logp = torch.randn(37, 4, generator=g).log_softmax(-1)
        allowance = float(torch.empty(()).uniform_(2.5, 16.0, generator=g)) * 37
        price = price_to_fit(logp, costs, 0.0, allowance)
        spend = lambda lam: float(costs[(logp - lam * costs).argmax(-1)].sum())  # noqa: E731
        assert spend(price) <= allowance
        assert price == 0.0 or spend(price * (1 - 1e-6) - 1e-9) > allowance


@pytest.mark.parametrize("budget", [3.0, 4.0])
def test_learned_policy_keeps_every_prefix_within_the_budget(tiny_decoder, budget):
    """A random controller that spends far more than the budget on its own."""
    torch.manual_seed(0)
    meta = ControllerMeta(class_fractions=(0.1, 0.2, 0.3, 0.4), budget_bits=budget)
    ctrl = PrecisionController(meta).eval()
    with torch.no_grad():
        ctrl.mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0]))  # leans to 8/16 bits
    s = Session(tiny_decoder, LearnedPolicy(ctrl), SessionConfig(max_seq_len=128, chunk_size=7))
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(1))
    s.feed(ids[:40])
    for t in ids[40:]:  # decode steps: one token per commit
        s.feed(t[None])
        assert s.cache.bits_per_value() <= budget + 1e-9
    assert len(set(s.cache.stored_bits().tolist())) > 1  # a real mix, not all-cheapest


def test_oracle_follows_the_budget_optimal_plan(tiny_decoder):
    damage = torch.rand(20, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([100.0, 10.0, 1.0, 0.0])
    oracle = make_policy("oracle", budget_bits=4.0)
    oracle.prepare(damage, tail=3)
    s = Session(tiny_decoder, oracle, SessionConfig(max_seq_len=32, chunk_size=6))
    s.feed(torch.arange(23))
    want = torch.tensor([2, 4, 8, 16])[torch.from_numpy(exact(damage.double().numpy(), [2.5, 4.5, 8.5, 16.0], 4.0))]
    assert s.cache.stored_bits().tolist() == want.tolist() + [2, 2, 2]
    assert s.cache.bits_per_value() <= 4.0
    with pytest.raises(PolicyError, match="plan covers 23 tokens"):
        s.feed(torch.arange(2))


def test_rule_policy_reads_features_in_the_session(tiny_decoder):
    s = Session(tiny_decoder, RulePolicy(thresholds=(0.0, 0.0, 100.0)), SessionConfig(max_seq_len=64, chunk_size=4))
    s.feed(torch.arange(10))  # every entropy is in (0, 100): 8 bits, until the 8-bit pool is full
    assert set(s.cache.stored_bits().tolist()) <= {8, 4, 16}
    assert s.cache.stored_bits().tolist()[:6] == [8] * 6  # 8-bit pool: 10% of 64 = 6 slots


class _Recorder:
    """A policy that records the features it is shown (and stores everything at 8 bits)."""

    name, needs_features = "recorder", True

    def __init__(self):
        self.seen = []

    def layout(self, max_seq_len):
        return StaticPolicy(8).layout(max_seq_len)

    def choose(self, features):
        self.seen.append(features)
        return torch.full_like(features.token_ids, 8)


@pytest.mark.parametrize("chunk", [3, 16])
def test_policies_see_the_true_features_of_every_chunk(tiny_model, tiny_decoder, chunk):
    ids = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(0))
    rec = _Recorder()
    s = Session(tiny_decoder, rec, SessionConfig(max_seq_len=64, chunk_size=chunk))
    s.feed(ids, logits="last")  # the caller wants only the last logits; features still need all
    seen = rec.seen
    entropy = torch.cat([f.entropy for f in seen])
    # the first chunk sees no quantized keys, so its entropies equal the full-precision model's
    with torch.no_grad():
        h_ref, c_ref = next_token_stats(tiny_model(ids[None, :chunk]).logits[0])
    assert torch.allclose(entropy[:chunk], h_ref, atol=1e-4)
    assert torch.allclose(torch.cat([f.confidence for f in seen])[:chunk], c_ref, atol=1e-5)
    attn_var = torch.cat([f.attn_var for f in seen])
    assert (entropy > 0).all() and (attn_var[1:] > 0).all()
    assert attn_var[0].abs() < 1e-6  # one key: a one-point distribution has no variance
    assert torch.cat([f.positions for f in seen]).tolist() == list(range(16))
    assert torch.cat([f.rarity for f in seen]).tolist() == pytest.approx(brute_rarity(ids.tolist()))


def test_budget_option_sizes_mixed_policies_only():
    lay = make_policy("rule", budget_bits=3.0).layout(1000)
    avg = sum(c * {2: 2.5, 4: 4.5, 8: 8.5, 16: 16.0}[b] for b, c in lay.capacities) / 1000
    assert avg == pytest.approx(3.0, abs=0.02)
    with pytest.raises(PolicyError, match="applies to the mixed policies"):
        make_policy("static-4", budget_bits=3.0)
