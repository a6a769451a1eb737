"""Ready layer groupings for known model families, always expressed as regex group specs.

Every grouping here is built the same way: decide which parameters belong to which group (by module
paths for torchvision families, by timm's own ``group_matcher`` for timm models, by the encoder's layer
list for Hugging Face transformers models), then turn that into ``re.match`` patterns on the shortest
module prefixes (``layer1\\.``, ``features\\.(?:2|3)\\.``, ``class_token$``). The patterns are shown to
users by ``finetune inspect`` and can be copied into ``model.groups``. Group order is input -> output;
``neck`` (pre-logits layers) and ``head`` come last.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Callable, Iterable, Sequence

import torch.nn as nn

from finetune.core.groups import auto_spec

HEAD = "head"
NECK = "neck"

# timm's marker suffix: "this layer belongs with the previous group" (timm.models._manipulate)
_MATCH_PREV = (99999,)


# ---------------------------------------------------------------------------------------------------
# paths -> regexes


def patterns_for(paths: Sequence[str], param_names: Iterable[str]) -> list[str]:
    """Regexes matching exactly the parameters at or under the given dotted paths.

    A path naming a parameter gives ``name$``; a module gives ``name\\.``. Consecutive numeric
    children of the same parent are merged (``features\\.(?:4|5|6)\\.``) to keep the spec readable.
    """
    params = set(param_names)
    items: list[tuple[str | None, list[str] | str]] = []
    for path in paths:
        parent, _, last = path.rpartition(".")
        numeric_module = last.isdigit() and path not in params
        if numeric_module and items and items[-1][0] == parent:
            items[-1][1].append(last)  # type: ignore[union-attr]
        elif numeric_module:
            items.append((parent, [last]))
        else:
            items.append((None, path))
    out = []
    for parent, rest in items:
        if parent is None:
            out.append(re.escape(rest) + ("$" if rest in params else r"\."))
        else:
            head = re.escape(parent) + r"\." if parent else ""
            alt = rest[0] if len(rest) == 1 else "(?:" + "|".join(rest) + ")"
            out.append(head + alt + r"\.")
    return out


def _pure_prefixes(names: Sequence[str], owner: Mapping[str, str]) -> list[tuple[str, str]]:
    """Shortest dotted prefixes (in model order) whose parameters all belong to one group, with it."""
    out: list[tuple[str, str]] = []

    def walk(prefix: str, members: list[str]) -> None:
        groups = {owner[n] for n in members}
        if prefix and len(groups) == 1:
            out.append((prefix, groups.pop()))
            return
        children: dict[str, list[str]] = {}
        depth = prefix.count(".") + 1 if prefix else 0
        for n in members:
            children.setdefault(".".join(n.split(".")[: depth + 1]), []).append(n)
        for child, sub in children.items():
            walk(child, sub)

    walk("", list(names))
    return out


def spec_from_owner(names: Sequence[str], owner: Mapping[str, str], order: Sequence[str]) -> dict:
    """Group spec (ordered as `order`) reproducing a parameter -> group assignment exactly."""
    paths: dict[str, list[str]] = {g: [] for g in order}
    for prefix, group in _pure_prefixes(names, owner):
        paths[group].append(prefix)
    return {g: patterns_for(p, names) for g, p in paths.items() if p}


def _finish(model: nn.Module, body: list[tuple[str, list[str]]], neck: list[str], heads: list[str]):
    """Spec from per-group paths: body groups, then `neck` (if any), then the head."""
    names = [n for n, _ in model.named_parameters()]
    groups = body + ([(NECK, neck)] if neck else []) + [(HEAD, heads)]
    return {g: patterns_for(p, names) for g, p in groups if p}


# ---------------------------------------------------------------------------------------------------
# torchvision families


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _param_children(model: nn.Module, path: str) -> list[str]:
    """Dotted paths of the parameter-holding children of the module at `path` ('' = the model)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return []
    return [f"{path}.{n}" if path else n for n, c in module.named_children() if _has_params(c)]


def _downsamples(module: nn.Module) -> bool:
    """Whether a module lowers the spatial resolution: a strided conv or pooling (stride-1 pools, as in
    inception branches, do not count)."""
    return any(
        isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and max(_pair(m.stride)) > 1
        for m in module.modules()
    )


def _pair(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def split_at_downsampling(model: nn.Module, container: str, skip: Sequence[str] = ()):
    """Cut the children of `container` into resolution stages: ["stem", "stage1", ...].

    A child that downsamples starts a new stage once the current stage holds parameters, so a pooling
    layer (no parameters) opens the stage of the blocks after it.
    """
    stages: list[list[str]] = [[]]
    for name, child in model.get_submodule(container).named_children():
        path = f"{container}.{name}" if container else name
        if path in skip:
            continue
        if _downsamples(child) and stages[-1]:
            stages.append([])
        if _has_params(child):
            stages[-1].append(path)
    stages = [s for s in stages if s]
    return [("stem" if i == 0 else f"stage{i}", s) for i, s in enumerate(stages)]


def _head_siblings(model: nn.Module, head: str) -> list[str]:
    """Pre-logits layers living next to the head (e.g. vgg's classifier.0/.3); none for a top-level head."""
    parent = head.rpartition(".")[0]
    return [p for p in _param_children(model, parent) if p != head] if parent else []


def _split(container: str, tail: int = 0):
    """Family using `split_at_downsampling`; the last `tail` children of `container` go to the neck."""

    def family(model: nn.Module, head: str):
        children = [c for c in _param_children(model, container) if c != head]
        neck = children[len(children) - tail :] if tail else []
        return split_at_downsampling(model, container, skip=neck + [head]), neck

    return family


def _resnet(model, head):
    return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)], []


