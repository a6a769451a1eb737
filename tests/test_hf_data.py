"""data=hf: a Hugging Face dataset (a save_to_disk directory, an image folder, a hub id) trains like a folder of
images: class names from the label column's ClassLabel, images as RGB, a stopped run resumed bit for bit; and
every bad input (a column that names no classes, a missing split or column, a hub id offline) is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tiny_runs import ROOT, run_cli

from finetune.commands.train import train
from finetune.config.schema import register_configs
from finetune.data import datasets, hf
from finetune.engine import checkpoint
from finetune.engine.signals import Interrupted

hfds = pytest.importorskip("datasets")

# resnet18 at 16 px, random init; 24 train images, batch 8: 3 steps an epoch
RUN = ["model=resnet18", "model.weights=null", "data.image_size=16", "batch_size=8", "progress=false", "device=cpu",
       "experiment=lp_ft", "epochs=2", "data.num_workers=0", "data=hf"]


def images(n: int, seed: int) -> tuple[list, list[int]]:
    """n noisy 20-28 px images of two colour classes (every fourth one greyscale), and their labels."""
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for i in range(n):
        label = i % 2
        side = int(rng.integers(20, 29))
        pixels = rng.integers(0, 80, (side, side, 3), dtype=np.uint8)
        pixels[..., 2 * label] += 150
        image = Image.fromarray(pixels)
        out.append(image.convert("L") if i % 4 == 3 else image)
        labels.append(label)
    return out, labels


def save(path, label_feature=None, labels=None, splits=("train", "validation")) -> str:
    feature = label_feature or hfds.ClassLabel(names=["cat", "dog"])
    features = hfds.Features({"image": hfds.Image(), "label": feature, "note": hfds.Value("string")})
    parts = {}
    for split, n, seed in zip(splits, (24, 8), (0, 1)):
        pics, ys = images(n, seed)
        ys = [labels[y] for y in ys] if labels else ys
        parts[split] = hfds.Dataset.from_dict({"image": pics, "label": ys, "note": ["x"] * n}, features=features)
    hfds.DatasetDict(parts).save_to_disk(str(path))
    return str(path)


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*RUN, *overrides])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    return save(tmp_path_factory.mktemp("hf") / "pets")


def test_a_save_to_disk_dir_trains_with_classlabel_names_and_resumes_exactly(saved, tmp_path):
    cfg = compose_cfg(f"data.path={saved}")
    train_set, val_set, names = datasets.splits(cfg.data, 16)[:3]
    assert names == ["cat", "dog"] and (len(train_set), len(val_set)) == (24, 8)
    image, label = train_set[3]  # a greyscale one
    assert image.mode == "RGB" and label == 1
    assert datasets.files_fingerprint(train_set) == train_set.data._fingerprint  # what auto's probe store keys on
    summary = train(cfg, tmp_path / "straight")
    assert summary["status"] == "completed"
    straight = torch.load(tmp_path / "straight" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert straight["classes"] == ["cat", "dog"] and straight["steps_per_epoch"] == 3

    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "first", stop_at_step=4)  # mid-epoch 1
    train(compose_cfg(f"data.path={saved}", f"resume={tmp_path / 'first'}"), tmp_path / "second")
    resumed = torch.load(tmp_path / "second" / "checkpoints" / checkpoint.LAST, weights_only=True)
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key


def test_string_labels_name_the_classes_in_sorted_order(tmp_path):
    path = save(tmp_path / "strings", hfds.Value("string"), labels=["zebra", "ant"])
    train_set, _, names = hf.splits(compose_cfg(f"data.path={path}").data)
    assert names == ["ant", "zebra"] and train_set[0][1] == 1  # label 0 was "zebra"


def test_an_image_folder_dir_loads_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(hfds.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    for split, n in (("train", 3), ("val", 2)):
        for name, colour in (("ants", (200, 0, 0)), ("bees", (0, 0, 200))):
            (tmp_path / "folder" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), colour).save(tmp_path / "folder" / split / name / f"{i}.png")
    train_set, val_set, names = hf.splits(compose_cfg(f"data.path={tmp_path / 'folder'}").data)
    assert names == ["ants", "bees"] and (len(train_set), len(val_set)) == (6, 4)  # val/ is its validation split


@pytest.mark.parametrize("case", ["int-labels", "no-split", "no-column", "no-dir", "single-split", "offline-hub"])
def test_bad_hf_input_is_one_line(case, saved, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(hfds.config, "HF_HUB_OFFLINE", True)  # read at import: no network retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if case == "int-labels":
        args = [f"data.path={save(tmp_path / 'ints', hfds.Value('int64'))}"]
    elif case == "single-split":
        pics, ys = images(4, 0)
        hfds.Dataset.from_dict({"image": pics, "label": ys}).save_to_disk(str(tmp_path / "one"))
        args = [f"data.path={tmp_path / 'one'}"]
    else:
        args = {"no-split": [f"data.path={saved}", "data.val_split=test"],
                "no-column": [f"data.path={saved}", "data.image_column=img"],
                "no-dir": [f"data.path={tmp_path / 'nope'}"],
                "offline-hub": ["data.path=someone/no-such-dataset"]}[case]
    expected = {"int-labels": "data.label_column 'label' is Value('int64'), not a ClassLabel",
                "no-split": "data.val_split: the dataset has no split 'test' (it has: train, validation)",
                "no-column": "data.image_column: split 'train' has no column 'img' (it has: image, label, note)",
                "no-dir": "does not exist",
                "single-split": "is one split (4 rows), not a DatasetDict",
                "offline-hub": "save_to_disk(DIR), copy DIR here and set data.path=DIR"}[case]
    code, err = run_cli(capsys, "inspect", *RUN, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("finetune: error: ") and expected in err[0], err
