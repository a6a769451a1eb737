"""experiment=auto, the default recipe: a short probe of the data chooses the recipe before training starts.

The probe is one forward pass of the pretrained model, in eval mode, over the train images (centre
crops), with no training. It pools the output of every layer group and fits a linear probe on each
(multinomial logistic regression to convergence, L-BFGS, k-fold cross-validation within the train set).
How well each depth's features separate the classes says how far the data is from the pretraining:

- The top features (the head's input) score best, or within noise of the best: the pretrained features
  fit. Keep them: a probed head and a gentle body LR (`auto.near`, lp_ft).
- An earlier group's features score clearly above the top's: the top layers encode pretraining-specific
  features that fit this data worse than what lies under them (steel defects, upscaled digits). The top
  must be re-learned: every group at one LR, BatchNorm on batch statistics (`auto.far`, freezeout: each
  group's LR anneals to zero by the epoch it freezes, bottom up, the head's by the end). freezeout
  rather than full: wherever auto trains `far` it scored at least full's mean (steel defects at 30 and
  60 images a class, three backbones, a tuning set and train folds: docs/benchmarks/auto.md).

"Clearly": by more than one standard error of the top probe's accuracy and at least 1 point. The probe
never sees the val folder.

The far recipe trains BatchNorm on the batch statistics of this data, not ImageNet's. So before it
chooses `far`, the probe re-estimates every BatchNorm's statistics on a subset of the train images
(AdaBN) and fits the top probe again: when the top features lose more than `auto.bn_drop` under the
data's own statistics (digits: 0.83 -> 0.65), training every group starts from features worse than the
pretrained head input and `near` trains instead; when they keep (steel defects: 0.93 -> 0.96), `far`.
`far` also needs `auto.far_min_steps` optimizer steps: the far recipe fits its new head at the body's
LR, and in a handful of steps it cannot (steel defects at 10 images a class: 5 steps, 0.55 against
lp_ft's 0.90). It costs at most `auto.budget` of the run's compute (a forward pass is a
third of a training step), fewer train images when the run is short; on a model with BatchNorm the
probe takes at most half of it, so that the check fits in the rest however short the run.

The choice, the reason and every group's probe accuracy are printed, saved in auto.json and kept in
summary.json["recipe"]["auto"]. The run is then exactly `experiment=<choice>` with the same command
line: your overrides win over the chosen recipe's values as under any recipe. The checkpoint keeps the
choice, so a resume trains it without probing again; a model with no head module to probe under trains
`auto.near`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from finetune.base.checksum import digest, fingerprints
from finetune.base.errors import UserError
from finetune.base.files import cache_home
from finetune.config.presets import conf_dir
from finetune.core.plan import total_steps
from finetune.data.datasets import files_fingerprint
from finetune.engine import checkpoint, distributed
from finetune.engine.cache import fit_head
from finetune.engine.setup import setup
from finetune.engine.step import resolve_device
from finetune.output.progress import bar
from finetune.tasks import SingleLabel
from finetune.tasks.single_label import balanced_weights, summary_of

log = logging.getLogger("finetune")

FORWARD_SHARE = 1 / 3  # a forward pass, against a training step's forward and backward passes
MAX_IMAGES = 4000  # enough to rank linear probes; beyond it the probe only costs more


@dataclass
class Evidence:
    """What the probe measured: (group, CV accuracy of a linear probe on its pooled output), bottom to
    top; the last entry is the head's input."""
    stages: list[tuple[str, float]]
    images: int  # probed train images
    classes: int
    seconds: float = 0.0
    budget_share: float = 0.0  # the probe's compute against the run's, in training-step units
    # the top probe on `adapted_images` of the probed images, under ImageNet's BatchNorm statistics and
    # under statistics re-estimated on those images (AdaBN); None: no BatchNorm, no budget left, or the
    # probes already said near (the check can only turn far into near)
    adapted: tuple[float, float] | None = None
    adapted_images: int = 0
    steps: int = 0  # the run's optimizer steps; 0: not known
    reused: str | None = None  # the stored probe this one is (auto.reuse), None: measured now
    # skewed classes (the largest SKEW times the smallest or more): the top probe's cross-validated balanced
    # accuracy without and with balanced class weights, and whether the weights win; None: not skewed
    balance: dict | None = None

    @property
    def top(self) -> tuple[str, float]:
        return self.stages[-1]

    @property
    def best(self) -> tuple[str, float]:
        return max(self.stages, key=lambda s: s[1])

    @property
    def noise(self) -> float:
        """One standard error of the top probe's accuracy."""
        p = self.top[1]
        return math.sqrt(max(p * (1 - p), 1e-6) / max(self.images, 1))


