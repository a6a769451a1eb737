"""experiment=auto: the probe measures each group's features on the train images, the decision follows
the evidence, the run trains exactly the chosen recipe with the user's overrides, and it says why."""

import json
import os

import pytest
import torch
import torch.nn as nn
from tiny_runs import (
    QUIET,
    TINY,
    compose_cfg,
    run_cli,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.core.groups import build_groups
from finetune.engine import checkpoint
from finetune.recipes import auto


def evidence(*stages, images=200):
    return auto.Evidence(list(stages), images=images, classes=2)


def test_decision_follows_the_evidence():
    # the top features are the best: near
    assert auto.decide(evidence(("a", 0.70), ("b", 0.90), ("head input", 0.95)), "lp_ft", "full")["recipe"] == "lp_ft"
    # an earlier group beats the top by 6 points, far above the top probe's noise (~0.02 at 200 images)
    far = auto.decide(evidence(("a", 0.70), ("b", 0.95), ("head input", 0.89)), "lp_ft", "full")
    assert far["recipe"] == "full" and "b's output scores 0.950, above the top features' 0.890" in far["reason"]
    # a lead within the noise of the top probe is no evidence: 1.5 points at 200 images (noise 0.0218)
    assert auto.decide(evidence(("b", 0.905), ("head input", 0.89)), "lp_ft", "full")["recipe"] == "lp_ft"
    # ... but the same lead at 4000 images is (noise 0.005, margin 0.01)
    assert auto.decide(evidence(("b", 0.905), ("head input", 0.89), images=4000), "lp_ft", "full")["recipe"] == "full"


def test_the_batchnorm_check_can_keep_the_near_recipe():
    far = evidence(("a", 0.70), ("b", 0.95), ("head input", 0.89))
    # the top probe collapses under the data's own BatchNorm statistics (the digits: 0.83 -> 0.65): near
    collapsed = auto.decide(auto.Evidence(**{**far.__dict__, "adapted": (0.834, 0.647)}), "lp_ft", "freezeout")
    assert collapsed["recipe"] == "lp_ft" and "falls from 0.834 to 0.647" in collapsed["reason"]
    assert "which freezeout trains on" in collapsed["reason"]  # the reason names the far recipe it turned down
    # it keeps (steel defects: 0.93 -> 0.96), or within bn_drop: far
    kept = auto.decide(auto.Evidence(**{**far.__dict__, "adapted": (0.929, 0.955)}), "lp_ft", "full")
    assert kept["recipe"] == "full" and "keeps 0.955" in kept["reason"]
    dented = auto.Evidence(**{**far.__dict__, "adapted": (0.90, 0.86)})
    assert auto.decide(dented, "lp_ft", "full")["recipe"] == "full"
    assert auto.decide(dented, "lp_ft", "full", bn_drop=0.03)["recipe"] == "lp_ft"
    # too few optimizer steps for a full fine-tune to fit a new head: near, whatever the BatchNorm check says
    short = auto.decide(auto.Evidence(**{**far.__dict__, "adapted": (0.929, 0.955), "steps": 5}), "lp_ft", "full")
    assert short["recipe"] == "lp_ft" and "only 5 optimizer steps (< 20): too few for full to fit" in short["reason"]
    assert auto.decide(auto.Evidence(**{**far.__dict__, "steps": 25}), "lp_ft", "full")["recipe"] == "full"
    assert auto.decide(auto.Evidence(**{**far.__dict__, "steps": 5}), "lp_ft", "full", far_min_steps=5)["recipe"] == "full"
    # the check never makes near data far
    near = evidence(("b", 0.90), ("head input", 0.95))
    assert auto.decide(auto.Evidence(**{**near.__dict__, "adapted": (0.95, 0.99)}), "lp_ft", "full")["recipe"] == "lp_ft"


def test_adapted_head_inputs_use_the_datas_statistics_and_restore_the_models():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(1), nn.Linear(4 * 2 * 2, 2))
    groups = build_groups(model, {"body": ["^0\\.", "^1\\."], "head": ["^3\\."]})
    model.train()
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = 5 + 3 * torch.randn(40, 3, 2, 2)  # far from the running statistics (0, 1)
    loader = [(x[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 40, 8)]
    adapted = auto.adapted_head_inputs(model, groups, model[3], loader, "cpu", progress=False)
    # the data's own statistics: every channel of the head's input has mean 0 over the data (BN's bias is 0)
    assert adapted.shape == (40, 16) and adapted.view(40, 4, 4).mean((0, 2)).abs().max() < 1e-4
    assert model.training and model[1].momentum == 0.1
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in before.items())
    assert auto.batchnorms(model) == [model[1]] and auto.batchnorms(nn.Linear(2, 2)) == []


