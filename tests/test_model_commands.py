"""After training: `finetune eval`, `predict` and `export` on a run trained on an ImageFolder, as a user
types them. Eval agrees with the run's own last evaluation; predict agrees with eval image by image;
every export reproduces the model's outputs (ONNX in onnxruntime)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_runs import (
    QUIET,
    run_cli,
)

from finetune.data.datasets import synthetic_images

# its module-scoped fixture trains once: keep the module on one test worker (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_model_commands")

CLASSES = ["cat", "dog", "owl"]


def write_folder(root: Path, split: str, n: int, classes=CLASSES, seed_split: int = 0) -> None:
    images, labels = synthetic_images(n, len(CLASSES), 32, seed_split)
    for i, (image, label) in enumerate(zip(images, labels)):
        name = CLASSES[int(label)]
        if name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / split / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet18 (random init, 32 px) trained 2 epochs on 3 classes, with a weight average."""
    from finetune.commands import cli

    root = tmp_path_factory.mktemp("cmds")
    write_folder(root / "data", "train", 48, seed_split=0)
    write_folder(root / "data", "val", 30, seed_split=1)
    write_folder(root / "data", "test", 30, classes=["cat", "owl"], seed_split=2)  # fewer classes
    try:
        cli.main(["train", "model=resnet18", "model.weights=null", "data=imagefolder", f"data.root={root / 'data'}",
                  "data.image_size=32", "batch_size=8", "epochs=2", "progress=false", "device=cpu",
                  "ema_half_life=1", f"hydra.run.dir={root / 'run'}", *QUIET])
    except SystemExit as e:
        assert e.code in (0, None)
    return root


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_agrees_with_the_runs_last_evaluation(trained, capsys):
    run = trained / "run"
    code, err = run_cli(capsys, "eval", f"ckpt={run}", "num_workers=0")
    assert code == 0, err
    result = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert result["weights"] == "average" and result["images"] == 30
    assert result["accuracy"] == pytest.approx(summary["final_val_acc"], abs=1e-6)
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)
    matrix = torch.tensor(result["confusion_matrix"])
    assert int(matrix.sum()) == 30 and float(matrix.diag().sum()) / 30 == pytest.approx(result["accuracy"])
    for i, row in enumerate(result["per_class"]):  # recall = diagonal / row sum, support = row sum
        assert row["support"] == int(matrix[i].sum())
        assert row["recall"] == pytest.approx(float(matrix[i, i] / matrix[i].sum()))
    assert "top5_accuracy" not in result  # 3 classes
    losses = [float(r["loss"]) for r in read(run / "eval" / "val" / "top_losses.csv")]
    assert losses == sorted(losses, reverse=True) and len(losses) == 16
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "top_losses.png"):
        assert (run / "eval" / "val" / name).is_file()


def test_eval_on_a_held_out_folder_with_fewer_classes_and_with_tta(trained, capsys):
    run = trained / "run"
    code, err = run_cli(capsys, "eval", f"ckpt={run}", "split=test", "tta=true", "average=false", "num_workers=0")
    assert code == 0, err
    result = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert result["tta"] and result["weights"] == "live"
    support = {r["class"]: r["support"] for r in result["per_class"]}
    assert support["dog"] == 0 and support["cat"] + support["owl"] == result["images"]
    (trained / "data" / "test" / "fox").mkdir()
    code, err = run_cli(capsys, "eval", f"ckpt={run}", "split=test")
    assert code == 2 and "class folders the model does not know: ['fox']" in err[-1]
    (trained / "data" / "test" / "fox").rmdir()


def test_predict_agrees_with_eval_and_keeps_going_past_a_broken_file(trained, capsys, tmp_path):
    run = trained / "run"
    val = trained / "data" / "val"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    code, err = run_cli(capsys, "predict", f"ckpt={run}", f"input={val}", f"out={tmp_path / 'p.csv'}", "top_k=2",
                        "num_workers=0")
    assert code == 0, err
    rows = read(tmp_path / "p.csv")
    assert len(rows) == 30 and list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "error"]
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)
    # the predictions the run's last evaluation counted (the weight average, the eval transform)
    correct = sum(Path(r["path"]).parent.name == r["class_1"] for r in rows)
    assert correct / 30 == pytest.approx(json.loads((run / "summary.json").read_text())["final_val_acc"])
    code, err = run_cli(capsys, "predict", f"ckpt={run}", f"input={tmp_path}/*.png", f"out={tmp_path / 'b.csv'}")
    assert code == 0, err
    (bad,) = read(tmp_path / "b.csv")
    assert bad["error"] and bad["class_1"] == ""
    code, err = run_cli(capsys, "predict", f"ckpt={run}", f"input={tmp_path / 'nothing'}")
    assert code == 2 and err[-1] == f"finetune: error: predict: input={tmp_path / 'nothing'}: no such file or folder"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_every_export_reproduces_the_model(trained, capsys, fmt, tmp_path):
    code, err = run_cli(capsys, "export", f"ckpt={trained / 'run'}", f"format={fmt}", f"out={tmp_path}")
    assert code == 0, err
    info = json.loads((tmp_path / "preprocess.json").read_text())
    assert info["classes"] == CLASSES and info["input_size"] == 32 and info["weights"] == "average"
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= 1e-4  # checked (onnxruntime for ONNX)
    assert (tmp_path / info["file"]).is_file()


