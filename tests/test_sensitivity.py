import torch

from adaptive_kv.sensitivity import exact_damage, first_order_damage


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_first_order_damage_ranks_tokens_like_the_exact_kl(tiny_model):
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(7))
    est = first_order_damage(tiny_model, ids, bits=(2, 4, 8))
    assert est.shape == (20, 3)
    assert (est[:, 0] >= est[:, 1]).all() and (est[:, 1] >= est[:, 2]).all()
    assert est[-1].abs().max() == 0  # nothing attends to the last token later
    exact2 = torch.tensor([exact_damage(tiny_model, ids, t, 2) for t in range(19)])
    assert exact2.min() >= 0 and exact2.max() > 0
    assert spearman(est[:19, 0], exact2) > 0.7
    exact4 = torch.tensor([exact_damage(tiny_model, ids, t, 4) for t in range(0, 19, 3)])
    assert (exact4 < exact2[::3]).float().mean() >= 0.8


def test_exact_damage_is_zero_at_full_precision_like_storage(tiny_model):
    ids = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(1))
    assert exact_damage(tiny_model, ids, 3, 16) < 1e-6 < exact_damage(tiny_model, ids, 3, 2)


def test_query_blocking_does_not_change_the_damage(tiny_model):
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(3))
    a = first_order_damage(tiny_model, ids, block=16)
    b = first_order_damage(tiny_model, ids, block=1000)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
