"""Freezing, per-group LRs and schedules observed in real training steps (CPU, tiny)."""

import pytest
import torch
from helpers import SixGroupNet, batches, make_cfg, make_trainer

from finetune.base.errors import UserError
from finetune.core import freeze
from finetune.core.plan import build_plan
from finetune.core.schedules import Schedule, lr_factor
from finetune.engine.step import trace_rows

SPE = 4  # steps per epoch


def run(trainer, epochs, data):
    """The runner's loop, reduced: returns the LR trace read back from the optimizer each step."""
    trace, step = [], 0
    for epoch in range(epochs):
        trainer.set_epoch(epoch)
        freeze.set_train_mode(trainer.model, trainer.frozen_norms)
        for x, y in data:
            trainer.step(x, y, step)
            trace.extend(trace_rows(trainer.plan, trainer.optimizer, step, epoch, trainer.mask))
            step += 1
    return trace


KINDS = {
    "constant": {},
    "step": {"step_size": 1.0, "gamma": 0.5},
    "multistep": {"milestones": [1.0, 2.0], "gamma": 0.3},
    "exponential": {"gamma": 0.5},
    "linear": {"min_lr_ratio": 0.1},
    "cosine": {"warmup": 0.5},
    "one_cycle": {},
    "sgdr": {"t0": 1.0, "t_mult": 2.0, "restart_decay": 0.8},
    "slanted_triangular": {},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_optimizer_lr_equals_plan_every_step(kind):
    torch.manual_seed(0)
    cfg = make_cfg(epochs=3, lr=0.01, **{"schedule.kind": kind},
                   **{f"schedule.{k}": v for k, v in KINDS[kind].items()})
    cfg.lr_spread.kind = "geometric"
    trainer = make_trainer(SixGroupNet(), cfg, SPE)
    trace = run(trainer, 3, batches(SPE))
    assert len(trace) == 3 * SPE * 6
    for row in trace:
        g = [gp.name for gp in trainer.plan.groups].index(row["group"])
        assert row["lr"] == trainer.plan.lr(g, row["step"])
    # and the plan itself is the geometric spread times the pure schedule
    lrs = [0.0001 * (100 ** (i / 5)) for i in range(6)]
    for row in trace:
        g = [gp.name for gp in trainer.plan.groups].index(row["group"])
        s = trainer.plan.groups[g].schedule
        assert row["lr"] == pytest.approx(lrs[g] * lr_factor(s, row["step"], 3 * SPE), rel=1e-12)


def test_gradual_unfreezing_trace_and_per_group_schedule_start():
    cfg = make_cfg(epochs=5, lr=0.01, unfreeze=4, **{"freeze.kind": "gradual", "schedule.kind": "cosine"})
    trainer = make_trainer(SixGroupNet(), cfg, SPE)
    trace = run(trainer, 5, batches(SPE))
    plan = trainer.plan
    assert plan.counts == (1, 2, 3, 4, 4)  # the head first, one more per epoch, capped at unfreeze=4
    assert [gp.first_epoch for gp in plan.groups] == [None, None, 3, 2, 1, 0]
    for row in trace:
        g = [gp.name for gp in plan.groups].index(row["group"])
        assert row["trainable"] == int(plan.groups[g].first_epoch is not None and row["epoch"] >= plan.groups[g].first_epoch)
        assert row["lr"] == plan.lr(g, row["step"])
    # b2 unfreezes at epoch 3 and its cosine starts there, at the peak, spanning the last 2 epochs
    b2 = [r for r in trace if r["group"] == "b2"]
    assert b2[3 * SPE]["lr"] == pytest.approx(0.01)
    assert b2[5 * SPE - 1]["lr"] == pytest.approx(0.01 * lr_factor(Schedule("cosine"), 2 * SPE - 1, 2 * SPE))
    assert b2[SPE - 1]["lr"] == pytest.approx(0.01)  # flat at its start value while frozen
    head = [r for r in trace if r["group"] == "head"]
    assert head[3 * SPE]["lr"] < 0.01  # the head's cosine spans all 5 epochs


def params_of(model, group):
    named = dict(model.named_parameters())
    return {n: named[n].detach().clone() for n in group.param_names}


def test_frozen_groups_bit_identical_and_bn_stats_fixed():
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=2, lr=0.05, unfreeze=5, **{"optimizer.weight_decay": 0.1})
    trainer = make_trainer(model, cfg, SPE)
    stem = trainer.groups[0]
    before = params_of(model, stem)
    bn = model.stem[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in before}
    run(trainer, 2, batches(SPE))
    for n, p in params_of(model, stem).items():
        assert torch.equal(p, before[n]), n
        assert dict(model.named_parameters())[n].grad is None
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    now = dict(model.named_parameters())
    assert all(not torch.equal(now[n], p) for n, p in others.items())
    assert not torch.equal(model.b1[1].running_mean, torch.zeros(8))  # trainable BN stats moved


