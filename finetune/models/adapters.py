"""Adapters per layer group through the peft library (LoRA, DoRA, IA3, LoHa, LoKr), not hand-written.

`peft.groups` (default: every group below the head) get adapters on the layers `peft.target` matches
(default: every Linear and every 1x1 convolution). peft's `inject_adapter_in_model` puts them into the
model in place, so parameter names keep their paths: `blocks.8.attn.qkv.weight` becomes
`blocks.8.attn.qkv.base_layer.weight` beside `blocks.8.attn.qkv.lora_A.default.weight`, and each belongs
to the group its layer did. In those groups the base weights are fixed (LayerGroup.fixed: they never
train, whatever the freeze schedule says) and the adapters are what the schedule trains, at the group's
LR; groups outside peft.groups (the head) train whole, as without adapters.

`merge` folds the adapters into the base layers (peft's own merge) for export; `save_adapter` writes the
adapters and the wholly trained layers in peft's format (`PeftModel.from_pretrained` loads it).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from finetune.base.errors import UserError
from finetune.core.groups import LayerGroup

log = logging.getLogger("finetune")

ADAPTER = "default"  # peft's adapter name: a component of every adapter parameter's name


def _adaptable(module: nn.Module, targeted: bool) -> bool:
    """The layer types every peft kind here adapts. Without peft.target, Linears and pointwise convolutions;
    with it, any Linear or ungrouped Conv2d it names (peft's convolution adapters need groups=1)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return targeted or tuple(module.kernel_size) == (1, 1)
    return False


def scope(groups: Sequence[LayerGroup], cfg) -> list[str]:
    """The names of the groups that get adapters: peft.groups, or every group below the head."""
    names = [g.name for g in groups]
    if cfg.groups is None:
        return names[:-1]
    chosen = [str(g) for g in cfg.groups]
    unknown = [g for g in chosen if g not in names]
    if unknown:
        raise UserError(f"peft.groups: '{unknown[0]}' is not a layer group of this model; its groups: {', '.join(names)}")
    return chosen


def targets(model: nn.Module, groups: Sequence[LayerGroup], cfg) -> dict[str, str]:
    """{module name: its group} of the layers that get adapters."""
    owner = {p: g.name for g in groups for p in g.param_names}
    inside = set(scope(groups, cfg))
    try:
        pattern = re.compile(cfg.target) if cfg.target is not None else None
    except re.error as e:
        raise UserError(f"peft.target: '{cfg.target}' is not a regular expression ({e})") from None
    out = {}
    for name, module in model.named_modules():
        weight = f"{name}.weight"
        if (weight in owner and owner[weight] in inside and _adaptable(module, pattern is not None)
                and (pattern is None or pattern.search(name))):
            out[name] = owner[weight]
    if cfg.groups is not None:  # a group the user named must get adapters
        empty = [g for g in scope(groups, cfg) if g not in out.values()]
        if empty:
            what = f"matches peft.target '{cfg.target}'" if cfg.target else "is a Linear or a 1x1 convolution"
            raise UserError(f"peft.groups: no layer of group '{empty[0]}' {what}; choose other groups or set "
                            "peft.target (a regex over module names, see finetune inspect inspect.params=true)")
    if not out:
        raise UserError("peft: no layer to adapt in the groups below the head (no Linear or 1x1 convolution"
                        + (f" matching '{cfg.target}'" if cfg.target else "") + ")")
    return out


def peft_config(cfg, modules: Sequence[str], bias: str = "none"):
    """peft's config for `cfg.kind` on exactly `modules` (a full-match regex: peft matches a list of names
    by suffix, which could catch a deeper layer of the same name)."""
    import peft

    names = "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"
    kind, r, alpha, dropout = str(cfg.kind), int(cfg.r), float(cfg.alpha), float(cfg.dropout)
    if r < 1 and kind != "ia3":
        raise UserError(f"peft.r: the adapters' rank must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise UserError(f"peft.dropout: must be in [0, 1), got {dropout}")
    if kind in ("lora", "dora"):
        return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias=bias,
                               use_dora=kind == "dora")
    if kind == "ia3":
        return peft.IA3Config(target_modules=names, feedforward_modules=[])
    if kind == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=names)
    if kind == "lokr":
        return peft.LoKrConfig(r=r, alpha=alpha, module_dropout=dropout, target_modules=names)
    raise UserError(f"peft.kind: '{kind}' is not one of lora, dora, ia3, loha, lokr")


