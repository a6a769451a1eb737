"""What a recipe (an `experiment=` preset) set, so that every run can say it.

The rule that keeps the command line predictable under every recipe: `lr` is always the head's peak LR,
and a recipe states the other groups' LRs relative to it (`lr_spread`), never through `head_lr` (a key
left to the user). Your overrides replace the recipe's settings key by key, as Hydra merges them, and
a config group on the command line (`schedule=`, `freeze=`) replaces the recipe's choice of it. So
`lr=1e-3` under lp_ft moves the head to 1e-3 and the body with it (lp_ft's body is lr/50), and
`lr=1e-3 lr_spread.kind=geometric lr_spread.lo=1e-5` is fastai's slice(1e-5, 1e-3).
"""

from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

NO_RECIPE = "none"
_MISSING = object()


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted key: leaf}; lists and empty dicts are leaves."""
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_settings(cfg: DictConfig, base: DictConfig) -> dict[str, Any]:
    """The values that differ between `cfg` (composed with the recipe and the overrides) and `base` (the
    same overrides, experiment=none): what the recipe set and the command line did not."""
    full = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    plain = flatten(OmegaConf.to_container(base, resolve=True, enum_to_str=True))
    return {k: (None if full.get(k, _MISSING) is _MISSING else full[k]) for k in sorted(full.keys() | plain.keys())
            if full.get(k, _MISSING) != plain.get(k, _MISSING)}


def without_recipe(overrides: Sequence[str]) -> list[str]:
    """The overrides less any experiment= choice."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "experiment"]


def describe(name: str | None, overrides: Sequence[str], compose, cfg: DictConfig | None = None) -> dict | None:
    """{"name", "set"} for recipe `name` (None or none: no recipe); `compose(overrides)` composes a config
    (Hydra's compose inside the app's context; the test helpers' outside it). `cfg`: the config already
    composed with the recipe and the overrides (the CLI's), so only the one without it is composed here."""
    if name in (None, NO_RECIPE):
        return None
    overrides = without_recipe(overrides)
    if cfg is None:
        cfg = compose([*overrides, f"experiment={name}"])
    return {"name": name, "set": recipe_settings(cfg, compose([*overrides, f"experiment={NO_RECIPE}"]))}


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def line(recipe: dict | None) -> str:
    """The start-up line of a run: the active recipe and each value it set."""
    if recipe is None:
        return "recipe: none (experiment=none): the base config and your overrides"
    if recipe["name"] == "auto":  # before its probe: what it sets is only that it probes
        return ("recipe auto: a short look at the train images chooses the recipe first "
                "(experiment=<name> chooses it yourself)")
    values = ", ".join(f"{k}={_text(v)}" for k, v in recipe["set"].items()) or "nothing your overrides did not"
    return f"recipe {recipe['name']} sets {values}"
