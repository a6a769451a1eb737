"""Ready layer groupings: every torchvision classifier, a few timm models, and the regex helpers."""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision

from finetune.core.groups import assign_groups
from finetune.models import zoo
from finetune.models.build import build_model, ready_spec
from finetune.models.heads import HeadConv1x1, HeadLinear

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)


@contextlib.contextmanager
def meta_params():
    """Build models with parameters and buffers on the meta device: no memory, no init cost, so even
    vit_h_14 / regnet_y_128gf are instant. (torch.device('meta') cannot be used: regnet computes its
    widths with tensors at construction.)"""
    orig_param, orig_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig_param(self, name, param)

    def register_buffer(self, name, tensor, persistent=True):
        orig_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = orig_param, orig_buffer


def model_cfg(name, source="torchvision", **kw):
    return SimpleNamespace(name=name, source=source, weights=None, groups=None, drop_rate=0.0, **kw)


def check_groups(model, spec):
    """Common invariants; returns the groups and the new head's path."""
    names = [n for n, _ in model.named_parameters()]
    groups = assign_groups(names, spec)  # no catch-all: every parameter must be covered
    heads = [n for n, m in model.named_modules() if isinstance(m, (HeadLinear, HeadConv1x1))]
    assert len(heads) == 1
    assert groups[-1].name == "head"
    assert groups[-1].param_names == [f"{heads[0]}.weight", f"{heads[0]}.bias"]
    index = {n: i for i, n in enumerate(names)}
    spans = [(index[g.param_names[0]], index[g.param_names[-1]]) for g in groups]
    for g in groups:  # each group is a contiguous run of parameters, in forward (registration) order
        idx = [index[n] for n in g.param_names]
        assert idx == list(range(idx[0], idx[0] + len(idx))), g.name
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    return groups


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_every_torchvision_model_has_a_ready_grouping(name):
    with meta_params():
        bundle = build_model(model_cfg(name), num_classes=7)
    groups = check_groups(bundle.model, bundle.group_spec)
    assert len(groups) >= 3
    assert bundle.head_group == "head"
    assert all(re.fullmatch(r"[A-Za-z_]\w*", g.name) for g in groups)  # usable as config keys
    if not name.startswith(("googlenet", "inception")):  # those two use the generic splitter
        assert groups[0].name == "stem"


