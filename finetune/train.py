"""The runner: builds everything from the config, then one thin loop that asks the plan what to do.

`Trainer.step` is the whole per-step work (set LRs from the plan, forward under autocast, ONE backward,
optimizer step) so benchmarks time exactly what training runs. `train(cfg, out_dir)` adds data,
evaluation, progress, checkpoints, resume and the run directory's reports.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from finetune import checkpoint, freeze, report
from finetune.ema import WeightEMA, decay_for
from finetune.errors import UserError
from finetune.groups import LayerGroup, build_groups
from finetune.optim import build_optimizer, layer_depths, param_groups
from finetune.plan import Plan, apply, build_plan
from finetune.plan import warnings as plan_warnings

log = logging.getLogger("finetune")


class Interrupted(Exception):
    """The run stopped early (SIGINT/SIGTERM, or `stop_at_step`) after writing a checkpoint.

    `reason` says why and where; `out_dir` is what `resume=` takes to continue; `signum` is the signal
    (None for `stop_at_step`), so a CLI can exit with 128 + signum."""

    def __init__(self, reason: str, out_dir: Path, signum: int | None):
        super().__init__(f"{reason}. Resume with: finetune train resume={out_dir} <the same overrides>")
        self.reason, self.out_dir, self.signum = reason, out_dir, signum


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the message names the step and every group's LR."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is available (use device=auto or cpu)")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """None: fp32. bf16 autocast where supported, fp16 (with GradScaler) otherwise; fp32 on CPU."""
    if name == "fp32":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise UserError("precision=fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        return torch.float16
    raise UserError(f"precision: unknown value '{name}'; choose auto, fp32, bf16 or fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Model + groups + plan + ONE optimizer; knows how to train one step and evaluate."""

    def __init__(self, model: nn.Module, groups: list[LayerGroup], plan: Plan, optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None = None, *, train_bn: bool = False,
                 bn_eval: bool = False, compile: bool = False, channels_last: bool = False,
                 label_smoothing: float = 0.0, grad_clip: float | None = None, compile_backend: str = "inductor",
                 ema_decay: float | None = None):
        self.model, self.groups, self.plan, self.optimizer = model, groups, plan, optimizer
        self.device, self.amp_dtype, self.train_bn, self.bn_eval = device, amp_dtype, train_bn, bn_eval
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:  # weights and inputs in the same layout, else every conv converts per call
            model.to(memory_format=torch.channels_last)
        self.label_smoothing, self.grad_clip, self.compile = label_smoothing, grad_clip, compile
        self.compile_backend = compile_backend  # tests use a lighter one ("aot_eager") to compile fast
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.mask: list[bool] | None = None
        self.frozen_norms: list[nn.Module] = []
        self.forward = model
        # head last: `_has_grads` scans it backwards and stops at the first gradient
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # last: the average references the model's tensors in their final layout
        self.ema = WeightEMA(model, ema_decay) if ema_decay is not None else None

    @classmethod
    def from_config(cls, cfg, model: nn.Module, groups: list[LayerGroup], steps_per_epoch: int,
                    device: torch.device, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False) -> "Trainer":
        """The plan, the ONE optimizer (every group, frozen ones too) and the Trainer, as configured."""
        plan = build_plan(cfg, [g.name for g in groups], steps_per_epoch, layer_depths(model, groups))
        lrs = [plan.lr(i, 0) for i in range(len(groups))]
        wds = [gp.weight_decay for gp in plan.groups]
        optimizer = build_optimizer(cfg.optimizer, param_groups(model, groups, lrs, wds,
                                                                cfg.optimizer.no_decay_norm_bias))
        return cls(model, groups, plan, optimizer, device, amp_dtype, train_bn=cfg.freeze.train_bn,
                   bn_eval=cfg.freeze.bn_eval, compile=cfg.compile, channels_last=channels_last,
                   label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
                   ema_decay=decay_for(cfg.ema_half_life, steps_per_epoch) if cfg.ema_half_life is not None else None)

    def set_epoch(self, epoch: int) -> bool:
        """Apply the plan's freeze state for `epoch`; True when it changed."""
        mask = self.plan.trainable(epoch)
        if mask == self.mask:
            return False
        self.mask = mask
        freeze.apply_trainable(self.model, self.groups, mask, self.train_bn)
        self.frozen_norms = freeze.frozen_norm_modules(self.model, self.groups, mask, self.train_bn,
                                                        self.bn_eval)
        if self.compile:
            # AOTAutograd bakes which parameters need gradients into the compiled backward, so a new
            # pattern needs a new graph. Guards alone would add it next to the old ones, but every
            # mask brings a train and an eval graph and past dynamo's recompile limit (8: gradual
            # unfreezing of 6 groups) it silently runs eagerly; so start from an empty cache
            torch._dynamo.reset()
            self.forward = torch.compile(self.model, backend=self.compile_backend)
        return True

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at global `step`: returns (loss, correct count) as device tensors; the loss
        is the plain cross-entropy, as `evaluate` measures it, whatever label smoothing the step used."""
        apply(self.optimizer, self.plan, step)
        with self.autocast():
            logits = self.forward(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.scaler.scale(loss).backward()  # scale() is the identity unless fp16
        if self._has_grads():  # GradScaler.step asserts when no parameter got a gradient
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # skips grad=None itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        logits = logits.detach()
        # reported like val_loss: plain cross-entropy, without the label smoothing the step optimised
        reported = F.cross_entropy(logits.float(), y) if self.label_smoothing else loss.detach()
        return reported, (logits.argmax(1) == y).sum()

    def _has_grads(self) -> bool:
        """Any optimizer parameter with a gradient; scanned head first, so normally one look-up."""
        return any(p.grad is not None for p in reversed(self.params))

    @torch.no_grad()
    def evaluate(self, loader, average: bool = False) -> tuple[float, float]:
        """(loss, accuracy) of the live model, or of the weight average with `average`."""
        forward = self.ema.model if average else self.forward
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        count = 0
        for x, y in loader:
            x, y = self.to_device(x, y)
            with self.autocast():
                logits = forward(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
        return loss_sum.item() / max(1, count), correct.item() / max(1, count)


@dataclass
class RunState:
    """Everything that must survive an interruption, besides model/optimizer/scaler state."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_val_acc: float = -1.0
    trace: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    # the epoch in progress, so a mid-epoch resume reports the same train loss/accuracy
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_seconds: float = 0.0  # training seconds spent on it before the interruption