def decide(ev: Evidence, near: str, far: str, bn_drop: float = 0.05, far_min_steps: int = 20) -> dict:
    """{"recipe", "reason"}: `far` when an earlier group's probe beats the top's by more than its noise
    (and 1 point), the top features keep (within `bn_drop`) under the data's own BatchNorm statistics and
    the run has at least `far_min_steps` optimizer steps, else `near`. A pure function of the evidence."""
    (top_name, top), (best_name, best) = ev.top, ev.best
    gap = best - top
    margin = max(0.01, ev.noise)
    if best_name != top_name and gap > margin:
        lead = (f"a linear probe on {best_name}'s output scores {best:.3f}, above the top features' {top:.3f} "
                f"by {gap:.3f} (> {margin:.3f})")
        if 0 < ev.steps < far_min_steps:
            reason = (f"{lead}, but the run has only {ev.steps} optimizer steps (< {far_min_steps}): too few for "
                      f"{far} to fit a new head at the body's LR; a probed head first, the body gently")
            return {"recipe": near, "reason": reason,
                    "summary": "an earlier layer fits better, but the run is too short to re-learn the top layers"}
        if ev.adapted is not None:
            before, after = ev.adapted
            if before - after > bn_drop:
                reason = (f"{lead}, but under this data's own BatchNorm statistics, which {far} trains on, the "
                          f"top probe falls from {before:.3f} to {after:.3f} (by more than {bn_drop}): {far} "
                          f"would start from worse features than the pretrained ones; keep them, train the body "
                          f"gently")
                return {"recipe": near, "reason": reason,
                        "summary": "an earlier layer fits better, but this data's BatchNorm statistics spoil the "
                                   "features: keep the pretrained ones"}
            lead += (f", and under this data's own BatchNorm statistics the top probe keeps "
                     f"{after:.3f} (from {before:.3f})")
        reason = f"{lead}: the top layers' pretrained features fit this data worse than earlier ones and must be re-learned"
        return {"recipe": far, "reason": reason,
                "summary": "an earlier layer's features fit this data clearly better than the pretrained top's"}
    if best_name != top_name:  # ahead, but within the probe's noise: no evidence to re-learn the top
        reason = (f"a linear probe on {best_name}'s output scores {best:.3f}, the top features' {top:.3f}: a gap of "
                  f"{gap:.3f} within the probe's noise ({margin:.3f} on {ev.images} images), no evidence that the "
                  f"top features fit worse: keep them, train the body gently")
        return {"recipe": near, "reason": reason,
                "summary": "the pretrained top features fit this data as well as any earlier layer's"}
    reason = (f"the top features are the best linear features (probe {top:.3f}; best earlier group "
              f"{_best_below(ev)}): keep them, train the body gently")
    return {"recipe": near, "reason": reason, "summary": "the pretrained top features fit this data best"}


def _best_below(ev: Evidence) -> str:
    below = ev.stages[:-1]
    if not below:
        return "none"
    name, acc = max(below, key=lambda s: s[1])
    return f"{name} {acc:.3f}"


# ------------------------------------------------------------------------------------------ measuring


def group_outputs(model: nn.Module, groups) -> dict[str, str]:
    """{module name: group} of the largest modules each holding parameters of one group only; a group's
    output is the output of the last of its modules to run (a stage's whole block, residuals included)."""
    owner = {p: g.name for g in groups for p in g.param_names}
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{m}.") for m in found):
            continue
        names = {f"{name}.{p}" for p, _ in module.named_parameters()}
        mine = {owner.get(p) for p in names}
        if names and len(mine) == 1 and None not in mine:
            found[name] = mine.pop()
    return found


