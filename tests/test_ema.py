"""Weight EMA: the debiased average equals its closed form, frozen weights stay bit-equal in it, the
half-life is in epochs, and evaluation scores the average while metrics keep the live model's score."""

import pytest
import torch
from helpers import SixGroupNet, batches, make_cfg, make_trainer, read_csv
from test_training_core import run
from tiny_runs import (
    compose_cfg,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.core import ema

SPE = 4


def test_decay_halves_the_weight_every_half_life_at_any_epoch_length():
    for half_life, steps_per_epoch in [(0.5, 5), (1.0, 8), (2.0, 5000)]:
        decay = ema.decay_for(half_life, steps_per_epoch)
        assert decay ** (half_life * steps_per_epoch) == pytest.approx(0.5)
    for bad in (0, -1):
        with pytest.raises(UserError, match="ema_half_life must be a positive number of epochs"):
            ema.decay_for(bad, 8)


def test_debiased_average_is_the_normalised_geometric_mean_of_the_iterates():
    decay = 0.8
    model = torch.nn.Linear(3, 2)
    average = ema.WeightEMA(model, decay)
    iterates = []
    for t in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        iterates.append(model.weight.detach().clone())
        average.update()
        if t == 0:  # the first update copies: the starting weights carry no weight at all
            assert torch.equal(average.model.weight, model.weight)
    w = torch.tensor([decay ** (len(iterates) - 1 - i) for i in range(len(iterates))])
    expected = sum(wi * it for wi, it in zip(w, iterates)) / w.sum()
    torch.testing.assert_close(average.model.weight, expected)


def test_trainer_average_keeps_frozen_weights_and_stats_bit_equal_and_lags_the_live_model():
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=2, lr=0.05, unfreeze=5, ema_half_life=0.5)
    trainer = make_trainer(model, cfg, SPE)
    assert trainer.ema.decay == pytest.approx(0.5 ** (1 / 2))  # half an epoch of 4 steps
    stem_before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    run(trainer, 2, batches(SPE))
    assert trainer.ema.updates == 2 * SPE
    for k, v in trainer.ema.model.stem.state_dict().items():
        assert torch.equal(v, stem_before[k]), k  # frozen: weights, BN statistics, batch count
    live, avg = model.b4[0].weight, trainer.ema.model.b4[0].weight
    assert not torch.equal(live, avg) and not avg.requires_grad
    # trainable BN statistics are averaged too; batch counts are copied
    assert torch.equal(trainer.ema.model.b4[1].num_batches_tracked, model.b4[1].num_batches_tracked)
    assert not torch.equal(trainer.ema.model.b4[1].running_mean, model.b4[1].running_mean)


def test_run_evaluates_the_average_and_reports_the_live_model_beside_it(tmp_path):
    train(compose_cfg("epochs=2", "ema_half_life=1", "experiment=full", "lr=0.01"), tmp_path / "ema")
    rows = read_csv(tmp_path / "ema" / "metrics.csv")
    assert len(rows) == 2 and {"live_val_loss", "live_val_acc"} <= rows[0].keys()
    assert rows[-1]["val_loss"] != rows[-1]["live_val_loss"]  # two different models scored
    saved = torch.load(tmp_path / "ema" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["ema"]["updates"] == 6 and saved["ema"]["model"].keys() == saved["model"].keys()

    with pytest.raises(UserError, match="ema_half_life must be a positive number of epochs, got 0"):
        train(compose_cfg("epochs=1", "ema_half_life=0"), tmp_path / "zero")
    train(compose_cfg("epochs=1"), tmp_path / "plain")
    assert "live_val_acc" not in read_csv(tmp_path / "plain" / "metrics.csv")[0]
    with pytest.raises(UserError, match="the checkpoint has no weight average"):
        train(compose_cfg("epochs=1", "ema_half_life=1", f"resume={tmp_path / 'plain'}"), tmp_path / "r")
