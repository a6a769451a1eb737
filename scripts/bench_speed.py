#!/usr/bin/env python
"""Speed: finetune's `Trainer.step` against a plain hand-written PyTorch loop (issue 5).

Every comparison runs in this one process on the SAME model object (weights, memory, requires_grad
pattern, frozen BatchNorm in eval mode), the same batch (already in memory, same memory format), the
same precision and optimizer settings; only the code around the step differs. A and B are
interleaved in ABBA order after warm-up, so drift and neighbours' load hit both alike; a ratio is the
median over >= 5 repeats of finetune's time / the plain loop's time in the same repeat (paired:
robust when other processes come and go). Repeats continue while a time budget lasts. `noise_ratio`
times a second, identical plain loop in the same run: how far from 1.0 a ratio strays by chance.
On CPU the default is one thread when other processes already load the machine (see cpu_threads).

  overhead  finetune, full training (6 layer groups, one-cycle LR and momentum set every step)
            vs the plain loop stepping the same optimizer (same param groups).       goal <= 1.02
  frozen    finetune unfreeze=1 vs the plain loop with the same requires_grad pattern
            (frozen BatchNorm in eval mode, optimizer over the trainable params).    goal <= 1.02
            frozen_over_full: finetune's frozen step / its full step (freezing must skip the
            backward of the frozen prefix, so it must be clearly < 1).
  groups    finetune with 6 groups on 6 different schedules vs the plain loop with ONE param
            group.                                                                   goal <= 1.01
            groups_optimizer_ratio: the plain loop stepping finetune's optimizer (12 param groups:
            6 layer groups x decay/no-decay) vs one group: torch's own per-group cost.
  memory    peak memory of one step, finetune / plain.                               goal <= 1.02
            CUDA: torch.cuda.max_memory_allocated above the pre-step level. CPU: the peak of live
            bytes in torch's CPU allocator during the step, from torch.profiler(profile_memory=True)
            ("Total Allocated" of its memory events). Also: activation memory (bytes autograd
            saves for backward, parameters and the input excluded), frozen vs full.
  diagnostics  a step with the per-group diagnostics (norms, weights copied before the update,
            activation hooks) against a plain step, paired; diagnostics_ratio is what a run pays at the
            default frequency, one probed step in 25 (4 an epoch of 100).           goal <= 1.02
  pipeline  real JPEG ImageFolder data (hymenoptera) through finetune's loader vs the same number of
            steps on an in-memory batch: throughput ratio (GPU goal >= 0.9; CPU: reported).

On CUDA it trains in bf16 (fp16 where unsupported) with channels_last; without --quick it also
measures resnet50 and resnet18 throughput at 224 px (goal: resnet50 >= 3000 images/s on one H100).

    python scripts/bench_speed.py --quick      # < 3 min on 2 CPU cores; last line: one JSON object
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.config.schema import TrainConfig  # noqa: E402
from finetune.core import freeze  # noqa: E402
from finetune.data import loaders as data_mod  # noqa: E402
from finetune.engine.setup import build_parts  # noqa: E402
from finetune.engine.step import Trainer, resolve_precision  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera"
SIX_SCHEDULES = ["constant", "cosine", "one_cycle", "sgdr", "slanted_triangular", "step"]
GOALS = {"overhead_ratio": 1.02, "frozen_ratio": 1.02, "groups_ratio": 1.01, "memory_ratio": 1.02,
         "diagnostics_ratio": 1.02}
DIAG_EVERY = 25  # the default, 4 diagnostic steps an epoch, for a 100-step epoch


@dataclass(frozen=True)
class Settings:
    model: str
    batch: int
    image: int
    repeats: int  # timed repeats per side, at least (>= 5)
    steps: int  # optimizer steps per timed repeat
    warmup: int  # untimed steps per side first
    budget_s: float  # more repeats (up to max_repeats) while a comparison ran less (per 2 sides)
    max_repeats: int
    pipeline_batches: int | None  # batches per pipeline repeat (None: a whole epoch)
    pipeline_repeats: int
    precision: str  # fp32 | bf16 | fp16 ("auto" resolved)
    channels_last: bool
    compile: bool = False


def settings_for(device: torch.device, quick: bool, args) -> Settings:
    if device.type == "cuda":
        amp = resolve_precision("auto", device)
        base = Settings("resnet18", 256, 224, 7, 20, 10, 20.0, 25, None, 3, str(amp).replace("torch.", ""), True)
        if quick:
            base = replace(base, batch=128, repeats=5, steps=10, warmup=5, budget_s=5.0, pipeline_batches=6)
    elif quick:  # 2 CPU cores, maybe shared with other processes: well under 3 minutes
        base = Settings("resnet18", 16, 64, 5, 1, 2, 12.0, 101, 4, 3, "fp32", False)
    else:
        base = Settings("resnet18", 32, 96, 5, 1, 2, 40.0, 201, None, 3, "fp32", False)
    overrides = {k: v for k, v in (("model", args.model), ("batch", args.batch), ("image", args.image),
                                   ("repeats", args.repeats)) if v is not None}
    if args.compile:
        overrides["compile"] = True
    s = replace(base, **overrides)
    if s.repeats < 5:
        raise SystemExit("--repeats must be >= 5 (the median of at least 5 repeats)")
    return s


def amp_dtype(s: Settings) -> torch.dtype | None:
    return None if s.precision == "fp32" else getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(
        s.precision, s.precision))


# ------------------------------------------------------------------------------------------ set-ups


def make_cfg(s: Settings, **overrides):
    """The schema's defaults (AdamW, one-cycle, 6 resnet layer groups), random init, offline."""
    cfg = OmegaConf.structured(TrainConfig)
    base = {"model.name": s.model, "model.source": "torchvision", "model.weights": None,
            "epochs": 1, "lr": 1e-3, "batch_size": s.batch, "compile": s.compile,
            "data.image_size": s.image, "data.num_classes": 10}
    for key, value in {**base, **overrides}.items():
        OmegaConf.update(cfg, key, value, force_add=False)
    return cfg


