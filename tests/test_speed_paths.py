"""The GPU-path options of Trainer, exercised on the CPU: torch.compile across an unfreeze,
channels_last, bf16 autocast, fp16 + GradScaler, and the fairness of the speed benchmark's plain loop."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import SixGroupNet, batches, make_cfg, make_trainer

from finetune.core import freeze
from finetune.engine.step import Trainer

SPE = 2  # steps per epoch
ROOT = Path(__file__).resolve().parents[1]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def group_names(trainer, index):
    return trainer.groups[index].param_names


def unfreeze_run(backend: str | None, epochs: int = 2):
    """Head only in epoch 0, the last 3 groups from epoch 1; returns the trainer, the parameters
    before, after epoch 0 and at the end, and whether grads existed right after each backward."""
    torch.manual_seed(0)
    model = SixGroupNet()
    # SGD: Adam's first steps are ~lr * sign(grad) and would amplify rounding differences
    cfg = make_cfg(epochs=epochs, lr=0.05, unfreeze=1, compile=backend is not None,
                   **{"freeze.kind": "milestones", "freeze.milestones": {1: 3}, "schedule.kind": "constant",
                      "optimizer.name": "sgd"})
    trainer = make_trainer(model, cfg, SPE)
    if backend is not None:
        trainer.compile_backend = backend
    got_grad = {}  # (epoch, param name) -> a gradient arrived
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: got_grad.__setitem__((epoch, name), True))
    states, forwards, step = [snapshot(model)], [], 0
    for epoch in range(epochs):
        trainer.set_epoch(epoch)
        forwards.append(trainer.forward)
        freeze.set_train_mode(model, trainer.frozen_norms)
        for x, y in batches(SPE):
            trainer.step(x, y, step)
            step += 1
        states.append(snapshot(model))
    return trainer, states, got_grad, forwards


def check_unfreeze(trainer, states, got_grad):
    start, after0, end = states
    head, b4, b3 = (group_names(trainer, i) for i in (5, 4, 3))
    frozen_always = [n for i in range(3) for n in group_names(trainer, i)]
    # epoch 0: only the head trains; everything else is bit-identical and got no gradient
    for n in head:
        assert not torch.equal(after0[n], start[n]) and got_grad.get((0, n)), n
    for n in b4 + b3 + frozen_always:
        assert torch.equal(after0[n], start[n]) and (0, n) not in got_grad, n
    # epoch 1: the newly trainable groups get gradients and change, the rest stays bit-identical
    for n in b4 + b3:
        assert got_grad.get((1, n)) and not torch.equal(end[n], after0[n]), n
    for n in frozen_always:
        assert torch.equal(end[n], start[n]) and (1, n) not in got_grad, n
        assert dict(trainer.model.named_parameters())[n].grad is None


def test_compile_stays_correct_across_an_unfreeze():
    # aot_eager runs AOTAutograd, the part that bakes the requires_grad pattern into the compiled
    # backward, without inductor's slow C++ build; test_compile_inductor_... covers the real backend
    trainer, states, got_grad, forwards = unfreeze_run("aot_eager")
    check_unfreeze(trainer, states, got_grad)
    assert forwards[0] is not forwards[1] and forwards[1] is not trainer.model  # recompiled on the change
    # and it trains exactly like eager mode
    _, eager_states, _, _ = unfreeze_run(None)
    for n, p in eager_states[-1].items():
        assert torch.allclose(states[-1][n], p, rtol=1e-4, atol=1e-6), n


def test_compile_keeps_the_graph_when_the_freeze_state_does_not_change():
    trainer, *_ = unfreeze_run("aot_eager", epochs=1)
    first = trainer.forward
    assert trainer.set_epoch(0) is False and trainer.forward is first


def test_compile_gradual_unfreezing_never_hits_dynamo_recompile_limit():
    """Each freeze state adds a train and an eval graph; without a fresh cache per state, gradual
    unfreezing of 6 groups (12 graphs) would pass dynamo's limit (8) and silently run eagerly."""
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=6, lr=0.05, unfreeze="all", compile=True,
                   **{"freeze.kind": "gradual", "schedule.kind": "constant", "optimizer.name": "sgd"})
    trainer = make_trainer(model, cfg, 1)
    trainer.compile_backend = "aot_eager"
    start = snapshot(model)
    x, y = batches(1)[0]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for epoch in range(6):
            assert trainer.set_epoch(epoch)
            freeze.set_train_mode(model, trainer.frozen_norms)
            trainer.step(x, y, epoch)
            trainer.evaluate([(x, y)])
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n.endswith("weight"))


@pytest.mark.slow
def test_compile_inductor_stays_correct_across_an_unfreeze():
    trainer, states, got_grad, _ = unfreeze_run("inductor")
    assert trainer.compile_backend == "inductor"
    check_unfreeze(trainer, states, got_grad)


def test_channels_last_converts_model_and_inputs_and_trains_the_same():
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = SixGroupNet()
        cfg = make_cfg(epochs=1, lr=0.05, **{"schedule.kind": "constant", "optimizer.name": "sgd"})
        trainer = make_trainer(model, cfg, SPE)
        trainer = Trainer(model, trainer.groups, trainer.plan, trainer.optimizer, torch.device("cpu"),
                          channels_last=channels_last)
        assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        trainer.set_epoch(0)
        freeze.set_train_mode(model, trainer.frozen_norms)
        for step, (x, y) in enumerate(batches(SPE)):
            x, y = trainer.to_device(x, y)
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
            trainer.step(x, y, step)
        results.append(snapshot(model))
    for n, p in results[0].items():
        assert torch.allclose(results[1][n], p, rtol=1e-4, atol=1e-6), n


