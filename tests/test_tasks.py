"""Tasks (finetune/tasks/) and label files (data=csv): a multi-label run from the README's command line on a
tiny CSV it writes, whose eval reports the run's own mAP and per-label AP and whose predict writes label
sets; single-label label files, the held-out split, bad rows named by line; the metrics against hand
counts; multilabel resume bit for bit; and no module outside the task package computing a loss or metric."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import QUIET, compose_cfg, run_cli

from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.signals import Interrupted
from finetune.tasks import MultiLabel, SingleLabel
from finetune.tasks.multilabel import average_precisions, best_thresholds, f1_scores

NAMES = ["blue", "green", "red"]
# resnet18 at 32 px, random init, 3 epochs of 8 images a step
SMALL = ["model=resnet18", "model.weights=null", "data.image_size=32", "batch_size=8", "progress=false", "device=cpu",
         "data.num_workers=0"]


def write_label_files(root: Path, train: int = 36, val: int = 18, single: bool = False) -> Path:
    """labels_train.csv and labels_val.csv in `root`, images in root/img: noise with a bright square of each
    labelled colour (multi-label: each colour with probability 1/2; `single`: exactly one)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("val", val)):
        rows = []
        for i in range(n):
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            labels = [int(rng.integers(0, 3))] if single else [c for c in range(3) if rng.random() < 0.5]
            for c in labels:
                y, x = rng.integers(0, 16, 2)
                img[y:y + 16, x:x + 16, 2 - c] = 230  # RGB: blue is channel 2
            Image.fromarray(img).save(root / "img" / f"{split}{i}.png")
            rows.append({"image": f"img/{split}{i}.png", "labels": " ".join(NAMES[c] for c in labels)})
        with open(root / f"labels_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "labels"])
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    root = write_label_files(tmp_path_factory.mktemp("labels"))
    return root


def test_a_multilabel_run_from_a_label_file_as_the_readme_types_it(multilabel_run, capsys, monkeypatch):
    root = multilabel_run
    monkeypatch.chdir(root)
    code, err = run_cli(capsys, "train", "data=csv", "data.train=labels_train.csv", "data.val=labels_val.csv", *SMALL,
                        "epochs=3", "hydra.run.dir=run", *QUIET[:1])
    assert code == 0, err
    log = (root / "run" / "finetune.log").read_text()
    assert "36 train / 18 val images, 3 labels, multi-label (task=auto: some images have several labels)" in log
    assert "no probe: its linear probes score one class per image, and task multilabel has label sets" in log
    rows = list(csv.DictReader(open(root / "run" / "metrics.csv")))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_map", "val_f1_macro",
                             "val_f1_micro", "val_acc", "seconds", "images_per_s"]
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["task"]["task"] == "multilabel" and len(summary["task"]["thresholds"]) == 3
    assert summary["best"]["metric"] == "val_map" and summary["final_val_map"] == float(rows[-1]["val_map"])

    code, err = run_cli(capsys, "eval", "ckpt=run", "num_workers=0")
    assert code == 0, err
    result = json.loads((root / "run" / "eval" / "val" / "metrics.json").read_text())
    assert result["map"] == pytest.approx(summary["final_val_map"], abs=1e-6)
    assert result["f1_macro"] == pytest.approx(summary["final_val_f1_macro"], abs=1e-6)
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    per_label = list(csv.DictReader(open(root / "run" / "eval" / "val" / "per_label.csv")))
    assert [r["label"] for r in per_label] == NAMES
    known = [float(r["ap"]) for r in per_label]
    assert sum(known) / 3 == pytest.approx(result["map"], abs=1e-6)  # mAP is the mean of the per-label APs

    code, err = run_cli(capsys, "predict", "ckpt=run", "input=img", "out=pred.csv", "progress=false")
    assert code == 0, err
    predicted = list(csv.DictReader(open(root / "pred.csv")))
    assert list(predicted[0]) == ["path", "labels", "p_blue", "p_green", "p_red", "error"]
    thresholds = summary["task"]["thresholds"]
    for row in predicted:
        expected = [n for n, t in zip(NAMES, thresholds) if float(row[f"p_{n}"]) >= t]
        assert row["labels"].split() == expected  # the set at the run's thresholds, space-separated

    code, err = run_cli(capsys, "export", "ckpt=run", "format=safetensors")
    assert code == 0, err
    assert json.loads((root / "run" / "export" / "preprocess.json").read_text())["task"]["thresholds"] == thresholds


