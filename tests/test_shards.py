"""data=webdataset and `finetune shard`: an ImageFolder written as tar shards (byte-identical on a rerun, skipped
when unchanged), read back as a map-style dataset, so that training on the shards equals training on the folder,
an epoch splits across ranks and workers with every sample once, and a stopped run resumes bit for bit."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_csv
from hydra import compose, initialize_config_dir
from PIL import Image
from test_readme_commands import commands_in, inspect_json
from tiny_runs import ONE_THREAD_ENV, ROOT, run_cli

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.config.schema import register_configs
from finetune.data import datasets, shards
from finetune.data.sampling import EpochSampler
from finetune.engine import checkpoint
from finetune.engine.signals import Interrupted

pytest.importorskip("webdataset")

# resnet18 at 16 px, random init; 32 train images, batch 8: 4 steps an epoch
RUN = ["model=resnet18", "model.weights=null", "data.image_size=16", "batch_size=8", "progress=false", "device=cpu",
       "experiment=lp_ft", "epochs=2", "data.num_workers=0"]
TIMING = ("seconds", "images_per_s")


def image_folder(root: Path, per_class=(16, 4)) -> Path:
    """Two colour classes of noisy PNGs, 20 to 31 px (some grey), in ROOT/{train,val}/{blue,red}."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for name, channel in (("blue", 2), ("red", 0)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                side = int(rng.integers(20, 32))
                img = rng.integers(0, 80, (side, side + 2, 3), dtype=np.uint8)
                img[..., channel] += 150
                image = Image.fromarray(img)
                (image.convert("L") if i % 5 == 4 else image).save(root / split / name / f"{i:02d}.png")
    return root


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*RUN, *overrides])


def shard_cli(capsys, folder: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    return run_cli(capsys, "shard", f"data.root={folder}", f"out={out}", "progress=false", *extra)


def webdataset_args(out: Path, train_shards: int) -> list[str]:
    return ["data=webdataset", f"data.train='{out}/train-{{000000..{train_shards - 1:06d}}}.tar'",
            f"data.val='{out}/val-{{000000..000000}}.tar'"]


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("folder") / "data")


@pytest.fixture(scope="module")
def sharded(folder, tmp_path_factory) -> Path:
    """The folder as shards of 10: train-000000..000003 (10, 10, 10, 2 images), val-000000."""
    out = tmp_path_factory.mktemp("shards") / "out"
    from finetune.data import shard_writer

    shard_writer.write_shards(str(folder), str(out), shard_size=10, progress=False)
    return out


def test_shard_as_typed_writes_shards_and_index_and_a_rerun_changes_nothing(folder, tmp_path, capsys):
    out = tmp_path / "shards"
    code, err = shard_cli(capsys, folder, out, "shard_size=10")
    assert code == 0, err
    assert err[0] == f"finetune: wrote 5 shard(s) to {out}: 32 train, 8 val images, 2 classes"
    assert err[-1] == (f"finetune: train with: finetune train data=webdataset \"data.train='{out}/train-"
                       f"{{000000..000003}}.tar'\" \"data.val='{out}/val-{{000000..000000}}.tar'\"")
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["blue", "red"]
    assert index["splits"]["train"]["count"] == 32 and index["splits"]["val"]["count"] == 8
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [10, 10, 10, 2]
    assert index["splits"]["train"]["class_counts"] == [16, 16]
    with tarfile.open(out / "train-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["00000000.cls", "00000000.json", "00000000.png"]
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "bigdata")}
        assert tar.extractfile(members[0]).read() == b"0"
        assert json.loads(tar.extractfile(members[1]).read()) == {"class": "blue", "path": "blue/00.png"}
        assert tar.extractfile(members[2]).read() == (folder / "train" / "blue" / "00.png").read_bytes()
    first = file_bytes(out)
    times = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    code, err = shard_cli(capsys, folder, out, "shard_size=10")  # unchanged: nothing is written
    assert code == 0 and err[0] == f"finetune: {out} is up to date (32 train, 8 val images in 5 shard(s)); nothing written"
    assert file_bytes(out) == first and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == times

    again = tmp_path / "again"  # written anew: byte for byte the same shards
    assert shard_cli(capsys, folder, again, "shard_size=10")[0] == 0
    assert {k: v for k, v in file_bytes(again).items() if k != "index.json"} == \
        {k: v for k, v in first.items() if k != "index.json"}

    assert shard_cli(capsys, folder, out, "shard_size=16")[0] == 0  # other settings: rewritten, stale shards gone
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train-000000.tar", "train-000001.tar",
                                                     "val-000000.tar"]


