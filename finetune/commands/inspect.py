"""`finetune inspect`: the plan of a run (groups, sizes, when each trains, LRs, schedules) without training."""

from __future__ import annotations

import json
import sys

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from finetune.commands.compose import recipe_of
from finetune.config.recipe import line
from finetune.core.freeze import batchnorm_mode
from finetune.core.optim import param_groups
from finetune.core.plan import Plan
from finetune.core.plan import warnings as plan_warnings
from finetune.engine.setup import setup
from finetune.recipes.lr_find import resolve_lr


def describe(plan: Plan, groups, sizes, batchnorm: str, counts=None) -> dict:
    """The plan as plain data: what `inspect.format=json` prints. `counts`: with adapters (peft=...), each
    group's {"base_params", "adapter_params", "trainable_params"} (what the group trains when it trains)."""
    out = []
    for i, (gp, group, size) in enumerate(zip(plan.groups, groups, sizes)):
        sched = dict(gp.schedule_cfg)
        out.append({
            "name": gp.name,
            "patterns": list(group.patterns),
            "params": size,
            **(counts[i] if counts else {}),
            "trainable_from_epoch": gp.first_epoch,
            "lr": plan.lr_range(i),
            "weight_decay": gp.weight_decay,
            "schedule": sched,
        })
    return {"groups": out, "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "epochs": plan.epochs, "batchnorm": batchnorm}


def _schedule_text(s: dict) -> str:
    kind = s["kind"]
    return kind + (f" (+{s['warmup']:g} ep warmup)" if s.get("warmup") else "")


def print_plan(info: dict, fmt: str, console: Console | None = None) -> None:
    if fmt == "json":
        print(json.dumps(info, indent=2))
        return
    # piped output has no terminal width: do not squeeze the table into 80 columns
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    full = info["epochs"] * info["steps_per_epoch"]
    cut = "" if info["total_steps"] == full else " (max_steps: the last epoch cut short)"
    # the group names and LRs are the point of the command: they never wrap or get cut. One schedule for every
    # group is said once, in the title. On a terminal narrower than the whole table (80 columns) the regex
    # patterns are left out (inspect.format=json has them), then the schedules go under the table and the
    # headers get short; a simple box spends no columns on borders
    schedules: dict[str, list[str]] = {}
    for g in info["groups"]:
        schedules.setdefault(_schedule_text(g["schedule"]), []).append(g["name"])
    for table in (_plan_table(info, cut, schedules, fit) for fit in range(4)):
        if console.measure(table, options=console.options.update_width(10_000)).maximum <= console.width:
            break
    console.print(table)
    if info.get("params"):
        _print_params(info["params"], console)


def _plan_table(info: dict, cut: str, schedules: dict[str, list[str]], fit: int) -> Table:
    """The plan's table, narrower with each `fit` (0: every column; 1: no patterns; 2: schedules under the
    table, short headers; 3: with adapters, no base parameter count)."""
    peft = "adapter_params" in info["groups"][0]
    title = (f"finetune plan: {info['epochs']} epochs x {info['steps_per_epoch']} steps"
             f"{' = ' if not cut else ', '}{info['total_steps']} steps{cut}")
    if len(schedules) == 1:
        title += f"; schedule {next(iter(schedules))} in every group"
    caption = [f"BatchNorm: {info['batchnorm']}"] if info.get("batchnorm") else []
    if fit >= 1:
        caption.append("each group's patterns: a wider terminal or inspect.format=json")
    in_column = len(schedules) > 1 and fit < 2
    if len(schedules) > 1 and not in_column:
        caption += [f"schedule {text}: {', '.join(names)}" for text, names in schedules.items()]
    table = Table(title=title, caption="\n".join(caption) or None, box=box.SIMPLE_HEAD, padding=(0, 1),
                  collapse_padding=True)
    short = fit >= 2
    headers = {"params": ("base" if short else "params (base)") if peft else "params", "trains": "trains",
               "adapters": "adapters", "trains from": "from" if short else "trains from"}
    base = not (peft and fit >= 3)
    columns = ("group", *(("patterns",) if fit == 0 else ()), *(("params",) if base else ()),
               *(("adapters", "trains") if peft else ()),
               "trains from", "lr start", "lr peak", "lr end", "wd", *(("schedule",) if in_column else ()))
    for col in columns:
        right = col.startswith(("params", "lr", "wd", "trains", "adapters"))
        table.add_column(headers.get(col, col), justify="right" if right else "left",
                         no_wrap=col not in ("patterns", "schedule"))
    for g in info["groups"]:
        first = "never" if g["trainable_from_epoch"] is None else f"epoch {g['trainable_from_epoch']}"
        sizes = (f"{g['base_params']:,}", f"{g['adapter_params']:,}", f"{g['trainable_params']:,}") if peft else (
            f"{g['params']:,}",)
        table.add_row(g["name"], *((" ".join(g["patterns"]),) if fit == 0 else ()), *sizes[0 if base else 1:], first,
                      f"{g['lr']['start']:.2e}", f"{g['lr']['peak']:.2e}", f"{g['lr']['end']:.2e}",
                      f"{g['weight_decay']:g}", *((_schedule_text(g["schedule"]),) if in_column else ()))
    return table


def tensor_rows(model, groups, plan: Plan, no_decay_norm_bias: bool) -> list[dict]:
    """Every parameter tensor with its group, shape, effective peak LR and weight decay, from the same
    param groups the optimizer gets."""
    lrs = [gp.lr for gp in plan.groups]
    decay = {}
    for pg in param_groups(model, groups, lrs, [gp.weight_decay for gp in plan.groups], no_decay_norm_bias):
        for p in pg["params"]:
            decay[id(p)] = (pg["group"], pg["weight_decay"])
    rows = []
    for name, p in model.named_parameters():
        g, wd = decay[id(p)]
        rows.append({"name": name, "group": plan.groups[g].name, "shape": list(p.shape),
                     "lr_peak": plan.lr_range(g)["peak"], "weight_decay": wd,
                     "trainable_from_epoch": plan.groups[g].first_epoch})
    return rows


def _print_params(rows: list[dict], console: Console) -> None:
    table = Table(title=f"parameters: {len(rows)} tensors")
    for col in ("tensor", "group", "shape", "lr peak", "wd", "trains from"):
        table.add_column(col, justify="right" if col in ("lr peak", "wd") else "left")
    for r in rows:
        first = "never" if r["trainable_from_epoch"] is None else f"epoch {r['trainable_from_epoch']}"
        table.add_row(r["name"], r["group"], "x".join(map(str, r["shape"])), f"{r['lr_peak']:.2e}",
                      f"{r['weight_decay']:g}", first)
    console.print(table)


def inspect(cfg) -> dict:
    """Build model (without downloading weights), groups and plan as training would; print; return the
    description. cfg.recipe (finetune.compose records it) is shown above the table and in the JSON; under
    experiment=auto without its probe the plan is auto.near's, provisional, and a warning names the other.
    lr=auto runs the LR finder (which trains a few steps on a copy, then restores it; no files)."""
    random_init = cfg.model.weights is None
    recipe = recipe_of(cfg)
    choice = (recipe or {}).get("auto")
    if choice and choice.get("provisional"):
        recipe = {k: v for k, v in recipe.items() if k != "auto"}
    cfg, _ = resolve_lr(cfg, None, None)
    parts = setup(cfg, training=False, weights=False)  # names and shapes need no weights
    parts.data.close()
    plan = parts.plan(cfg)
    params = dict(parts.model.named_parameters())
    sizes = [sum(params[n].numel() for n in g.param_names) for g in parts.groups]
    counts = None
    if any(g.adapters or g.fixed for g in parts.groups):
        counts = [{"base_params": size - sum(params[n].numel() for n in g.adapters),
                   "adapter_params": sum(params[n].numel() for n in g.adapters),
                   "trainable_params": size - sum(params[n].numel() for n in g.fixed)}
                  for g, size in zip(parts.groups, sizes)]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in parts.model.modules())  # not a ViT
    info = describe(plan, parts.groups, sizes,
                    batchnorm_mode(cfg.freeze.train_bn, cfg.freeze.bn_eval) if has_bn else None, counts)
    info["recipe"] = recipe
    info["warnings"] = plan_warnings(cfg, plan, random_init)
    if choice and choice.get("provisional"):  # the probe runs when training starts: the near recipe, the other named
        near, far = cfg.auto.near, cfg.auto.far
        info["auto"] = {"near": near, "far": far}
        info["warnings"].insert(0, f"experiment=auto chooses experiment={near} or experiment={far} when "
                                   "training starts (a probe of the train images); this plan is "
                                   f"{near}'s: inspect experiment={far} for the other")
    if cfg.inspect.params:
        info["params"] = tensor_rows(parts.model, parts.groups, plan, cfg.optimizer.no_decay_norm_bias)
    if cfg.inspect.format != "json":
        console = Console(width=None if sys.stdout.isatty() else 200)
        if choice and not choice.get("provisional"):  # inspect.probe=true: what auto's probe chose, and why
            console.print(f"auto: chose experiment={choice['recipe']}: {choice['reason']}", markup=False)
        console.print(line(recipe), markup=False)
        for warning in info["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    print_plan(info, cfg.inspect.format)
    return info
