"""`finetune inspect`: every parameter tensor's effective LR and weight decay (inspect.params=true), and
the warnings about legal but likely mistaken settings, which train logs too."""

import json

import pytest
from tiny_runs import ROOT

from finetune.commands import cli

RESNET = ["model=resnet18", "model.weights=null", "data=synthetic", "experiment=none"]


def inspect_json(capsys, *overrides) -> dict:
    capsys.readouterr()
    cli.main(["inspect", *overrides, "inspect.format=json"])
    return json.loads(capsys.readouterr().out)


def test_params_lists_every_tensor_with_its_lr_and_weight_decay(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    info = inspect_json(capsys, *RESNET, "unfreeze=2", "optimizer.weight_decay=0.05", "+per_group.layer4.lr=3e-3",
                        "inspect.params=true")
    rows = {r["name"]: r for r in info["params"]}
    assert len(rows) == 62  # resnet18's parameter tensors
    peaks = {g["name"]: g["lr"]["peak"] for g in info["groups"]}
    assert rows["layer4.1.conv2.weight"]["lr_peak"] == peaks["layer4"] == pytest.approx(3e-3, rel=0.02)
    assert (rows["conv1.weight"]["group"], rows["conv1.weight"]["weight_decay"]) == ("stem", 0.05)
    assert rows["bn1.weight"]["weight_decay"] == rows["fc.bias"]["weight_decay"] == 0.0  # norm and bias: none
    assert rows["fc.weight"]["shape"] == [4, 512] and rows["fc.weight"]["trainable_from_epoch"] == 0
    assert rows["conv1.weight"]["trainable_from_epoch"] is None


def test_likely_mistakes_are_warned_about(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    info = inspect_json(capsys, *RESNET, "epochs=4", "unfreeze=2", "lr_spread.kind=geometric", "head_lr=1e-5",
                        "freeze=milestones", "++freeze.milestones={7: all}", "+per_group.stem.lr=1")
    assert info["warnings"] == [
        "freeze.milestones at epoch 4, 7: past the last epoch (3), so that change never happens",
        "per_group.stem is set, but group 'stem' never trains",
        "the head's peak LR (1e-05) is below the peak LR of group layer4 (0.000398): a new head usually needs "
        "the highest LR",  # geometric from lr / 100 to lr = 1e-3: layer4 at 1e-3 * 100 ** (-1 / 5)
        "lr_spread.kind=geometric on a randomly initialised model (model.weights=null): lower LRs for the early "
        "layers only slow them down when nothing is pretrained",
    ]
    plain = inspect_json(capsys, *RESNET, "model.weights=DEFAULT")  # a sound config: nothing to say
    assert plain["warnings"] == []


def test_a_gradual_unfreeze_longer_than_training_is_warned_about(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    info = inspect_json(capsys, *RESNET, "epochs=3", "freeze=gradual", "unfreeze=all")
    assert info["warnings"] == [
        "group(s) stem, layer1, layer2 never train in 3 epochs although unfreeze=all allows them "
        "(freeze.kind=gradual): their schedules never start; raise epochs or lower unfreeze"]



@pytest.mark.parametrize("extra", [[], ["peft=lora"], ["freeze=gradual", "+per_group.head.schedule.kind=constant"]])
def test_the_plan_at_80_columns_shows_every_group_name_and_lr_whole(capsys, extra):
    """Before: every column cut at 80 columns (`block…`, `4.00e…`)."""
    import io

    from rich.console import Console

    from finetune.commands.inspect import print_plan

    info = inspect_json(capsys, *extra)
    out = io.StringIO()
    print_plan(info, "table", Console(file=out, width=80))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip() and line.split()[0] in
            {g["name"] for g in info["groups"]}}
    assert len(rows) == len(info["groups"])
    for g in info["groups"]:
        for key in ("start", "peak", "end"):
            assert f"{g['lr'][key]:.2e}" in rows[g["name"]].split(), (g["name"], key)
    wide = io.StringIO()
    print_plan(info, "table", Console(file=wide, width=160))
    assert all(" ".join(g["patterns"]) in wide.getvalue() for g in info["groups"])


def test_a_model_without_batchnorm_says_nothing_of_it(capsys):
    info = inspect_json(capsys, "model=timm", "model.name=test_vit", "model.weights=null", "data=synthetic",
                        "experiment=none")
    assert info["batchnorm"] is None
    assert inspect_json(capsys, *RESNET)["batchnorm"].startswith("pretrained statistics in frozen groups")