def test_max_side_reencodes_only_the_larger_images_as_jpeg(folder, tmp_path, capsys):
    out = tmp_path / "small"
    assert shard_cli(capsys, folder, out, "max_side=24")[0] == 0
    data = shards.ShardImages([str(out / "train-000000.tar")], [32], ["blue", "red"])
    kept = reencoded = 0
    for i in range(len(data)):
        record = data.record(i)
        source = folder / "train" / json.loads(record["json"])["path"]
        if "jpg" in record:
            reencoded += 1
            with Image.open(source) as original:
                assert max(original.size) > 24
            assert max(Image.open(__import__("io").BytesIO(record["jpg"])).size) == 24
        else:
            kept += 1
            assert record["png"] == source.read_bytes()
    assert kept and reencoded


def test_training_on_the_shards_equals_training_on_the_folder(folder, sharded, tmp_path):
    """Same samples in the same order, so the same weights, bit for bit; the shards read in 2 workers."""
    plain = train(compose_cfg("data=imagefolder", f"data.root={folder}"), tmp_path / "folder")
    cfg = compose_cfg(*webdataset_args(sharded, 4), "data.num_workers=2")
    tarred = train(cfg, tmp_path / "shards")
    a = torch.load(tmp_path / "folder" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "shards" / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert a["classes"] == b["classes"] == ["blue", "red"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert plain["final_val_acc"] == tarred["final_val_acc"]
    assert b["steps_per_epoch"] == 4


def test_an_epoch_over_two_ranks_and_two_workers_sees_every_sample_once(sharded):
    data = shards.ShardImages([str(sharded / f"train-{i:06d}.tar") for i in range(4)], [10, 10, 10, 2],
                              ["blue", "red"])

    class Keys(torch.utils.data.Dataset):  # the sample's key, read from its shard in a worker
        def __len__(self):
            return len(data)

        def __getitem__(self, key):
            index, epoch = key
            return data.record(index)["__key__"], torch.utils.data.get_worker_info().id

    seen, workers = [], set()
    for rank in range(2):
        sampler = EpochSampler(len(data), seed=7, batch_size=4, rank=rank, world=2)
        sampler.set_epoch(3)
        loader = torch.utils.data.DataLoader(Keys(), batch_size=4, sampler=sampler, num_workers=2)
        for keys, worker in loader:
            seen += list(keys)
            workers |= set(worker.tolist())
    assert sorted(seen) == [f"{i:08d}" for i in range(32)]  # 32 = 4 global batches of 8: each sample once
    assert workers == {0, 1}


def test_a_run_on_shards_stopped_and_resumed_equals_the_straight_run(sharded, tmp_path):
    args = webdataset_args(sharded, 4)
    train(compose_cfg(*args), tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(compose_cfg(*args), tmp_path / "first", stop_at_step=5)  # mid-epoch 1
    train(compose_cfg(*args, f"resume={tmp_path / 'first'}"), tmp_path / "second")
    a = torch.load(tmp_path / "straight" / "checkpoints" / checkpoint.LAST, weights_only=True)
    b = torch.load(tmp_path / "second" / "checkpoints" / checkpoint.LAST, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for param, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][param][name]), (param, name)
    strip = [{k: v for k, v in m.items() if k not in TIMING} for m in read_csv(tmp_path / "straight" / "metrics.csv")]
    assert strip == [{k: v for k, v in m.items() if k not in TIMING}
                     for m in read_csv(tmp_path / "second" / "metrics.csv")]
    assert (a["step"], b["step"]) == (8, 8)


@pytest.mark.parametrize("scheme", ["file://", "pipe:cat "])
def test_shards_named_by_url_are_copied_into_the_cache_once(scheme, sharded, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = compose_cfg("data=webdataset", f"data.train='{scheme}{sharded}/train-{{000000..000003}}.tar'",
                      f"data.val='{scheme}{sharded}/val-000000.tar'").data
    train_set, val_set, names = shards.splits(cfg)
    assert names == ["blue", "red"] and (len(train_set), len(val_set)) == (32, 8)
    assert all(f.startswith(str(tmp_path / "cache" / "finetune" / "shards")) for f in train_set.files)
    local = shards.ShardImages([str(sharded / "val-000000.tar")], [8], names)
    assert [val_set.record(i)["png"] for i in range(8)] == [local.record(i)["png"] for i in range(8)]
    image, label = train_set[31]
    assert image.mode == "RGB" and label == 1
    assert datasets.num_classes(cfg) == 2
    assert len(datasets.files_fingerprint(train_set)) == 16  # what auto's probe store keys on


@pytest.mark.parametrize("case", ["no-dir", "not-imagefolder", "no-root", "unknown-key", "out-inside"])
def test_bad_shard_input_is_one_line(case, folder, tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    args = {"no-dir": [f"data.root={tmp_path / 'nope'}", f"out={tmp_path / 'o'}"],
            "not-imagefolder": [f"data.root={tmp_path / 'flat'}", f"out={tmp_path / 'o'}"],
            "no-root": [f"out={tmp_path / 'o'}"],
            "unknown-key": [f"data.root={folder}", f"out={tmp_path / 'o'}", "shard_sise=3"],
            "out-inside": [f"data.root={folder}", f"out={folder / 'shards'}"]}[case]
    expected = {"no-dir": "does not exist", "not-imagefolder": "has no 'train' folder", "no-root": "data.root= is "
                "required", "unknown-key": "did you mean shard_size?", "out-inside": "lies inside data.root"}[case]
    code, err = run_cli(capsys, "shard", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("finetune: error: ") and expected in err[0], err
    assert not (folder / "shards").exists()


def test_bad_shard_specs_are_one_line(sharded, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train-000000.tar").write_bytes((sharded / "train-000000.tar").read_bytes())
    cases = {
        "no index.json beside": [f"data.train={bare}/train-000000.tar", f"data.val={bare}/train-000000.tar"],
        "6 of the 10 shards": webdataset_args(sharded, 10)[1:2] + [f"data.val={sharded}/val-000000.tar"],
        "data.val is required": [f"data.train={sharded}/train-000000.tar"],
        "the shell expanded its braces": [f"data.train={sharded}/train-000000.tar",
                                          f"data.train={sharded}/train-000001.tar"],
        "Hydra reads { as syntax; quote the pattern": [f"data.train={sharded}/train-{{000000..000003}}.tar"],
    }
    for expected, args in cases.items():
        code, err = run_cli(capsys, "inspect", *RUN, "data=webdataset", *args)
        assert code == 2 and len(err) == 1 and expected in err[0], (expected, err)


def test_the_guide_lines_as_typed(tmp_path, capsys, monkeypatch):
    """docs/guide/data-at-scale.md: the shard line run as typed, then its train line inspected (7 steps of 32)."""
    from conftest import SHARED_DATA, shared_data

    shared_data("hymenoptera")
    (tmp_path / "work").mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)  # ../shared/data/... from the working directory
    monkeypatch.chdir(tmp_path / "work")
    lines = commands_in((ROOT / "docs" / "guide" / "data-at-scale.md").read_text())
    shard_line = next(c for c in lines if c.startswith("finetune shard ") and "hymenoptera" in c)
    code, err = run_cli(capsys, *shlex.split(shard_line)[1:], "progress=false")
    assert code == 0, err
    train_line = next(c for c in lines if "data=webdataset" in c and "hymenoptera" in c)
    assert err[-1] == f"finetune: train with: {train_line}"  # what the shard command prints is the guide's line
    info = inspect_json(capsys, shlex.split(train_line)[2:])
    assert info["steps_per_epoch"] == 7  # 245 train images, batch 32


@pytest.mark.slow
def test_torchrun_trains_on_shards_with_equal_replicas(sharded, tmp_path):
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m", "finetune",
         "train", *RUN, "batch_size=4", "data.num_workers=1", *webdataset_args(sharded, 4), "hydra.run.dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["images_per_step"] == 8
    assert len(set(summary["replica_fingerprints"])) == 1


def test_a_missing_index_is_an_error_naming_it(sharded, tmp_path):
    cfg = compose_cfg("data=webdataset", f"data.train={tmp_path}/x-000000.tar", f"data.val={tmp_path}/x-000000.tar")
    with pytest.raises(UserError, match="no index.json beside"):
        datasets.num_classes(cfg.data)


def test_shard_help_lists_its_keys(capsys):
    from finetune.commands import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["shard", "--help"])
    out = capsys.readouterr().out
    keys = {line.split()[0] for line in out.split("keys (key=value):")[1].splitlines() if line.strip()}
    assert info.value.code == 0 and keys == {"data", "out", "shard_size", "max_side", "progress"}
    assert "data.root=DIR (required)" in out


def test_train_shards_without_some_classes_are_refused(sharded, tmp_path, capsys):
    """train-000000.tar holds only blue images (the writer goes class by class): before, a run on it trained
    a one-class model (train acc 1.000) without a word. Refused from index.json's per-shard counts and, for
    shards made elsewhere (an index without them), from the labels in the shards."""
    import shutil

    index = json.loads((sharded / "index.json").read_text())
    assert [s["class_counts"] for s in index["splits"]["train"]["shards"]] == [[10, 0], [6, 4], [0, 10], [0, 2]]
    bare = tmp_path / "bare"
    shutil.copytree(sharded, bare)
    for split in index["splits"].values():
        for shard in split["shards"]:
            del shard["class_counts"]
    (bare / "index.json").write_text(json.dumps(index))
    for where in (sharded, bare):
        args = ["data=webdataset", f"data.train='{where}/train-000000.tar'", f"data.val='{where}/val-000000.tar'"]
        code, err = run_cli(capsys, "inspect", *RUN, *args)
        assert code == 2 and err == [f"finetune: error: data.train: the shards of '{where}/train-000000.tar' hold no "
                                     "sample of 1 of the 2 classes their index.json names (red); name every train "
                                     "shard (a brace pattern over all of them) or shard a folder of the classes you "
                                     "train"], err
        code, err = run_cli(capsys, "inspect", *RUN, *args[:1], f"data.train='{where}/train-{{000000..000001}}.tar'",
                            args[2])
        assert code == 0, err