def finetune_trainer(cfg, s: Settings, device: torch.device, steps_per_epoch: int = 100_000):
    """finetune's Trainer built the way `train` builds it, in the plan's epoch-0 freeze state."""
    torch.manual_seed(0)
    bundle, groups, _ = build_parts(cfg)
    model = bundle.model.to(device)
    trainer = Trainer.from_config(cfg, model, groups, steps_per_epoch, device, amp_dtype(s), s.channels_last)
    trainer.set_epoch(0)
    freeze.set_train_mode(model, trainer.frozen_norms)
    return trainer, bundle


class PlainLoop:
    """The baseline people write by hand: autocast forward, one backward, step, zero_grad."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 amp: torch.dtype | None, compile: bool = False):
        self.model, self.optimizer, self.device, self.amp = model, optimizer, device, amp
        self.forward = torch.compile(model) if compile else model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def plain_loop(trainer: Trainer, cfg, s: Settings, optimizer: str = "shared") -> PlainLoop:
    """The plain loop on the trainer's own model object (same weights and memory, same requires_grad
    pattern, frozen BatchNorm in eval mode), so only the code around the step differs. `optimizer`:
      shared     the trainer's optimizer itself (same param groups and state; LRs left as they are)
      trainable  a hand-made optimizer over the trainable parameters only, the trainer's LRs and decays
      one_group  a hand-made optimizer with ONE param group over the trainable parameters"""
    if optimizer == "shared":
        return PlainLoop(trainer.model, trainer.optimizer, trainer.device, trainer.amp_dtype, s.compile)
    if optimizer == "one_group":
        groups = [{"params": [p for p in trainer.model.parameters() if p.requires_grad]}]
    elif optimizer == "trainable":
        groups = [{"params": [p for p in pg["params"] if p.requires_grad], "lr": pg["lr"],
                   "weight_decay": pg["weight_decay"]} for pg in trainer.optimizer.param_groups]
        groups = [g for g in groups if g["params"]]
    else:
        raise ValueError(optimizer)
    return PlainLoop(trainer.model, same_kind_optimizer(trainer.optimizer, groups), trainer.device,
                     trainer.amp_dtype, s.compile)


def same_kind_optimizer(like: torch.optim.Optimizer, groups: list[dict]) -> torch.optim.Optimizer:
    """A new optimizer of like's class with like's constructor settings (betas, eps, decay, foreach,
    fused...), so the plain side never runs a different optimizer implementation."""
    accepted = inspect.signature(type(like).__init__).parameters
    return type(like)(groups, **{k: v for k, v in like.defaults.items() if k in accepted})


def in_memory_batch(s: Settings, device: torch.device, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.batch, 3, s.image, s.image, generator=g)
    y = torch.randint(0, classes, (s.batch,), generator=g)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    return x.to(device, memory_format=fmt), y.to(device)


def diagnosed_step(trainer: Trainer, x, y, probe: bool) -> Callable[[], object]:
    """One training step; with `probe`, the diagnostics of a run's due step (norms, weights copied
    before the update, activation hooks)."""
    from finetune.engine.diagnostics import Activations, Probe, last_modules

    params = dict(trainer.model.named_parameters())
    groups = [[params[n] for n in g.param_names] for g in trainer.groups]
    modules = last_modules(trainer.model, trainer.groups)
    counter = itertools.count()

    def step():
        i = next(counter)
        if not probe:
            return trainer.step(x, y, i)
        with Activations(modules):
            return trainer.step_accumulated([(x, y)], i, probe=Probe(groups))
    return step


def finetune_step(trainer: Trainer, x, y) -> Callable[[], object]:
    counter = itertools.count()
    return lambda: trainer.step(x, y, next(counter))


# ------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: list[Callable], s: Settings, device: torch.device) -> list[list[float]]:
    """Seconds per step of each fn: `warmup` untimed steps each, then timed repeats of `steps` steps
    each, the order reversed every repeat (ABBA...): at least `repeats`, more while the budget lasts
    (a noisy shared machine needs many pairs for a stable median). A device sync brackets each
    repeat, never each step."""
    for _ in range(s.warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(s.max_repeats):
        if r >= s.repeats and time.perf_counter() - start > s.budget_s * len(fns) / 2:
            break
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(s.steps):
                fns[i]()
            synchronize(device)
            times[i].append((time.perf_counter() - t0) / s.steps)
    return times


def ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of A's time / B's time in the same repeat."""
    return statistics.median(x / y for x, y in zip(a, b))


