"""The configuration reference (docs/reference.md), generated so that it cannot drift from the code.

Every key of the typed schema (finetune/config/schema.py) with its type, its default (the schema's, with
conf/train.yaml's default config groups on top: what `finetune train experiment=none` starts from), its
description and the recipes (conf/experiment/*.yaml) that set it. A key's description is the comment beside
it in schema.py: the comment at the end of its line, else the comment lines right above it. The config
groups and the recipes come from conf/ itself.

    python -m finetune.config.reference -o docs/reference.md   # what `make docs` runs first

tests/test_docs.py compares the committed docs/reference.md with `markdown()` and fails on a key without a
description.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from finetune.config import schema
from finetune.config.presets import conf_dir
from finetune.config.recipe import NO_RECIPE, flatten, recipe_settings

# the schema's sections, in the order the reference shows them (the top-level keys first)
SECTIONS = ["", "model", "data", "task", "loss", "optimizer", "schedule", "lr_spread", "freeze", "peft", "auto", "lr_find", "inspect",
            "logger"]
# conf/ groups a command line chooses with `group=choice`, in the order the reference lists them
GROUPS = ["experiment", "model", "data", "task", "optimizer", "schedule", "freeze", "peft", "logger", "hparams_search"]


@dataclasses.dataclass(frozen=True)
class Key:
    name: str  # dotted, as typed on the command line
    type: str
    default: str
    description: str
    recipes: dict  # recipe -> the value it sets


def descriptions(cls: type) -> dict[str, str]:
    """{field: its comment in the source} for the fields of dataclass `cls` ('' where none): the comment
    closing the field's line, else the block of comment lines right above it, joined into one line."""
    path = inspect.getsourcefile(cls)
    source = Path(path).read_text()
    trailing, alone = {}, {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (alone if tok.line[:tok.start[1]].strip() == "" else trailing)[tok.start[0]] = text
    node = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        line, above = item.lineno, []
        while line - 1 - len(above) in alone:
            above.insert(0, alone[line - 1 - len(above)])
        text = trailing.get(line) or " ".join(above)
        out[item.target.id] = " ".join(text.split())
    return out


def _type(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_type(inner[0])} or null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " / ".join(m.value for m in hint)
    if origin in (dict, typing.Dict):
        return "mapping"
    if origin in (list, typing.List):
        return f"list of {_type(args[0])}"
    if hint is typing.Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def as_text(value) -> str:
    """A config value as it is typed on the command line (and shown in the reference)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if value == MISSING:
        return "(required)"
    return str(value)


def _schema_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _leaves(cls: type, prefix: str = ""):
    """(dotted key, field, type hint) of every leaf of dataclass `cls`, sections expanded."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, name = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{name}.")
        else:
            yield name, f, hint


