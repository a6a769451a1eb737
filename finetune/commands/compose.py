"""The config a command trains, composed one way for the command line and for Python.

    cfg = finetune.compose(["model=resnet18", "unfreeze=5"])   # what `finetune train model=resnet18 unfreeze=5` trains
    summary = finetune.train(cfg, "runs/r18")

conf/train.yaml is composed with the overrides exactly as the command line's Hydra composes it, then its
recipe is resolved: under the default, experiment=auto, the probe of the train images chooses a recipe
and the config is composed again under it with the same overrides, so they still win. What the recipe
set (and auto's choice and reason) is recorded under `cfg.recipe`, which train() saves in summary.json.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.config import overrides as override_checks
from finetune.config.presets import conf_dir
from finetune.config.recipe import describe, without_recipe
from finetune.config.schema import register_configs
from finetune.recipes import auto

CONFIG_NAME = "train"


def compose(overrides: Sequence[str] = (), *, probe: bool = True) -> DictConfig:
    """What `finetune train <overrides>` trains, recipe resolved (see the module's docstring). Under
    experiment=auto the probe runs here (forward passes over part of the train set); `probe=False` takes
    auto.near instead and marks the choice provisional (what `finetune inspect` shows)."""
    overrides = list(overrides)
    override_checks.check(overrides)
    register_configs()
    with _hydra():
        full = hydra_compose(CONFIG_NAME, overrides=overrides, return_hydra_config=True)
        experiment = full.hydra.runtime.choices.get("experiment")
        with open_dict(full):
            del full["hydra"]
        return resolve(full, overrides, _compose, experiment, probe=probe)


def _compose(overrides: Sequence[str]) -> DictConfig:
    return hydra_compose(CONFIG_NAME, overrides=list(overrides))


@contextlib.contextmanager
def _hydra():
    """Hydra's config search: the command line's own when it is running (`finetune train`), else conf/."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="finetune"):
        yield


def resolve(cfg: DictConfig, overrides: Sequence[str], compose_fn: Callable[[Sequence[str]], DictConfig],
            experiment: str | None, *, probe: bool = True) -> DictConfig:
    """`cfg` (composed from `overrides` under `experiment`) with its recipe applied and recorded under
    cfg.recipe; under experiment=auto, composed again under the recipe its probe chooses (a resumed run:
    the recipe its checkpoint keeps). `compose_fn(overrides)` composes this app's config."""
    overrides = without_recipe(overrides)
    if cfg.auto.enabled:
        if probe:
            choice = auto.choose(cfg)
        else:
            auto.check_recipes(cfg)
            choice = {"recipe": cfg.auto.near, "provisional": True, "probe": None,
                      "reason": "provisional: the probe of the train images runs when training starts"}
        # what the probe chose besides the recipe (loss.class_weights on skewed classes): the command line's
        # own settings come after it, and win
        extra = [f"{key}={value}" for key, value in (choice.get("set") or {}).items()]
        chosen = compose_fn([*extra, *overrides, f"experiment={choice['recipe']}"])
        recipe = {**(describe(choice["recipe"], overrides, compose_fn, chosen) or
                     {"name": choice["recipe"], "set": {}}), "auto": choice}
        cfg = chosen
    else:
        recipe = describe(experiment, overrides, compose_fn, cfg)
    cfg.recipe = recipe
    return cfg


def recipe_of(cfg) -> dict | None:
    """What cfg.recipe records, as plain data (None: no recipe)."""
    recipe = cfg.get("recipe")
    return OmegaConf.to_container(recipe, resolve=True) if OmegaConf.is_config(recipe) else recipe