def _regnet(model, head):
    stages = _param_children(model, "trunk_output")
    return [("stem", ["stem"])] + [(f"stage{i}", [s]) for i, s in enumerate(stages, 1)], []


def _shufflenet(model, head):
    return [("stem", ["conv1"])] + [(f"stage{i}", [f"stage{i}"]) for i in (2, 3, 4)], ["conv5"]


def _efficientnet(model, head):
    """features.0 is the stem, features.1..n-2 the MBConv stages, the final 1x1 conv the neck."""
    ch = _param_children(model, "features")
    return [("stem", ch[:1])] + [(f"stage{i}", [c]) for i, c in enumerate(ch[1:-1], 1)], ch[-1:]


def _paired(neck: list[str]):
    """convnext / swin: stem, stage1, then each downsampling layer grouped with the stage after it."""

    def family(model, head):
        ch = _param_children(model, "features")
        stages = [("stem", ch[:1]), ("stage1", ch[1:2])]
        stages += [(f"stage{k}", ch[2 * k - 2 : 2 * k]) for k in range(2, len(ch) // 2 + 1)]
        return stages, neck

    return family


def _maxvit(model, head):
    blocks = _param_children(model, "blocks")
    return [("stem", ["stem"])] + [(f"stage{i}", [b]) for i, b in enumerate(blocks, 1)], []


def _vit(model, head):
    """Patch embedding + tokens as the stem, one group per encoder layer, the final norm as neck."""
    layers = _param_children(model, "encoder.layers")
    stem = [("stem", ["class_token", "conv_proj", "encoder.pos_embedding"])]
    return stem + [(f"layer{i}", [p]) for i, p in enumerate(layers)], ["encoder.ln"]


# (regex on the model name, family); first match wins. Anything else gets groups.auto_spec.
TORCHVISION_FAMILIES: list[tuple[str, Callable]] = [
    (r"resnet|resnext|wide_resnet", _resnet),
    (r"regnet", _regnet),
    (r"shufflenet", _shufflenet),
    (r"efficientnet", _efficientnet),
    (r"convnext", _paired([])),
    (r"swin", _paired(["norm"])),
    (r"maxvit", _maxvit),
    (r"vit_", _vit),
    (r"vgg|alexnet|squeezenet", _split("features")),
    (r"densenet|mobilenet", _split("features", tail=1)),
    (r"mnasnet", _split("layers", tail=2)),
    (r"googlenet|inception", _split("")),
]


def torchvision_spec(model: nn.Module, name: str, head: str) -> dict | None:
    """Ready grouping of a torchvision classifier whose final layer is at `head`; None if unknown."""
    for pattern, family in TORCHVISION_FAMILIES:
        if re.match(pattern, name):
            body, neck = family(model, head)
            return _finish(model, body, neck + _head_siblings(model, head), [head])
    return None


# ---------------------------------------------------------------------------------------------------
# timm


def _stage_name(pattern: str, capture: str, fallback: str) -> str:
    """Group name from the literal text before a matcher's capture: '^blocks\\.(\\d+)' + '3' -> 'blocks_3',
    '^layer(\\d+)' + '2' -> 'layer2'."""
    cut = re.search(r"(?<!\\)\((?!\?)", pattern)
    literal = pattern[: cut.start()].lstrip("^").replace(r"\.", ".") if cut else ""
    parts = literal.split(".")
    name = f"{parts[-2]}_{capture}" if len(parts) > 1 and not parts[-1] else f"{parts[-1]}{capture}"
    return name if re.fullmatch(r"[A-Za-z_]\w*", name) else f"{fallback}_{capture}"


def _compile_matcher(matcher: Mapping):
    """timm's dict matcher as [(ordinal, dict key, regex, suffix)] in timm's own matching order."""
    out = []
    for ordinal, (key, spec) in enumerate(matcher.items()):
        if spec is None:
            continue
        for entry in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            out.append((ordinal, key, re.compile(entry[0]), entry[1]))
    return out


def _timm_stage(name: str, compiled) -> tuple[tuple, str, int]:
    """(sort key, group name, matcher entry) of one parameter: stages by the first numeric capture of
    timm's matcher.

    Layers timm merges into the previous group without a stage index (final norms, conv_head) and
    layers the matcher misses (timm sorts them last) form the neck.
    """
    neck = ((math.inf, 0.0, ""), NECK, -1)
    for entry, (ordinal, key, regex, suffix) in enumerate(compiled):
        m = regex.match(name)
        if not m:
            continue
        caps = [c for c in m.groups() if c is not None]
        if caps:
            num = float(caps[0]) if caps[0].isdigit() else math.inf
            return (ordinal, num, caps[0]), _stage_name(regex.pattern, caps[0], key), entry
        if tuple(suffix or ()) == _MATCH_PREV:
            return neck
        return (ordinal, -1.0, ""), key, entry
    return neck


def timm_spec(model: nn.Module, heads: Sequence[str]) -> dict:
    """Ready grouping of a timm model from its ``group_matcher(coarse=False)``, coarsened to stages:
    stem, one group per stage (first numeric capture), neck, then the classifier at `heads`."""
    names = [n for n, _ in model.named_parameters()]
    is_head = {n: any(n == h or n.startswith(h + ".") for h in heads) for n in names}
    body = [n for n in names if not is_head[n]]
    try:
        matcher = model.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        matcher = None
    if isinstance(matcher, Mapping):
        compiled = _compile_matcher(matcher)
        keyed = {n: _timm_stage(n, compiled) for n in body}
        # one name per stage, from its earliest matcher entry (stage2 + patch_embed2 -> 'stage2')
        named = {key: gname for key, gname, _ in sorted(keyed.values(), key=lambda t: -t[2])}
        named = {k: f"{g}_body" if g == HEAD else g for k, g in named.items()}  # 'head' is the new head
        owner = {n: named[key] for n, (key, _, _) in keyed.items()}
        order = list(dict.fromkeys(named[k] for k in sorted(named)))
    elif callable(matcher):
        from timm.models._manipulate import group_with_matcher

        layer_of = group_with_matcher(((n, None) for n in body), matcher, reverse=True)
        owner = {n: f"layer{layer_of[n]}" for n in body}
        order = [f"layer{i}" for i in sorted(set(layer_of.values()))]
    else:
        owner = {n: n.split(".")[0] if n.split(".")[0] != HEAD else NECK for n in body}
        order = list(dict.fromkeys(owner.values()))
    owner.update({n: HEAD for n in names if is_head[n]})
    order = [g for g in order if g != HEAD] + [HEAD]
    return spec_from_owner(names, owner, order)


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers


def _block_list(model: nn.Module, body: str) -> str | None:
    """Path of the encoder's layer list under `body`: the ModuleList holding the most parameters, the
    outermost on a tie (``vit.layers`` / ``vit.encoder.layer``, ``convnext.encoder.stages``, Swin's
    ``swin.encoder.layers`` rather than one stage's ``blocks``); None when the body has none."""
    best, best_key = None, None
    for path, module in model.get_submodule(body).named_modules(prefix=body):
        if isinstance(module, nn.ModuleList) and len(module):
            key = (sum(p.numel() for p in module.parameters()), -path.count("."))
            if key[0] and (best_key is None or key > best_key):
                best, best_key = path, key
    return best


def hf_spec(model: nn.Module, body: str, heads: Sequence[str]) -> dict:
    """Ready grouping of a transformers image classifier with its backbone at `body` and classifier(s) at
    `heads`: ``embeddings`` (every parameter before the encoder's layer list), one group per list entry,
    ``neck`` (after it: final norm, pooler), ``head``. Entries are ``stages_<i>`` when the list is of
    stages (named so, or entries holding their own block list: ConvNeXt, Swin, ResNet), else ``blocks_<i>``
    (ViT, DeiT, BEiT, DINOv2, CLIP / SigLIP vision). Without a layer list: groups.auto_spec's groups of the
    body (one per child), then the head (which may lie inside the body)."""
    names = [n for n, _ in model.named_parameters()]
    is_head = {n: any(n.startswith(h + ".") for h in heads) for n in names}
    blocks = _block_list(model, body)
    if blocks is None:
        sub = auto_spec(model.get_submodule(body))
        owner = {}
        for n in names:
            rel = n[len(body) + 1:]
            group = HEAD if is_head[n] else next(g for g, pats in sub.items() if any(re.match(p, rel) for p in pats))
            owner[n] = f"{group}_body" if group == HEAD and not is_head[n] else group
        order = [f"{g}_body" if g == HEAD else g for g in sub] + [HEAD]
        return spec_from_owner(names, owner, [g for g in order if g in set(owner.values())])
    entries = model.get_submodule(blocks)
    staged = blocks.rpartition(".")[2] == "stages" or any(
        isinstance(m, nn.ModuleList) for entry in entries for m in entry.modules())
    kind = "stages" if staged else "blocks"
    owner, seen_blocks = {}, False
    for n in names:
        if is_head[n]:
            owner[n] = HEAD
        elif n.startswith(blocks + "."):
            owner[n], seen_blocks = f"{kind}_{n[len(blocks) + 1:].split('.')[0]}", True
        else:
            owner[n] = NECK if seen_blocks else "embeddings"
    order = ["embeddings"] + [f"{kind}_{i}" for i in range(len(entries))] + [NECK, HEAD]
    return spec_from_owner(names, owner, [g for g in order if g in set(owner.values())])
