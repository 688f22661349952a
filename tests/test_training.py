import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adaptive_kv.allocation import exact
from adaptive_kv.controller import PrecisionController
from adaptive_kv.training import Rows, TrainConfig, calibration_sequences, class_costs, collect, controller_loss, stratified_split, train
from export.cli import main


@pytest.fixture(scope="module")
def rows(tiny_decoder):
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 512, (48,), generator=g) for _ in range(6)]
    return collect(tiny_decoder, windows, chunk_size=8)


def test_labels_are_the_budget_optimal_allocation_of_each_sequence(rows):
    assert rows.features.shape == (288, 5) and rows.damage.shape == (288, 4) and rows.sequence.shape == (288,)
    costs = class_costs()
    for budget in (3.0, 4.0):
        labels = rows.labels(budget)
        for w in range(6):  # each window's labels spend at most the budget
            lab = labels[48 * w : 48 * (w + 1)].numpy()
            assert costs[lab].mean() <= budget + 1e-9
            assert np.array_equal(lab, exact(rows.damage[48 * w : 48 * (w + 1)].double().numpy(), costs, budget))
    assert len(rows.digest) == 64
    assert torch.equal(rows.select("paper"), rows.features[:, :4])
    assert torch.equal(rows.features[:48, 4], torch.arange(48.0))  # position column


def test_rows_round_trip(rows, tmp_path):
    rows.save(tmp_path / "rows.safetensors")
    again = Rows.load(tmp_path / "rows.safetensors")
    assert again.digest == rows.digest and torch.equal(again.features, rows.features) and torch.equal(again.damage, rows.damage)


def test_stratified_split_keeps_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [3] * 20)
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    assert torch.bincount(labels[va], minlength=4).tolist() == [10, 6, 0, 4]


@pytest.mark.parametrize("features", ["paper", "extended"])
def test_training_lowers_the_loss_and_beats_a_constant_predictor(rows, tmp_path, features):
    cfg = TrainConfig(budget_bits=4.0, epochs=300, patience=300, chunk_size=8, features=features)
    ctrl, rep = train(rows, cfg, model_id="tiny")
    labels = rows.labels(4.0)
    x = rows.select(features)
    assert rep.val_loss < rep.train_loss * 3  # sanity: finite, same scale
    # a constant predictor that always answers the most frequent training label
    tr, va = stratified_split(labels, 0.2, 0)
    const = torch.bincount(labels[tr]).argmax()
    const_logits = torch.full((va.numel(), 4), -10.0)
    const_logits[:, const] = 10.0
    scale = ctrl.meta.extra["damage_scale"]
    const_loss = float(controller_loss(const_logits, labels[va], rows.damage[va], cfg, scale))
    assert rep.val_loss < const_loss
    untrained = PrecisionController(ctrl.meta)
    untrained.feature_mean.copy_(ctrl.feature_mean), untrained.feature_std.copy_(ctrl.feature_std)
    with torch.no_grad():
        start = float(controller_loss(untrained(x[va]), labels[va], rows.damage[va], cfg, scale))
    assert rep.val_loss < start
    # the calibrated price brings the training rows to the budget
    with torch.no_grad():
        chosen = ctrl.choose_bits(x[tr])
    assert np.mean([{2: 2.5, 4: 4.5, 8: 8.5, 16: 16.0}[int(b)] for b in chosen]) <= 4.0 + 1e-9
    ctrl.save(tmp_path / "c.safetensors")
    again = PrecisionController.load(tmp_path / "c.safetensors", model_id="tiny", feature_names=ctrl.meta.feature_names)
    assert torch.equal(again(x), ctrl(x)) and again.meta.price == ctrl.meta.price


def test_bad_training_options():
    with pytest.raises(ValueError, match="unknown feature set"):
        TrainConfig(features="everything")
    with pytest.raises(ValueError, match="outside"):
        TrainConfig(budget_bits=1.0)


def test_calibration_data_refuses_evaluation_text(tokenizer, tmp_path):
    test_raw = tmp_path / "wiki.test.raw"
    test_raw.write_text("hello " * 100)
    with pytest.raises(ValueError, match="evaluation text"):
        calibration_sequences(tokenizer, [str(test_raw)])
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    seqs = calibration_sequences(tokenizer, [str(text)], window=64, max_windows=3)
    assert len(seqs) == 3 and all(s.numel() == 64 for s in seqs)


def test_train_controller_cli_is_deterministic(tiny_checkpoint, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("A small model stores its keys and values. The cache grows with every token it reads. " * 40)
    outs = []
    for name in ("a", "b"):
        args = ["train-controller", "--model", str(tiny_checkpoint), "--data", str(text), "--window", "96", "--windows", "3",
                "--epochs", "30", "--chunk-size", "16", "--out", str(tmp_path / f"{name}.safetensors"), "--json"]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        outs.append(PrecisionController.load(tmp_path / f"{name}.safetensors"))
    a, b = outs
    assert a.meta.extra["data_sha256"] == b.meta.extra["data_sha256"]
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    res = CliRunner().invoke(main, ["train-controller", "--model", str(tiny_checkpoint), "--data", str(text), "--features", "all",
                                    "--out", str(tmp_path / "c.safetensors")])
    assert res.exit_code == 2 and "all" in res.output