@functools.lru_cache(maxsize=1)
def _composed() -> tuple[dict, dict]:
    """(the base config flattened: experiment=none with the default groups, {recipe: what it sets})."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    schema.register_configs()
    saved = GlobalHydra.instance().hydra  # a running app's Hydra (its own config search path): put back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="reference"):
            base = compose("train", overrides=[f"experiment={NO_RECIPE}"])
            sets = {name: recipe_settings(compose("train", overrides=[f"experiment={name}"]), base)
                    for name in recipes()}
    finally:
        GlobalHydra.instance().clear()  # the context put back a copy of the singleton: ask for it again
        if saved is not None:
            GlobalHydra.instance().initialize(saved)
    plain = flatten(OmegaConf.to_container(base, resolve=True, enum_to_str=True))
    return plain, sets


def recipes() -> list[str]:
    """The recipes conf/experiment/ offers, `none` (no recipe) left out."""
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml") if p.stem != NO_RECIPE)


def keys() -> list[Key]:
    """Every key of the schema, in the order of SECTIONS, then of the schema."""
    base, sets = _composed()
    comments: dict[type, dict[str, str]] = {}
    found = []
    for name, f, hint in _leaves(schema.TrainConfig):
        owner = _owner(name)
        if owner not in comments:
            comments[owner] = descriptions(owner)
        by_recipe = {}
        for recipe, settings in sets.items():
            if name in settings:
                by_recipe[recipe] = settings[name]
            elif inside := {k[len(name) + 1:]: v for k, v in settings.items() if k.startswith(f"{name}.")}:
                by_recipe[recipe] = inside  # entries of a mapping (freeze.milestones, per_group)
        default = base.get(name, _schema_default(f))
        found.append(Key(name, _type(hint), as_text(default), comments[owner][f.name], by_recipe))
    order = {s: i for i, s in enumerate(SECTIONS)}
    return sorted(found, key=lambda k: order[section(k.name)])



def _owner(name: str) -> type:
    """The dataclass that declares key `name`."""
    cls = schema.TrainConfig
    for part in name.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def section(name: str) -> str:
    return name.split(".")[0] if "." in name else ""


def undocumented() -> list[str]:
    """The schema keys without a description: each needs a comment in schema.py."""
    return [k.name for k in keys() if not k.description]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _first_sentence(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            lines.append(line.lstrip("#").strip())
    text = " ".join(" ".join(lines).split())
    return re.split(r"(?<!\bal\.)(?<=\.)\s+", text)[0] if text else ""  # "et al. 2022" ends no sentence


def _defaults() -> dict[str, str]:
    """conf/train.yaml's choice of every config group."""
    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(conf_dir() / "train.yaml"))["defaults"]:
        if isinstance(item, dict):
            out.update({k: as_text(v) for k, v in item.items()})
    return out


def markdown() -> str:
    """docs/reference.md."""
    defaults = _defaults()
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by `python -m finetune.config.reference -o docs/reference.md` from "
        "finetune/config/schema.py and conf/; do not edit (tests/test_docs.py checks it) -->",
        "",
        "Every key of the config, as typed on the command line (`finetune train KEY=VALUE`) or set in "
        "Python (`cfg.KEY = VALUE` after `finetune.compose`). A wrong type, an unknown key or an unknown "
        "choice is refused before anything runs, naming the closest valid key. `finetune train --cfg job` "
        "prints the composed config.",
        "",
        "**Default** is what `finetune train experiment=none` starts from: the schema's defaults with the "
        "default config groups below on top. **Recipes** are the recipes (`experiment=...`) that set the "
        "key to another value than the default, with that value; your command line wins over them.",
        "",
        "## Config groups",
        "",
        "A config group is chosen with `group=choice` (`model=resnet18`); each choice is a file "
        "`conf/<group>/<choice>.yaml`.",
        "",
        "| group | default | choices |",
        "|---|---|---|",
    ]
    for group in GROUPS:
        folder = conf_dir() / group
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        out.append(f"| `{group}` | `{defaults.get(group, 'null')}` | {', '.join(f'`{c}`' for c in choices)} |")
    out += ["", "## Recipes", "", "`experiment=<recipe>`; `conf/experiment/<recipe>.yaml`.", "",
            "| recipe | what it trains |", "|---|---|"]
    for recipe in [*recipes(), NO_RECIPE]:
        out.append(f"| `{recipe}` | {_cell(_first_sentence(conf_dir() / 'experiment' / f'{recipe}.yaml'))} |")
    titles = {"": "Top-level keys"}
    for group in SECTIONS:
        rows = [k for k in keys() if section(k.name) == group]
        title = titles.get(group, f"`{group}.*`")
        doc = inspect.getdoc(_owner(rows[0].name)) if group else None
        out += ["", f"## {title}", ""]
        if doc and not doc.startswith(_owner(rows[0].name).__name__ + "("):
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | description | recipes |", "|---|---|---|---|---|"]
        for k in rows:
            recipes_cell = ", ".join(f"{r}: `{as_text(v)}`" for r, v in k.recipes.items())
            out.append(f"| `{k.name}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.description)} "
                       f"| {_cell(recipes_cell)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.config.reference", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", help="write here (default: stdout)")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print(f"keys without a description (a comment in finetune/config/schema.py): {', '.join(missing)}",
              file=sys.stderr)
        return 1
    text = markdown()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
