"""One training step and one evaluation: the per-step work, and nothing about runs.

`Trainer.step` is the whole per-step work (set LRs from the plan, forward under autocast, ONE backward,
optimizer step, the weight average's update), so benchmarks time exactly what training runs.
`finetune.engine.loop.Run` drives it through a run: data, evaluation, checkpoints, reports, signals.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torchvision.transforms import v2

from finetune.base.errors import UserError
from finetune.config.presets import schedule_presets
from finetune.core import freeze
from finetune.core.ema import WeightEMA, decay_for
from finetune.core.groups import LayerGroup
from finetune.core.optim import build_optimizer, layer_depths, param_groups
from finetune.core.plan import Plan, apply, build_plan
from finetune.engine import distributed
from finetune.engine.signals import EvaluationStopped
from finetune.tasks import SingleLabel


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


def batch_mix(cfg, num_classes: int):
    """MixUp / CutMix from the data config (both: one of the two per batch), or None. torchvision's rather
    than timm's Mixup: they draw from torch's global generator, which checkpoints save, so a resumed run
    mixes exactly as the uninterrupted one (timm's draws from NumPy's)."""
    alphas = {"mixup": float(cfg.mixup), "cutmix": float(cfg.cutmix)}
    for key, alpha in alphas.items():
        if alpha < 0:
            raise UserError(f"data.{key}: the Beta distribution's alpha must be >= 0 (0: off), got {alpha}")
    mixes = [kind(alpha=alpha, num_classes=num_classes) for kind, alpha in
             ((v2.MixUp, alphas["mixup"]), (v2.CutMix, alphas["cutmix"])) if alpha > 0]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


class Compiled:
    """torch.compile of a module, run with room for `graphs` graphs of its code: every freeze state
    brings a train and an eval graph, and past dynamo's default recompile limit (8: gradual unfreezing
    of 6 groups) it would silently run eagerly. The limit is raised only while this module runs, and no
    cache is reset, so compiled graphs of other modules in the process are left alone."""

    def __init__(self, module: nn.Module, backend: str, graphs: int):
        self.module, self.graphs = module, graphs
        self.compiled = torch.compile(module, backend=backend)

    def __call__(self, *args, **kwargs):
        config = torch._dynamo.config
        with config.patch(recompile_limit=max(config.recompile_limit, self.graphs),
                          accumulated_recompile_limit=max(config.accumulated_recompile_limit, 4 * self.graphs)):
            return self.compiled(*args, **kwargs)


class Trainer:
    """Model + groups + plan + ONE optimizer; knows how to train one step and evaluate."""
    def __init__(self, model: nn.Module, groups: list[LayerGroup], plan: Plan, optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None = None, *, train_bn: bool = False,
                 bn_eval: bool = False, compile: bool = False, channels_last: bool = False,
                 task=None, grad_clip: float | None = None, compile_backend: str = "inductor",
                 ema_decay: float | None = None, mix=None):
        self.model, self.groups, self.plan, self.optimizer = model, groups, plan, optimizer
        self.device, self.amp_dtype, self.train_bn, self.bn_eval = device, amp_dtype, train_bn, bn_eval
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:  # weights and inputs in the same layout, else every conv converts per call
            model.to(memory_format=torch.channels_last)
        # what the model predicts: the loss, the metrics (finetune/tasks/); single-label by default
        self.task = task if task is not None else SingleLabel(num_classes=0)
        self.grad_clip, self.compile = grad_clip, compile
        self.compile_backend = compile_backend  # tests use a lighter one ("aot_eager") to compile fast
        self.mix = mix  # (images, labels) -> (mixed images, soft labels): MixUp / CutMix, or None
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.mask: list[bool] | None = None
        self.frozen_norms: list[nn.Module] = []
        self.forward = model
        self.ddp: nn.parallel.DistributedDataParallel | None = None  # with several processes
        self.diag_rows: list[dict] = []  # the last probed step's per-group diagnostics
        self.head_only: nn.Module | None = None  # the feature cache's epochs: the head on cached features
        # head last: `_has_grads` scans it backwards and stops at the first gradient
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # last: the average references the model's tensors in their final layout
        self.ema = WeightEMA(model, ema_decay) if ema_decay is not None else None

    @classmethod
    def from_config(cls, cfg, model: nn.Module, groups: list[LayerGroup], steps_per_epoch: int,
                    device: torch.device, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, num_classes: int | None = None, task=None) -> "Trainer":
        """The plan, the ONE optimizer (every group, frozen ones too) and the Trainer, as configured."""
        plan = build_plan(cfg, [g.name for g in groups], steps_per_epoch, layer_depths(model, groups),
                          presets=schedule_presets())
        lrs = [plan.lr(i, 0) for i in range(len(groups))]
        wds = [gp.weight_decay for gp in plan.groups]
        optimizer = build_optimizer(cfg.optimizer, param_groups(model, groups, lrs, wds,
                                                                cfg.optimizer.no_decay_norm_bias))
        return cls(model, groups, plan, optimizer, device, amp_dtype, train_bn=cfg.freeze.train_bn,
                   bn_eval=cfg.freeze.bn_eval, compile=cfg.compile, channels_last=channels_last,
                   task=task or SingleLabel(num_classes or 0, float(cfg.label_smoothing)), grad_clip=cfg.grad_clip,
                   ema_decay=decay_for(cfg.ema_half_life, steps_per_epoch) if cfg.ema_half_life is not None else None,
                   mix=batch_mix(cfg.data, num_classes) if num_classes else None)

    def set_epoch(self, epoch: int) -> bool:
        """Apply the plan's freeze state for `epoch`; True when it changed."""
        mask = self.plan.trainable(epoch)
        if mask == self.mask:
            return False
        self.mask = mask
        freeze.apply_trainable(self.model, self.groups, mask, self.train_bn)
        self.frozen_norms = freeze.frozen_norm_modules(self.model, self.groups, mask, self.train_bn,
                                                        self.bn_eval)
        # several processes: DDP registers the parameters that require grad when it is built, so every
        # freeze change builds it again (the same step on every rank; no gradient is pending here)
        self.optimizer.zero_grad(set_to_none=True)
        wrapped = distributed.wrap(self.model, self.device)
        self.ddp = wrapped if wrapped is not self.model else None
        if self.compile:
            # AOTAutograd bakes which parameters need gradients into the compiled backward, so a new
            # pattern needs a new graph: dynamo's guards on requires_grad add it beside the old ones
            self.forward = Compiled(wrapped, self.compile_backend, graphs=4 * (len(self.groups) + 1))
        else:
            self.forward = wrapped
        return True

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        fmt = self.memory_format if x.dim() == 4 else torch.contiguous_format  # cached features are 2-D
        x = x.to(self.device, non_blocking=True, memory_format=fmt)
        return x, y.to(self.device, non_blocking=True)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step at global `step` on one batch: returns (loss, the task's train score summed
        over the batch, for single-label the correct count) as device tensors; the loss is the task's plain
        loss, as `evaluate` measures it, whatever label smoothing the step used."""
        return self.step_accumulated([(x, y)], step)

    def step_accumulated(self, batches, step: int, lrs: list[float] | None = None,
                         probe=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the gradients of several equal micro-batches (gradient accumulation):
        each backward adds its loss / len(batches), so the update is that of their concatenation (up to
        BatchNorm's batch statistics); an epoch's final partial step averages over the micro-batches it has. Returns the mean loss over their samples and the correct count.
        `lrs` (one per layer group; the LR finder) replaces the plan's LRs for this step. `probe`
        (finetune/engine/diagnostics.py) measures gradients before the optimizer step and the update after it;
        its rows are left in `self.diag_rows`."""
        if probe is not None:
            self.diag_rows = []
        if lrs is None:
            apply(self.optimizer, self.plan, step)
        else:
            for pg in self.optimizer.param_groups:
                pg["lr"] = lrs[pg["group"]]
        losses, correct, seen = [], 0, 0
        for i, (x, y) in enumerate(batches):
            # DDP all-reduces in the last micro-batch's backward only: the earlier ones accumulate locally
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                # mixing images, not cached features: the cache is off under MixUp / CutMix
                x, target = self.mix(x, y) if self.mix is not None and self.head_only is None else (x, y)
                with self.autocast():
                    logits = (self.head_only or self.forward)(x)
                    loss = self.task.loss(logits, target)
                self.scaler.scale(loss / len(batches) if len(batches) > 1 else loss).backward()  # identity unless fp16
            logits = logits.detach()
            # reported like val_loss: the task's plain loss, without the label smoothing the step optimised
            # (against the mixed labels when mixing); the train score against the labels of the images as loaded
            plain = self.task.plain_differs or target is not y
            images = len(y)
            losses.append((self.task.plain_loss(logits, target) if plain else loss.detach(), images))
            correct = correct + self.task.train_score(logits, y)
            seen += images
        if self._has_grads():  # GradScaler.step asserts when no parameter got a gradient
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)  # skips grad=None itself
            if probe is not None:  # the gradients as applied: unscaled (fp16) and clipped
                scaled = self.scaler.is_enabled() and not self.grad_clip
                probe.before_step(float(self.scaler.get_scale()) if scaled else 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if probe is not None:
                self.diag_rows = probe.after_step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        if probe is not None and not self.diag_rows:  # nothing trained: norms of the weights alone
            probe.before_step(1.0)
            self.diag_rows = probe.after_step()
        if len(losses) == 1:
            return losses[0][0], correct
        return sum(loss * n for loss, n in losses) / seen, correct

    def _has_grads(self) -> bool:
        """Any optimizer parameter with a gradient; scanned head first, so normally one look-up."""
        return any(p.grad is not None for p in reversed(self.params))

    @torch.no_grad()
    def evaluate(self, loader, average: bool = False, head: str | None = None,
                 stop: Callable[[], bool] | None = None, tune: bool = True) -> dict[str, float]:
        """The task's metrics ({"loss": ..., "acc": ...} for single-label) of the live model, or of the
        weight average with `average`; with several processes, over every rank's shard of the loader's
        data. `head` (a module name): the loader holds that module's inputs (the feature cache) and only it
        runs. `stop` (one process): asked between batches; True raises EvaluationStopped (a job scheduler's
        grace period is shorter than some evaluations). `tune`: this model is the one the run delivers, and
        the task may choose its settings on these images (multilabel: the thresholds)."""
        forward = self.ema.model if average else self.forward
        if head is not None:
            forward = (self.ema.model if average else self.model).get_submodule(head)
        self.model.eval()
        if self.ema is not None:
            self.ema.model.eval()
        meter = self.task.meter(self.device, tune=tune)
        for x, y in loader:
            if stop is not None and stop():
                raise EvaluationStopped
            x, y = self.to_device(x, y)
            with self.autocast():
                logits = forward(x)
            meter.update(logits, y)
        return meter.result(distributed.sum_, distributed.gather)


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


def chunks(loader, k: int, steps: int):
    """Lists of `k` consecutive batches, `steps` of them; the epoch's last may be shorter (a final partial
    step, as timm and Lightning take: every image of the epoch trains)."""
    it = iter(loader)
    for _ in range(steps):
        chunk = [b for _, b in zip(range(k), it)]
        if not chunk:
            return
        yield chunk
