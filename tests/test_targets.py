"""Your own model class and dataset (`model._target_`, `data._target_`): the README's my_model.py and its
command line, run as typed in the directory holding the file; then evaluated; errors are one line."""

import json
import re
import shlex

import pytest
from tiny_runs import (
    QUIET,
    ROOT,
    run_cli,
)

README = (ROOT / "README.md").read_text()
CODE = re.search(r"```python\n# my_model\.py\n(.*?)```", README, re.S).group(1)
COMMAND = next(c for c in re.findall(r"```bash\n(.*?)```", README, re.S) if "my_model.SmallNet" in c).strip()


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    (tmp_path / "my_model.py").write_text(CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_readme_example_trains_and_evaluates(in_project, capsys):
    args = shlex.split(COMMAND)[2:]
    code, err = run_cli(capsys, "train", *args, "progress=false", "hydra.run.dir=run", *QUIET)
    assert code == 0, err
    summary = json.loads((in_project / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["groups"] == ["block1", "block2", "fc"]
    assert summary["final_val_acc"] >= 0.9  # stripes are easy
    code, err = run_cli(capsys, "eval", "ckpt=run", "num_workers=0")
    assert code == 0, err
    result = json.loads((in_project / "run" / "eval" / "val" / "metrics.json").read_text())
    assert [r["class"] for r in result["per_class"]] == ["horizontal", "vertical"]
    assert result["accuracy"] == pytest.approx(summary["final_val_acc"], abs=1e-6)


def test_mistakes_with_targets_are_one_line(in_project, capsys):
    base = ["model=custom", "model._target_=my_model.SmallNet", "data=custom", "data._target_=my_model.Stripes",
            "data.image_size=32", "progress=false", "hydra.run.dir=x", *QUIET]
    code, err = run_cli(capsys, "train", *base, "model.head=classifier")
    assert code == 2 and err[-1].startswith("finetune: error: model.head=classifier: the model has no module")
    code, err = run_cli(capsys, "train", *base, "model.head=block1")
    assert code == 2 and err[-1] == "finetune: error: model.head=block1 is a Sequential; it must be a Linear or Conv2d layer"
    code, err = run_cli(capsys, "train", *base, "model._target_=my_model.Nope")
    assert code == 2 and err[-1].startswith("finetune: error: model._target_=my_model.Nope:")
    code, err = run_cli(capsys, "train", *base, "data._target_=my_model.SmallNet")
    assert code == 2 and err[-1].startswith("finetune: error: data._target_=my_model.SmallNet:")  # no split=
