"""The LR range test: every group keeps its ratio to the head (or one group sweeps alone), the run is
left bit for bit as it was, the suggestions find the fall of a known curve, and lr=auto trains exactly
as lr=<its suggestion> would."""

import json
import logging
import math

import pytest
import torch
from helpers import read_csv
from tiny_runs import (
    QUIET,
    TINY,
    compose_cfg,
    run_cli,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.loop import Run
from finetune.recipes import lr_find

FIND = ["lr_find.steps=30", "lr_find.start=1e-5", "lr_find.end=1"]


def state_of(run: Run) -> dict:
    return {"model": {k: v.clone() for k, v in run.model.state_dict().items()},
            "optimizer": str(run.optimizer.state_dict()), "ema": {k: v.clone() for k, v in run.trainer.ema.model.state_dict().items()},
            "grad": [p.requires_grad for p in run.model.parameters()], "rng": torch.get_rng_state(),
            "training": [m.training for m in run.model.modules()], "mask": run.trainer.mask}


def test_the_run_is_left_bit_for_bit_as_it_was_and_ratios_hold(tmp_path):
    # lp_ft: the body at 0.02 of the head; epoch 0 trains the head alone, so sweep epoch 1's state
    run = Run(compose_cfg("experiment=lp_ft", "ema_half_life=1", "model.drop_rate=0.2", *FIND), tmp_path)  # dropout draws RNG
    run.trainer.set_epoch(0)  # as fit() leaves it at the start of epoch 0
    before = state_of(run)
    result = lr_find.find(run, compose_cfg("experiment=lp_ft", *FIND, "lr_find.epoch=1").lr_find)
    after = state_of(run)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])  # BN stats too
    assert all(torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"])
    assert before["optimizer"] == after["optimizer"] and torch.equal(before["rng"], after["rng"])
    assert before["grad"] == after["grad"] and before["training"] == after["training"]
    assert before["mask"] == after["mask"]
    names = result["groups"]
    for lrs in result["group_lrs"]:  # read back from the optimizer at every step
        for name, lr in zip(names[:-1], lrs[:-1]):
            assert lr / lrs[-1] == pytest.approx(0.02), name
    assert result["lrs"][0] == pytest.approx(1e-5) and len(result["lrs"]) <= 30
    run.data.close()


def test_one_group_sweeps_while_the_others_keep_their_lrs(tmp_path):
    cfg = compose_cfg("experiment=lp_ft", *FIND, "lr_find.epoch=1", "lr_find.group=layer4")
    run = Run(cfg, tmp_path)
    result = lr_find.find(run, cfg.lr_find)
    layer4 = result["groups"].index("layer4")
    peaks = [g.lr for g in run.plan.groups]
    for swept, lrs in zip(result["lrs"], result["group_lrs"]):
        assert lrs[layer4] == pytest.approx(swept)
        assert [v for i, v in enumerate(lrs) if i != layer4] == [p for i, p in enumerate(peaks) if i != layer4]
    assert result["override"].startswith("++per_group.layer4.lr=")
    with pytest.raises(UserError, match="lr_find.group=layer4 is frozen in epoch 0"):
        lr_find.find(run, compose_cfg(*FIND, "lr_find.group=layer4", "experiment=lp_ft").lr_find)
    run.data.close()


def test_suggestions_on_a_known_curve():
    lrs = lr_find.sweep_lrs(1e-6, 1.0, 61)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(1e-3)  # even on a log scale
    # flat to 1e-4, falls to 1e-1 (fastest at 1e-2), then blows up
    x = [math.log10(lr) for lr in lrs]
    loss = [2.0 - 1.5 / (1 + math.exp(-3 * (v + 2))) + (10 * (v + 1) ** 2 if v > -1 else 0) for v in x]
    assert lrs[lr_find.steepest(lrs, loss)] == pytest.approx(1e-2, rel=0.3)
    valley = lrs[lr_find.valley(loss)]
    assert 1e-4 < valley < 1e-1  # inside the fall, short of its bottom
    smoother = lr_find.Smoother(0.9)
    assert [smoother.add(v) for v in (1.0, 1.0, 1.0)] == pytest.approx([1.0, 1.0, 1.0])  # debiased


def test_lr_auto_trains_exactly_as_lr_set_to_its_suggestion(tmp_path):
    auto = train(compose_cfg("lr=auto", "epochs=2", *FIND), tmp_path / "auto")
    chosen = auto["lr_auto"]["lr"]
    assert (tmp_path / "auto" / "lr_find.png").is_file() and len(read_csv(tmp_path / "auto" / "lr_find.csv")) > 5
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["lr_auto"]["lr"] == chosen
    fixed = train(compose_cfg(f"lr={chosen}", "epochs=2", *FIND), tmp_path / "fixed")
    a = torch.load(tmp_path / "auto" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "fixed" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert a["config"]["lr"] == chosen and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert auto["final_val_acc"] == fixed["final_val_acc"]


def test_lr_find_command_prints_the_override(capsys, tmp_path):
    code, err = run_cli(capsys, "lr-find", *TINY, *FIND, f"hydra.run.dir={tmp_path}", *QUIET)
    assert code == 0, err
    assert err[-2].startswith("finetune: suggested lr=") and "(valley; steepest descent at" in err[-2]
    assert err[-1].startswith("finetune: then: finetune train model=resnet18") and err[-1].endswith(
        err[-2].split()[2])
    assert (tmp_path / "lr_find.png").is_file() and (tmp_path / "lr_find.csv").is_file()
    # under the default, experiment=auto, the range test runs on the recipe the probe chose, as training would
    assert json.loads((tmp_path / "auto.json").read_text())["recipe"] in ("lp_ft", "freezeout")
    code, err = run_cli(capsys, "train", *TINY, "lr=fast", *QUIET, f"hydra.run.dir={tmp_path / 'x'}")
    assert code == 2 and err[-1] == "finetune: error: lr=fast: expected a finite number or auto (the LR finder's suggestion)"


def test_a_flat_loss_gives_no_suggestion_and_many_passes_over_few_images_warn(tmp_path, caplog):
    """Where the loss never moves (LRs far too small to change anything) there is no valley to read: the
    finder says so instead of suggesting an LR from noise; 30 steps over 24 images warn that the curve
    shows memorising."""
    cfg = compose_cfg("experiment=lp_ft", "lr_find.steps=30", "lr_find.start=1e-12", "lr_find.end=1e-10")
    run = Run(cfg, tmp_path)
    with caplog.at_level(logging.WARNING, logger="finetune"), \
            pytest.raises(UserError, match=r"lr_find: the loss did not fall anywhere between lr .* no LR to suggest"):
        lr_find.find(run, cfg.lr_find)
    assert "go over the 24 train images 10 times" in caplog.text
    run.data.close()
