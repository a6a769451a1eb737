"""Per-group diagnostics and freeze integrity: what no other fine-tuning tool shows per layer group.

Every `diag_every` steps (default: 4 times an epoch; 0: off), for each group: the gradient norm, the
weight norm and the update-to-weight ratio ||dW|| / ||W||, measured from the update the optimizer
actually made (weights copied before its step, compared after), into diagnostics.csv and
diagnostics.png; and the distribution of each group's output activations (forward hooks on the group's
last module) into activations.csv and activations.png. A trainable group whose update ratio stays far
from the usual ~1e-3 over an epoch (above 1e-2 or below 1e-5) gets a one-line warning with an LR for it.

Freeze integrity: whenever a group is frozen, a fingerprint of its weights and of the BatchNorm
statistics that must not move (those in eval mode) is taken; at every epoch's end a change is an error
naming the tensor (a frozen weight that weight decay, an optimizer or a stray in-place op touched).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from finetune.base.checksum import fingerprints
from finetune.base.errors import UserError
from finetune.output import report
from finetune.output.trace import NoTrace, TraceFile, read_rows

log = logging.getLogger("finetune")

FIELDS = ("step", "epoch", "group", "trainable", "grad_norm", "weight_norm", "update_ratio")
BINS = 40
LOG10_RANGE = (-4.0, 2.0)  # activation magnitudes 1e-4 .. 1e2, log-spaced; outside: the end bins
ACT_FIELDS = ("step", "epoch", "group", *[f"b{i}" for i in range(BINS)])
RATIO_BAND = (1e-5, 1e-2)
SAMPLE = 1 << 16  # activations histogrammed per group and diagnostic step, at most  # update ratios outside it get a warning; ~1e-3 is the usual


def resolve_every(every: int, steps_per_epoch: int) -> int:
    """-1: four times an epoch (at least every step of a short epoch); 0: off."""
    if every < -1:
        raise UserError(f"diag_every must be -1 (4 times an epoch), 0 (off) or a number of steps, got {every}")
    return max(1, steps_per_epoch // 4) if every == -1 else every


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of several tensors together (one fused kernel per dtype and device)."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)])))


class Probe:
    """One diagnostic step: gradients and weights before the optimizer step, the update after it."""
    def __init__(self, groups: list[list[nn.Parameter]]):
        self.groups = groups
        self.grad_norms: list[float] = []
        self.before: list[list[torch.Tensor]] = []

    def before_step(self, grad_scale: float) -> None:
        self.grad_norms = [_norm([p.grad for p in g if p.grad is not None]) / grad_scale for g in self.groups]
        self.before = [[p.detach().clone() for p in g if p.grad is not None] for g in self.groups]

    def after_step(self) -> list[dict]:
        rows = []
        for g, grad, before in zip(self.groups, self.grad_norms, self.before):
            moved = [p for p in g if p.grad is not None] if before else []
            weight = _norm([p.detach() for p in g])
            update = _norm(torch._foreach_sub([p.detach() for p in moved], before)) if before else 0.0
            rows.append({"grad_norm": grad, "weight_norm": weight,
                         "update_ratio": update / weight if weight > 0 else 0.0})
        self.before = []
        return rows


def last_modules(model: nn.Module, groups) -> list[nn.Module | None]:
    """Each group's last module (in registration order) that owns one of its parameters: its output."""
    owner = {}
    for name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{name}.{pname}" if name else pname] = module
    out = []
    for group in groups:
        modules = [owner[n] for n in group.param_names if n in owner]
        out.append(modules[-1] if modules else None)
    return out