def test_resnet18_grouping_exact():
    bundle = build_model(model_cfg("resnet18"), num_classes=3)
    names = [n for n, _ in bundle.model.named_parameters()]
    groups = assign_groups(names, bundle.group_spec)
    assert [g.name for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert groups[0].param_names == ["conv1.weight", "bn1.weight", "bn1.bias"]
    for g, size in zip(groups[1:5], [12, 15, 15, 15]):  # 2 BasicBlocks each, + downsample conv/bn in 2-4
        assert g.param_names == [n for n in names if n.startswith(g.name + ".")]
        assert len(g.param_names) == size
    assert groups[-1].param_names == ["fc.weight", "fc.bias"]
    assert bundle.model.fc.out_features == 3


@pytest.mark.parametrize(
    "name, groups",
    [
        ("vgg11_bn", ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head"]),
        ("densenet121", ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head"]),
        ("efficientnet_b0", ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["neck", "head"]),
        ("convnext_tiny", ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head"]),
        ("swin_t", ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head"]),
        ("maxvit_t", ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head"]),
        ("regnet_y_400mf", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
        ("shufflenet_v2_x0_5", ["stem", "stage2", "stage3", "stage4", "neck", "head"]),
        ("mobilenet_v2", ["stem", "stage1", "stage2", "stage3", "stage4", "neck", "head"]),
        ("vit_b_32", ["stem"] + [f"layer{i}" for i in range(12)] + ["neck", "head"]),
        ("googlenet", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
        ("inception_v3", ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    ],
)
def test_family_group_names(name, groups):
    with meta_params():
        bundle = build_model(model_cfg(name), num_classes=4)
    assert list(bundle.group_spec) == groups


def test_family_patterns_are_readable():
    with meta_params():
        vgg = build_model(model_cfg("vgg11_bn"), 4).group_spec
        swin = build_model(model_cfg("swin_t"), 4).group_spec
        vit = build_model(model_cfg("vit_b_32"), 4).group_spec
    assert vgg["stage1"] == [r"features\.(?:4|5)\."]  # conv+bn after the first max-pool
    assert vgg["neck"] == [r"classifier\.(?:0|3)\."]
    assert vgg["head"] == [r"classifier\.6\."]
    assert swin["stage2"] == [r"features\.(?:2|3)\."]  # patch merging + the stage after it
    assert swin["neck"] == [r"norm\."]
    assert vit["stem"] == ["class_token$", r"conv_proj\.", r"encoder\.pos_embedding$"]


@pytest.mark.parametrize(
    "name, body",
    [
        ("tf_efficientnet_lite0", ["stem"] + [f"blocks_{i}" for i in range(7)] + ["neck"]),
        ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("convnext_atto", ["stem", "stages_0", "stages_1", "stages_2", "stages_3", "neck"]),
        ("vit_tiny_patch16_224", ["stem"] + [f"blocks_{i}" for i in range(12)] + ["neck"]),
    ],
)
def test_timm_ready_groupings(name, body):
    bundle = build_model(model_cfg(name, source="timm"), num_classes=5)
    names = [n for n, _ in bundle.model.named_parameters()]
    groups = assign_groups(names, bundle.group_spec)
    assert [g.name for g in groups] == body + ["head"]
    assert sum(len(g.param_names) for g in groups) == len(names)
    classifier = bundle.model.get_classifier()
    head_params = [bundle.model.get_parameter(n) for n in groups[-1].param_names]
    assert len(head_params) == 2
    assert head_params[0] is classifier.weight and head_params[1] is classifier.bias
    assert classifier.out_features == 5


def test_timm_grouping_follows_timm_stages():
    """Each group holds exactly the parameters timm's matcher puts in that stage (first capture)."""
    bundle = build_model(model_cfg("tf_efficientnet_lite0", source="timm"), num_classes=5)
    names = [n for n, _ in bundle.model.named_parameters()]
    groups = {g.name: g.param_names for g in assign_groups(names, bundle.group_spec)}
    assert groups["blocks_3"] == [n for n in names if n.startswith("blocks.3.")]
    assert groups["stem"] == ["conv_stem.weight", "bn1.weight", "bn1.bias"]
    assert groups["neck"] == ["conv_head.weight", "bn2.weight", "bn2.bias"]


def test_plain_module_gets_auto_spec():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    assert ready_spec(model, "anything", "custom") == {"0": [r"0\."], "3": [r"3\."]}


def test_patterns_for_merges_numeric_siblings_only():
    names = ["a.0.w", "a.1.w", "a.2.w", "a.10.w", "tok", "b.x.w"]
    pats = zoo.patterns_for(["a.0", "a.1", "a.10", "tok", "b.x"], names)
    assert pats == [r"a\.(?:0|1|10)\.", "tok$", r"b\.x\."]
    matched = [n for n in names if any(re.match(p, n) for p in pats)]
    assert matched == ["a.0.w", "a.1.w", "a.10.w", "tok", "b.x.w"]  # not a.2, and a.1 is not a.10's prefix


def test_spec_from_owner_reproduces_any_assignment():
    names = ["tok", "s.0.a.w", "s.0.b.w", "s.1.a.w", "s.1.b.w", "n.w", "h.w", "h.b"]
    owner = {"tok": "g0", "s.0.a.w": "g0", "s.0.b.w": "g1", "s.1.a.w": "g1", "s.1.b.w": "g1",
             "n.w": "g2", "h.w": "head", "h.b": "head"}
    spec = zoo.spec_from_owner(names, owner, ["g0", "g1", "g2", "head"])
    assert spec["g1"] == [r"s\.0\.b\.", r"s\.1\."]
    got = {n: g.name for g in assign_groups(names, spec) for n in g.param_names}
    assert got == owner


def test_split_at_downsampling():
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.MaxPool2d(2), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
    )
    model = nn.Module()
    model.features = features
    assert zoo.split_at_downsampling(model, "features") == [
        ("stem", ["features.0", "features.2"]),
        ("stage1", ["features.4"]),
        ("stage2", ["features.7"]),  # consecutive pools open only one stage
    ]


@pytest.mark.parametrize(
    "pattern, capture, expected",
    [(r"^blocks\.(\d+)\.(\d+)", "3", "blocks_3"), (r"^layer(\d+)\.(\d+)", "2", "layer2"),
     (r"^s(\d+)\.b(\d+)", "1", "s1"), (r"^features\.denseblock(\d+)", "4", "denseblock4"),
     (r"^(?:a|b)\.(\d+)", "0", "blocks_0")],
)
def test_stage_names(pattern, capture, expected):
    assert zoo._stage_name(pattern, capture, "blocks") == expected


class _TimmLike(nn.Module):
    """A model with a timm-style matcher: stages referenced by two patterns, a MATCH_PREV final norm,
    a parameter the matcher misses, and a stage embedding registered before the stem."""

    pretrained_cfg = {"classifier": "fc"}

    def __init__(self):
        super().__init__()
        self.pos2 = nn.Parameter(torch.zeros(1))
        self.stem = nn.Linear(2, 2)
        self.stage = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]) for _ in range(3)])
        self.norm = nn.LayerNorm(2)
        self.extra = nn.Linear(2, 2)
        self.fc = nn.Linear(2, 2)

    def group_matcher(self, coarse=False):
        return {
            "stem": r"^stem",
            "blocks": [(r"^stage\.(\d+)\.(\d+)", None), (r"^pos(\d+)", (0,)), (r"^norm", (99999,))],
        }


def test_timm_matcher_semantics():
    model = _TimmLike()
    spec = zoo.timm_spec(model, ["fc"])
    assert list(spec) == ["stem", "stage_0", "stage_1", "stage_2", "neck", "head"]
    assert spec["stage_2"] == ["pos2$", r"stage\.2\."]  # named after the first matcher entry
    assert spec["neck"] == [r"norm\.", r"extra\."]  # MATCH_PREV without a stage index + unmatched
    assert spec["head"] == [r"fc\."]


def _timm_layer_decay_scales(model) -> dict[str, float]:
    from timm.optim._param_groups import param_groups_layer_decay

    scales = {}
    for group in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.75):
        scales.update({id(p): group["lr_scale"] for p in group["params"]})
    return {n: scales[id(p)] for n, p in model.named_parameters()}


def _layer_decay_lrs(model, groups) -> dict[str, float]:
    """Each parameter's peak LR under lr_spread.kind=layer_decay, decay 0.75, at lr 1 (the scale itself)."""
    from helpers import make_cfg

    from finetune.core.optim import layer_depths
    from finetune.core.plan import build_plan

    cfg = make_cfg(lr=1.0, epochs=1, **{"lr_spread.kind": "layer_decay", "lr_spread.decay": 0.75,
                                       "schedule.kind": "constant"})
    plan = build_plan(cfg, [g.name for g in groups], 1, layer_depths(model, groups))
    return {n: gp.lr for g, gp in zip(groups, plan.groups) for n in g.param_names}


def test_layer_decay_matches_timm_on_a_vit_with_the_ready_groups():
    """timm's convention: the final norm (our `neck`) counts with the last block: blocks.11 gets 0.75."""
    bundle = build_model(model_cfg("vit_tiny_patch16_224", source="timm"), num_classes=5)
    groups = assign_groups([n for n, _ in bundle.model.named_parameters()], bundle.group_spec)
    ours, timms = _layer_decay_lrs(bundle.model, groups), _timm_layer_decay_scales(bundle.model)
    assert ours["blocks.11.mlp.fc2.weight"] == pytest.approx(0.75) and ours["norm.weight"] == pytest.approx(0.75)
    assert ours == pytest.approx(timms, rel=1e-12)


def test_layer_decay_matches_timm_on_a_convnext_at_timms_granularity():
    """Groups as fine as timm's layers (one per block): every parameter's scale equals timm's. The ready
    stage groups take the scale of their top block."""
    from timm.models import group_parameters

    from finetune.core.optim import timm_layer_ids

    bundle = build_model(model_cfg("convnext_atto", source="timm"), num_classes=5)
    model = bundle.model
    layer_map = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_map.values())
    by_layer: dict[int, list[str]] = {}
    for name, _ in model.named_parameters():
        by_layer.setdefault(layer_map.get(name, top + 1), []).append(rf"{re.escape(name)}$")
    spec = {f"layer{i}": by_layer[i] for i in sorted(by_layer)}
    groups = assign_groups([n for n, _ in model.named_parameters()], spec)
    assert len(groups) > 8 and timm_layer_ids(model, groups)[1] == top
    assert _layer_decay_lrs(model, groups) == pytest.approx(_timm_layer_decay_scales(model), rel=1e-12)
    ready = assign_groups([n for n, _ in model.named_parameters()], bundle.group_spec)
    lrs, timms = _layer_decay_lrs(model, ready), _timm_layer_decay_scales(model)
    for group in ready:
        assert lrs[group.param_names[0]] == pytest.approx(max(timms[n] for n in group.param_names))


def test_layer_decay_depths_without_timm_let_the_neck_count_with_the_last_block():
    from finetune.core.optim import decay_depths

    assert decay_depths(["stem", "layer0", "layer1", "neck", "head"]) == [3, 2, 1, 1, 0]
    assert decay_depths(["stem", "layer1", "layer2", "head"]) == [3, 2, 1, 0]
