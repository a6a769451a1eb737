"""Freezing as a schedule both ways: FreezeOut freezes groups bottom up, each annealed to zero by its
freeze epoch; a milestone may lower the number of trainable groups (gradual freezing)."""

import math

import pytest
import torch
from helpers import read_csv
from tiny_runs import (
    compose_cfg,
)

from finetune.commands.train import train
from finetune.core.freeze import freezeout_ends
from finetune.core.plan import build_plan
from finetune.engine import checkpoint

RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def test_freezeout_plan_freezes_bottom_up_and_each_group_anneals_by_then():
    assert freezeout_ends(0.5, 6, 10) == [5, 6, 7, 8, 9, 10]
    cfg = compose_cfg("experiment=freezeout", "epochs=10")
    plan = build_plan(cfg, RESNET, 6)
    assert plan.counts == (6, 6, 6, 6, 6, 5, 4, 3, 2, 1)
    assert plan.trainable(5) == [False, True, True, True, True, True]
    for g, end in enumerate(freezeout_ends(0.5, 6, 10)):
        last = end * 6 - 1  # the group's last step: its cosine's last point, then 0 while frozen
        assert plan.lr(g, last) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * last / (end * 6))))
        if end < 10:
            assert plan.lr(g, end * 6) == 0.0
    assert plan.lr(5, 30) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 30 / 60)))  # head: whole run


def test_a_freezeout_run_drops_groups_from_the_backward_and_keeps_them_bit_equal(tmp_path):
    summary = train(compose_cfg("experiment=freezeout", "epochs=4", "freeze.t0=0.5"), tmp_path / "run")
    trainable = summary["trainable_params_per_epoch"]
    assert trainable[0] == trainable[1] > trainable[2] > trainable[3]  # stem+layer1.. freeze from epoch 2
    trace = read_csv(tmp_path / "run" / "lr_trace.csv")
    stem = [r for r in trace if r["group"] == "stem"]
    assert [r["trainable"] for r in stem] == ["1"] * 6 + ["0"] * 6  # 3 steps an epoch, frozen after epoch 1
    assert float(stem[-1]["lr"]) == 0.0


def test_a_milestone_may_freeze_groups_again(tmp_path):
    from finetune.engine.signals import Interrupted

    cfg = ["experiment=none", "freeze.kind=milestones", "++freeze.milestones={1: 2}", "epochs=3"]
    run = tmp_path / "run"
    with pytest.raises(Interrupted):  # all groups train in epoch 0, the last 2 from epoch 1 on
        train(compose_cfg(*cfg), run, stop_at_step=3)
    after_epoch0 = torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)["model"]
    summary = train(compose_cfg(*cfg, f"resume={run}"), run)
    trainable = summary["trainable_params_per_epoch"]
    assert trainable[0] > trainable[1] == trainable[2]
    final = torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)["model"]
    assert torch.equal(after_epoch0["layer1.0.conv1.weight"], final["layer1.0.conv1.weight"])  # frozen again
    assert not torch.equal(after_epoch0["fc.weight"], final["fc.weight"])


def test_lr_spread_ramp_grows_the_spread_from_uniform(tmp_path):
    # lp_ft's body at 0.02 of the head, reached after 2 epochs of 3 steps; constant schedule to see it bare
    cfg = compose_cfg("experiment=discriminative", "lr_spread.kind=body", "lr_spread.ratio=0.01", "lr=0.01",
                      "lr_spread.ramp=2", "schedule=constant", "epochs=3")
    plan = build_plan(cfg, RESNET, 3)
    assert plan.lr(5, 0) == plan.lr(5, 8) == pytest.approx(0.01)  # the head: lr throughout
    assert plan.lr(0, 0) == pytest.approx(0.01)  # uniform at the start
    assert plan.lr(0, 3) == pytest.approx(0.01 * 0.01 ** 0.5)  # half-way, log-linear: 1e-3
    assert plan.lr(0, 6) == plan.lr(0, 8) == pytest.approx(1e-4)  # the target from the ramp's end
    summary = train(cfg, tmp_path / "run")
    stem = [float(r["lr"]) for r in read_csv(tmp_path / "run" / "lr_trace.csv") if r["group"] == "stem"]
    assert stem[0] == pytest.approx(0.01) and stem[3] == pytest.approx(1e-3) and stem[-1] == pytest.approx(1e-4)
    assert summary["status"] == "completed"