def trace_rows(plan: Plan, optimizer, step: int, epoch: int, mask: list[bool]) -> list[dict]:
    """LR/momentum of each group as set on the optimizer right now (read back, not recomputed)."""
    seen = {}
    for pg in optimizer.param_groups:
        if pg["group"] in seen:
            continue
        momentum = pg["betas"][0] if "betas" in pg else pg.get("momentum")
        seen[pg["group"]] = {"step": step, "epoch": epoch, "group": pg["name"], "lr": pg["lr"],
                             "momentum": momentum, "trainable": int(mask[pg["group"]])}
    return [seen[g] for g in sorted(seen)]


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop stops after the current step and checkpoints."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _config_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def build_run(cfg):
    """Model, groups, data and plan from the config: everything `train` and `inspect` share."""
    from finetune import data as data_mod
    from finetune import models

    num_classes = data_mod.num_classes(cfg.data)
    bundle = models.build_model(cfg.model, num_classes)
    spec = cfg.model.groups if cfg.model.groups is not None else bundle.group_spec
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    groups = build_groups(bundle.model, spec, cfg.model.catch_all)
    return bundle, groups, num_classes


def train(cfg, out_dir: str | Path, *, stop_at_step: int | None = None, recipe: dict | None = None) -> dict:
    """Fine-tune as configured, writing the run directory; returns the summary (with final_val_acc).

    `cfg.resume` (a run directory or checkpoint file) continues that run exactly: same weights, optimizer
    state, schedule position, freeze state, RNG and data order; the checkpoint carries the trace and
    metrics, so `out_dir` (which may be a new directory) gets complete reports.
    SIGINT/SIGTERM stop the run after the current step: checkpoint, reports, then `Interrupted`.
    `stop_at_step` (library only) stops the same way once that many steps are done (at an epoch's end:
    after its evaluation): it splits one plan over several runs (time-limited jobs; tests of exact
    resume), where a run with fewer `epochs` would follow a different schedule.
    `recipe` (what the recipe set, finetune.recipe.describe) is saved in summary.json.
    """
    from finetune import data as data_mod
    from finetune.progress import EpochProgress

    out_dir = Path(out_dir)
    if cfg.checkpoint_every < 0:
        raise UserError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {cfg.checkpoint_every}")
    _refuse_finished_dir(out_dir, cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # read the checkpoint first: a wrong path or an unsafe file fails before anything is built
    saved = checkpoint.load_checkpoint(cfg.resume)[1] if cfg.resume else None

    bundle, groups, _ = build_run(cfg)
    model = bundle.model
    data = data_mod.build_data(cfg.data, bundle.preprocess, batch_size=cfg.batch_size, seed=cfg.seed,
                               pin_memory=device.type == "cuda", persistent_workers=True)
    log.info("data: %d train / %d val images, %d classes, %d px", len(data.train), len(data.val),
             len(data.classes), data_mod.image_size(cfg.data, bundle.preprocess))
    model.to(device)
    trainer = Trainer.from_config(cfg, model, groups, data.steps_per_epoch, device, amp_dtype, channels_last)
    plan, optimizer = trainer.plan, trainer.optimizer
    for warning in plan_warnings(cfg, plan, random_init=cfg.model.weights is None):
        log.warning("%s", warning)

    config = _config_container(cfg)
    group_list = [[g.name, list(g.param_names)] for g in groups]
    state = RunState()
    if saved is not None:  # last: restoring the RNG must follow everything that draws from it
        state = _restore(saved, trainer, config, group_list, plan.steps_per_epoch)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", cfg.resume, state.epoch, state.batch,
                 state.step)
        if state.epoch >= plan.epochs:
            log.warning("resume: the checkpoint already finished all %d epochs; nothing to train", plan.epochs)

    ckpt_path = out_dir / "checkpoints" / checkpoint.LAST

    def save():  # never over the last good checkpoint with a diverged model
        _check_finite_state(model, plan, state.step, ckpt_path)
        checkpoint.atomic_save({
            "format": checkpoint.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
            "ema": trainer.ema.state_dict() if trainer.ema else None,
            "rng": checkpoint.rng_state(), "config": config, "groups": group_list,
            "steps_per_epoch": plan.steps_per_epoch,
            **{k: getattr(state, k) for k in RunState.__dataclass_fields__},
        }, ckpt_path)

    def write_reports(status: str, plot: bool = True):  # status: running | interrupted | completed
        names = [g.name for g in groups]
        report.write_csv(out_dir / "lr_trace.csv", state.trace, report.TRACE_FIELDS)
        report.write_csv(out_dir / "metrics.csv", state.metrics,
                         report.METRIC_FIELDS + (report.EMA_METRIC_FIELDS if trainer.ema else ()))
        summary = {
            "status": status,
            "best_val_acc": max((m["val_acc"] for m in state.metrics), default=None),
            "final_val_acc": state.metrics[-1]["val_acc"] if state.metrics else None,
            "final_val_loss": state.metrics[-1]["val_loss"] if state.metrics else None,
            "epochs": len(state.metrics), "wall_seconds": round(state.wall_seconds, 3),
            "train_images_per_second": _mean([m["images_per_s"] for m in state.metrics]),
            "trainable_params_per_epoch": state.trainable_params,
            "groups": names, "device": str(device), "precision": str(amp_dtype or "fp32"),
            "torch_threads": torch.get_num_threads(), "recipe": recipe,
            "skipped_images": data.skipped,  # unreadable files left out (data.skip_bad)
        }
        report.write_json(out_dir / "summary.json", summary)
        if plot and state.trace:  # the plot costs about a second: at the end (or stop), not every epoch
            report.plot_lr_trace(out_dir / "lr_trace.png", state.trace, names, plan.steps_per_epoch)
        return summary

    def stop_here(signum: int | None) -> Interrupted:  # after a save()
        write_reports("interrupted")
        why = f"stopped by {signal.Signals(signum).name}" if signum else f"stopped at stop_at_step={stop_at_step}"
        return Interrupted(f"{why} after {state.step} of {plan.total_steps} steps (epoch {state.epoch}, "
                           f"batch {state.batch}); checkpoint written to {ckpt_path}", out_dir, signum)

    # per-epoch sums: tensors (no device sync per step); a resumed epoch starts from the saved ones
    loss_sum, correct, seen, pending = torch.zeros(()), torch.zeros((), dtype=torch.long), 0, []
    run_t0, wall_before = time.perf_counter(), state.wall_seconds

    def check_losses():  # pending: (step, loss) not yet checked for NaN/inf
        _check_finite(pending, plan, ckpt_path)
        pending.clear()

    def save_mid_epoch():
        check_losses()  # never overwrite the last good checkpoint with a diverged model
        state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = loss_sum.item(), correct.item(), seen
        state.epoch_seconds = epoch_before + time.perf_counter() - t0
        state.wall_seconds = wall_before + time.perf_counter() - run_t0
        save()

    out_dir.mkdir(parents=True, exist_ok=True)
    progress = EpochProgress(enabled=cfg.progress, group_names=[g.name for g in groups])
    with _StopFlag() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(progress.stop)  # also on errors: leave the terminal usable
        cleanup.callback(data.close)  # persistent loader workers end with the run
        while state.epoch < plan.epochs:
            epoch = state.epoch
            trainer.set_epoch(epoch)
            if len(state.trainable_params) <= epoch:
                state.trainable_params.append(trainer.trainable_params())
            freeze.set_train_mode(model, trainer.frozen_norms)
            t0, epoch_before = time.perf_counter(), state.epoch_seconds
            loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
            correct = torch.tensor(state.epoch_correct, device=device, dtype=torch.long)
            seen = seen_before = state.epoch_seen
            pending.clear()
            loader = data.train_loader(epoch, start_step=state.batch)
            progress.start_epoch(epoch, plan.epochs, plan.steps_per_epoch, done=state.batch)
            for x, y in loader:
                x, y = trainer.to_device(x, y)
                try:
                    loss, ok = trainer.step(x, y, state.step)
                except ValueError as err:  # torch's BatchNorm on a batch of one image
                    if "Expected more than 1 value per channel" not in str(err):
                        raise
                    raise UserError(f"a batch of {len(y)} image at step {state.step}: BatchNorm in train mode "
                                    "needs at least 2; raise batch_size or set freeze.bn_eval=true") from None
                state.trace.extend(trace_rows(plan, optimizer, state.step, epoch, trainer.mask))
                pending.append((state.step, loss))
                loss_sum += loss * y.numel()
                correct += ok
                seen += y.numel()
                state.step += 1
                state.batch += 1
                if state.batch % 10 == 0 or state.batch == plan.steps_per_epoch:
                    check_losses()
                    progress.update(state.batch, loss_sum.item() / seen, correct.item() / seen,
                                    (seen - seen_before) / (time.perf_counter() - t0),
                                    state.trace[-len(groups):])  # this step's rows, just recorded
                # stop_at_step on an epoch's last step lets the epoch finish (evaluation) first
                stopping = stop.signum is not None or (state.step == stop_at_step
                                                       and state.batch < plan.steps_per_epoch)
                if stopping or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
                    save_mid_epoch()
                if stopping:
                    raise stop_here(stop.signum)
            check_losses()
            train_seconds = epoch_before + time.perf_counter() - t0
            # with EMA, val_* scores the average (the weights the run delivers), live_val_* the live model
            val_loss, val_acc = trainer.evaluate(data.val_loader(), average=trainer.ema is not None)
            if not math.isfinite(val_loss):  # AdamW can keep the train loss finite while the model diverged
                raise _diverged(f"val loss became {val_loss} after step {state.step - 1}", plan, state.step - 1,
                                ckpt_path)
            live = {}
            if trainer.ema is not None:
                live = dict(zip(("live_val_loss", "live_val_acc"), trainer.evaluate(data.val_loader())))
            state.metrics.append({
                "epoch": epoch, "train_loss": loss_sum.item() / max(1, seen),
                "train_acc": correct.item() / max(1, seen), "val_loss": val_loss, "val_acc": val_acc,
                "seconds": round(epoch_before + time.perf_counter() - t0, 3),
                "images_per_s": round(seen / max(train_seconds, 1e-9), 2), **live,
            })
            progress.end_epoch(state.metrics[-1])
            state.best_val_acc = max(state.best_val_acc, val_acc)
            state.epoch, state.batch = state.epoch + 1, 0
            state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_seconds = 0.0, 0, 0, 0.0
            state.wall_seconds = wall_before + time.perf_counter() - run_t0
            save()
            write_reports("running", plot=False)
            stopping = stop.signum is not None or state.step == stop_at_step  # a signal during evaluation too
            if stopping and state.epoch < plan.epochs:
                raise stop_here(stop.signum)
    summary = write_reports("completed")
    progress.summary(state.metrics, summary)
    return summary