def spread(times: list[float]) -> str:
    return (f"{statistics.median(times) * 1e3:8.2f} ms/step (min {min(times) * 1e3:.2f}, "
            f"max {max(times) * 1e3:.2f}, n={len(times)})")


# ------------------------------------------------------------------------------------------ memory


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs start/stop lines on fd 2; keep the report readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_bytes(fn: Callable) -> int:
    """Peak live bytes in torch's CPU allocator during fn(), above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start


def peak_bytes(fn: Callable, device: torch.device) -> int:
    if device.type != "cuda":
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def activation_bytes(trainer: Trainer, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters and the
    input excluded): what freezing a prefix saves."""
    skip = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer.autocast():
        logits = trainer.forward(x)
    del logits
    return sum(saved.values())


# ------------------------------------------------------------------------------------------ measures


def measure_core(s: Settings, device: torch.device, log) -> dict:
    x, y = in_memory_batch(s, device)
    out: dict = {}

    # overhead: full training, same param groups, finetune sets LR + momentum every step
    cfg = make_cfg(s)
    full, _ = finetune_trainer(cfg, s, device)
    # noise floor: a second, identical plain loop in the same run: how far a ratio strays by chance
    plain, twin = plain_loop(full, cfg, s), plain_loop(full, cfg, s)
    ft_full, pl_full, pl_twin = interleaved(
        [finetune_step(full, x, y), lambda: plain.step(x, y), lambda: twin.step(x, y)], s, device)
    out["overhead_ratio"] = ratio(ft_full, pl_full)
    out["noise_ratio"] = ratio(pl_twin, pl_full)
    log(f"overhead  finetune {spread(ft_full)} | plain {spread(pl_full)} | ratio {out['overhead_ratio']:.4f}")
    log(f"noise     the same plain loop twice: ratio {out['noise_ratio']:.4f} (what chance alone gives here)")

    # memory: one step each, after the warm-up above (optimizer state exists on both sides)
    counter = itertools.count(10_000)
    ft_mem = max(peak_bytes(lambda: full.step(x, y, next(counter)), device) for _ in range(2))
    pl_mem = max(peak_bytes(lambda: plain.step(x, y), device) for _ in range(2))
    out["memory_ratio"] = ft_mem / pl_mem
    act_full = activation_bytes(full, x)
    log(f"memory    finetune {ft_mem / 2**20:.1f} MiB | plain {pl_mem / 2**20:.1f} MiB peak per step | "
        f"ratio {out['memory_ratio']:.4f}")
    del plain, twin

    # frozen: unfreeze=1 (the head trains) against the same requires_grad pattern by hand
    frozen, _ = finetune_trainer(make_cfg(s, unfreeze=1), s, device)
    plain = plain_loop(frozen, cfg, s, optimizer="trainable")
    ft_frozen, pl_frozen = interleaved([finetune_step(frozen, x, y), lambda: plain.step(x, y)], s, device)
    out["frozen_ratio"] = ratio(ft_frozen, pl_frozen)
    out["frozen_over_full"] = statistics.median(ft_frozen) / statistics.median(ft_full)
    act_frozen = activation_bytes(frozen, x)
    out["activation_frozen_over_full"] = act_frozen / act_full
    counter = itertools.count(10_000)
    frozen_mem = max(peak_bytes(lambda: frozen.step(x, y, next(counter)), device) for _ in range(2))
    out["peak_memory_frozen_over_full"] = frozen_mem / ft_mem
    log(f"frozen    finetune {spread(ft_frozen)} | plain {spread(pl_frozen)} | ratio {out['frozen_ratio']:.4f}")
    log(f"          frozen/full step time {out['frozen_over_full']:.3f}; activations saved for backward "
        f"{act_frozen / 2**20:.2f} MiB frozen vs {act_full / 2**20:.2f} MiB full; "
        f"peak step memory {frozen_mem / 2**20:.1f} vs {ft_mem / 2**20:.1f} MiB")
    del frozen, plain, full

    # groups: six layer groups on six schedules, against one param group
    per_group = {name: {"schedule": {"kind": kind}}
                 for name, kind in zip(["stem", "layer1", "layer2", "layer3", "layer4", "head"], SIX_SCHEDULES)}
    cfg6 = make_cfg(s, **{"lr_spread.kind": "geometric"})
    cfg6.per_group = per_group
    six, _ = finetune_trainer(cfg6, s, device)
    assert len({gp.schedule.kind for gp in six.plan.groups}) == 6
    # a third side splits the ratio: the plain loop stepping finetune's multi-group optimizer shows
    # what torch's optimizer itself charges per param group, apart from finetune's own code
    plain, plain_six = plain_loop(six, cfg6, s, optimizer="one_group"), plain_loop(six, cfg6, s)
    ft_six, pl_one, pl_six = interleaved(
        [finetune_step(six, x, y), lambda: plain.step(x, y), lambda: plain_six.step(x, y)], s, device)
    out["groups_ratio"] = ratio(ft_six, pl_one)
    out["groups_optimizer_ratio"] = ratio(pl_six, pl_one)
    log(f"groups    finetune {spread(ft_six)} | plain {spread(pl_one)} | ratio {out['groups_ratio']:.4f} "
        f"({len(six.optimizer.param_groups)} param groups vs 1)")
    log(f"          of which torch's optimizer with {len(six.optimizer.param_groups)} param groups vs 1 "
        f"(plain loop both sides): {out['groups_optimizer_ratio']:.4f}; finetune's own code: "
        f"{ratio(ft_six, pl_six):.4f}")
    del six, plain, plain_six

    # diagnostics: a probed step against a plain one, paired many times (a block of 25 steps per sample
    # would give a handful of noisy pairs); a run at the default frequency pays 1 probed step in 25
    diag, _ = finetune_trainer(cfg, s, device)
    probed, unprobed = interleaved([diagnosed_step(diag, x, y, True), diagnosed_step(diag, x, y, False)], s, device)
    per_probe = ratio(probed, unprobed)
    out["diagnostics_step_ratio"] = per_probe
    out["diagnostics_ratio"] = 1 + (per_probe - 1) / DIAG_EVERY
    log(f"diagnostics  a probed step {spread(probed)} | a plain step {spread(unprobed)} | ratio {per_probe:.4f}; "
        f"one step in {DIAG_EVERY} probed: {out['diagnostics_ratio']:.4f}")
    del diag
    out["images_per_s"] = {"finetune_full": s.batch / statistics.median(ft_full),
                           "plain_full": s.batch / statistics.median(pl_full),
                           "finetune_frozen": s.batch / statistics.median(ft_frozen)}
    return out