def _pooled(out) -> torch.Tensor | None:
    """A module's output as one vector per image: the spatial (or token) mean; None when it is no tensor."""
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    out = out.detach().float()
    return out.mean(tuple(range(2, out.dim()))) if out.dim() == 4 else (out.mean(1) if out.dim() == 3 else out)


@torch.no_grad()
def stage_features(model: nn.Module, groups, head: nn.Module, loader, device, progress: bool = True,
                   channels_last: bool = False):
    """({group: pooled features} bottom to top, ending with "head input"; labels), model in eval mode."""
    modules = group_outputs(model, groups)
    head_group = groups[-1].name
    last: dict[str, torch.Tensor] = {}
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    hooks = []
    for name, module in model.named_modules():
        if modules.get(name) not in (None, head_group):
            group = modules[name]
            hooks.append(module.register_forward_hook(
                lambda m, args, out, g=group: last.__setitem__(g, _pooled(out))))
    hooks.append(head.register_forward_pre_hook(lambda m, args: last.__setitem__("head input", args[0].detach().flatten(1).float())))
    was = model.training
    model.eval()
    try:
        with bar(len(loader), "auto: probing the data", enabled=progress) as advance:
            for x, y in loader:
                last.clear()
                model(x.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format))
                for g, f in last.items():
                    if f is not None:
                        feats.setdefault(g, []).append(f.cpu())
                labels.append(y)
                advance()
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {g.name: torch.cat(feats[g.name]) for g in groups if g.name in feats}
    top = torch.cat(feats["head input"])
    # a group whose pooled output is the head's input itself (EfficientNet's neck) is no earlier stage
    out = {g: f for g, f in out.items() if not (f.shape == top.shape and torch.equal(f, top))}
    return {**out, "head input": top}, torch.cat(labels)


SKEW = 2.0  # train classes this uneven (largest over smallest) make the probe measure class weights too
# on skewed classes balanced class weights are chosen unless they cost the probe more balanced accuracy than
# this: a probe fitted to convergence is hardly moved by weights, while a few epochs of fine-tuning on the
# skewed loss under-predict the rare classes (on dtd10 made 10:1 the probe lost 0.011 with weights and
# the fine-tuned model gained 0.025: docs/benchmarks/tasks.md)
BALANCE_TOLERANCE = 0.02


def cv_accuracy(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 1e-3, seed: int = 0) -> float:
    """k-fold accuracy of a multinomial logistic regression on standardised features (the feature cache's
    L-BFGS fit to convergence); every image is scored once, by the fold that did not train on it."""
    return cv_scores(x, y, folds, l2, seed)[0]