def test_batchnorm_without_affine_parameters_in_a_frozen_group_keeps_its_statistics():
    """BatchNorm(affine=False) has no parameter to tell its group: its buffers' names place it."""
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),  # 0, 1: the body
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),  # 3, 4: trains
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    spec = {"body": [r"0\.", r"1\."], "top": [r"3\.", r"4\."], "head": r"8\."}  # stage prefixes, as the zoo's
    trainer = make_trainer(model, make_cfg(epochs=1, unfreeze=2), SPE, spec)
    frozen_bn, live_bn = model[1], model[4]
    before = frozen_bn.running_mean.clone(), frozen_bn.num_batches_tracked.clone()
    run(trainer, 1, batches(SPE))
    assert torch.equal(frozen_bn.running_mean, before[0]) and torch.equal(frozen_bn.num_batches_tracked, before[1])
    assert int(live_bn.num_batches_tracked) == SPE  # its group trains: batch statistics, updated


def test_gradual_group_changes_only_after_its_milestone():
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=3, lr=0.05, unfreeze=1, **{"freeze.kind": "milestones", "freeze.milestones": {2: 3}})
    trainer = make_trainer(model, cfg, SPE)
    b3 = trainer.groups[3]
    start = params_of(model, b3)
    data = batches(SPE)
    step = 0
    for epoch in range(3):
        trainer.set_epoch(epoch)
        freeze.set_train_mode(model, trainer.frozen_norms)
        for x, y in data:
            trainer.step(x, y, step)
            step += 1
        changed = any(not torch.equal(p, start[n]) for n, p in params_of(model, b3).items())
        assert changed == (epoch >= 2), epoch


def test_train_bn_trains_bn_affine_in_frozen_groups():
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=1, lr=0.05, unfreeze=1, **{"freeze.train_bn": True})
    trainer = make_trainer(model, cfg, SPE)
    conv_w, bn_w = model.stem[0].weight.detach().clone(), model.stem[1].weight.detach().clone()
    run(trainer, 1, batches(SPE))
    assert torch.equal(model.stem[0].weight, conv_w)
    assert not torch.equal(model.stem[1].weight, bn_w)


def test_bn_eval_keeps_every_bn_stat_while_trainable_bn_affine_learns():
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=1, lr=0.05, unfreeze="all", **{"freeze.bn_eval": True})
    trainer = make_trainer(model, cfg, SPE)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) >= 5
    stats = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    affine = [m.weight.detach().clone() for m in bns]
    run(trainer, 1, batches(SPE))
    for m, (mean, var, count), w in zip(bns, stats, affine):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert torch.equal(m.num_batches_tracked, count)
        assert not m.training
        assert not torch.equal(m.weight, w)  # the group trains; only the statistics stay pretrained
    assert model.training  # everything else (dropout) is in train mode


