"""Where the YAML configs live and what a config group's file gives on its own."""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from finetune.config.schema import ScheduleConfig

# conf/ sits next to the package in a checkout; a wheel ships it as the package finetune.conf
SOURCE_CONF = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> Path:
    if (SOURCE_CONF / "train.yaml").is_file():
        return SOURCE_CONF
    from importlib.resources import files

    return Path(str(files("finetune.conf")))


def schedule_preset(kind: str) -> dict:
    """What `schedule=<kind>` gives: the schema's defaults with conf/schedule/<kind>.yaml on top (a
    per-group schedule of another kind starts from here, not from the global schedule's settings)."""
    preset = {**asdict(ScheduleConfig()), "kind": kind}
    path = conf_dir() / "schedule" / f"{kind}.yaml"
    if path.is_file():
        preset.update(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return preset


@functools.lru_cache(maxsize=1)
def schedule_presets() -> dict[str, dict]:
    """schedule_preset of every kind conf/schedule/ offers: what build_plan starts a per-group schedule
    of another kind from."""
    return {path.stem: schedule_preset(path.stem) for path in sorted((conf_dir() / "schedule").glob("*.yaml"))}