def _mean(values):
    return round(sum(values) / len(values), 2) if values else None


def _check_finite(pending: list[tuple[int, torch.Tensor]], plan: Plan, kept: Path | None = None) -> None:
    """Stop on a NaN/inf loss, naming the first bad step and every group's LR there (GradScaler's skipped
    fp16 overflow steps have finite losses, so they never land here)."""
    if not pending:
        return
    losses = torch.stack([loss.float() for _, loss in pending])
    bad = (~torch.isfinite(losses)).nonzero()
    if not len(bad):
        return
    step, loss = pending[int(bad[0])]
    raise _diverged(f"loss became {loss.item()} at step {step}", plan, step, kept)


def _diverged(what: str, plan: Plan, step: int, kept: Path | None) -> NonFiniteLoss:
    """The one message of every divergence: what, the step's epoch and every group's LR there."""
    epoch = step // plan.steps_per_epoch
    mask = plan.trainable(epoch)
    lrs = ", ".join(f"{g.name}={plan.lr(i, step):.3g}" + ("" if mask[i] else " (frozen)")
                    for i, g in enumerate(plan.groups))
    return NonFiniteLoss(f"{what} (epoch {epoch}) with LRs {lrs}; stopped, {_kept(kept)}. "
                         "Lower the LR or set grad_clip")