def measure_pipeline(s: Settings, device: torch.device, root: Path, log) -> dict:
    """finetune's ImageFolder loader feeding Trainer.step vs the same steps on an in-memory batch."""
    if not (root / "train").is_dir():
        log(f"pipeline  skipped: no ImageFolder data at {root}")
        return {"pipeline_ratio": None}
    cfg = make_cfg(s, **{"data.name": "imagefolder", "data.root": str(root)})
    bundle, groups, _ = build_parts(cfg)
    data = data_mod.build_data(cfg.data, bundle.preprocess, batch_size=s.batch, seed=0,
                               pin_memory=device.type == "cuda", persistent_workers=True)
    torch.manual_seed(0)
    trainer = Trainer.from_config(cfg, bundle.model.to(device), groups, data.steps_per_epoch, device,
                                  amp_dtype(s), s.channels_last)
    trainer.set_epoch(0)
    freeze.set_train_mode(trainer.model, trainer.frozen_norms)
    n = min(s.pipeline_batches or data.steps_per_epoch, data.steps_per_epoch)
    x_mem, y_mem = trainer.to_device(*next(iter(data.train_loader(0))))
    counter = itertools.count()

    def from_loader(epoch: int) -> None:
        # a fresh epoch each time: worker start-of-epoch latency is part of what is measured
        for x, y in itertools.islice(data.train_loader(epoch), n):
            x, y = trainer.to_device(x, y)
            trainer.step(x, y, next(counter))

    def from_memory() -> None:
        for _ in range(n):
            trainer.step(x_mem, y_mem, next(counter))

    epochs = itertools.count(1)
    loader_t, memory_t = interleaved([lambda: from_loader(next(epochs)), from_memory],
                                     replace(s, warmup=1, steps=1, repeats=s.pipeline_repeats,
                                             max_repeats=s.pipeline_repeats), device)
    pipeline = ratio(memory_t, loader_t)
    workers = data.num_workers
    log(f"pipeline  loader {n * s.batch / statistics.median(loader_t):.1f} img/s ({workers} workers, "
        f"{len(data.train)} JPEGs at {s.image}px) | in-memory {n * s.batch / statistics.median(memory_t):.1f} "
        f"img/s | ratio {pipeline:.3f} (median of {s.pipeline_repeats}, {n} batches each)")
    del data
    return {"pipeline_ratio": pipeline, "pipeline_workers": workers}


