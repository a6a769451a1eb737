"""The command line's overrides checked against the schema and conf/ before Hydra composes them: an unknown
key (also one added with `+`), an unknown group choice or a value of the wrong type is one line naming
the key and the closest valid names. Hydra's own messages for these run to 6-21 lines, and it accepts
`+unfreez=3` (its own hint) silently."""

from __future__ import annotations

import difflib
import math
from typing import Sequence

from omegaconf import DictConfig, EnumNode, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.base.errors import UserError
from finetune.config.presets import conf_dir
from finetune.config.schema import TrainConfig

# config groups of Hydra's that finetune's conf/ extends or leaves alone
HYDRA_GROUPS = ("hydra",)


def _closest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f" (closest: {', '.join(close)})" if close else ""


def group_options(group: str) -> list[str] | None:
    """The choices of config group `group` (conf/<group>/*.yaml), or None when it is not a group."""
    path = conf_dir() / group
    if not path.is_dir():
        return None
    return sorted(p.stem for p in path.glob("*.yaml"))


def _open(node) -> bool:
    """A node that takes any key below it: a Dict[...] or Any field (per_group, freeze.milestones, model.groups)."""
    if not isinstance(node, DictConfig):
        return node is None  # an Any/Optional field that is null
    return OmegaConf.get_type(node) is dict


def check_key(key: str, schema: DictConfig) -> bool:
    """Raise UserError for a key the schema does not have; False when the key lies below an open node
    (whose keys and values the schema does not type, e.g. freeze.milestones.7)."""
    node, path = schema, []
    for part in key.split("."):
        if _open(node):
            return False
        if not isinstance(node, DictConfig):
            raise UserError(f"'{key}': {'.'.join(path)} is a value, it has no key '{part}'")
        if part not in node.keys():  # `in node` is False for a key whose value is ??? (model.name)
            siblings = [".".join([*path, str(k)]) for k in node.keys()]
            raise UserError(f"unknown key '{key}'{_closest('.'.join([*path, part]), siblings)}")
        path.append(part)
        node = node._get_node(part)
        node = node if isinstance(node, DictConfig) else OmegaConf.select(schema, ".".join(path))
    return True


def _values(override) -> list:
    """The values an override sets: one, or each of a choice sweep (lr=1e-3,-1 or unfreeze=1,3,all)."""
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        Glob,
        IntervalSweep,
        RangeSweep,
    )

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, (RangeSweep, IntervalSweep, Glob)):
        return []  # numbers Hydra generates; their type is checked when each job composes
    return [value]


# data=webdataset's brace patterns, which an unquoted shell expands into several arguments
SHARD_KEYS = ("data.train", "data.val")


def check(args: Sequence[str]) -> None:
    """Raise UserError for the first bad override in `args` (a command line after `finetune train`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    candidates = [a for a in args if "=" in a and not a.startswith("-")]
    parser = OverridesParser.create()
    for candidate in candidates:  # one at a time: the error names the override that fails
        try:
            parser.parse_overrides([candidate])
        except OverrideParseException as err:
            if "~" in candidate.partition("=")[2]:
                key, _, value = candidate.partition("=")
                raise UserError(f"{candidate}: Hydra reads ~ as syntax; quote the path ({key}='{value}') or "
                                "write it out (/home/you/...)") from None
            if "{" in candidate.partition("=")[2]:  # a shard pattern: DIR/train-{000000..000009}.tar
                key, _, value = candidate.partition("=")
                raise UserError(f"{candidate}: Hydra reads {{ as syntax; quote the pattern, in the shell too: "
                                f"\"{key}='{value}'\"") from None
            raise UserError(f"{candidate}: {' '.join(str(err).split())}") from None
    shell_expanded = [k for k in SHARD_KEYS if sum(a.startswith(f"{k}=") for a in candidates) > 1]
    if shell_expanded:  # bash turned train-{000000..000009}.tar into ten arguments
        raise UserError(f"{shell_expanded[0]} is given more than once: the shell expanded its braces; quote the "
                        f"pattern: \"{shell_expanded[0]}='DIR/train-{{000000..000009}}.tar'\"")
    overrides = parser.parse_overrides(candidates)
    multirun = any(a in ("-m", "--multirun") for a in args)
    schema = OmegaConf.structured(TrainConfig)
    for override in overrides:
        key = override.key_or_group
        if override.is_sweep_override() and not multirun and key.split("/")[0] != "hydra":
            raise UserError(f"{override.input_line} lists several values: sweep them with -m (finetune train -m "
                            f"{override.input_line}), or quote a list as one value ({key}='[...]')")
        if override.is_delete() or key.split("/")[0].split(".")[0] in HYDRA_GROUPS:
            continue
        options = group_options(key)
        if options is not None:  # a config group: model=resnet18, or several of it: logger=[tensorboard,mlflow]
            for value in _values(override):
                for choice in value if isinstance(value, list) else [value]:
                    if choice is not None and str(choice) not in options:
                        raise UserError(f"{key}={choice}: no such {key} config; choose one of {', '.join(options)}"
                                        f"{_closest(str(choice), options)}")
            continue
        if "/" in key:
            continue  # a nested group path Hydra resolves itself
        if check_key(key, schema):
            for value in _values(override):
                _check_type(key, value, schema)


def _number_or_auto(value) -> bool:
    try:
        return math.isfinite(float(value)) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return value == "auto"


# keys the schema types loosely (Any) because they take a word as well as a number
LOOSE = {"lr": (_number_or_auto, "expected a finite number or auto (the LR finder's suggestion)")}


def _check_type(key: str, value, schema: DictConfig) -> None:
    if key in LOOSE:
        ok, expected = LOOSE[key]
        if not ok(value):
            raise UserError(f"{key}={_text(value)}: {expected}")
        return
    probe = schema.copy()
    try:
        OmegaConf.update(probe, key, value, merge=True, force_add=True)
    except OmegaConfBaseException as err:
        choices = choices_of(key, schema)
        if choices is not None:
            raise UserError(f"{key}: unknown value '{_text(value)}'; choose one of {', '.join(choices)}"
                            f"{_closest(_text(value), choices)}") from None
        message = str(err).split("\n")[0].rstrip(".")
        raise UserError(f"{key}={_text(value)}: {message}") from None


def choices_of(key: str, schema: DictConfig) -> list[str] | None:
    """The choices of an enum key of the schema (schedule.kind: constant, step, ...), else None."""
    parent, _, leaf = key.rpartition(".")
    node = (OmegaConf.select(schema, parent) if parent else schema)
    node = node._get_node(leaf) if isinstance(node, DictConfig) else None
    if isinstance(node, EnumNode):
        return [member.name for member in node.enum_type]
    return None


def _text(value) -> str:
    return "null" if value is None else str(value)