class Activations:
    """Forward hooks that histogram each group's output (log10 |a|, BINS bins) during one forward."""
    def __init__(self, modules: list[nn.Module | None]):
        self.modules = modules
        self.hists: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = []

    def __enter__(self):
        for i, module in enumerate(self.modules):
            if module is not None:
                self.handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        lo, hi = LOG10_RANGE

        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                flat = output.detach().flatten()
                # a strided sample of at most SAMPLE values: the histogram's shape at a fraction of the cost
                flat = flat[:: max(1, flat.numel() // SAMPLE)]
                a = flat.float().abs().clamp_min(10 ** lo).log10().clamp(lo, hi - 1e-6)
                h = torch.histc(a, bins=BINS, min=lo, max=hi).cpu()
                self.hists[i] = h if self.hists[i] is None else self.hists[i] + h
        return hook

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def ratio_warnings(ratios: dict[str, list[float]], peaks: dict[str, float], epoch: int) -> dict[str, str]:
    """{group: warning} for groups whose update ratios over the epoch (geometric mean, at peak LR) lie
    outside RATIO_BAND, each with the LR that would bring them to ~1e-3 (updates scale with the LR)."""
    out = {}
    lo, hi = RATIO_BAND
    for name, values in ratios.items():
        if not values:
            continue
        mean = math.exp(sum(math.log(v) for v in values) / len(values))
        if lo <= mean <= hi:
            continue
        lr, better = peaks[name], peaks[name] * 1e-3 / mean
        out[name] = (f"group {name}: its updates were {mean:.1e} of its weights in epoch {epoch} (usually ~1e-3): "
                     f"its LR {lr:.2g} looks too {'high' if mean > hi else 'low'}; try ++per_group.{name}.lr={better:.2g}")
    return out


class Diagnostics:
    """diagnostics.csv / activations.csv as training goes (cut back on resume like the LR trace), the
    update-ratio warning per epoch, and the plots at the end. The loop asks `due(step)`; on a due step
    it runs the step under `activations()` with `probe()` and hands the results to `record`."""

    def __init__(self, model: nn.Module, groups, plan, out_dir: Path, every: int, main: bool,
                 resumed_dir: Path | None = None):
        self.every, self.plan, self.out_dir, self.main = every, plan, out_dir, main  # rank 0 alone writes
        self.names = [g.name for g in groups]
        # the ~1e-3 rule of thumb is for pretrained weights: adapters start at zero (LoRA's B) or one (IA3) and
        # move by other ratios, so groups that train adapters get no LR advice
        self.adapted = {g.name for g in groups if getattr(g, "adapters", None)}
        params = dict(model.named_parameters())
        # what the group trains: under adapters their weights, not the fixed base's (a ratio over both would
        # read ~0 however fast the adapters move)
        self.params = [[params[n] for n in g.param_names if n not in set(g.fixed)] for g in groups]
        self.modules = last_modules(model, groups)
        kind = TraceFile if main else NoTrace
        self.csv = kind(out_dir / "diagnostics.csv", FIELDS)
        self.act_csv = kind(out_dir / "activations.csv", ACT_FIELDS)
        self.ratios: dict[int, list[float]] = defaultdict(list)  # this epoch's update ratios per group
        self.warned: set[str] = set()
        self.started = False
        # a resumed run's files, beside its checkpoint
        self.before = ({"diagnostics": resumed_dir / "diagnostics.csv", "activations": resumed_dir / "activations.csv"}
                       if resumed_dir is not None else {})

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def probe(self) -> Probe:
        return Probe(self.params)

    def activations(self) -> Activations:
        return Activations(self.modules)

    def start(self, step: int) -> None:
        """At the first epoch this process trains: rows of the steps the checkpoint holds come over from
        the resumed run's files."""
        if self.started:
            return
        self.started = True
        self.csv.start(step, self.before.get("diagnostics"))
        self.act_csv.start(step, self.before.get("activations"))

    def record(self, step: int, epoch: int, mask: list[bool], probe_rows: list[dict], hists: list) -> None:
        rows = [{"step": step, "epoch": epoch, "group": n, "trainable": int(on), **r}
                for n, on, r in zip(self.names, mask, probe_rows)]
        for i, r in enumerate(rows):
            # the ratio the group's peak LR would give: warmup and annealing are not a wrong LR
            factor = self.plan.lr(i, step) / self.plan.peak(i, step)
            if r["trainable"] and factor > 0.1 and r["update_ratio"] > 0:
                self.ratios[i].append(r["update_ratio"] / factor)
        self.csv.write(rows)
        self.act_csv.write([{"step": step, "epoch": epoch, "group": n,
                             **{f"b{k}": int(v) for k, v in enumerate(h.tolist())}}
                            for n, h in zip(self.names, hists) if h is not None])

    def end_epoch(self, epoch: int) -> None:
        """The update-ratio warnings of `epoch` (once per group), and the files flushed."""
        # the new head (the last group) is exempt: a freshly initialised layer under Adam moves by far
        # more than 1e-3 of its small initial weights, and that is how it should train
        ratios = {self.names[i]: r for i, r in self.ratios.items()
                  if i < len(self.names) - 1 and self.names[i] not in self.adapted}
        peaks = {g.name: g.lr for g in self.plan.groups}
        for name, line in ratio_warnings(ratios, peaks, epoch).items():
            if name not in self.warned:
                self.warned.add(name)
                log.warning("%s", line)
        self.ratios.clear()
        self.csv.flush()
        self.act_csv.flush()

    def plot(self) -> None:
        """diagnostics.png and activations.png from the files (rank 0, once something was recorded; a
        resumed run that had nothing left to train draws them again from its directory's files)."""
        if not self.main or not self.csv.path.is_file():
            return
        self.csv.flush()
        self.act_csv.flush()
        report.plot_diagnostics(self.out_dir / "diagnostics.png", read_rows(self.csv.path), self.names)
        report.plot_activations(self.out_dir / "activations.png", read_rows(self.act_csv.path), self.names, BINS,
                                LOG10_RANGE)

    def close(self) -> None:
        self.csv.close()
        self.act_csv.close()


# ------------------------------------------------------------------------------------ freeze integrity


class FreezeIntegrity:
    """Frozen weights, and the BatchNorm statistics kept in eval mode, must not change while frozen."""
    def __init__(self):
        self.held: dict[str, int] = {}

    @staticmethod
    def _frozen(model: nn.Module, frozen_norms) -> dict[str, torch.Tensor]:
        out = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        names = {id(m): n for n, m in model.named_modules()}
        for module in frozen_norms:
            prefix = names.get(id(module), "")
            for bname, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point():
                    out[f"{prefix}.{bname}" if prefix else bname] = buf
        return out

    def hold(self, model: nn.Module, frozen_norms) -> None:
        """At the start of every epoch: a freeze change has just been applied, and a resumed run
        fingerprints what it loaded."""
        self.held = fingerprints(self._frozen(model, frozen_norms))

    def check(self, model: nn.Module, frozen_norms, epoch: int) -> None:
        """At an epoch's end: a frozen tensor that changed during `epoch` is an error naming it."""
        if not self.held:
            return
        now = fingerprints({n: t for n, t in self._frozen(model, frozen_norms).items() if n in self.held})
        changed = [n for n, fp in now.items() if fp != self.held[n]]
        if changed:
            raise UserError(f"freeze integrity: {changed[0]} changed during epoch {epoch} although "
                            f"its group was frozen ({len(changed)} tensor(s) changed); please report this with the "
                            "config (a model that writes to its own weights, or a finetune bug)")
