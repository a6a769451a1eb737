"""Layer groups: first-match rule, catch-all, auto grouping, and one clear error per mistake."""

import pytest
import torch
import torch.nn as nn

from finetune.base.errors import UserError
from finetune.core.groups import assign_groups, auto_spec, build_groups

NAMES = ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
         "layer2.0.conv1.weight", "fc.weight", "fc.bias"]


def members(groups):
    return {g.name: g.param_names for g in groups}


def test_first_matching_group_wins_and_patterns_are_anchored():
    spec = {"stem": ["conv1", "bn1"], "body": r"layer\d", "also_layer1": "layer1", "head": "fc"}
    with pytest.raises(UserError, match="group 'also_layer1'.*gets no parameter: every one it matches was already "
                                        "taken by the earlier group 'body'"):
        assign_groups(NAMES, spec)  # layer1.* was taken by 'body' first
    groups = assign_groups(NAMES, {"stem": ["conv1", "bn1"], "body": r"layer\d", "head": "fc"})
    assert members(groups) == {
        "stem": ["conv1.weight", "bn1.weight", "bn1.bias"],  # re.match: layer1.0.conv1 is not stem
        "body": ["layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer2.0.conv1.weight"],
        "head": ["fc.weight", "fc.bias"],
    }


def test_list_form_and_catch_all():
    spec = [{"name": "stem", "patterns": ["conv1"]}, {"name": "rest", "patterns": ["layer"]},
            {"name": "head", "patterns": "fc"}]
    groups = assign_groups(NAMES, spec, catch_all="rest")
    assert members(groups)["rest"] == ["bn1.weight", "bn1.bias", "layer1.0.conv1.weight",
                                       "layer1.0.bn1.weight", "layer2.0.conv1.weight"]


def test_unmatched_parameter_is_named():
    with pytest.raises(UserError, match=r"parameter 'bn1.weight' \(and 1 more\) matches no group"):
        assign_groups(NAMES, {"stem": "conv1", "body": "layer", "head": "fc"})


def test_group_matching_nothing_suggests_close_names():
    with pytest.raises(UserError, match=r"group 'head' \(patterns \['fc1'\]\) matches no parameter; "
                                        r"closest parameter names: .*fc"):
        assign_groups(NAMES, {"all": ["conv1", "bn1", "layer"], "head": "fc1"}, catch_all="all")


def test_invalid_regex_and_duplicates():
    with pytest.raises(UserError, match=r"invalid regex 'layer\(' in group 'body'"):
        assign_groups(NAMES, {"body": "layer(", "head": "fc"})
    with pytest.raises(UserError, match="duplicate group name 'a'"):
        assign_groups(NAMES, [{"name": "a", "patterns": "conv"}, {"name": "a", "patterns": "fc"}])
    with pytest.raises(UserError, match="catch_all group 'nope'"):
        assign_groups(NAMES, {"head": "fc"}, catch_all="nope")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(3))
        self.embed = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def test_auto_grouping_uses_top_level_children_in_order():
    model = Toy()
    assert list(auto_spec(model)) == ["embed", "blocks", "head"]
    groups = build_groups(model)
    assert members(groups)["embed"] == ["token", "embed.weight", "embed.bias"]
    assert members(groups)["head"] == ["head.weight", "head.bias"]
    assert sum(len(g.param_names) for g in groups) == len(list(model.parameters()))