def amp_trainer(dtype):
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=1, lr=0.05, **{"schedule.kind": "constant"})
    base = make_trainer(model, cfg, SPE)
    trainer = Trainer(model, base.groups, base.plan, base.optimizer, torch.device("cpu"), dtype)
    trainer.set_epoch(0)
    freeze.set_train_mode(model, trainer.frozen_norms)
    return trainer


def test_bf16_autocast_trains_fp32_weights_without_a_scaler():
    trainer = amp_trainer(torch.bfloat16)
    assert not trainer.scaler.is_enabled()
    before = snapshot(trainer.model)
    seen = []
    trainer.model.head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss, correct = trainer.step(*batches(1)[0], 0)
    assert seen == [torch.bfloat16]  # the forward ran in bf16 ...
    assert torch.isfinite(loss) and 0 <= int(correct) <= 8
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # ... the weights stay fp32
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n.endswith("weight"))


def test_fp16_uses_the_grad_scaler_and_steps():
    trainer = amp_trainer(torch.float16)
    assert trainer.scaler.is_enabled()
    before = snapshot(trainer.model)
    for step, (x, y) in enumerate(batches(3)):
        trainer.step(x, y, step)
    assert trainer.scaler.get_scale() > 0
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n.endswith("weight"))


def test_grad_scaler_step_without_any_gradient_does_not_fail():
    # GradScaler.step asserts ("No inf checks were recorded") when no parameter got a gradient
    trainer = amp_trainer(torch.float16)
    for p in trainer.model.parameters():  # drop every gradient as soon as it is accumulated
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    before = snapshot(trainer.model)
    loss, _ = trainer.step(*batches(1)[0], 0)
    assert torch.isfinite(loss)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_grad_clip_with_frozen_groups_clips_the_trainable_norm():
    torch.manual_seed(0)
    model = SixGroupNet()
    cfg = make_cfg(epochs=1, lr=0.05, unfreeze=2, grad_clip=1e-3, **{"schedule.kind": "constant"})
    trainer = make_trainer(model, cfg, SPE)
    trainer.grad_clip = cfg.grad_clip
    trainer.set_epoch(0)
    norms = []
    real_step = trainer.optimizer.step

    def recording_step(*a, **k):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return real_step(*a, **k)

    trainer.optimizer.step = recording_step
    trainer.step(*batches(1)[0], 0)
    assert norms and norms[0] == pytest.approx(1e-3, rel=1e-4)
    assert model.stem[0].weight.grad is None


def test_lrs_are_set_on_the_optimizer_after_load_state_dict():
    # load_state_dict replaces the optimizer's param-group dicts: the step must write to the new ones
    torch.manual_seed(0)
    cfg = make_cfg(epochs=2, lr=0.01, **{"schedule.kind": "cosine"})
    trainer = make_trainer(SixGroupNet(), cfg, SPE)
    trainer.set_epoch(0)
    data = batches(SPE)
    trainer.step(*data[0], 0)
    trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())
    trainer.step(*data[1], 3)
    for pg in trainer.optimizer.param_groups:
        assert pg["lr"] == trainer.plan.lr(pg["group"], 3)


# ------------------------------------------------------------------------------ the speed benchmark


def load_bench():
    if "bench_speed" not in sys.modules:  # dataclasses resolve annotations through sys.modules
        spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "scripts" / "bench_speed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_speed"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_speed"]


def test_bench_plain_loop_computes_exactly_what_trainer_step_computes():
    """The benchmark is only fair if both sides do the same work: with a constant schedule, one
    Trainer.step and one plain step from the same state give bit-identical parameters."""
    bench = load_bench()
    results = []
    for side in ("finetune", "plain"):
        torch.manual_seed(0)
        model = SixGroupNet()
        cfg = make_cfg(epochs=1, lr=0.05, unfreeze=4, **{"schedule.kind": "constant"})
        trainer = make_trainer(model, cfg, SPE)
        trainer.set_epoch(0)
        freeze.set_train_mode(model, trainer.frozen_norms)
        settings = bench.Settings("x", 8, 16, 5, 1, 0, 0.0, 5, None, 1, "fp32", False)
        plain = bench.plain_loop(trainer, cfg, settings, optimizer="trainable")
        for step, (x, y) in enumerate(batches(2)):
            trainer.step(x, y, step) if side == "finetune" else plain.step(x, y)
        results.append(snapshot(model))
    assert all(torch.equal(results[0][n], p) for n, p in results[1].items())


def test_bench_memory_probes_measure_real_bytes():
    bench = load_bench()
    peak = bench.cpu_peak_bytes(lambda: torch.ones(1 << 20).sum())  # a 4 MiB temporary
    assert 4 << 20 <= peak < 5 << 20
    torch.manual_seed(0)
    saved = {}
    for unfreeze in (6, 1):
        trainer = make_trainer(SixGroupNet(), make_cfg(epochs=1, unfreeze=unfreeze), SPE)
        trainer.set_epoch(0)
        freeze.set_train_mode(trainer.model, trainer.frozen_norms)
        saved[unfreeze] = bench.activation_bytes(trainer, batches(1)[0][0])
    # head only: autograd keeps just the pooled features (8 x 16 floats) for the head's backward
    assert saved[1] == 8 * 16 * 4 and saved[6] > 100 * saved[1]
