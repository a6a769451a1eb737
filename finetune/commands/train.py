"""`train(cfg, out_dir)`: fine-tune as configured, the run directory written to `out_dir`.

`cfg` is a resolved config: from `finetune.compose(...)` (what the command line trains) or any config of
the schema with a fixed recipe. The run and its loop live in finetune/engine/loop.py.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from finetune.base.errors import UserError
from finetune.commands.compose import recipe_of
from finetune.data import shards
from finetune.engine import checkpoint, distributed
from finetune.engine.loop import Run
from finetune.recipes import lr_find

log = logging.getLogger("finetune")


def train(cfg, out_dir: str | Path, *, stop_at_step: int | None = None, on_start=None) -> dict:
    """Fine-tune as configured, writing the run directory; returns the summary (with final_val_acc).

    `cfg.resume` (a run directory or checkpoint file) continues that run exactly: same weights, optimizer
    state, schedule position, freeze state, RNG and data order; the checkpoint carries the metrics and
    names its lr_trace.csv, so `out_dir` (which may be a new directory) gets complete reports.
    SIGINT/SIGTERM stop the run after the current step: checkpoint, reports, then `Interrupted`.
    `stop_at_step` (library only) stops the same way once that many steps are done (at an epoch's end:
    after its evaluation): it splits one plan over several runs (time-limited jobs; tests of exact
    resume), where a run with fewer `epochs` would follow a different schedule.
    `cfg.recipe` (finetune.compose records it: what the recipe set, auto's choice) goes to summary.json
    and, under auto, to auto.json. `lr=auto` runs the LR finder first (lr_find.png in `out_dir`) and
    trains with its suggestion, which summary.json keeps under lr_auto. `on_start()` is called once every
    check has passed (a resume's included), right before the run writes its first file: a refused command
    changes nothing in a directory that holds a run.
    """
    if cfg.auto.enabled:
        raise UserError("experiment=auto chooses its recipe when the config is composed: pass "
                        "finetune.compose([...]) to train, or name a recipe (experiment=lp_ft)")
    out_dir = Path(out_dir)
    checkpoint.refuse_used_dir(out_dir, cfg)  # before anything is written there
    if cfg.overwrite and not cfg.resume and checkpoint.holds_run(out_dir):
        checkpoint.clear_run(out_dir)  # the run it replaces leaves nothing beside the new one
    cfg = absolute_paths(cfg)
    saved = checkpoint.resumed(cfg.resume)  # read once: lr=auto's LR and the run's state both come from it
    recipe = recipe_of(cfg)
    cfg, lr_auto = lr_find.resolve_lr(cfg, out_dir, saved)  # the finder writes only where no run is held
    run = Run(cfg, out_dir, stop_at_step=stop_at_step, recipe=recipe, lr_auto=lr_auto, saved=saved)
    if on_start is not None:
        on_start()
    write_auto_choice(recipe, out_dir)
    return run.fit()


def write_auto_choice(recipe: dict | None, out_dir: Path) -> None:
    """auto.json in `out_dir`: experiment=auto's choice, its reason and its probe (rank 0)."""
    if recipe and recipe.get("auto") and distributed.from_env().main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "auto.json").write_text(json.dumps(recipe["auto"], indent=2) + "\n")


def absolute_paths(cfg):
    """`cfg` with data.root and cache_dir absolute, and a Hugging Face model's local directory: the checkpoint's
    config must name the same folders from any working directory (`finetune eval ckpt=RUN` elsewhere read
    another folder of that name)."""
    cfg = copy.deepcopy(cfg)
    for key in ("data.root", "cache_dir"):
        value = OmegaConf.select(cfg, key)
        if value:
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(str(value))))
    for key in ("data.train", "data.val"):  # data=webdataset's shard patterns, unless URLs
        value = OmegaConf.select(cfg, key, default=None)
        if value and not shards.is_remote(str(value)):
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(str(value))))
    path = OmegaConf.select(cfg, "data.path", default=None)
    if path and os.path.isdir(os.path.expanduser(str(path))):  # data=hf: a local directory, not a hub id
        OmegaConf.update(cfg, "data.path", os.path.abspath(os.path.expanduser(str(path))))
    name = OmegaConf.select(cfg, "model.name")
    if str(OmegaConf.select(cfg, "model.source")) == "hf" and name and os.path.isdir(os.path.expanduser(str(name))):
        OmegaConf.update(cfg, "model.name", os.path.abspath(os.path.expanduser(str(name))))  # not a hub id
    return cfg