def test_probe_budget():
    # 5 epochs of 1000 images: a forward pass of all 1000 is 1/15 of the run's compute
    assert auto.probe_images(1000, 5000, 0.15) == 1000
    # one epoch: 0.15 * 1000 / (1/3) = 450 images
    assert auto.probe_images(1000, 1000, 0.15) == 450
    assert auto.probe_images(10**6, 5 * 10**6, 0.15) == auto.MAX_IMAGES
    # the BatchNorm check forwards its images twice in what is left: (2250 - 1000) // 2
    assert auto.adapted_images(1000, 5000, 0.15) == 625
    assert auto.adapted_images(450, 1000, 0.15) == 0  # nothing left: no check
    # a model with BatchNorm probes at most half the budget, so the check fits in the rest
    assert auto.probe_images(1000, 5000, 0.15, check=True) == 1000  # 1125 affordable: no change
    assert auto.probe_images(1000, 1000, 0.15, check=True) == 225
    assert auto.adapted_images(225, 1000, 0.15) == 112
    assert auto.adapted_images(100, 500, 0.15) == 62 and auto.adapted_images(20, 100, 0.15) == 0  # under MIN_ADAPTED


class TwoStage(nn.Module):
    """stage a keeps the class signal; stage b overwrites it with noise; the head reads b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x) * 0 + torch.randn_like(x)
        return self.head(x.mean((2, 3)))


def test_probe_measures_every_group_and_finds_the_better_earlier_one():
    torch.manual_seed(0)
    model = TwoStage()
    groups = build_groups(model, {"a": ["a\\."], "b": ["b\\."], "head": ["head\\."]})
    assert auto.group_outputs(model, groups) == {"a": "a", "b": "b", "head": "head"}
    y = torch.arange(64) % 2
    x = torch.randn(64, 3, 4, 4) + 3 * y.view(-1, 1, 1, 1)  # the class shifts every pixel
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    feats, labels = auto.stage_features(model, groups, model.head, loader, "cpu", progress=False)
    assert list(feats) == ["a", "b", "head input"] and torch.equal(labels, y)
    assert feats["a"].shape == (64, 4) and feats["head input"].shape == (64, 4)
    accs = {g: auto.cv_accuracy(f, labels) for g, f in feats.items()}
    assert accs["a"] == 1.0 and accs["head input"] < 0.8  # the head's input is noise
    ev = auto.Evidence(list(accs.items()), images=64, classes=2)
    assert auto.decide(ev, "lp_ft", "full")["recipe"] == "full"
    assert model.training  # the probe leaves the mode as it found it


def test_group_outputs_are_whole_stages_of_a_real_model():
    from finetune.engine.setup import build_parts

    bundle, groups, _ = build_parts(compose_cfg())
    outputs = auto.group_outputs(bundle.model, groups)
    assert outputs == {"conv1": "stem", "bn1": "stem", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
                       "layer4": "layer4", "fc": "head"}


def test_auto_trains_exactly_the_chosen_recipe_with_the_users_overrides(capsys, tmp_path, monkeypatch):
    far = evidence(("layer3", 0.99), ("layer4", 0.9), ("head input", 0.8))
    monkeypatch.setattr(auto, "measure", lambda cfg: far)
    code, err = run_cli(capsys, "train", *TINY, "experiment=auto", "epochs=2", "lr=0.005", *QUIET,
                        f"hydra.run.dir={tmp_path / 'auto'}")
    assert code == 0, err
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    choice = summary["recipe"]["auto"]
    assert choice["recipe"] == "freezeout" and "layer3's output scores 0.990" in choice["reason"]
    assert json.loads((tmp_path / "auto" / "auto.json").read_text()) == choice
    assert summary["recipe"]["name"] == "freezeout" and summary["recipe"]["set"]["freeze.kind"] == "freezeout"
    assert summary["recipe"]["set"]["schedule.kind"] == "cosine"
    code, err = run_cli(capsys, "train", *TINY, "experiment=freezeout", "epochs=2", "lr=0.005", *QUIET,
                        f"hydra.run.dir={tmp_path / 'freezeout'}")
    assert code == 0, err
    a = torch.load(tmp_path / "auto" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "freezeout" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert a["config"]["lr"] == 0.005  # the override won over freezeout's 1e-3
    # the same config as experiment=freezeout's; the recipe it records adds auto's choice
    assert {**a["config"], "recipe": None} == {**b["config"], "recipe": None}
    assert a["config"]["recipe"] == {**b["config"]["recipe"], "auto": choice}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_real_probe_says_what_it_measured(capsys, tmp_path):
    code, err = run_cli(capsys, "train", *TINY, "experiment=auto", "epochs=1", "auto.near=linear_probe", *QUIET,
                        f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    choice = json.loads((tmp_path / "auto.json").read_text())
    probe = choice["probe"]
    # layer4's pooled output is the head's input itself: one stage, not two
    assert [g for g, _ in probe["stages"]] == ["stem", "layer1", "layer2", "layer3", "head input"]
    assert all(0 <= acc <= 1 for _, acc in probe["stages"])
    # one epoch of 24 images: 0.15 x 24 x 3 = 10 images affordable; resnet18 has BatchNorm, so the probe
    # takes half (5 images, 7 % of the run's compute) and leaves the rest to the check
    assert probe["images"] == 5 and probe["budget_share"] == pytest.approx(0.0694, abs=1e-4)
    assert choice == {**auto.decide(auto.Evidence(**{**probe, "stages": [tuple(s) for s in probe["stages"]]}),
                                    "linear_probe", "freezeout"), "probe": probe}
    assert json.loads((tmp_path / "summary.json").read_text())["recipe"]["name"] == choice["recipe"]


def test_the_real_probe_checks_batchnorm_when_it_can_change_the_choice(capsys, tmp_path, monkeypatch):
    real = auto.decide
    # the probes say far (the check runs only then: it can only turn far into near)
    monkeypatch.setattr(auto, "decide", lambda ev, near, far, *a: {"recipe": far, "reason": "stub"}
                        if ev.adapted is None else real(ev, near, far, *a))
    code, err = run_cli(capsys, "train", *TINY, "experiment=auto", "epochs=2", "auto.budget=1", *QUIET,
                        f"hydra.run.dir={tmp_path / 'far'}")
    assert code == 0, err
    probe = json.loads((tmp_path / "far" / "auto.json").read_text())["probe"]
    # 2 epochs of 24 images at budget 1: 144 forward passes, 24 for the probes, twice 24 for the check
    assert probe["images"] == 24 and probe["adapted_images"] == 24 and probe["budget_share"] == 0.5
    assert probe["steps"] == 2 * 24 // 8  # 2 epochs of 24 images in batches of 8
    before, after = probe["adapted"]  # the top probe on the same images, before and after (other folds)
    assert 0 <= before <= 1 and 0 <= after <= 1
    # the probes say near (too few steps for far): no check, its forward passes not spent
    monkeypatch.setattr(auto, "decide", real)
    code, err = run_cli(capsys, "train", *TINY, "experiment=auto", "epochs=2", "auto.budget=1",
                        "auto.far_min_steps=1000", *QUIET, f"hydra.run.dir={tmp_path / 'near'}")
    assert code == 0, err
    probe = json.loads((tmp_path / "near" / "auto.json").read_text())["probe"]
    assert probe["adapted"] is None and probe["adapted_images"] == 0 and probe["budget_share"] == 0.1667


def test_bad_auto_settings(capsys, tmp_path):
    code, err = run_cli(capsys, "train", *TINY, "experiment=auto", "auto.far=auto", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 2 and err[-1].startswith("finetune: error: auto.far: 'auto' is not a fixed recipe; choose one of ")
    code, err = run_cli(capsys, "train", *TINY, "experiment=auto", "auto.budget=0", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 2 and err[-1] == "finetune: error: auto.budget must be in (0, 1], got 0.0"
    with pytest.raises(UserError, match="experiment=auto chooses its recipe when the config is composed"):
        train(compose_cfg("experiment=auto"), tmp_path / "lib")


def test_inspect_shows_the_near_recipe_and_names_the_far_one(capsys, tmp_path):
    code, err = run_cli(capsys, "inspect", *TINY, *QUIET, f"hydra.run.dir={tmp_path}")  # auto: the default
    assert code == 0, err
    assert err[0] == ("warning: experiment=auto chooses experiment=lp_ft or experiment=freezeout when training starts "
                      "(a probe of the train images); this plan is lp_ft's: inspect experiment=freezeout for the other")
    # the plan shown is auto.near's, with the user's overrides
    from finetune.commands import cli

    capsys.readouterr()
    cli.main(["inspect", *TINY, "auto.near=linear_probe", "epochs=3", *QUIET, f"hydra.run.dir={tmp_path}",
              "inspect.format=json"])
    info = json.loads(capsys.readouterr().out)
    assert info["auto"] == {"near": "linear_probe", "far": "freezeout"} and info["recipe"]["name"] == "linear_probe"
    assert [g["trainable_from_epoch"] for g in info["groups"]] == [None] * 5 + [0] and info["epochs"] == 3


def test_inspect_probe_shows_the_plan_auto_will_train(capsys, tmp_path, monkeypatch):
    from finetune.commands import cli

    monkeypatch.chdir(tmp_path)
    far = evidence(("layer3", 0.99), ("layer4", 0.9), ("head input", 0.8))
    monkeypatch.setattr(auto, "measure", lambda cfg: far)
    capsys.readouterr()
    cli.main(["inspect", *TINY, "inspect.probe=true", "lr=0.005", *QUIET, "inspect.format=json"])
    info = json.loads(capsys.readouterr().out)
    assert info["recipe"]["name"] == "freezeout" and "layer3's output scores 0.990" in info["recipe"]["auto"]["reason"]
    # freezeout's plan with the user's lr: every group from epoch 0 at 0.005, no warning about what auto may choose
    assert {g["trainable_from_epoch"] for g in info["groups"]} == {0}
    assert [g["lr"]["peak"] for g in info["groups"]] == pytest.approx([0.005] * 6, rel=0.02)
    assert "auto" not in info and not info["warnings"]
    assert list(tmp_path.iterdir()) == []  # inspect writes nothing, auto.json included
    cli.main(["inspect", *TINY, "inspect.probe=true", *QUIET])
    out = capsys.readouterr().out
    assert "auto: chose experiment=freezeout: a linear probe on layer3's output scores 0.990" in " ".join(out.split())


def test_a_model_without_a_head_module_trains_the_near_recipe(capsys, tmp_path):
    # layer4 and fc in one head group: no single module holds it, so there is no head input to probe
    groups = "model.groups={body: [conv1, bn1, layer1, layer2, layer3], head: [layer4, fc]}"
    code, err = run_cli(capsys, "train", *TINY, groups, "epochs=1", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    choice = json.loads((tmp_path / "auto.json").read_text())
    assert choice == {"recipe": "lp_ft", "probe": None, "reason": "no probe: no single module holds the head group "
                      "'head', whose input the probe reads; the recipe for pretrained features that fit"}
    assert json.loads((tmp_path / "summary.json").read_text())["recipe"]["name"] == "lp_ft"


def test_a_budget_too_small_to_probe_trains_the_near_recipe(capsys, tmp_path):
    # one epoch of 24 images at 5 %: 3 forward passes affordable, 1 for the probe: under 2 a class
    code, err = run_cli(capsys, "train", *TINY, "epochs=1", "auto.budget=0.05", *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    choice = json.loads((tmp_path / "auto.json").read_text())
    assert choice == {"recipe": "lp_ft", "probe": None, "reason": "no probe: the run's budget (5% of its compute) "
                      "affords a probe of 1 train images, under 2 a class; the recipe for pretrained features that fit"}


def test_a_run_cannot_be_built_from_an_unresolved_auto_config(tmp_path):
    from finetune.engine.loop import Run

    with pytest.raises(UserError, match="experiment=auto is resolved before a run is built"):
        Run(compose_cfg("experiment=auto"), tmp_path)


def test_an_interrupted_auto_run_resumes_exactly(tmp_path, monkeypatch):
    """The checkpoint keeps the choice: the resumed run trains it without a second probe, and continues
    bit for bit."""
    import finetune
    from finetune.engine.signals import Interrupted

    def composed(*extra):
        return finetune.compose([*TINY, "experiment=auto", "epochs=2", *extra])

    straight = finetune.train(composed(), tmp_path / "straight")
    with pytest.raises(Interrupted):
        finetune.train(composed(), tmp_path / "first", stop_at_step=3)

    def no_probe(cfg):
        raise AssertionError("a resumed auto run probed again")

    monkeypatch.setattr(auto, "measure", no_probe)
    resumed = finetune.train(composed(f"resume={tmp_path / 'first'}"), tmp_path / "second")
    first = json.loads((tmp_path / "first" / "auto.json").read_text())
    assert json.loads(json.dumps(resumed["recipe"]["auto"])) == {**first, "resumed": True}  # as auto.json has it
    assert resumed["recipe"]["auto"]["recipe"] == straight["recipe"]["auto"]["recipe"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "second" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_reason_never_contradicts_the_probes_numbers():
    """An earlier group ahead of the top by less than the probe's noise: near, and the reason says the
    earlier group scored more (it used to say the top features were the best)."""
    tiny = auto.decide(evidence(("blocks_4", 0.400), ("head input", 0.350), images=20), "lp_ft", "freezeout")
    assert tiny["recipe"] == "lp_ft"
    assert "blocks_4's output scores 0.400, the top features' 0.350" in tiny["reason"]
    assert "within the probe's noise" in tiny["reason"] and "are the best" not in tiny["reason"]
    best = auto.decide(evidence(("blocks_4", 0.30), ("head input", 0.35), images=20), "lp_ft", "freezeout")
    assert best["reason"].startswith("the top features are the best linear features (probe 0.350")


def test_every_choice_has_a_one_line_summary_in_a_users_terms():
    far = evidence(("a", 0.70), ("b", 0.95), ("head input", 0.89))
    cases = [auto.decide(far, "lp_ft", "freezeout"),
             auto.decide(evidence(("a", 0.70), ("head input", 0.95)), "lp_ft", "freezeout"),
             auto.decide(evidence(("a", 0.40), ("head input", 0.35), images=20), "lp_ft", "freezeout"),
             auto.decide(auto.Evidence(**{**far.__dict__, "adapted": (0.834, 0.647)}), "lp_ft", "freezeout"),
             auto.decide(auto.Evidence(**{**far.__dict__, "steps": 5}), "lp_ft", "freezeout")]
    summaries = [c["summary"] for c in cases]
    assert len(set(summaries)) == 5 and all("probe" not in s and len(s) < 120 for s in summaries)


def test_a_second_run_on_the_same_model_and_files_reuses_the_probe(capsys, caplog, tmp_path, monkeypatch):
    from test_recipes import tiny_image_folder

    root = tiny_image_folder(tmp_path / "data", per_class=(12, 2))
    caplog.set_level("INFO", logger="finetune")
    args = [*TINY, "data=imagefolder", f"data.root={root}", "data.image_size=16", "experiment=auto",
            "epochs=1", "auto.budget=1", *QUIET]
    measured = []
    real = auto._measure
    monkeypatch.setattr(auto, "_measure", lambda *a: measured.append(1) or real(*a))

    def run(name, *more):
        code, err = run_cli(capsys, "train", *args, *more, f"hydra.run.dir={tmp_path / name}")
        assert code == 0, err
        return json.loads((tmp_path / name / "auto.json").read_text())["probe"], caplog.text

    first, _ = run("a")
    # another lr (a sweep's next job): the same model, files and probe settings, so the stored probe
    second, log = run("b", "lr=0.05")
    assert len(measured) == 1 and second["reused"] and second["stages"] == first["stages"]
    assert "kept in" in log and first["reused"] is None
    # a file the probe read changes: probed again
    image = next((root / "train").rglob("*.png"))
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(1, 1))
    third, _ = run("c", "lr=0.05")
    # other settings the probe reads (a seed: other images, another head) or auto.reuse=false: probed again
    run("d", "seed=1")
    run("e", "auto.reuse=false")
    assert third["reused"] is None and len(measured) == 4