def cv_scores(x: torch.Tensor, y: torch.Tensor, folds: int = 5, l2: float = 1e-3, seed: int = 0,
              class_weights: list[float] | None = None) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of cv_accuracy's probe, its loss weighted by `class_weights` if given."""
    n, classes = len(y), int(y.max()) + 1
    task = SingleLabel(classes, class_weights=class_weights)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    folds = max(2, min(folds, n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    correct = 0
    for k in range(folds):
        test = order[k::folds]
        mask = torch.ones(n, dtype=torch.bool)
        mask[test] = False
        train = mask.nonzero().squeeze(1)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        xtr, xte = (x[train] - mean) / std, (x[test] - mean) / std
        linear = nn.Linear(x.shape[1], classes)
        with torch.enable_grad():
            fit_head(linear, xtr, y[train], task, l2=l2, steps=200, weighted=class_weights is not None)
        with torch.no_grad():
            logits = linear(xte)
            correct += int(task.train_score(logits, y[test]))
            confusion += task.confusion_of(logits, y[test])
    return correct / n, summary_of(confusion)["bal_acc"]


def probe_images(n: int, images_per_run: int, budget: float, check: bool = False) -> int:
    """How many train images the probe may forward: its cost (a third of a training step per image) at
    most `budget` of the run's (`images_per_run` images through a training step), and MAX_IMAGES. With
    `check` (the model has BatchNorm) at most half the budget: the BatchNorm check, which alone can veto a
    full fine-tune, must fit in the rest, or a short run would choose `far` unchecked."""
    affordable = int(budget * images_per_run / FORWARD_SHARE)
    return max(1, min(n, MAX_IMAGES, affordable // 2 if check else affordable))


MIN_PROBED_PER_CLASS = 2  # a probe's cross-validation needs a class in its folds' train and test sets
MIN_ADAPTED = 20  # fewer images say nothing about a BatchNorm's statistics


def adapted_images(probed: int, images_per_run: int, budget: float) -> int:
    """How many of the probed images the BatchNorm check may use: it forwards them twice (statistics, then
    features) within what the first pass left of the budget; 0 when that is under MIN_ADAPTED."""
    left = int(budget * images_per_run / FORWARD_SHARE) - probed
    count = min(probed, left // 2)
    return count if count >= MIN_ADAPTED else 0


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapted_head_inputs(model: nn.Module, groups, head: nn.Module, loader, device, progress: bool = True,
                        channels_last: bool = False) -> torch.Tensor:
    """The head's input, in `loader`'s order, after every BatchNorm's statistics are re-estimated on
    `loader`'s images (AdaBN: a cumulative average over its batches, which should be shuffled); the
    model's own statistics and mode are restored."""
    norms = batchnorms(model)
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    was = model.training
    fmt = torch.channels_last if channels_last else torch.preserve_format
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every batch counts the same
            m.train()
        with bar(len(loader), "auto: BatchNorm statistics of the data", enabled=progress) as advance:
            for x, _ in loader:
                model(x.to(device, memory_format=fmt))
                advance()
        feats, _ = stage_features(model, groups, head, loader, device, progress, channels_last)
        return feats["head input"]
    finally:
        for m, (momentum, state) in zip(norms, saved):
            m.momentum = momentum
            m.load_state_dict(state)
        model.train(was)


def probe_store() -> Path:
    """Where auto.reuse keeps probes: $XDG_CACHE_HOME/finetune/probes (~/.cache when unset)."""
    return cache_home("probes")


def probe_key(cfg, parts) -> str:
    """Everything the probe's result depends on: the model's weights (as built, head included), its groups,
    the train files and the settings measure() reads. Equal keys measure equal evidence."""
    model_bits = sum(fingerprints(parts.model.state_dict()).values())
    key = {"model": model_bits, "groups": [(g.name, g.param_names) for g in parts.groups],
           "files": files_fingerprint(parts.data.train), "data": OmegaConf.to_container(cfg.data, resolve=True),
           "auto": {k: cfg.auto[k] for k in ("budget", "bn_drop", "far_min_steps", "folds")},
           "run": {k: cfg[k] for k in ("seed", "batch_size", "accumulate", "epochs", "max_steps")},
           "device": parts.device.type, "channels_last": parts.channels_last, "preprocess": parts.preprocess}
    return digest(key, 20)


def _stored(path: Path) -> Evidence | None:
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: probe again (and overwrite it)
        return None
    fields["stages"] = [tuple(s) for s in fields["stages"]]
    fields["adapted"] = tuple(fields["adapted"]) if fields.get("adapted") else None
    return Evidence(**{**fields, "reused": str(path)})


def measure(cfg) -> Evidence:
    """Build the model and the train set (centre crops) as the run will, forward, fit the probes; with
    auto.reuse, a stored probe of the same model, files and settings instead."""
    t0 = time.perf_counter()
    parts = setup(cfg, training=False)
    stored = probe_store() / f"{probe_key(cfg, parts)}.json" if cfg.auto.reuse else None
    ev = _stored(stored) if stored else None
    if ev is not None:
        parts.data.close()
        return ev
    ev = _measure(cfg, parts)
    ev.seconds = round(time.perf_counter() - t0, 1)
    if stored:
        try:
            stored.parent.mkdir(parents=True, exist_ok=True)
            tmp = stored.with_name(f".{stored.name}.{os.getpid()}.tmp")  # jobs running at once never see half
            tmp.write_text(json.dumps(asdict(ev), indent=1))
            os.replace(tmp, stored)
        except OSError as e:  # a read-only cache costs only the reuse
            log.warning("auto: could not keep the probe in %s (%s)", stored, e)
    return ev


def _measure(cfg, parts) -> Evidence:
    device, channels_last, groups, head, data = parts.device, parts.channels_last, parts.groups, parts.head, parts.data
    model = parts.model.to(memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if parts.task.name != "single_label":
        data.close()
        raise CannotProbe(f"its linear probes score one class per image, and task {parts.task.name} has label sets")
    if head is None:
        data.close()
        raise CannotProbe(f"no single module holds the head group '{groups[-1].name}', whose input the probe reads")
    n = len(data.train)
    per_step = cfg.batch_size * cfg.accumulate
    trained = min(cfg.epochs * n, cfg.max_steps * per_step) if cfg.max_steps else cfg.epochs * n
    has_bn = bool(batchnorms(model))
    keep = probe_images(n, trained, cfg.auto.budget, check=has_bn)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:keep].sort().values.tolist()

    def loader_of(indices: list[int]):
        return torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size * 2, sampler=indices,
                                           num_workers=data.num_workers)

    # the run's optimizer steps, counted as the run's plan counts them (no plan: lr may still be auto)
    steps = total_steps(cfg.epochs, cfg.max_steps, parts.steps_per_epoch)
    try:
        if keep < MIN_PROBED_PER_CLASS * data.num_classes:  # cross-validated probes on fewer say nothing
            raise CannotProbe(f"the run's budget ({cfg.auto.budget:.0%} of its compute) affords a probe of "
                              f"{keep} train images, under {MIN_PROBED_PER_CLASS} a class")
        feats, labels = stage_features(model, groups, head, loader_of(chosen), device, progress=bool(cfg.progress),
                                       channels_last=channels_last)
        stages = [(g, round(cv_accuracy(f, labels, cfg.auto.folds, seed=cfg.seed), 4)) for g, f in feats.items()]
        ev = Evidence(stages, keep, data.num_classes, steps=steps)
        count = adapted_images(keep, trained, cfg.auto.budget) if has_bn else 0
        # the BatchNorm check can only turn `far` into `near`: where the probes already say near, it is skipped
        if count and decide(ev, "near", "far", cfg.auto.bn_drop, cfg.auto.far_min_steps)["recipe"] == "far":
            # a random subset in random order: shuffled batches, as training sees them
            pick = torch.randperm(keep, generator=torch.Generator().manual_seed(cfg.seed + 1))[:count]
            shuffled = loader_of([chosen[i] for i in pick.tolist()])
            after = adapted_head_inputs(model, groups, head, shuffled, device, bool(cfg.progress), channels_last)
            ev.adapted = tuple(round(cv_accuracy(f, labels[pick], cfg.auto.folds, seed=cfg.seed), 4)
                               for f in (feats["head input"][pick], after))
            ev.adapted_images = count
        ev.balance = measure_balance(feats["head input"], labels, data.class_counts(), cfg.auto.folds, cfg.seed)
    finally:
        data.close()
    ev.budget_share = round((keep + 2 * ev.adapted_images) * FORWARD_SHARE / max(1, trained), 4)
    return ev


def measure_balance(x: torch.Tensor, y: torch.Tensor, counts: list[int] | None, folds: int, seed: int) -> dict | None:
    """On skewed classes (the train set's largest class SKEW times its smallest or more): the top probe's
    cross-validated balanced accuracy without and with balanced class weights (balance_choice decides);
    None when the classes are even or not countable."""
    if not counts or min(counts) == 0 or max(counts) / min(counts) < SKEW:
        return None
    plain = cv_scores(x, y, folds, seed=seed)[1]
    weighted = cv_scores(x, y, folds, seed=seed, class_weights=balanced_weights(counts))[1]
    return {"ratio": round(max(counts) / min(counts), 2), "plain": round(plain, 4), "weighted": round(weighted, 4)}


def balance_choice(ev: Evidence) -> dict:
    """What the balance measurement adds to the choice: settings and a sentence (none when not skewed)."""
    b = ev.balance
    if not b:
        return {}
    # decided here from the measurements, not stored with them: a kept probe (auto.reuse) follows today's rule
    if b["weighted"] >= b["plain"] - BALANCE_TOLERANCE:
        return {"set": {"loss.class_weights": "balanced"},
                "balance": (f"classes skewed {b['ratio']:g}:1: loss.class_weights=balanced (the probe's balanced "
                            f"accuracy {b['plain']:.3f} without, {b['weighted']:.3f} with)")}
    return {"balance": (f"classes skewed {b['ratio']:g}:1, but class weights cost the probe's balanced accuracy more "
                        f"than {BALANCE_TOLERANCE} ({b['plain']:.3f} without, {b['weighted']:.3f} with): none")}


def check_recipes(cfg) -> None:
    """auto.near and auto.far name fixed recipes (conf/experiment/)."""
    known = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml") if p.stem not in ("auto", "none"))
    for key in ("near", "far"):
        if cfg.auto[key] not in known:
            raise UserError(f"auto.{key}: '{cfg.auto[key]}' is not a fixed recipe; choose one of {', '.join(known)}")


def choose(cfg, saved: dict | None = None) -> dict:
    """Probe, decide, say it in the log: {"recipe", "reason", "probe": {...}} (train() writes it to
    auto.json). `saved`: the checkpoint cfg.resume points at, loaded (read here when not given)."""
    check_recipes(cfg)
    if not 0 < cfg.auto.budget <= 1:
        raise UserError(f"auto.budget must be in (0, 1], got {cfg.auto.budget}")
    world = distributed.from_env()
    if world.enabled:  # rank 0 probes and every rank trains its choice: a tie broken differently would split them

        distributed.init(world, resolve_device(distributed.device_name(cfg.device, world)))
        choice = choose_here(cfg, saved) if world.main else None
        choice = distributed.broadcast(choice)
    else:
        choice = choose_here(cfg, saved)
    probe = choice["probe"]
    # the choice in a user's terms; the probe's numbers are in auto.json (and inspect inspect.probe=true)
    log.info("auto: %s experiment=%s: %s%s", "the resumed run keeps" if choice.get("resumed") else "chose",
             choice["recipe"], choice.get("summary", choice["reason"]),
             _probe_note(probe))
    if choice.get("balance"):
        log.info("auto: %s", choice["balance"])
    return choice


def _probe_note(probe: dict | None) -> str:
    if not probe:
        return ""
    if probe.get("reused"):
        return f" (the probe of {probe['images']} images kept in {probe['reused']}; details in auto.json)"
    return f" (probe of {probe['images']} images, {probe['seconds']:.0f} s; details in auto.json)"


class CannotProbe(Exception):
    """No probe can run (the model has no head module to probe under, or the budget affords too few
    images): auto trains its near recipe and says why."""


def choose_here(cfg, saved: dict | None = None) -> dict:
    if saved is None:

        saved = checkpoint.resumed(cfg.resume)
    kept = resumed_choice(saved) if saved is not None else None
    if kept:  # no second probe: the run continues the recipe it started with
        return kept
    try:
        ev = measure(cfg)
    except CannotProbe as why:
        return {"recipe": cfg.auto.near, "reason": f"no probe: {why}; the recipe for pretrained features that fit",
                "probe": None}
    choice = decide(ev, cfg.auto.near, cfg.auto.far, cfg.auto.bn_drop, cfg.auto.far_min_steps)
    return {**choice, **balance_choice(ev), "probe": asdict(ev)}


def resumed_choice(saved: dict) -> dict | None:
    """The choice the run being resumed made (its checkpoint `saved` keeps it), marked resumed; None for
    a run that was not experiment=auto."""
    chosen = (saved.get("recipe") or {}).get("auto")
    return {**chosen, "resumed": True} if chosen else None