def test_bad_arguments_are_one_line(trained, capsys):
    code, err = run_cli(capsys, "eval", f"ckpt={trained / 'run'}", "splt=val")
    assert code == 2 and err == ["finetune: error: eval: unknown key 'splt'; did you mean split?"]
    code, err = run_cli(capsys, "predict", "input=x")
    assert code == 2 and err == ["finetune: error: predict: ckpt= is required"]
    code, err = run_cli(capsys, "export", f"ckpt={trained / 'run'}", "format=tflite")
    assert code == 2 and "format must be one of torchscript, onnx, safetensors" in err[-1]


def test_a_relative_data_root_is_stored_absolute_and_eval_names_what_it_scored(tmp_path, capsys, monkeypatch):
    """Run from one directory with data.root relative to it, evaluate from another: eval reads the run's
    own images (another folder of that name where eval runs is not it) and says which root it scored."""
    here = tmp_path / "project"
    write_folder(here / "images", "train", 24, seed_split=0)
    write_folder(here / "images", "val", 12, seed_split=1)
    elsewhere = tmp_path / "elsewhere"
    write_folder(elsewhere / "images", "val", 21, seed_split=2)  # a decoy of the same name, more images
    monkeypatch.chdir(here)
    code, err = run_cli(capsys, "train", "model=resnet18", "model.weights=null", "data=imagefolder",
                        "data.root=images", "data.image_size=32", "batch_size=8", "epochs=1", "progress=false",
                        "experiment=lp_ft", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert code == 0, err
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["config"]["data"]["root"] == str(here / "images")
    monkeypatch.chdir(elsewhere)
    code, err = run_cli(capsys, "eval", f"ckpt={tmp_path / 'run'}", "num_workers=0")
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "eval" / "val" / "metrics.json").read_text())
    assert result["data_root"] == str(here / "images") and result["split"] == "val" and result["images"] == 12


def test_exports_of_several_formats_into_one_folder_each_keep_their_entry(trained, capsys, tmp_path):
    for fmt in ("torchscript", "safetensors"):
        code, err = run_cli(capsys, "export", f"ckpt={trained / 'run'}", f"format={fmt}", f"out={tmp_path}")
        assert code == 0, err
    exports = json.loads((tmp_path / "preprocess.json").read_text())["exports"]
    assert sorted(exports) == ["safetensors", "torchscript"]
    assert all((tmp_path / e["file"]).is_file() and e["max_abs_diff"] <= 1e-4 for e in exports.values())


def test_eval_and_export_name_a_run_that_did_not_complete(trained, capsys, tmp_path):
    """A copy of the run whose summary says failed, then running: one line names the status and the
    checkpoint's step (before: nothing)."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained / "run", run)
    summary = json.loads((run / "summary.json").read_text())
    code, err = run_cli(capsys, "eval", f"ckpt={run}", "num_workers=0")
    assert code == 0 and any(line.startswith(f"ckpt: {run}/checkpoints/last.pt, written at step 12 (epoch 2, batch 0)")
                             for line in err), err
    (run / "summary.json").write_text(json.dumps({**summary, "status": "failed", "reason": "loss became nan"}))
    code, err = run_cli(capsys, "eval", f"ckpt={run}", "num_workers=0")
    assert code == 0 and f"ckpt: the run in {run} failed (loss became nan); using its checkpoint last.pt, written " \
                         "at step 12 (epoch 2, batch 0)" in err, err
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    code, err = run_cli(capsys, "export", f"ckpt={run}", "format=safetensors")
    assert code == 0 and any("is still training" in line for line in err), err