def straight_and_resumed(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """The last checkpoints of a straight run and of one stopped at step 4 and resumed, whose weights must be
    bit-identical (asserted here)."""
    train(compose_cfg(*args), tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(compose_cfg(*args), tmp_path / "run", stop_at_step=4)
    train(compose_cfg(*args, f"resume={tmp_path / 'run'}"), tmp_path / "run")
    a = torch.load(tmp_path / "straight" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return a, b


def test_a_multilabel_run_resumes_bit_for_bit(multilabel_run, tmp_path):
    args = ["data=csv", f"data.train={multilabel_run / 'labels_train.csv'}",
            f"data.val={multilabel_run / 'labels_val.csv'}", *SMALL, "epochs=2", "experiment=lp_ft",
            "checkpoint_every=2"]
    a, b = straight_and_resumed(args, tmp_path)
    assert a["task"] == b["task"]


def test_a_single_label_file_and_the_held_out_split(tmp_path):
    from finetune.data.labels import splits

    root = write_label_files(tmp_path, train=40, val=0, single=True)
    cfg = compose_cfg("data=csv", f"data.train={root / 'labels_train.csv'}", *SMALL).data
    train_set, val_set, classes, skipped = splits(cfg)
    assert classes == NAMES and not train_set.multilabel and skipped == 0
    assert len(train_set) + len(val_set) == 40 and len(val_set) == 8  # 0.2 of each class, rounded
    train_files = {p for p, _ in train_set.samples}
    assert not train_files & {p for p, _ in val_set.samples}
    assert {label for _, label in val_set.samples} == {0, 1, 2}  # stratified: every class held out
    again = splits(cfg)[1]
    assert again.samples == val_set.samples  # the same split every run


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, train_text, val_text, message", [
    ("missing image", "image,labels\nimg/train0.png,red\nimg/nope.png,red\n", None,
     "labels_train.csv:3: image img/nope.png does not exist"),
    ("unknown label", "image,labels\nimg/train0.png,red\nimg/train1.png,blue\n", "image,labels\nimg/val0.png,pink\n",
     "labels_val.csv:2: label 'pink' is not in labels_train.csv's labels"),
    ("no label", "image,labels\nimg/train0.png,red\nimg/train1.png,\nimg/train2.png,blue\n", None,
     "labels_train.csv:3: no label; a single-label task needs one per image"),
    ("no column", "path,labels\nimg/train0.png,red\n", None, "has no column 'image' (its columns: path, labels)"),
])
def test_bad_rows_are_named_with_their_line(tmp_path, capsys, case, train_text, val_text, message):
    root = write_label_files(tmp_path / "data", train=3, val=1, single=True)
    train_file = _write(root / "labels_train.csv", train_text)
    args = ["data=csv", f"data.train={train_file}", *SMALL, "experiment=none", "epochs=1", *QUIET,
            f"hydra.run.dir={tmp_path / 'run'}"]
    if val_text:
        args.append(f"data.val={_write(root / 'labels_val.csv', val_text)}")
    code, err = run_cli(capsys, "train", *args)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_one_column_per_label_and_tab_separated_files(tmp_path):
    from finetune.data.labels import splits

    root = write_label_files(tmp_path, train=4, val=2)
    for split in ("train", "val"):
        rows = list(csv.DictReader(open(root / f"labels_{split}.csv")))
        with open(root / f"flags_{split}.tsv", "w") as f:
            f.write("image\tred\tblue\n" + "".join(
                f"{r['image']}\t{int('red' in r['labels'])}\t{int('blue' in r['labels'])}\n" for r in rows))
    cfg = compose_cfg("data=csv", f"data.train={root / 'flags_train.tsv'}", f"data.val={root / 'flags_val.tsv'}",
                      "data.label_columns=[red,blue]", *SMALL).data
    train_set, _, classes, _ = splits(cfg)
    assert classes == ["red", "blue"] and train_set.multilabel
    first = next(iter(csv.DictReader(open(root / "labels_train.csv"))))
    assert train_set.samples[0][1].tolist() == [float("red" in first["labels"]), float("blue" in first["labels"])]


def test_multilabel_metrics_against_hand_counts():
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.6], [0.3, 0.7], [0.1, 0.4]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.float32)
    # label 0: both positives ranked first, AP 1; label 1: ranked 0.7 (pos), 0.6 (pos), 0.4, 0.2: AP 1
    assert average_precisions(probs, targets) == [1.0, 1.0]
    assert average_precisions(probs, torch.tensor([[1, 0], [0, 0], [0, 0], [0, 0]], dtype=torch.float32))[1] is None
    # label 1 ranked: 0.7 (pos), 0.6 (pos), 0.4 (neg), 0.2 (neg): the best F1 cuts between 0.6 and 0.4
    assert best_thresholds(probs, targets) == [0.55, 0.5]
    per_label, macro, micro = f1_scores(probs >= 0.5, targets)
    # label 0: tp 2; label 1: tp 2, fp 0, fn 0 at 0.5 (0.6, 0.7): both 1.0
    assert per_label == [1.0, 1.0] and macro == 1.0 and micro == 1.0
    task = MultiLabel(2, thresholds=[0.95, 0.5])
    assert task.predict(probs).tolist() == [[False, False], [False, True], [False, True], [False, False]]
    assert task.figures(probs, targets)["f1"][0] == 0.0  # no positive predicted for label 0 at 0.95
    single = SingleLabel(3)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    assert int(single.train_score(logits, torch.tensor([0, 2]))) == 1


