"""Layer groups: ordered regex groupings of a model's parameter names.

A group spec is an ordered mapping ``name -> regex | [regex, ...]`` (input -> output; the last group is
the head), or a list of ``{name: ..., patterns: ...}`` entries. Each pattern is matched with
``re.match`` against the names of ``model.named_parameters()``, i.e. anchored at the start of the name
(``conv1`` matches ``conv1.weight`` but not ``layer1.0.conv1.weight``). A parameter belongs to the
FIRST group (in order) that has a matching pattern. Every parameter must land in a group unless a
catch-all group is named: unmatched parameters then join that group.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch.nn as nn

from finetune.base.errors import UserError


@dataclass
class LayerGroup:
    name: str
    patterns: list[str]
    param_names: list[str] = field(default_factory=list)
    # with adapters (peft=...): the group's adapter parameters, and the parameters that never train (the
    # base weights under the adapters), both among param_names
    adapters: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)


def normalize_spec(spec) -> list[tuple[str, list[str]]]:
    """Turn a mapping or a list of {name, patterns} entries into [(name, [patterns])], checking names."""
    if spec is None:
        raise UserError("layer groups: no group spec given")
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        items = []
        for entry in spec:
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise UserError(f"layer groups: list entries need 'name' and 'patterns', got {entry!r}")
            items.append((str(entry["name"]), entry.get("patterns", entry.get("pattern"))))
    else:
        raise UserError(f"layer groups: expected a mapping name -> regex(es), got {type(spec).__name__}")
    out, seen = [], set()
    for name, pats in items:
        if name in seen:
            raise UserError(f"layer groups: duplicate group name '{name}'")
        seen.add(name)
        if isinstance(pats, str):
            pats = [pats]
        pats = [str(p) for p in (pats or [])]
        if not pats:
            raise UserError(f"layer groups: group '{name}' has no pattern")
        out.append((name, pats))
    if not out:
        raise UserError("layer groups: the spec has no group")
    return out


def _compile(name: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"layer groups: invalid regex {pattern!r} in group '{name}': {e}") from None


def _closest(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """Parameter names (and their module prefixes) that look most like a pattern that matched nothing."""
    names = list(names)
    candidates = set(names)
    for full in names:
        parts = full.split(".")
        candidates.update(".".join(parts[:i]) for i in range(1, len(parts)))
    literal = re.sub(r"[\\^$()|?*+\[\]{}]", "", pattern)
    return difflib.get_close_matches(literal, sorted(candidates), n=n, cutoff=0.3)


def assign_groups(
    param_names: Sequence[str], spec, catch_all: str | None = None
) -> list[LayerGroup]:
    """Assign every parameter name to the first group whose regex matches (pure: names in, groups out)."""
    entries = normalize_spec(spec)
    compiled = [(name, pats, [_compile(name, p) for p in pats]) for name, pats in entries]
    groups = [LayerGroup(name, pats) for name, pats, _ in compiled]
    index = {g.name: g for g in groups}
    if catch_all is not None and catch_all not in index:
        raise UserError(
            f"layer groups: catch_all group '{catch_all}' is not one of the groups {list(index)}"
        )
    unmatched = []
    for pname in param_names:
        for group, (_, _, regexes) in zip(groups, compiled):
            if any(r.match(pname) for r in regexes):
                group.param_names.append(pname)
                break
        else:
            unmatched.append(pname)
    if unmatched:
        if catch_all is None:
            more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
            raise UserError(
                f"layer groups: parameter '{unmatched[0]}'{more} matches no group; add a pattern "
                "for it or name a catch-all group"
            )
        index[catch_all].param_names.extend(unmatched)
        # keep model order inside the catch-all group
        order = {n: i for i, n in enumerate(param_names)}
        index[catch_all].param_names.sort(key=order.__getitem__)
    owner = {pname: g.name for g in groups for pname in g.param_names}
    for group, (_, _, regexes) in zip(groups, compiled):
        if not group.param_names:
            # its pattern does match, but earlier groups took those parameters first
            taken = sorted({owner[p] for p in param_names if p in owner and any(r.match(p) for r in regexes)},
                           key=list(index).index)
            if taken:
                raise UserError(
                    f"layer groups: group '{group.name}' (patterns {group.patterns}) gets no parameter: every one "
                    f"it matches was already taken by the earlier group{'s' if len(taken) > 1 else ''} "
                    f"{', '.join(repr(t) for t in taken)} (a parameter belongs to the first group that matches)"
                )
            near = _closest(group.patterns[0], param_names)
            hint = f"; closest parameter names: {', '.join(near)}" if near else ""
            raise UserError(
                f"layer groups: group '{group.name}' (patterns {group.patterns}) matches no "
                f"parameter{hint}"
            )
    return groups


def auto_spec(model: nn.Module) -> dict[str, list[str]]:
    """Fallback grouping for any nn.Module: one group per top-level child holding parameters, in order.

    Parameters registered directly on the root module (e.g. a class token) join the first group.
    """
    spec: dict[str, list[str]] = {}
    for child_name, child in model.named_children():
        if any(True for _ in child.parameters()):
            spec[child_name] = [rf"{re.escape(child_name)}\."]
    direct = [n for n, _ in model.named_parameters(recurse=False)]
    if direct:
        if not spec:
            return {"root": [rf"{re.escape(n)}$" for n in direct]}
        first = next(iter(spec))
        spec[first] = [rf"{re.escape(n)}$" for n in direct] + spec[first]
    if not spec:
        raise UserError("layer groups: the model has no parameters")
    return spec


def build_groups(model: nn.Module, spec=None, catch_all: str | None = None) -> list[LayerGroup]:
    """Layer groups of a model from a spec (auto grouping when spec is None)."""
    names = [n for n, _ in model.named_parameters()]
    return assign_groups(names, spec if spec is not None else auto_spec(model), catch_all)
