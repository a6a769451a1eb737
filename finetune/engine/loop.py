"""A fine-tuning run as one object and its loop, read top to bottom as timm's and nanoGPT's are.

`Run.fit`: for each epoch, `begin_epoch` (freeze state, cache, BatchNorm modes), `train_epoch`, then
`evaluate`, `end_epoch`. Every decision is made here, in the order it is written: after each step the
LR trace row, the NaN check, an evaluation inside the epoch (eval_every) with best.pt, a checkpoint
(checkpoint_every) and the stop check; after each epoch the freeze-integrity check, diagnostics' warnings,
early stopping, the checkpoint, best.pt and the reports. Observers (finetune.engine.observers: the
progress bar; finetune.engine.trackers: TensorBoard, MLflow, W&B) are told what happened and cannot steer
the run. `save` and `report` are the only ways to write a checkpoint and the reports, so a checkpoint is
always checked for finite values first and the reports always describe the same state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from finetune.base import files
from finetune.base.errors import UserError, writing
from finetune.core import freeze
from finetune.core.plan import warnings as plan_warnings
from finetune.engine import best, checkpoint, distributed, trackers
from finetune.engine.cache import FeatureCache, as_tensor, fit_head
from finetune.engine.diagnostics import Diagnostics, FreezeIntegrity, resolve_every
from finetune.engine.distributed import World
from finetune.engine.divergence import check_finite_state, diverged, first_bad
from finetune.engine.observers import ProgressBar, StepView, check_due
from finetune.engine.setup import setup
from finetune.engine.signals import (
    TIME_LIMIT_EXIT,
    EvaluationStopped,
    Interrupted,
    StopFlag,
)
from finetune.engine.step import Trainer, chunks, trace_rows
from finetune.output import report
from finetune.output.trace import NoTrace, TraceFile
from finetune.output.trace import read as read_trace

log = logging.getLogger("finetune")


@dataclass
class RunState:
    """Everything that must survive an interruption, besides model/optimizer/scaler state."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    metrics: list[dict] = field(default_factory=list)
    trainable_params: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    # the epoch in progress, so a mid-epoch resume reports the same train loss/accuracy
    epoch_loss_sum: float = 0.0
    epoch_correct: float = 0.0  # the task's train score summed (single-label: the correct count)
    epoch_seen: int = 0
    epoch_seconds: float = 0.0  # training seconds spent on it before the interruption
    finished_early: str | None = None  # why early stopping ended the run (a resume then trains no more)
    evals: list[dict] = field(default_factory=list)  # eval_every: {step, epoch, val_*} of every evaluation


