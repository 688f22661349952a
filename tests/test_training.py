import numpy as np
import pytest
import torch

from adaptive_kv.allocation import exact
from adaptive_kv.controller import PrecisionController
from adaptive_kv.training import TrainConfig, class_costs, collect, controller_loss, stratified_split, train


@pytest.fixture(scope="module")
def rows(tiny_decoder):
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 512, (48,), generator=g) for _ in range(6)]
    return collect(tiny_decoder, windows, TrainConfig(budget_bits=4.0, chunk_size=8))


def test_collected_labels_are_the_budget_optimal_allocation(rows):
    assert rows.features.shape == (288, 4) and rows.damage.shape == (288, 4) and rows.labels.shape == (288,)
    costs = class_costs()
    for w in range(6):  # each window's labels spend at most the budget
        lab = rows.labels[48 * w : 48 * (w + 1)].numpy()
        assert costs[lab].mean() <= 4.0 + 1e-9
        assert np.array_equal(lab, exact(rows.damage[48 * w : 48 * (w + 1)].double().numpy(), costs, 4.0))
    assert len(rows.digest) == 64


def test_stratified_split_keeps_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [3] * 20)
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    assert torch.bincount(labels[va], minlength=4).tolist() == [10, 6, 0, 4]


def test_training_lowers_the_loss_and_beats_a_constant_predictor(rows, tmp_path):
    cfg = TrainConfig(budget_bits=4.0, epochs=300, patience=300, chunk_size=8)
    ctrl, rep = train(rows, cfg, model_id="tiny")
    assert rep.val_loss < rep.train_loss * 3  # sanity: finite, same scale
    # a constant predictor that always answers the most frequent training label
    tr, va = stratified_split(rows.labels, 0.2, 0)
    const = torch.bincount(rows.labels[tr]).argmax()
    const_logits = torch.full((va.numel(), 4), -10.0)
    const_logits[:, const] = 10.0
    scale = ctrl.meta.extra["damage_scale"]
    const_loss = float(controller_loss(const_logits, rows.labels[va], rows.damage[va], cfg, scale))
    assert rep.val_loss < const_loss
    untrained = PrecisionController(ctrl.meta)
    untrained.feature_mean.copy_(ctrl.feature_mean), untrained.feature_std.copy_(ctrl.feature_std)
    with torch.no_grad():
        start = float(controller_loss(untrained(rows.features[va]), rows.labels[va], rows.damage[va], cfg, scale))
    assert rep.val_loss < start
    ctrl.save(tmp_path / "c.safetensors")
    again = PrecisionController.load(tmp_path / "c.safetensors", model_id="tiny", feature_names=ctrl.meta.feature_names)
    assert torch.equal(again(rows.features), ctrl(rows.features))


def test_bad_training_options():
    with pytest.raises(ValueError, match="unknown feature set"):
        TrainConfig(features="everything")
    with pytest.raises(ValueError, match="outside"):
        TrainConfig(budget_bits=1.0)
