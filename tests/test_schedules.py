"""The pure schedules against torch's own schedulers (independent implementations) and the papers."""

import math

import pytest
import torch

from finetune.base.errors import UserError
from finetune.core import schedules
from finetune.core.schedules import Schedule, lr_factor, momentum_at

TOTAL = 40
PEAK = 0.1


def torch_trace(make_scheduler, steps=TOTAL, momentum=False):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=PEAK, momentum=0.9)
    sched = make_scheduler(opt)
    lrs, moms = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return moms if momentum else lrs


def ours(s: Schedule, total=TOTAL):
    return [PEAK * lr_factor(s, t, total) for t in range(total)]


@pytest.mark.parametrize(
    "schedule, make",
    [
        (Schedule("constant"), lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)),
        (Schedule("step", step_size=7, gamma=0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)),
        (Schedule("multistep", milestones=(10, 25), gamma=0.1),
         lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [10, 25], 0.1)),
        (Schedule("exponential", gamma=0.93), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.93)),
        (Schedule("cosine"), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, TOTAL)),
        (Schedule("cosine", min_lr_ratio=0.1),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, TOTAL, eta_min=PEAK * 0.1)),
        (Schedule("sgdr", t0=5, t_mult=2.0),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2)),
        (Schedule("one_cycle"),
         lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=PEAK, total_steps=TOTAL, pct_start=0.25,
                                                       div_factor=25, final_div_factor=1e5)),
    ],
    ids=lambda v: v.kind if isinstance(v, Schedule) else "",
)
def test_schedule_matches_torch_scheduler(schedule, make):
    assert ours(schedule) == pytest.approx(torch_trace(make), rel=1e-9, abs=1e-12)


def test_one_cycle_momentum_matches_torch():
    ref = torch_trace(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=PEAK, total_steps=TOTAL, pct_start=0.25, base_momentum=0.85, max_momentum=0.95),
        momentum=True)
    got = [momentum_at(Schedule("one_cycle"), t, TOTAL) for t in range(TOTAL)]
    assert got == pytest.approx(ref, rel=1e-9)
    assert momentum_at(Schedule("cosine"), 3, TOTAL) is None


def test_one_cycle_fastai_shape():
    lrs = ours(Schedule("one_cycle"))
    assert lrs[0] == pytest.approx(PEAK / 25)
    assert max(lrs) == pytest.approx(PEAK)
    assert lrs[-1] == pytest.approx(PEAK / 25 / 1e5)
    assert lrs.index(max(lrs)) == 9  # pct_start 0.25 of 40 steps


def test_slanted_triangular_follows_ulmfit_formula():
    s = Schedule("slanted_triangular", cut_frac=0.1, ratio=32)
    total = 100
    cut = 10
    for t in (0, 5, 10, 11, 50, 99):
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
        assert lr_factor(s, t, total) == pytest.approx((1 + p * 31) / 32)
    assert lr_factor(s, 10, total) == 1.0
    assert min(lr_factor(s, t, 117) for t in range(117)) >= 1 / 32  # never below lr/ratio


def test_sgdr_restart_decay_and_longer_cycles():
    s = Schedule("sgdr", t0=4, t_mult=2.0, restart_decay=0.5)
    f = [lr_factor(s, t, 28) for t in range(28)]
    assert f[0] == 1.0 and f[4] == 0.5 and f[12] == 0.25  # restarts at 4 and 4 + 8
    assert f[3] < f[4] and f[11] < f[12]


def test_warmup_then_schedule():
    s = Schedule("cosine", warmup=4)
    f = [lr_factor(s, t, 24) for t in range(24)]
    assert f[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert f[4] == 1.0  # cosine over the remaining 20 steps starts at the peak
    assert f[4:] == pytest.approx([lr_factor(Schedule("cosine"), t, 20) for t in range(20)])


def test_from_config_converts_epochs_to_steps():
    s = schedules.from_config({"kind": "multistep", "milestones": [2, 3], "warmup": 0.5, "gamma": 0.1}, 10)
    assert s.milestones == (20, 30) and s.warmup == 5
    e = schedules.from_config({"kind": "exponential", "gamma": 0.5}, 4)
    assert lr_factor(e, 4, 100) == pytest.approx(0.5)  # gamma is per epoch


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(UserError, match=r"schedule.kind: unknown schedule kind 'cosin'"):
        schedules.from_config({"kind": "cosin"}, 10)


def test_schedule_is_pure():
    s = Schedule("one_cycle")
    assert [lr_factor(s, t, 50) for t in range(50)] == [lr_factor(s, t, 50) for t in range(50)]
    assert not math.isnan(lr_factor(s, 0, 1))


@pytest.mark.parametrize("kind, ramp", [("one_cycle", "pct_start"), ("slanted_triangular", "cut_frac")])
def test_warmup_on_a_kind_that_ramps_up_by_itself_is_refused(kind, ramp):
    with pytest.raises(UserError, match=rf"^per_group.head.schedule.warmup: {kind} ramps up by itself "
                                        rf"\(per_group.head.schedule.{ramp}\); set per_group.head.schedule.warmup=0$"):
        schedules.from_config({"kind": kind, "warmup": 0.5}, 10, key="per_group.head.schedule")
    assert schedules.from_config({"kind": kind, "warmup": 0}, 10).warmup == 0