def _kept(ckpt: Path | None) -> str:
    return f"the last good checkpoint {ckpt} is kept" if ckpt and ckpt.is_file() else "no checkpoint was written"


def _check_finite_state(model: nn.Module, plan: Plan, step: int, ckpt: Path) -> None:
    """A good checkpoint holds finite weights and buffers (BatchNorm statistics included); `step` steps
    are done."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _diverged(f"{name} became non-finite by step {step - 1}", plan, max(0, step - 1), ckpt)


def _refuse_finished_dir(out_dir: Path, cfg) -> None:
    """A run directory holds one run: a second one there would replace its checkpoint and mix the logs."""
    held = [p for p in (out_dir / "checkpoints" / checkpoint.LAST, out_dir / "summary.json") if p.is_file()]
    if not held or cfg.overwrite:
        return
    if cfg.resume and checkpoint.resolve_resume_path(cfg.resume).resolve().parent.parent == out_dir.resolve():
        return  # continuing the run that is there
    raise UserError(f"{out_dir} already holds a run ({held[0].name}); continue it with resume={out_dir}, "
                    "choose another directory (hydra.run.dir=...) or replace it with overwrite=true")


def _restore(saved: dict, trainer: Trainer, config: dict, groups: list, steps_per_epoch: int) -> RunState:
    """Load a checkpoint into a freshly built run after checking it continues the same run; returns the
    loop's state. Changed settings (epochs, lr...) are allowed and listed in a warning."""
    checkpoint.check_resumable(saved, config, groups, trainer.model.state_dict(), steps_per_epoch)
    changed = checkpoint.config_changes(saved["config"], config)
    if changed:
        log.warning("resume: these settings differ from the checkpoint's run and apply from now on: %s",
                    ", ".join(changed))
    trainer.model.load_state_dict(saved["model"])
    # the saved state (moments, step counts) carries over; hyperparameters come from this config, so a
    # changed weight_decay or beta2 applies as the warning says (LR and momentum are set every step anyway)
    configured = [{k: v for k, v in pg.items() if k != "params"} for pg in trainer.optimizer.param_groups]
    trainer.optimizer.load_state_dict(saved["optimizer"])
    for pg, settings in zip(trainer.optimizer.param_groups, configured):
        pg.update(settings)
    if trainer.ema is not None:
        if saved.get("ema") is None:
            raise UserError("resume: the checkpoint has no weight average (its run had ema_half_life=null); "
                            "resume with ema_half_life=null")
        trainer.ema.load_state_dict(saved["ema"])
    if saved.get("scaler") and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(saved["scaler"])
    checkpoint.set_rng_state(saved["rng"])
    return RunState(**{k: saved[k] for k in RunState.__dataclass_fields__ if k in saved})
