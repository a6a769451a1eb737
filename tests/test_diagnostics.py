"""Per-group diagnostics measured from the real update, activation histograms, the update-ratio warning,
freeze integrity, and files that a resume continues without a duplicate row."""

import pytest
import torch
from helpers import read_csv
from tiny_runs import (
    compose_cfg,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.diagnostics import ratio_warnings, resolve_every
from finetune.engine.signals import Interrupted
from finetune.engine.step import Trainer

# plain SGD: the update is exactly lr x gradient, so the probe's numbers can be checked by hand
SGD = ["experiment=none", "optimizer.name=sgd", "optimizer.momentum=0", "optimizer.weight_decay=0",
       "schedule=constant", "lr=0.05", "unfreeze=2", "diag_every=1"]


def test_update_ratio_is_the_applied_update_and_frozen_groups_stay_zero(tmp_path):
    train(compose_cfg(*SGD, "epochs=1"), tmp_path)
    rows = read_csv(tmp_path / "diagnostics.csv")
    assert {int(r["step"]) for r in rows} == {0, 1, 2}  # 3 steps, every one probed
    for r in rows:
        grad, weight, ratio = float(r["grad_norm"]), float(r["weight_norm"]), float(r["update_ratio"])
        if r["group"] in ("layer4", "head"):
            assert r["trainable"] == "1" and grad > 0
            assert ratio * weight == pytest.approx(0.05 * grad, rel=1e-4)  # ||dW|| = lr ||g|| for SGD
        else:
            assert r["trainable"] == "0" and grad == 0 and ratio == 0 and weight > 0
    acts = read_csv(tmp_path / "activations.csv")
    head = [r for r in acts if r["group"] == "head"]
    assert len(head) == 3 and all(sum(int(r[f"b{i}"]) for i in range(40)) == 8 * 2 for r in head)  # batch x classes
    assert (tmp_path / "diagnostics.png").is_file() and (tmp_path / "activations.png").is_file()


def test_diag_every_and_off(tmp_path):
    assert resolve_every(-1, 100) == 25 and resolve_every(-1, 3) == 1 and resolve_every(0, 100) == 0
    train(compose_cfg("diag_every=0", "epochs=1"), tmp_path)
    assert not (tmp_path / "diagnostics.csv").exists()
    with pytest.raises(UserError, match="diag_every must be"):
        resolve_every(-2, 10)


def test_training_is_the_same_bit_for_bit_with_diagnostics_on_or_off(tmp_path):
    """Probing every step (BatchNorm in train mode, AdamW, dropout) changes nothing the run computes."""
    plan = ["experiment=full", "epochs=2", "model.drop_rate=0.2"]
    on = train(compose_cfg(*plan, "diag_every=1"), tmp_path / "on")
    off = train(compose_cfg(*plan, "diag_every=0"), tmp_path / "off")
    a = torch.load(tmp_path / "on" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "off" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # BatchNorm statistics too
    assert on["final_val_acc"] == off["final_val_acc"]


def test_the_update_ratio_warning_names_the_group_and_an_lr():
    lines = ratio_warnings({"layer4": [0.05, 0.2], "layer3": [1e-3, 2e-3], "stem": [1e-7]},
                           {"layer4": 0.01, "layer3": 0.01, "stem": 1e-4}, epoch=2)
    assert set(lines) == {"layer4", "stem"}
    assert lines["layer4"] == ("group layer4: its updates were 1.0e-01 of its weights in epoch 2 (usually ~1e-3): its "
                               "LR 0.01 looks too high; try ++per_group.layer4.lr=0.0001")
    assert lines["stem"].endswith("its LR 0.0001 looks too low; try ++per_group.stem.lr=1")


def test_a_frozen_weight_that_changes_is_an_error_naming_it(tmp_path, monkeypatch):
    step = Trainer.step_accumulated

    def tampering(self, batches, s, **kw):
        out = step(self, batches, s, **kw)
        if s == 1:
            with torch.no_grad():
                self.model.layer1[0].conv1.weight.add_(1e-3)  # frozen under unfreeze=2
        return out
    monkeypatch.setattr(Trainer, "step_accumulated", tampering)
    with pytest.raises(UserError, match=r"freeze integrity: layer1.0.conv1.weight changed during epoch 0"):
        train(compose_cfg(*SGD, "epochs=2"), tmp_path)
    assert not (tmp_path / "checkpoints" / checkpoint.LAST).exists()  # never checkpointed


def test_a_resumed_run_continues_the_files_without_duplicates(tmp_path):
    straight = tmp_path / "straight"
    train(compose_cfg(*SGD, "epochs=2", "freeze=gradual"), straight)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(compose_cfg(*SGD, "epochs=2", "freeze=gradual"), run, stop_at_step=4)
    train(compose_cfg(*SGD, "epochs=2", "freeze=gradual", f"resume={run}"), run)
    for name in ("diagnostics.csv", "activations.csv"):
        assert read_csv(run / name) == read_csv(straight / name), name


def test_no_lr_advice_for_groups_that_train_adapters(tmp_path, caplog):
    """The ~1e-3 update ratio is a rule for pretrained weights; a LoRA B starts at zero (before: 'its LR
    looks too high' for adapter groups)."""
    import logging

    from helpers import SixGroupNet, make_cfg, make_trainer

    from finetune.engine.diagnostics import Diagnostics

    model = SixGroupNet()
    trainer = make_trainer(model, make_cfg(), 4)
    groups = trainer.groups
    groups[2].adapters.append(groups[2].param_names[0])  # b2 trains adapters
    diag = Diagnostics(model, groups, trainer.plan, tmp_path, 1, main=True)
    diag.start(0)
    rows = [{"grad_norm": 1.0, "weight_norm": 1.0, "update_ratio": 0.5} for _ in groups]
    diag.record(2, 0, [True] * len(groups), rows, [None] * len(groups))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        diag.end_epoch(0)
    diag.close()
    named = {r.getMessage().split(":")[0] for r in caplog.records}
    assert {"group stem", "group b1", "group b3"} <= named and "group b2" not in named
