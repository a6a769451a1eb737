"""Help that tells the truth: every command's --help lists its keys with what each does, and shows the
values the default recipe trains; `finetune config` prints the config a command line trains."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from finetune.commands import cli, evaluate, export, predict


def out_of(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_help_describes_the_keys_and_shows_what_the_default_trains(capsys):
    code, out, _ = out_of(capsys, "train", "--help")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows["lr"].split()[1] == "0.01*" and "the head group's peak LR" in rows["lr"]
    assert rows["schedule.kind"].split()[1] == "cosine*" and rows["freeze.kind"].split()[1] == "fine_tune*"
    assert "experiment=auto, probes the train images" in out
    assert all(len(line.split()) >= 3 for name, line in rows.items() if "." in name or name in cli.COMMON_KEYS)
    code, every, _ = out_of(capsys, "train", "--help-all")
    assert code == 0 and "  auto.budget " in every and "  lr_find.steps " in every


def test_config_prints_the_config_the_default_trains(capsys):
    code, out, _ = out_of(capsys, "config")
    assert code == 0
    assert "provisionally lp_ft" in out
    cfg = yaml.safe_load(out)
    assert cfg["lr"] == 0.01 and cfg["schedule"]["kind"] == "cosine" and cfg["freeze"]["kind"] == "fine_tune"
    code, out, _ = out_of(capsys, "config", "experiment=freezeout", "epochs=3")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["lr"] == 0.001 and cfg["epochs"] == 3 and cfg["freeze"]["kind"] == "freezeout"
    code, _, err = out_of(capsys, "config", "unfreez=3")
    assert code == 2 and "unknown key 'unfreez'" in err


def test_a_mistyped_command_gets_a_suggestion(capsys):
    code, _, err = out_of(capsys, "trian")
    assert code == 2 and err.startswith("finetune: error: unknown command 'trian'; did you mean 'train'?")


@pytest.mark.parametrize("command, module", [("eval", evaluate), ("predict", predict), ("export", export)])
def test_every_model_command_help_lists_all_its_keys(capsys, command, module):
    code, out, _ = out_of(capsys, command, "--help")
    schema = next(v for v in vars(module).values() if dataclasses.is_dataclass(v) and v.__name__.endswith("Args"))
    listed = {line.split()[0] for line in out.split("keys (key=value):")[1].splitlines() if line.strip()}
    assert code == 0 and listed == {f.name for f in dataclasses.fields(schema)}


def test_config_help_lists_the_keys(capsys):
    """Before: a Hydra OverrideParseException traceback, exit 1."""
    for flag in ("--help", "-h"):
        code, out, err = out_of(capsys, "config", flag)
        assert code == 0 and err == ""
        assert out.startswith("usage: finetune config [key=value ...]") and "common keys (key=value" in out


def test_the_usage_names_every_command_of_the_table():
    listed = [line.split()[0] for line in cli.USAGE.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
              if line.startswith("  ") and not line.startswith("    ")]
    assert sorted(listed) == sorted(cli.ALL_COMMANDS)