class Run:
    """Everything one run owns. Build it, then `fit()`; `stop_at_step` (library only) stops like a signal
    once that many steps are done (at an epoch's end: after its evaluation).

    Under torchrun (`world`, by default read from the environment) every rank builds the same Run and
    trains its shard of each batch; rank 0 alone writes the run directory. Whatever decides where the
    loop goes (a signal, the time limit, a NaN) is agreed on by all ranks at the same step, so none is
    left waiting in a collective the others never reach. `saved`: the checkpoint cfg.resume names, where
    the caller has read it already (train() does, for experiment=auto and lr=auto)."""

    def __init__(self, cfg, out_dir: str | Path, *, stop_at_step: int | None = None, recipe: dict | None = None,
                 world: World | None = None, lr_auto: dict | None = None, saved: dict | None = None):
        if cfg.auto.enabled:  # it would train the config under no recipe, not the one auto chooses
            raise UserError("experiment=auto is resolved before a run is built: compose the config with "
                            "finetune.compose(...) or run `finetune train`, or name a recipe (experiment=lp_ft)")
        self.cfg, self.out_dir, self.stop_at_step, self.recipe = cfg, Path(out_dir), stop_at_step, recipe
        self.lr_auto = lr_auto  # what lr=auto chose (summary.json)
        self.world = world = world or distributed.from_env()
        _check_settings(cfg)
        checkpoint.refuse_used_dir(self.out_dir, cfg)
        # read the checkpoint first (unless train() has): a wrong path or an unsafe file fails before
        # anything is built
        if saved is None:
            saved = checkpoint.resumed(cfg.resume)

        parts = setup(cfg, world)
        self.device, self.amp_dtype, self.model, self.groups = parts.device, parts.amp_dtype, parts.model, parts.groups
        self.data, self.preprocess, self.accumulate = parts.data, parts.preprocess, parts.accumulate
        self.task = parts.task
        self.trainer = Trainer.from_config(cfg, self.model, self.groups, parts.steps_per_epoch, self.device,
                                           self.amp_dtype, parts.channels_last, num_classes=len(self.data.classes),
                                           task=self.task)
        # the metric best.pt, early stopping and the summary's best follow (auto: the task's main one)
        self.best_metric = best.resolve_metric(cfg.best_metric, self.task, ema=cfg.ema_half_life is not None)
        self.plan, self.optimizer = self.trainer.plan, self.trainer.optimizer
        for warning in plan_warnings(cfg, self.plan, random_init=cfg.model.weights is None):
            log.warning("%s", warning)

        self.head_name, self.head = parts.head_name, parts.head
        self.cache = FeatureCache(cfg, self.trainer, self.head_name, self.head, self.data, world)
        self.cached = False  # the epoch in progress trains the head on cached features
        self.config = _config_container(cfg)
        self.group_list = [[g.name, list(g.param_names)] for g in self.groups]
        self.state = RunState()
        if world.enabled:  # a stream per rank from here on: dropout masks differ between the shards
            torch.manual_seed(distributed.rank_seed(cfg.seed, world.rank))
        if saved is not None:  # last: restoring the RNG must follow everything that draws from it
            self.state = _restore(saved, self.trainer, self.config, self.group_list, self.plan.steps_per_epoch,
                                  world)
            log.info("resumed from %s at epoch %d, batch %d (step %d)", cfg.resume, self.state.epoch,
                     self.state.batch, self.state.step)
            if self.state.epoch >= self.plan.epochs:
                log.warning("resume: the checkpoint already finished all %d epochs; nothing to train",
                            self.plan.epochs)
        self.ckpt_path = self.out_dir / "checkpoints" / checkpoint.LAST
        self.trace = TraceFile(self.out_dir / "lr_trace.csv") if world.main else NoTrace(self.out_dir / "lr_trace.csv")
        self._trace_before = _previous_trace(cfg.resume, saved) if saved else (None, None)
        names = [g.name for g in self.groups]
        resumed_dir = checkpoint.resolve_resume_path(cfg.resume).parent.parent if cfg.resume else None
        # the progress bar (rank 0's alone under torchrun) and the trackers of cfg.logger (rank 0)
        self.observers = [ProgressBar(cfg.progress and world.main, names)]
        if world.main:
            self.observers += trackers.trackers(cfg.logger, self.out_dir, self.state.step, resumed_dir, self.config,
                                                self.recipe)
        every = resolve_every(cfg.diag_every, self.plan.steps_per_epoch)
        self.diagnostics = (Diagnostics(self.model, self.groups, self.plan, self.out_dir, every, world.main, resumed_dir)
                            if every else None)
        self.integrity = FreezeIntegrity()
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet checked for NaN/inf
        # the epoch in progress: sums as device tensors (no sync per step), images seen, and its start
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self.seen = self.seen_before = 0
        self.epoch_t0: float | None = None  # perf_counter at the start of the epoch in progress
        self.epoch_before = 0.0  # its training seconds before an interruption
        self.stop = StopFlag()
        self.summary: dict | None = None
        self.replicas: list[int] | None = None  # every rank's weight fingerprint at the last epoch's end
        self.saved_at: int | None = None  # the step of the last checkpoint written by this process
        self.run_t0, self.wall_before = time.perf_counter(), self.state.wall_seconds
        self.late = False  # another rank passed the time limit

    def observe(self, event: str, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)

    # ------------------------------------------------------------------------------------------ loop

    def fit(self) -> dict:
        """Train to the end of the plan; returns the summary (with final_val_acc)."""
        if self.world.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.stop, contextlib.ExitStack() as cleanup:
            cleanup.callback(self.close)  # also on errors: leave the terminal usable, end the workers
            cleanup.enter_context(_algorithms(self.cfg.deterministic, self.device))
            self.trace.start(self.state.step, *self._trace_before)
            while self.state.epoch < self.plan.epochs and not self.state.finished_early:
                self.begin_epoch()
                try:
                    self.train_epoch()
                    metrics = self.evaluate()
                except EvaluationStopped:  # the checkpoint of this step resumes with the evaluation
                    raise self.stop_here() from None
                self.end_epoch(metrics)
                if self.stopping(epoch_end=True) and self.state.epoch < self.plan.epochs:
                    raise self.stop_here()
            # the final reports while signals are still caught: a job scheduler's SIGTERM now is taken
            # after them (a second or two), never halfway through them
            self.summary = self.report("completed")
            if self.diagnostics is not None:
                self.diagnostics.plot()
            self.observe("end", self.state.metrics, self.summary)  # the run's files are all written
        if self.stop.signum is not None:
            log.warning("%s arrived after the last step: the run is complete and its reports are written",
                        signal.Signals(self.stop.signum).name)
        return self.summary

    def close(self) -> None:
        self.observe("close")
        if self.diagnostics is not None:
            self.diagnostics.close()
        self.data.close()  # persistent loader workers end with the run
        self.trace.close()

    def begin_epoch(self) -> None:
        state, trainer = self.state, self.trainer
        trainer.set_epoch(state.epoch)
        if len(state.trainable_params) <= state.epoch:
            state.trainable_params.append(trainer.trainable_params())
        freeze.set_train_mode(self.model, trainer.frozen_norms)
        self.cached = self.cache.usable(state.epoch)
        trainer.head_only = self.head if self.cached else None
        if self.cfg.head_init == "lbfgs" and state.step == 0 and state.epoch == 0:
            self._init_head()
        # a resumed epoch starts from the saved sums
        self.loss_sum = torch.tensor(state.epoch_loss_sum, device=self.device)
        self.correct = torch.tensor(float(state.epoch_correct), device=self.device, dtype=torch.float64)
        self.seen = self.seen_before = state.epoch_seen
        self.epoch_t0, self.epoch_before = time.perf_counter(), state.epoch_seconds
        self.pending.clear()
        self.integrity.hold(self.model, trainer.frozen_norms)  # what must not move while frozen
        if self.diagnostics is not None:
            self.diagnostics.start(state.step)
        self.observe("epoch_start", state.epoch, self.plan.epochs, self.plan.steps_in(state.epoch), state.batch)

    def train_epoch(self) -> None:
        state, k, cfg = self.state, self.accumulate, self.cfg
        if self.cached:
            loader = self.cache.loader(state.epoch, state.batch * k)
        else:
            loader = self.data.train_loader(state.epoch, start_step=state.batch * k)
        diag, steps = self.diagnostics, self.plan.steps_in(state.epoch)
        for micro in chunks(loader, k, steps - state.batch):
            micro = [self.trainer.to_device(x, y) for x, y in micro]
            probing = diag is not None and diag.due(state.step)
            try:
                with diag.activations() if probing else contextlib.nullcontext() as acts:
                    loss, ok = self.trainer.step_accumulated(micro, state.step, probe=diag.probe() if probing else None)
            except ValueError as err:  # torch's BatchNorm on a batch of one image
                if "Expected more than 1 value per channel" not in str(err):
                    raise
                raise UserError(f"a batch of {len(micro[0][1])} image at step {state.step}: BatchNorm in train "
                                "mode needs at least 2; raise batch_size or set freeze.bn_eval=true") from None
            images = sum(len(y) for _, y in micro)
            done = state.step
            if probing:
                diag.record(done, state.epoch, self.trainer.mask, self.trainer.diag_rows, acts.hists)
            self.pending.append((done, loss))
            self.loss_sum += loss * images
            self.correct += ok
            self.seen += images
            state.step += 1
            state.batch += 1
            # every group's LR and momentum as set on the optimizer (read back, not recomputed)
            rows = trace_rows(self.plan, self.optimizer, done, state.epoch, self.trainer.mask)
            self.trace.write(rows)
            due = check_due(state.batch, steps)
            if due:
                self.check_losses()
            self.observe("step", StepView(done, state.epoch, state.batch, rows, self.running() if due else None))
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.batch < steps:
                self.evaluate_midway()
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and self.saved_at != state.step:
                self.save()
            if self.stopping(epoch_end=False):
                raise self.stop_here()
        self.check_losses()

    def running(self) -> tuple[float, float, float]:
        """This epoch's train loss, accuracy and images/s so far (this rank's shard; images of all ranks)."""
        seconds = time.perf_counter() - self.epoch_t0
        return (self.loss_sum.item() / self.seen, self.correct.item() / self.seen,
                (self.seen - self.seen_before) * self.world.size / seconds)

    def _init_head(self) -> None:
        """head_init=lbfgs: the new head fitted to convergence on the cached features of view 0."""
        if not self.cached:
            raise UserError(f"head_init=lbfgs fits the head on cached features, but the cache is off in epoch 0: "
                            f"{self.cache.reason_off()}")
        features = as_tensor(self.cache.views[0]).to(self.device)
        loss = fit_head(self.head, features, self.cache.labels.to(self.device), self.task)
        log.info("head_init=lbfgs: the head fitted on %d cached feature vectors, train loss %.4f", len(features), loss)

    def evaluate(self) -> dict:
        """This epoch's metrics row: train_loss, train_<score>, val_loss, val_<metric> for each of the task's
        metrics; with EMA, val_* score the average (the weights the run delivers) and live_val_* the live
        model. `seconds` and images_per_s count training alone."""
        train_seconds = self.epoch_seconds()
        loss_sum, correct, seen = self.epoch_totals()
        val = self.validate()
        return {
            "epoch": self.state.epoch, "train_loss": loss_sum / max(1, seen),
            f"train_{self.task.train_metric}": correct / max(1, seen),
            **{k: v for k, v in val.items() if not k.startswith("live")}, "seconds": round(train_seconds, 3),
            "images_per_s": round(seen / max(train_seconds, 1e-9), 2), **{k: v for k, v in val.items() if "live" in k},
        }

    def validate(self) -> dict:
        """val_loss and the task's val_* metrics (with EMA: of the average, and live_val_* of the live model)."""
        ema = self.trainer.ema
        self.sync_buffers()
        # a head-only epoch scores the head on the val set's cached features: the body did not change.
        # The average's body, though, still holds weights of epochs the body trained (freezeout, milestones
        # that freeze again): then the cached features are not its own and it runs on the images
        average_cached = self.cached and (ema is None or self._average_body_is_live())
        val = {f"val_{k}": v for k, v in self._score(average_cached, average=ema is not None).items()}
        if not math.isfinite(val["val_loss"]):  # AdamW can keep the train loss finite while the model diverged
            raise diverged(f"val loss became {val['val_loss']} after step {self.state.step - 1}", self.plan,
                           self.state.step - 1, self.ckpt_path)
        live = {}
        if ema is not None:  # the live model's figures; the task's settings stay the delivered model's
            live = {f"live_val_{k}": v for k, v in self._score(self.cached, average=False, tune=False).items()}
        return {**val, **live}

    def _score(self, cached: bool, average: bool, tune: bool = True) -> dict:
        # one process stops between batches on a signal or the time limit (a large val set can take
        # minutes); several would have to agree on the batch first
        stop = None if self.world.enabled else (lambda: self.stop.signum is not None or self.out_of_time())
        if cached:
            return self.trainer.evaluate(self.cache.val_loader(), average=average, head=self.head_name, stop=stop,
                                         tune=tune)
        return self.trainer.evaluate(self.data.val_loader(), average=average, stop=stop, tune=tune)

    def _average_body_is_live(self) -> bool:
        """The weight average's body (everything below the head) equals the live one bit for bit: true
        while the body never trained (an average of equal weights stays equal)."""
        prefix = f"{self.head_name}."
        live = {n: t for n, t in self.model.state_dict().items() if not n.startswith(prefix)}
        avg = {n: t for n, t in self.trainer.ema.model.state_dict().items() if not n.startswith(prefix)}
        return all(torch.equal(t, avg[n]) for n, t in live.items())

    def evaluate_midway(self) -> None:
        """eval_every: an evaluation inside the epoch, recorded in evals.csv, and best.pt when it is the
        best so far; training goes on as it was (an evaluation draws no random number, so exact resume is
        unaffected) and its time does not count as training time."""
        t0 = time.perf_counter()
        state = self.state
        row = {"step": state.step, "epoch": state.epoch, **self.validate()}
        freeze.set_train_mode(self.model, self.trainer.frozen_norms)
        state.evals.append(row)
        main = f"val_{self.task.main}"
        log.info("step %d: val loss %.3f %s %.3f", row["step"], row["val_loss"], main.replace("_", " "), row[main])
        self.observe("evaluation", dict(row))  # before best.pt's checkpoint of this step, which then holds it
        if self.epoch_t0 is not None:
            self.epoch_t0 += time.perf_counter() - t0
        if best.last_is_best(self.evaluations(), self.best_metric):
            if self.saved_at != state.step:  # best.pt copies a checkpoint of this very step
                self.save()
            self.copy_checkpoint(self.ckpt_path.with_name(best.BEST))

    def evaluations(self) -> list[dict]:
        """What best.pt is chosen from: every evaluation with eval_every (for a val_* best_metric), else the
        epochs' metrics."""
        if self.cfg.eval_every and "val_" in self.best_metric:
            return self.state.evals
        return self.state.metrics

    def epoch_totals(self) -> tuple[float, int, int]:
        """The epoch's train loss sum, train score sum (correct count) and images seen, over all ranks."""
        if not self.world.enabled:
            return self.loss_sum.item(), self.correct.item(), self.seen
        totals = torch.stack([self.loss_sum.double(), self.correct.double(),
                              torch.tensor(float(self.seen), dtype=torch.float64, device=self.device)])
        loss_sum, correct, seen = distributed.sum_(totals).tolist()
        return loss_sum, correct, int(seen)

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics (of the weight average too) on every rank, before they are
        evaluated or saved: each rank's last forward updated its own."""
        distributed.sync_buffers(self.model, *([self.trainer.ema.model] if self.trainer.ema else []))

    def end_epoch(self, metrics: dict) -> None:
        """Record the epoch, then check it, decide whether the run ends early, checkpoint and report."""
        state, cfg = self.state, self.cfg
        if self.world.enabled:  # the replicas must hold the same weights: a freeze change that was not
            self.replicas = distributed.check_replicas(self.model, f"after epoch {state.epoch}")  # all-reduced shows here
        state.metrics.append(metrics)
        if cfg.eval_every:
            state.evals.append({"step": state.step, "epoch": state.epoch,
                                **{k: v for k, v in metrics.items() if "val_" in k}})
        epoch = state.epoch
        state.epoch, state.batch = epoch + 1, 0
        self.loss_sum.zero_(), self.correct.zero_()
        self.seen, self.epoch_t0 = 0, None
        state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_seconds = 0.0, 0.0, 0, 0.0
        # a changed frozen weight is never checkpointed; observers hear of the epoch once it passed the check,
        # and get a copy of its row (the run's own is checkpointed)
        self.integrity.check(self.model, self.trainer.frozen_norms, epoch)
        self.observe("epoch_end", dict(metrics), state.step)
        if self.diagnostics is not None:
            self.diagnostics.end_epoch(epoch)
        # before the checkpoint, which then records it
        why = best.early_stop(state.metrics, self.best_metric, cfg.patience, cfg.min_delta)
        if why and state.epoch < self.plan.epochs:
            state.finished_early = why
            log.info("%s", why)
        self.save()
        if best.last_is_best(self.evaluations(), self.best_metric):
            self.copy_checkpoint(self.ckpt_path.with_name(best.BEST))
        self.report("running", plot=False)

    # ------------------------------------------------------------------------------- stop, save, report

    def copy_checkpoint(self, dest: Path) -> None:
        """The checkpoint just written, copied to `dest` atomically (a kill never leaves half a file)."""
        if not self.world.main:
            return
        tmp = dest.with_name(f".{dest.name}.tmp")
        with writing(dest):
            shutil.copyfile(self.ckpt_path, tmp)
            os.replace(tmp, dest)

    def stopping(self, epoch_end: bool) -> bool:
        """A signal arrived, the time limit passed, or stop_at_step is reached (on an epoch's last step the
        epoch finishes first). With several processes a signal or the time limit counts when any rank has
        it, agreed every CHECK_EVERY steps and at epoch ends (one small collective, not one per step)."""
        if self.world.enabled:
            if epoch_end or check_due(self.state.batch, self.plan.steps_in(self.state.epoch)):
                signum, late = distributed.max_([float(self.stop.signum or 0), float(self.out_of_time())], self.device)
                if signum or late:
                    self.stop.signum, self.late = int(signum) or None, bool(late)
                    return True
        elif self.stop.signum is not None or self.out_of_time():
            return True
        if epoch_end:
            return self.state.step == self.stop_at_step
        return self.state.step == self.stop_at_step and self.state.batch < self.plan.steps_in(self.state.epoch)

    def stop_here(self) -> Interrupted:
        if self.saved_at != self.state.step:
            self.save()
        self.report("interrupted")
        distributed.barrier()  # no rank exits (and has torchrun stop the others) before rank 0 has written
        signum, state, code = self.stop.signum, self.state, None
        if signum:
            why = f"stopped by {signal.Signals(signum).name}"
        elif self.out_of_time() or self.late:
            why, code = f"stopped by time_limit={self.cfg.time_limit:g} min", TIME_LIMIT_EXIT
        else:
            why = f"stopped at stop_at_step={self.stop_at_step}"
        return Interrupted(f"{why} after {state.step} of {self.plan.total_steps} steps (epoch {state.epoch}, "
                           f"batch {state.batch}); checkpoint written to {self.ckpt_path}", self.out_dir, signum, code)

    def out_of_time(self) -> bool:
        """This process has trained for longer than time_limit minutes (a resume starts a new budget)."""
        limit = self.cfg.time_limit
        return limit is not None and time.perf_counter() - self.run_t0 > limit * 60

    def epoch_seconds(self) -> float:
        """Training seconds of the epoch in progress, those before an interruption included."""
        if self.epoch_t0 is None:
            return 0.0
        return self.epoch_before + time.perf_counter() - self.epoch_t0

    def check_losses(self) -> None:
        """Stop on a NaN/inf loss; with several processes every rank stops at the first bad step of any."""
        bad = first_bad(self.pending)
        if self.world.enabled:  # the ranks hold the same pending steps, their own shard's losses
            first = -distributed.max_([-float(bad[0]) if bad else -math.inf], self.device)[0]
            bad = (int(first), dict(self.pending).get(int(first))) if math.isfinite(first) else None
        self.pending.clear()
        if bad:
            loss = bad[1].item() if bad[1] is not None and not bool(torch.isfinite(bad[1])) else "non-finite"
            raise diverged(f"loss became {loss} at step {bad[0]}", self.plan, bad[0], self.ckpt_path)

    def save(self) -> None:
        """Checkpoint the run as it stands, mid-epoch sums included; never a diverged model over the last
        good checkpoint (every pending loss, weight and buffer is checked first)."""
        self.check_losses()
        self.trace.flush()  # the trace file holds at least every step the checkpoint does
        self.sync_buffers()
        state = self.state
        state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = self.loss_sum.item(), self.correct.item(), self.seen
        state.epoch_seconds = self.epoch_seconds()
        state.wall_seconds = self.wall_before + time.perf_counter() - self.run_t0
        check_finite_state(self.model, self.plan, state.step, self.ckpt_path)  # the same on every rank
        # each rank's own RNG stream (dropout) and epoch sums, so that every rank resumes exactly
        ranks = distributed.gather({"rng": checkpoint.rng_state(),
                                    "sums": [state.epoch_loss_sum, state.epoch_correct, state.epoch_seen]})
        self.saved_at = state.step
        if self.world.main:
            self._write_checkpoint(ranks)
        distributed.barrier()  # a rank that stops next must not exit (torchrun then ends rank 0) mid-write
        self.observe("checkpoint", state.step)  # MLflow and W&B send what it holds

    def _write_checkpoint(self, ranks: list[dict]) -> None:
        state, trainer = self.state, self.trainer
        files.atomic_save({
            "format": checkpoint.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
            "ema": trainer.ema.state_dict() if trainer.ema else None,
            "rng": ranks[0]["rng"], "config": self.config, "groups": self.group_list,
            "steps_per_epoch": self.plan.steps_per_epoch, "trace_file": str(self.trace.path.resolve()),
            "world_size": self.world.size, **({"ranks": ranks} if self.world.enabled else {}),
            "classes": list(self.data.classes), "preprocess": self.preprocess,
            "recipe": self.recipe,  # experiment=auto's choice: a resume trains it without probing again
            "task": self.task.state(),  # what eval / predict / export need besides the weights (thresholds)
            **{k: getattr(state, k) for k in RunState.__dataclass_fields__},
        }, self.ckpt_path)

    def report(self, status: str, plot: bool = True) -> dict:
        """metrics.csv, summary.json (status: running | interrupted | completed) and, with `plot`,
        lr_trace.png (about a second: at the end or a stop, not every epoch); returns the summary.
        lr_trace.csv is written as training goes (finetune/output/trace.py)."""
        state, out_dir, names = self.state, self.out_dir, [g.name for g in self.groups]
        self.trace.flush()
        task, ema = self.task, self.trainer.ema is not None
        chosen = _best(self.evaluations(), self.best_metric)
        report.write_csv(out_dir / "metrics.csv", state.metrics, report.metric_fields(task, ema))
        if self.cfg.eval_every:
            report.write_csv(out_dir / "evals.csv", state.evals, report.eval_fields(task, ema))
        summary = {
            "status": status,
            # the evaluation best_metric chose (best.pt's), an epoch's or with eval_every one inside an epoch
            "best_val_acc": chosen["val_acc"] if chosen else None,
            "final_val_acc": state.metrics[-1]["val_acc"] if state.metrics else None,
            "final_val_loss": state.metrics[-1]["val_loss"] if state.metrics else None,
            # every val figure of the last epoch (multilabel: val_map, val_f1_macro ...) and the task's settings
            **{f"final_{k}": state.metrics[-1][k] if state.metrics else None for k in report.val_fields(task)
               if k not in ("val_acc", "val_loss")},
            "task": task.state(),
            "epochs": len(state.metrics), "wall_seconds": round(state.wall_seconds, 3),
            "train_images_per_second": _mean([m["images_per_s"] for m in state.metrics]),
            "trainable_params_per_epoch": state.trainable_params,
            "groups": names, "device": str(self.device), "precision": str(self.amp_dtype or "fp32"),
            "torch_threads": torch.get_num_threads(), "recipe": self.recipe,
            "skipped_images": self.data.skipped,  # unreadable files left out (data.skip_bad)
            "finished_early": state.finished_early,
            "best_epoch": chosen["epoch"] if chosen else None,
            "best": chosen,
            **({"lr_auto": self.lr_auto} if self.lr_auto else {}),
            "world_size": self.world.size,
            "images_per_step": self.cfg.batch_size * self.accumulate * self.world.size,
            **({"replica_fingerprints": self.replicas} if self.world.enabled else {}),
        }
        if not self.world.main:
            return summary
        report.write_json(out_dir / "summary.json", summary)
        confusion = getattr(task, "confusion", None)
        if plot and confusion is not None:  # the last evaluation of the delivered model, per class
            report.write_csv(out_dir / "per_class.csv", task.class_rows(list(self.data.classes)),
                             ("class", "precision", "recall", "f1", "support"))
            report.plot_confusion(out_dir / "confusion_matrix.png", confusion.tolist(), list(self.data.classes))
        if plot and state.step:  # at most ~4000 steps drawn: the plot of a long run stays quick
            rows = read_trace(self.trace.path, every=max(1, self.plan.total_steps // 4000))
            report.plot_lr_trace(out_dir / "lr_trace.png", rows, names, self.plan.steps_per_epoch)
        return summary


def _previous_trace(resume: str, saved: dict) -> tuple[Path | None, list | None]:
    """Where a resumed run's earlier trace rows are: lr_trace.csv of the run directory the checkpoint sits
    in, else the file the checkpoint names (a checkpoint copied elsewhere), else the rows a checkpoint of
    before streaming holds."""
    beside = checkpoint.resolve_resume_path(resume).parent.parent / "lr_trace.csv"
    named = Path(saved["trace_file"]) if saved.get("trace_file") else None
    found = next((p for p in (beside, named) if p is not None and p.is_file()), beside)
    return found, saved.get("trace")


def _best(rows: list[dict], metric: str) -> dict | None:
    """The evaluation `metric` chose among `rows` (Run.evaluations): where, its metric and its val_acc."""
    if not rows:
        return None
    row = rows[best.best_epoch(rows, metric)]
    return {"metric": metric, "value": row[metric], "val_acc": row["val_acc"], "epoch": row["epoch"],
            **({"step": row["step"]} if "step" in row else {})}


def _check_settings(cfg) -> None:
    for key in ("checkpoint_every", "eval_every"):
        if cfg[key] < 0:
            raise UserError(f"{key} must be >= 0 (0: at epoch ends only), got {cfg[key]}")
    if cfg.time_limit is not None and cfg.time_limit <= 0:
        raise UserError(f"time_limit must be > 0 minutes (null: none), got {cfg.time_limit}")
    if cfg.patience < 0 or cfg.min_delta < 0:
        raise UserError(f"patience and min_delta must be >= 0, got {cfg.patience} and {cfg.min_delta}")


@contextlib.contextmanager
def _algorithms(deterministic: bool, device: torch.device):
    """cuDNN's autotuner on CUDA for speed, or with `deterministic` the same algorithms every run (and
    every resume); the global flags are put back afterwards."""
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
           torch.backends.cudnn.deterministic)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old[1], old[2]


def _config_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _mean(values):
    return round(sum(values) / len(values), 2) if values else None


def _restore(saved: dict, trainer: Trainer, config: dict, groups: list, steps_per_epoch: int,
             world: World = distributed.SINGLE) -> RunState:
    """Load a checkpoint into a freshly built run after checking it continues the same run; returns the
    loop's state. Changed settings (epochs, lr...) are allowed and listed in a warning."""
    saved_world = saved.get("world_size", 1)
    if saved_world != world.size:
        raise UserError(f"resume: the checkpoint's run had {saved_world} process(es), this one has {world.size}; "
                        "an exact resume needs the same number (each holds its data shard and RNG stream); "
                        "start it with the same torchrun --nnodes x --nproc_per_node")
    checkpoint.check_resumable(saved, config, groups, trainer.model.state_dict(), steps_per_epoch)
    changed = checkpoint.config_changes(saved["config"], config)
    length = [k for k in ("epochs", "max_steps") if k in changed]
    if length:  # every schedule is laid over the run's length: a new one would jump the LRs mid-run
        was = ", ".join(f"{k}={saved['config'].get(k)}" for k in length)
        raise UserError(f"resume: the checkpoint's run was planned with {was}; a run of another length lays every "
                        f"LR schedule anew and its LRs would jump at the resumed step: resume with {was} "
                        "(to train longer, start a run from its weights: model.weights=RUN/checkpoints/last.pt)")
    if changed:
        log.warning("resume: these settings differ from the checkpoint's run and apply from now on: %s",
                    ", ".join(changed))
    trainer.model.load_state_dict(saved["model"])
    trainer.task.load_state(saved.get("task"))
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
    own = saved["ranks"][world.rank] if world.enabled else {"rng": saved["rng"]}
    checkpoint.set_rng_state(own["rng"])
    state = RunState(**{k: saved[k] for k in RunState.__dataclass_fields__ if k in saved})
    if world.enabled:  # the interrupted epoch's sums over this rank's shard
        state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = own["sums"]
    return state
