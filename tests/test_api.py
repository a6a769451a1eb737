"""The Python API (finetune.compose, finetune.train) and the command line share one composition path:
the same config, the same run; lr=auto and experiment=auto resolve in one place each."""

from __future__ import annotations

import json

import torch
from tiny_runs import (
    QUIET,
    TINY,
    run_cli,
)

import finetune
from finetune.engine import checkpoint
from finetune.recipes import auto

FIND = ["lr_find.steps=12", "lr_find.start=1e-4", "lr_find.end=1"]


def test_compose_gives_the_config_the_command_line_trains(capsys, tmp_path):
    args = [*TINY, "experiment=lp_ft", "epochs=2", "unfreeze=3"]
    summary = finetune.train(finetune.compose(args), tmp_path / "api")
    code, err = run_cli(capsys, "train", *args, *QUIET, f"hydra.run.dir={tmp_path / 'cli'}")
    assert code == 0, err
    a = torch.load(tmp_path / "api" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "cli" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert a["config"] == b["config"] and a["config"]["recipe"]["name"] == "lp_ft"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert summary["recipe"] == json.loads((tmp_path / "cli" / "summary.json").read_text())["recipe"]


def test_compose_resolves_auto_once_and_train_refuses_an_unresolved_config(monkeypatch):
    calls = []
    monkeypatch.setattr(auto, "measure", lambda cfg: calls.append(1) or auto.Evidence(
        [("layer3", 0.6), ("head input", 0.9)], 24, 2, steps=6))
    cfg = finetune.compose([*TINY, "epochs=2"])  # the default recipe, experiment=auto
    assert calls == [1] and not cfg.auto.enabled and cfg.recipe.name == "lp_ft"
    assert cfg.recipe.auto.recipe == "lp_ft" and cfg.lr == 0.01  # lp_ft's, composed after the choice
    provisional = finetune.compose([*TINY, "epochs=2"], probe=False)
    assert calls == [1] and provisional.recipe.auto.provisional


def test_the_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The README's Python API block, run as written (the default model and data, offline)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "finetune.compose(" in block and "finetune.train(" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    summary = namespace["summary"]
    assert summary["status"] == "completed" and summary["recipe"]["auto"]["recipe"] in ("lp_ft", "freezeout")


def test_lr_auto_works_under_the_default_recipe(capsys, tmp_path):
    """`finetune train lr=auto` as the README types it: auto's probe runs before any plan needs a number,
    then the finder runs under the recipe auto chose."""
    code, err = run_cli(capsys, "train", *TINY, "epochs=1", "lr=auto", *FIND, *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"]["auto"]["recipe"] in ("lp_ft", "freezeout")
    lr = summary["lr_auto"]["lr"]
    assert 1e-4 <= lr <= 1 and (tmp_path / "lr_find.png").is_file()
    saved = torch.load(tmp_path / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert saved["config"]["lr"] == lr


def test_lr_auto_in_inspect_and_lr_find(capsys, tmp_path):
    from finetune.commands import cli

    capsys.readouterr()
    cli.main(["inspect", *TINY, "epochs=2", "lr=auto", *FIND, "inspect.format=json", *QUIET, f"hydra.run.dir={tmp_path}"])
    plan = json.loads(capsys.readouterr().out)
    assert 1e-4 <= plan["groups"][-1]["lr"]["peak"] <= 1  # the finder's suggestion, as the head's peak LR
    assert not any(tmp_path.iterdir())  # inspect writes nothing
    code, err = run_cli(capsys, "lr-find", *TINY, "lr=auto", *FIND, *QUIET, f"hydra.run.dir={tmp_path / 'find'}")
    assert code == 0, err
    assert (tmp_path / "find" / "lr_find.png").is_file() and "suggested lr=" in err[-2]


def test_a_used_run_dir_is_refused_before_anything_is_probed_or_written(capsys, tmp_path, monkeypatch):
    code, err = run_cli(capsys, "train", *TINY, "experiment=lp_ft", "epochs=1", "hydra.output_subdir=null",
                        f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert (tmp_path / "finetune.log").is_file()

    def no_probe(cfg):
        raise AssertionError("probed a run directory it then refused")

    monkeypatch.setattr(auto, "measure", no_probe)
    code, err = run_cli(capsys, "train", *TINY, "epochs=1", "hydra.output_subdir=null", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "already holds a run" in err[-1]
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no auto.json, nothing appended to finetune.log