def measure_gpu_throughput(s: Settings, device: torch.device, log) -> dict:
    """resnet50 and resnet18 at 224 px, bf16, channels_last: images/s of finetune and the plain loop."""
    out = {}
    for name, batch in (("resnet50", 256), ("resnet18", 256)):
        t = replace(s, model=name, batch=batch, image=224, channels_last=True)
        x, y = in_memory_batch(t, device)
        cfg = make_cfg(t)
        trainer, _ = finetune_trainer(cfg, t, device)
        plain = plain_loop(trainer, cfg, t)
        ft, pl = interleaved([finetune_step(trainer, x, y), lambda: plain.step(x, y)], t, device)
        out[name] = {"finetune_img_s": batch / statistics.median(ft), "plain_img_s": batch / statistics.median(pl),
                     "ratio_plain_over_finetune": statistics.median(pl) / statistics.median(ft)}
        log(f"{name:9s} {out[name]['finetune_img_s']:.0f} img/s finetune | {out[name]['plain_img_s']:.0f} img/s "
            f"plain | {t.precision}, channels_last, batch {batch}, 224px")
        del trainer, plain
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ main


def cpu_threads(requested: int) -> int:
    """0 (auto): every core on an idle machine, but ONE thread when other processes already keep the
    cores busy: oversubscribed OpenMP threads wait on each other at every op and make steps 3-10x
    slower and far noisier (seen on 2 shared cores), which no ratio survives. Ratios compare Python-side
    overhead against the same compute, so the thread count does not favour either side."""
    if requested > 0:
        return requested
    cores = data_mod.available_cores()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy >= 1.0 else cores


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings: < 3 minutes on 2 CPU cores")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", help="torchvision model name (default resnet18)")
    p.add_argument("--batch", type=int)
    p.add_argument("--image", type=int, help="image side in pixels")
    p.add_argument("--repeats", type=int, help="timed repeats per side (>= 5)")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: auto, 1 when the machine is busy)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="ImageFolder root for the pipeline")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(cpu_threads(args.threads))
    s = settings_for(device, args.quick, args)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    log(f"device {device_name(device)}, load average {load}; {s.model}, batch {s.batch}, {s.image}px, {s.precision}, "
        f"channels_last={s.channels_last}, compile={s.compile}; medians of >= {s.repeats} paired repeats "
        f"of {s.steps} step(s), ~{s.budget_s:g} s per comparison")
    result = measure_core(s, device, log)
    result.update(measure_pipeline(s, device, args.data_root, log))
    if device.type == "cuda" and not args.quick:
        result["throughput_224"] = measure_gpu_throughput(s, device, log)
    result["goals_met"] = {k: result[k] <= goal for k, goal in GOALS.items()}
    result["goals_met"]["frozen_faster"] = result["frozen_over_full"] < 1.0
    result.update({
        "device": device_name(device), "load_avg": load, "settings": asdict(s), "seconds": round(time.perf_counter() - t0, 1),
        "memory_method": "cuda.max_memory_allocated" if device.type == "cuda"
        else "torch.profiler CPU allocator peak (Total Allocated)",
    })
    print(json.dumps(_rounded(result)), flush=True)
    return result


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


if __name__ == "__main__":
    main()