def test_no_module_outside_the_tasks_computes_a_loss_or_a_metric():
    """The task owns them: a new task is a module in finetune/tasks/, not edits across the engine and the
    commands (finetune/bench holds the plain peers the benchmarks compare with, on purpose)."""
    import finetune

    package = Path(finetune.__file__).parent
    forbidden = {"cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "nll_loss", "argmax",
                 "CrossEntropyLoss", "BCEWithLogitsLoss"}
    found = []
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if relative.parts[0] in ("tasks", "bench"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in forbidden:
                found.append(f"{relative}:{node.lineno} {name}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(m and m.startswith("torchmetrics") for m in modules):
                    found.append(f"{relative}:{node.lineno} torchmetrics")
    assert not found, found


# ------------------------------------------------------------------------------------ skewed classes

SKEWED = ["data.num_classes=3", "experiment=lp_ft", "epochs=2", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def skewed_folder(tmp_path_factory) -> Path:
    """An image folder of 3 classes with 24, 8 and 4 train images (6 val images each), 16 px."""
    from finetune.data.datasets import synthetic_images

    root = tmp_path_factory.mktemp("skewed")
    for split, per_class, stream in (("train", (24, 8, 4), 0), ("val", (6, 6, 6), 1)):
        images, labels = synthetic_images(120, 3, 16, stream)
        for c, n in enumerate(per_class):
            (root / split / f"class_{c}").mkdir(parents=True)
            picked = [i for i in range(120) if int(labels[i]) == c][:n]
            for i in picked:
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / split / f"class_{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("setting", ["loss.class_weights=balanced", "data.sampler=balanced", "loss.logit_adjust=1"])
def test_balancing_resumes_bit_for_bit(tmp_path, skewed_folder, setting):
    args = [*SKEWED, "data=imagefolder", f"data.root={skewed_folder}", "data.num_workers=0", "data.image_size=16",
            setting]
    a, _ = straight_and_resumed(args, tmp_path)
    train(compose_cfg(*args[:-1]), tmp_path / "plain")
    plain = torch.load(tmp_path / "plain" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert not all(torch.equal(a["model"][k], plain["model"][k]) for k in a["model"])  # the setting did something


def test_the_balanced_sampler_draws_every_class_alike_and_splits_across_ranks():
    from finetune.data.sampling import EpochSampler

    labels = [0] * 80 + [1] * 15 + [2] * 5
    counts = [80, 15, 5]
    weights = [1.0 / counts[y] for y in labels]
    one = EpochSampler(100, seed=3, batch_size=10, weights=weights)
    one.set_epoch(2)
    drawn = [labels[i] for i, _ in one]
    assert len(drawn) == 100 and all(20 <= drawn.count(c) <= 47 for c in range(3))  # ~33 each, not 80/15/5
    again = EpochSampler(100, seed=3, batch_size=10, weights=weights)
    again.set_epoch(2, start_step=4)
    assert [i for i, _ in again] == [i for i, _ in one][40:]  # a resume skips whole batches of the same draw
    ranks = [EpochSampler(100, seed=3, batch_size=5, rank=r, world=2, weights=weights) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    halves = [[i for i, _ in r] for r in ranks]
    merged = [i for s in range(10) for r in range(2) for i in halves[r][s * 5:(s + 1) * 5]]
    assert merged == [i for i, _ in one]  # two ranks' slices of each global batch: one process's order


def test_class_weights_and_logit_adjustment_follow_their_rules():
    from omegaconf import OmegaConf

    from finetune.base.errors import UserError
    from finetune.tasks.single_label import balanced_weights

    assert balanced_weights([80, 15, 5]) == pytest.approx([100 / 240, 100 / 45, 100 / 15])
    cfg = OmegaConf.create({"label_smoothing": 0.0, "loss": {"class_weights": "none", "logit_adjust": 1.0}})
    task = SingleLabel.from_config(cfg, 3, [80, 15, 5])
    assert task.logit_shift.tolist() == pytest.approx([np.log(0.8), np.log(0.15), np.log(0.05)], rel=1e-6)
    logits = torch.zeros(2, 3)
    expected = torch.nn.functional.cross_entropy(logits + task.logit_shift, torch.tensor([0, 2]))
    assert float(task.loss(logits, torch.tensor([0, 2]))) == pytest.approx(float(expected))
    cfg.loss = {"class_weights": [1.0, 2.0], "logit_adjust": 0.0}
    with pytest.raises(UserError, match="2 weights for 3 classes"):
        SingleLabel.from_config(cfg, 3, [80, 15, 5])


def test_every_run_reports_balanced_accuracy_macro_f1_and_its_classes(tmp_path):
    train(compose_cfg(*SKEWED[:3]), tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    classes = list(csv.DictReader(open(tmp_path / "run" / "per_class.csv")))
    assert [r["class"] for r in classes] == ["class_0", "class_1", "class_2"]
    recalls = [float(r["recall"]) for r in classes if int(r["support"])]
    assert float(rows[-1]["val_bal_acc"]) == pytest.approx(sum(recalls) / len(recalls))
    f1s = [float(r["f1"]) for r in classes if int(r["support"])]
    assert float(rows[-1]["val_f1_macro"]) == pytest.approx(sum(f1s) / len(f1s))
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()


def test_auto_measures_class_weights_on_skewed_classes():
    from finetune.recipes.auto import Evidence, balance_choice, measure_balance

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 80 + [1] * 8)
    x = torch.randn(88, 2, generator=g) + y[:, None] * 1.0  # the rare class overlaps the frequent one
    assert measure_balance(x, y, [44, 44], 4, 0) is None  # even classes: nothing to measure
    measured = measure_balance(x, y, [80, 8], 4, 0)
    # unweighted, the probe gives up on the rare class; weighted, it finds it
    assert measured == {"ratio": 10.0, "plain": 0.675, "weighted": 0.7875}
    ev = Evidence([("head input", 0.9)], 88, 2, balance=measured)
    choice = balance_choice(ev)
    assert choice["set"] == {"loss.class_weights": "balanced"} and "classes skewed 10:1" in choice["balance"]
    # weights are the rule on skewed classes; only a clear cost to the probe vetoes them (decided from the
    # numbers each time: a kept probe follows today's rule)
    slight = Evidence([("head input", 0.9)], 88, 2, balance={**measured, "plain": 0.756, "weighted": 0.745})
    assert balance_choice(slight)["set"] == {"loss.class_weights": "balanced"}
    vetoed = Evidence([("head input", 0.9)], 88, 2, balance={**measured, "plain": 0.8, "weighted": 0.77})
    assert "set" not in balance_choice(vetoed) and "cost the probe" in balance_choice(vetoed)["balance"]


@pytest.mark.slow
@pytest.mark.parametrize("script, expected", [("bench_skew.py", ["| default (auto) |", '"default_minus_plain_bal_acc"']),
                                              ("bench_multilabel.py", ["| plain full BCE |", '"default_minus_plain_map"'])])
def test_the_task_benchmarks_run_in_quick_mode(script, expected):
    import os
    import subprocess
    import sys

    from tiny_runs import ONE_THREAD_ENV, ROOT

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--quick"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **ONE_THREAD_ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(text in out.stdout for text in expected), out.stdout[-2000:]