def test_one_backward_per_step_with_six_schedules(monkeypatch):
    kinds = ["constant", "cosine", "one_cycle", "sgdr", "slanted_triangular", "step"]
    cfg = make_cfg(epochs=1, lr=0.01)
    cfg.per_group = {name: {"schedule": {"kind": k}, "lr": 0.001 * (i + 1)}
                     for i, (name, k) in enumerate(zip(["stem", "b1", "b2", "b3", "b4", "head"], kinds))}
    model = SixGroupNet()
    trainer = make_trainer(model, cfg, SPE)
    assert len({gp.schedule.kind for gp in trainer.plan.groups}) == 6
    calls = {"backward": 0, "hooks": 0}
    real = torch.autograd.backward

    def counting(*a, **k):
        calls["backward"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "backward", counting)
    model.stem[0].weight.register_hook(lambda g: calls.__setitem__("hooks", calls["hooks"] + 1))
    run(trainer, 1, batches(SPE))
    assert calls == {"backward": SPE, "hooks": SPE}
    assert len({id(pg) for pg in trainer.optimizer.param_groups}) == len(trainer.optimizer.param_groups)
    assert sorted({pg["group"] for pg in trainer.optimizer.param_groups}) == list(range(6))


def test_all_groups_in_optimizer_from_the_start_and_no_decay_on_bias_and_norm():
    model = SixGroupNet()
    cfg = make_cfg(epochs=2, unfreeze=1, **{"optimizer.weight_decay": 0.05})
    trainer = make_trainer(model, cfg, SPE)
    in_opt = {id(p) for pg in trainer.optimizer.param_groups for p in pg["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    for pg in trainer.optimizer.param_groups:
        expected = 0.0 if all(p.ndim <= 1 for p in pg["params"]) else 0.05
        assert pg["weight_decay"] == expected


def test_discriminative_lr_rules():
    names = ["a", "b", "c", "d"]
    def lrs(**kw):
        plan = build_plan(make_cfg(epochs=1, lr=0.01, **{"schedule.kind": "constant"}, **kw), names, 2)
        return [gp.lr for gp in plan.groups]
    assert lrs(**{"lr_spread.kind": "geometric", "lr_spread.lo": 1e-5}) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert lrs(**{"lr_spread.kind": "ulmfit"}) == pytest.approx([0.01 / 2.6**3, 0.01 / 2.6**2, 0.01 / 2.6, 0.01])
    assert lrs(**{"lr_spread.kind": "layer_decay", "lr_spread.decay": 0.5}) == pytest.approx([0.00125, 0.0025, 0.005, 0.01])
    assert lrs(head_lr=0.1) == pytest.approx([0.01, 0.01, 0.01, 0.1])
    cfg = make_cfg(epochs=1, lr=0.01)
    cfg.per_group = {"b": {"lr": 0.5, "weight_decay": 0.0}}
    plan = build_plan(cfg, names, 2)
    assert [gp.lr for gp in plan.groups] == [0.01, 0.5, 0.01, 0.01]
    assert plan.groups[1].weight_decay == 0.0


@pytest.mark.parametrize("overrides, message", [
    ({"unfreeze": 7}, r"unfreeze=7 is out of range: the model has 6 layer groups"),
    ({"unfreeze": 0}, r"unfreeze=0 is out of range"),
    ({"unfreeze": "some"}, r"unfreeze: expected an integer or 'all'"),
    ({"lr": -0.1}, r"lr must be a finite number > 0, got -0.1"),
    ({"lr": 0.0}, r"lr must be a finite number > 0"),
    ({"schedule.kind": "cosine", "schedule.warmup": 3.0}, r"schedule.warmup \(3.0 epochs\) is not shorter"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        build_plan(make_cfg(epochs=3, **overrides), ["stem", "b1", "b2", "b3", "b4", "head"], 4)


@pytest.mark.parametrize("override, choices", [
    ("schedule.kind=cosinus", "constant, step, multistep, exponential, linear, cosine, one_cycle, sgdr"),
    ("freeze.kind=sometimes", "fixed, milestones, gradual, fine_tune, freezeout"),
    ("lr_spread.kind=wide", "none, body, geometric, ulmfit, layer_decay"),
    ("optimizer.name=lamb", "sgd, adamw, adam, rmsprop"),
    ("precision=fp8", "auto, fp32, bf16, fp16"),
    ("best_metric=val_f1", "auto, val_acc, val_loss, val_map, val_f1_macro, val_f1_micro, train_acc, train_loss"),
    ("logger.mode=sometimes", "online, offline, disabled"),
    ("head_init=zeros", "none, lbfgs"),
    ("cache_dtype=int8", "fp32, fp16, bf16"),
    ("inspect.format=yaml", "table, json"),
])
def test_a_wrong_choice_is_refused_when_the_config_is_composed(override, choices):
    """Every key with a fixed list of choices is an enum of the schema: the command line's check (before
    Hydra composes) names the key and the choices, and composing refuses it too."""
    from omegaconf.errors import ValidationError

    from finetune.config import overrides

    with pytest.raises(UserError, match=f"{override.split('=')[0]}.*{choices}"):
        overrides.check([override])
    key, value = override.split("=")
    with pytest.raises(ValidationError):
        make_cfg(**{key: value})


def test_per_group_errors():
    names = ["stem", "head"]
    cfg = make_cfg(epochs=2)
    cfg.per_group = {"neck": {"lr": 0.1}}
    with pytest.raises(UserError, match=r"per_group.neck: no layer group named 'neck'"):
        build_plan(cfg, names, 2)
    cfg.per_group = {"head": {"schedule": {"kind": "cosine", "warmup": 2.0}}}
    with pytest.raises(UserError, match=r"per_group.head.schedule.warmup"):
        build_plan(cfg, names, 2)
    cfg.per_group = {"head": {"schedule": {"kind": "cosinus"}}}  # per-group schedules are plain text
    with pytest.raises(UserError, match=r"per_group.head.schedule.kind: unknown schedule kind 'cosinus'"):
        build_plan(cfg, names, 2)


def test_resnet18_unfreeze_5_keeps_stem_and_its_bn_stats_bit_identical():
    from finetune.models.build import build_model

    torch.manual_seed(0)
    bundle = build_model(make_cfg(**{"model.name": "resnet18", "model.source": "torchvision",
                                     "model.weights": None}).model, num_classes=3)
    model = bundle.model
    cfg = make_cfg(epochs=1, lr=0.01, unfreeze=5, **{"schedule.kind": "constant"})
    trainer = make_trainer(model, cfg, 3, spec=bundle.group_spec)
    assert [g.name for g in trainer.groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    stem = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("conv1", "bn1"))}
    assert sorted(stem) == ["bn1.bias", "bn1.weight", "conv1.weight"]
    stats = {k: v.clone() for k, v in model.bn1.state_dict().items()}
    rest = {n: p.detach().clone() for n, p in model.named_parameters() if n not in stem}
    run(trainer, 1, batches(3, size=4, image=32))
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in stem.items())
    assert all(torch.equal(v, model.bn1.state_dict()[k]) for k, v in stats.items())
    assert all(not torch.equal(named[n], p) for n, p in rest.items() if n.endswith("weight"))
    assert model.conv1.weight.grad is None


def test_train_loss_is_measured_like_val_loss_under_label_smoothing():
    """The step optimises the smoothed loss but reports plain cross-entropy, as `evaluate` does."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = SixGroupNet()
    trainer = make_trainer(model, make_cfg(label_smoothing=0.2, unfreeze="all"), steps_per_epoch=2)
    trainer.set_epoch(0)
    x, y = batches(1)[0]
    with torch.no_grad():
        logits = copy.deepcopy(model)(x)  # the same weights and mode, before the step
    loss, _ = trainer.step(x, y, 0)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.2).item(), rel=1e-3)
