"""A trained model back from its checkpoint, for `finetune eval`, `predict` and `export`: the architecture
from the run's config (built without downloading anything: the weights are in the checkpoint), the weight
average when the run kept one, the class names and the preprocessing it was trained with.

The arguments of those commands are `key=value` like Hydra's overrides, read into a small typed schema
per command (`parse_args`), so a wrong key or type is one line naming it.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune import tasks
from finetune.base.errors import UserError
from finetune.base.files import first_line
from finetune.engine import checkpoint
from finetune.engine.setup import model_groups
from finetune.engine.step import resolve_device
from finetune.models import build as models
from finetune.models.weights import Preprocess
from finetune.tasks import Task

log = logging.getLogger("finetune")


@dataclass
class SavedModel:
    model: nn.Module  # in eval mode, on `device`
    classes: list[str]
    preprocess: Preprocess  # input_size: the size it was trained at
    config: dict  # the run's resolved config
    path: Path  # the checkpoint file
    averaged: bool  # the weights are the run's weight average (ema_half_life)
    device: torch.device
    groups: list | None = None  # the layer groups, with the adapters of a peft=... run; None without adapters
    task: Task | None = None  # what the model predicts, with its settings (multilabel: the thresholds)

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """The task's probabilities of a batch on the model's device (softmax; multilabel: a sigmoid per
        label); with `tta` the mean over each image and its mirror."""
        x = x.to(self.device)
        p = self.task.probabilities(self.model(x))
        if tta:
            p = (p + self.task.probabilities(self.model(torch.flip(x, dims=[3])))) / 2
        return p


def architecture(config: dict, num_classes: int) -> tuple[models.ModelBundle, list | None]:
    """The run's model (a models.ModelBundle) built from its config without weights: they come from the
    checkpoint, so nothing is downloaded. With the run's adapters (peft=...): a checkpoint holds them."""
    model_cfg = OmegaConf.create({**config["model"], "weights": None})
    bundle = models.build_model(model_cfg, num_classes)
    peft = config.get("peft") or {}
    groups = model_groups(bundle, model_cfg, OmegaConf.create(peft)) if peft.get("kind", "none") != "none" else None
    return bundle, groups


def load(ckpt: str, device: str = "auto", average: bool = True) -> SavedModel:
    """The model of a run directory or checkpoint file; `average`: its weight average when it has one."""
    path, saved = checkpoint.load_checkpoint(ckpt, "ckpt")
    config = saved["config"]
    classes = saved.get("classes")
    if not classes:  # the head's size alone would be a guess at which tensor is the head
        raise UserError(f"{path} holds no class names (a checkpoint of an older finetune); train the run again to "
                        "use it with eval, predict or export")
    bundle, groups = architecture(config, len(classes))
    averaged = bool(average and saved.get("ema"))
    state = saved["ema"]["model"] if averaged else saved["model"]
    try:
        bundle.model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit model {config['model']['name']} ({first_line(e)})") from None
    if saved.get("preprocess"):
        preprocess = Preprocess(**{**saved["preprocess"], "mean": tuple(saved["preprocess"]["mean"]),
                                   "std": tuple(saved["preprocess"]["std"])})
    else:  # a checkpoint of before they were saved: the architecture's own, at the configured size
        preprocess = bundle.preprocess
        size = config.get("data", {}).get("image_size")
        if size:
            preprocess.input_size = int(size)
        log.warning("%s holds no preprocessing; using %s's defaults (%d px)", path, config['model']['name'],
                    preprocess.input_size)
    note_status(path, saved)
    dev = resolve_device(device)
    return SavedModel(bundle.model.to(dev).eval(), list(classes), preprocess, config, path, averaged, dev, groups,
                      tasks.from_state(saved.get("task"), len(classes)))


def note_status(path: Path, saved: dict) -> None:
    """One line naming the checkpoint used (its step, epoch and batch) and, for a run that did not complete,
    its status: eval / predict / export of a run still training or one that failed is no accident."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    where = f"step {saved.get('step')} (epoch {saved.get('epoch')}, batch {saved.get('batch')})"
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    status = summary.get("status")
    if status in (None, "completed"):
        log.info("ckpt: %s, written at %s", path, where)
        return
    why = {"running": "is still training (or its process ended without a word)",
           "interrupted": "was interrupted (resume=RUN continues it)",
           "failed": f"failed ({summary.get('reason') or 'summary.json says why'})"}.get(status, f"is {status}")
    log.warning("ckpt: the run in %s %s; using its checkpoint %s, written at %s", run_dir, why, path.name, where)


def parse_args(schema, args: list[str], command: str):
    """`key=value` arguments into the dataclass `schema` (typed, defaults filled in); `data.*` keys are
    collected in the `data` field as overrides of the run's data config."""
    known = {f.name for f in fields(schema)}
    values, data = {}, {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserError(f"{command}: expected key=value, got '{arg}'")
        if key.startswith("data.") and "data" in known:
            data[key[len("data."):]] = OmegaConf.from_dotlist([f"v={value}"]).v
            continue
        if key not in known or key == "data":
            close = difflib.get_close_matches(key, sorted(known - {"data"}), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; keys: {', '.join(sorted(known - {'data'}))}"
            raise UserError(f"{command}: unknown key '{key}'{hint}")
        values[key] = value
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]))
    except OmegaConfBaseException as e:
        raise UserError(f"{command}: {str(e).splitlines()[0]}") from None
    if "data" in known:
        cfg.data = data
    missing = [f.name for f in fields(schema) if OmegaConf.is_missing(cfg, f.name)]
    if missing:
        raise UserError(f"{command}: {missing[0]}= is required")
    return cfg