def base_name(name: str) -> str:
    """The parameter's name before adapters were added (peft moves the layer's own under `base_layer`)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def is_adapter(name: str) -> bool:
    """An adapter's own parameter (not a base layer's)."""
    return _adapted_layer(name) is not None


def _adapted_layer(name: str) -> str | None:
    """The layer an adapter parameter belongs to (`a.b.lora_A.default.weight` -> `a.b`); None for others."""
    parts = name.split(".")
    if ADAPTER not in parts:
        return None
    return ".".join(parts[:parts.index(ADAPTER) - 1])


def add(model: nn.Module, groups: Sequence[LayerGroup], cfg) -> list[LayerGroup]:
    """Adapters into `model` (in place) as `cfg` (a PeftConfig) says; the groups of the adapted model: each
    adapter in its layer's group, the base parameters of adapted groups fixed (biases trainable by peft.bias)."""
    try:
        import peft
    except ImportError:
        raise UserError('peft=... needs the peft library: pip install "finetune[peft]"') from None
    chosen = targets(model, groups, cfg)
    adapted_groups = set(scope(groups, cfg))
    owner = {p: g.name for g in groups for p in g.param_names}
    with _quiet():
        peft.inject_adapter_in_model(peft_config(cfg, list(chosen)), model, adapter_name=ADAPTER)
    new = {g.name: LayerGroup(g.name, list(g.patterns)) for g in groups}
    for name, _ in model.named_parameters():
        layer = _adapted_layer(name)
        group = new[chosen[layer] if layer is not None else owner[base_name(name)]]
        group.param_names.append(name)
        if layer is not None:
            group.adapters.append(name)
        elif group.name in adapted_groups and not _trains_as_bias(base_name(name), str(cfg.bias), chosen):
            group.fixed.append(name)
    plain = [g for g in adapted_groups if not new[g].adapters]
    if plain:
        log.info("peft: group(s) %s hold no layer to adapt: their weights stay as pretrained", ", ".join(plain))
    return list(new.values())


def _trains_as_bias(name: str, bias: str, adapted: dict[str, str]) -> bool:
    if not name.endswith(".bias") or bias == "none":
        return False
    return bias == "all" or name[: -len(".bias")] in adapted


class _quiet:
    """peft warns about every layer type it cannot adapt and about unmerged DoRA; finetune chose the layers."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", UserWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _tuner_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    named = dict(model.named_modules())
    out = []
    for name, module in named.items():
        if isinstance(module, BaseTunerLayer) and name:
            parent, _, child = name.rpartition(".")
            out.append((named[parent] if parent else model, child, module))
    return out


def has_adapters(model: nn.Module) -> bool:
    return any(_adapted_layer(name) is not None for name, _ in model.named_parameters())


def merge(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its base layer by peft (the plain architecture
    again: what export writes)."""
    model = copy.deepcopy(model)
    with _quiet():
        for parent, child, layer in _tuner_layers(model):
            layer.merge(safe_merge=True)
            setattr(parent, child, layer.get_base_layer())
    return model


def unload(model: nn.Module) -> nn.Module:
    """A copy of `model` without its adapters (the base layers as they are, nothing merged)."""
    model = copy.deepcopy(model)
    for parent, child, layer in _tuner_layers(model):
        setattr(parent, child, layer.get_base_layer())
    return model


def save_adapter(model: nn.Module, groups: Sequence[LayerGroup], cfg, out: Path) -> list[str]:
    """peft's own format in `out` (adapter_config.json, adapter_model.safetensors): the adapters, and, as
    peft's modules_to_save, every layer of the groups outside peft.groups (the trained head). Loads with
    `PeftModel.from_pretrained(<the base model with a head of this size>, out)`. Returns modules_to_save."""
    import peft

    adapted = sorted({layer for g in groups for n in g.adapters if (layer := _adapted_layer(n))})
    inside = set(scope(groups, cfg))
    whole = sorted({n.rpartition(".")[0] for g in groups if g.name not in inside for n in g.param_names})
    config = peft_config(cfg, adapted, bias=str(cfg.bias) if str(cfg.kind) in ("lora", "dora") else "none")
    config.modules_to_save = whole
    with _quiet():
        wrapped = peft.get_peft_model(unload(model), config, adapter_name=ADAPTER)
    ours = dict(model.named_parameters())
    for name, p in wrapped.base_model.model.named_parameters():
        if _adapted_layer(name) is not None and ".modules_to_save." not in name:
            p.data.copy_(ours[name].data)
    wrapped.save_pretrained(str(out))
    return whole
