"""Bad input through the command line: one line on stderr naming the problem, exit code 2, no traceback
(unless verbose=true); pickles that would run code are refused without running it.

Most cases call `finetune.commands.cli.main` in-process (the same Hydra app and error path as the installed command,
without a Python start-up per case); one runs the real `python -m finetune` to check what a shell sees."""

import builtins
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from tiny_runs import (
    ONE_THREAD_ENV,
    QUIET,
    TINY,
)
from tiny_runs import run_cli as run_finetune

ARGS = [*TINY, "epochs=1", "experiment=none"]
GROUPS = "['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']"


def run_cli(tmp_path, capsys, *overrides):
    """`finetune train <tiny run> <overrides>` in-process, in tmp_path/run: (exit code, stderr lines)."""
    return run_finetune(capsys, "train", *ARGS, f"hydra.run.dir={tmp_path / 'run'}", *QUIET, *overrides)


def assert_one_line_error(result, message: str) -> None:
    code, lines = result
    assert code == 2, lines
    assert lines == [f"finetune: error: {message}"]


@pytest.fixture
def folder(tmp_path):
    """ROOT/{train,val}/{ants,bees}/ with two readable 16 px images each."""
    root = tmp_path / "images"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (40 * i, 200, 90)).save(root / split / name / f"{i}.png")
    return root


def imagefolder(root):
    return ["data=imagefolder", f"data.root={root}", "data.num_workers=0"]


# --------------------------------------------------------------------------------------------- data


def test_missing_data_root(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    assert_one_line_error(run_cli(tmp_path, capsys, *imagefolder(nowhere)),
                          f"data.root '{nowhere}' does not exist or is not a folder.")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, capsys, folder, split):
    for path in sorted((folder / split).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (folder / split).rmdir()
    assert_one_line_error(run_cli(tmp_path, capsys, *imagefolder(folder)),
                          f"data.root '{folder}' has no '{split}' folder; expected {folder}/train and "
                          f"{folder}/val.")


def test_empty_class_folder(tmp_path, capsys, folder):
    (folder / "train" / "wasps").mkdir()
    (folder / "val" / "wasps").mkdir()
    assert_one_line_error(run_cli(tmp_path, capsys, *imagefolder(folder)),
                          f"class folder '{folder}/train/wasps' has no readable images.")


def test_different_classes_in_train_and_val(tmp_path, capsys, folder):
    (folder / "val" / "bees").rename(folder / "val" / "wasps")
    assert_one_line_error(run_cli(tmp_path, capsys, *imagefolder(folder)),
                          f"train and val in '{folder}' have different classes: only in train: ['bees']; "
                          "only in val: ['wasps'].")


def test_corrupt_image_is_named_or_skipped_with_a_count(tmp_path, capsys, caplog, folder):
    bad = folder / "train" / "bees" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    assert_one_line_error(run_cli(tmp_path, capsys, *imagefolder(folder)),
                          f"cannot read image '{bad}' (1 unreadable in its folder); fix or delete it, or set "
                          "data.skip_bad=true.")
    with caplog.at_level(logging.WARNING):
        code, lines = run_cli(tmp_path, capsys, *imagefolder(folder), "data.skip_bad=true")
    assert code == 0, lines
    assert f"skipped 1 unreadable images in {folder} (first: {bad})" in caplog.messages
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()  # and it trained


# -------------------------------------------------------------------------------------- model, plan


def test_unknown_model_name_suggests_close_names(tmp_path, capsys):
    code, lines = run_cli(tmp_path, capsys, "model.name=resnet19")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("finetune: error: model.name: 'resnet19' is not a torchvision classification "
                               "model; did you mean resnet18, ")


@pytest.mark.parametrize("groups, message", [
    ("{body:['layer[1'],head:[fc]}",
     "layer groups: invalid regex 'layer[1' in group 'body': unterminated character set at position 5"),
    ("{body:[conv1,bn1,layer],extra:[nomatch],head:[fc]}",
     "layer groups: group 'extra' (patterns ['nomatch']) matches no parameter"),
    ("{body:[conv1,bn1,layer],late:[layer4],head:[fc]}",
     "layer groups: group 'late' (patterns ['layer4']) gets no parameter: every one it matches was already taken "
     "by the earlier group 'body' (a parameter belongs to the first group that matches)"),
], ids=["invalid-regex", "regex-matching-nothing", "shadowed-by-an-earlier-group"])
def test_bad_layer_group_regex(tmp_path, capsys, groups, message):
    assert_one_line_error(run_cli(tmp_path, capsys, f"model.groups={groups}"), message)


@pytest.mark.parametrize("lr, shown", [("0", "0.0"), ("-0.01", "-0.01")])
def test_zero_or_negative_lr(tmp_path, capsys, lr, shown):
    assert_one_line_error(run_cli(tmp_path, capsys, f"lr={lr}"), f"lr must be a finite number > 0, got {shown}")


def test_warmup_longer_than_training(tmp_path, capsys):
    assert_one_line_error(run_cli(tmp_path, capsys, "schedule=cosine", "schedule.warmup=3", "epochs=2"),
                          "schedule.warmup (3.0 epochs) is not shorter than the 2 epochs group 'stem' trains: set "
                          "schedule.warmup below 2 or train longer (epochs)")
    # only the head trains: the error names it (before: 'stem', which never trains, and no fix)
    assert_one_line_error(run_cli(tmp_path, capsys, "experiment=linear_probe", "schedule.warmup=10", "epochs=2"),
                          "schedule.warmup (10.0 epochs) is not shorter than the 2 epochs group 'head' trains: set "
                          "schedule.warmup below 2 or train longer (epochs)")


def test_unfreeze_out_of_range_and_unknown_schedule_kind(tmp_path, capsys):
    # test_cli checks these two in a real subprocess; here the in-process path agrees
    assert_one_line_error(run_cli(tmp_path, capsys, "unfreeze=0"),
                          "unfreeze=0 is out of range: the model has 6 layer groups (use 1..6 or 'all')")
    code, lines = run_cli(tmp_path, capsys, "schedule.kind=cosin")
    assert code == 2 and len(lines) == 1 and "schedule.kind: unknown value 'cosin'" in lines[0]


# ------------------------------------------------------------------------------------ weights, resume


def test_weights_file_missing(tmp_path, capsys):
    path = tmp_path / "missing.pth"
    assert_one_line_error(run_cli(tmp_path, capsys, f"model.weights={path}"),
                          f"model.weights: {path} does not exist")


def test_weights_file_corrupt(tmp_path, capsys):
    path = tmp_path / "corrupt.pth"
    good = tmp_path / "good.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, good)
    path.write_bytes(good.read_bytes()[:200])  # a truncated download
    code, lines = run_cli(tmp_path, capsys, f"model.weights={path}")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"finetune: error: model.weights: {path} is corrupt or not a torch file (")


def test_weights_for_another_architecture_list_missing_and_unexpected_keys(tmp_path, capsys):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=2).state_dict(), path)
    code, lines = run_cli(tmp_path, capsys, f"model.weights={path}")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"finetune: error: model.weights: {path} does not fit the model: ")
    assert "missing keys (conv1.weight, bn1.weight, bn1.bias, ...)" in lines[0]
    assert "unexpected keys (features.0.0.weight, features.0.1.weight, features.0.1.bias, ...)" in lines[0]


def test_resume_path_that_does_not_exist(tmp_path, capsys):
    path = tmp_path / "old_run"
    assert_one_line_error(run_cli(tmp_path, capsys, f"resume={path}"),
                          f"resume: no checkpoint at {path} (give a run directory or a checkpoint file)")


def test_resume_with_other_groups_is_refused(tmp_path, capsys):
    assert run_cli(tmp_path, capsys)[0] == 0
    first = tmp_path / "first"
    (tmp_path / "run").rename(first)
    assert_one_line_error(
        run_cli(tmp_path, capsys, f"resume={first}", "model.groups={body:[conv1,bn1,layer],head:[fc]}"),
        f"resume: the layer groups changed (checkpoint {GROUPS}, now ['body', 'head']); resuming with other "
        "groups is refused")


# ----------------------------------------------------------------------------------------- security


class RunsCode:
    """Unpickling this calls exec(): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture
def malicious(tmp_path):
    """(checkpoint-shaped file whose unpickling writes a marker file, the marker's path)."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": "finetune-checkpoint/1", "model": {"fc.weight": torch.zeros(2, 512)},
                "payload": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # the file really runs code when loaded unsafely
    assert marker.read_text() == "pwned"
    marker.unlink()
    return path, marker


@pytest.mark.parametrize("override, what", [("model.weights", "model.weights:"),
                                            ("resume", "resume: checkpoint")], ids=["weights", "resume"])
def test_pickle_that_runs_code_is_refused(tmp_path, capsys, malicious, override, what):
    path, marker = malicious
    code, lines = run_cli(tmp_path, capsys, f"{override}={path}")
    assert code == 2 and len(lines) == 1
    assert lines[0] == (f"finetune: error: {what} {path} is a pickle that would run code (exec); finetune refuses "
                        "to load it and never runs it: re-save the weights as a plain state dict or a .safetensors file")
    assert "corrupt" not in lines[0] and "weights_only=False" not in lines[0]
    assert not marker.exists()


# ------------------------------------------------------------------------------- a real command line


def finetune(*args, cwd):
    return subprocess.run([sys.executable, "-m", "finetune", "train", *ARGS, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD_ENV})


@pytest.mark.slow
def test_real_command_line_error_is_one_line_without_traceback(tmp_path):
    nowhere = tmp_path / "nowhere"
    proc = finetune("data=imagefolder", f"data.root={nowhere}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"finetune: error: data.root '{nowhere}' does not exist or is not a folder."]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_verbose_adds_the_traceback_and_keeps_exit_2(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    code, lines = run_cli(tmp_path, capsys, *imagefolder(nowhere), "verbose=true")
    assert code == 2
    assert lines[0] == "Traceback (most recent call last):"
    assert f"finetune.base.errors.UserError: data.root '{nowhere}' does not exist or is not a folder." in lines
    assert lines[-1] == f"finetune: error: data.root '{nowhere}' does not exist or is not a folder."


# ------------------------------------------------------------------------- keys, values, the machine


@pytest.mark.parametrize("override, message", [
    ("unfreez=3", "unknown key 'unfreez' (closest: unfreeze, freeze)"),
    ("+unfreez=3", "unknown key 'unfreez' (closest: unfreeze, freeze)"),  # Hydra's own hint, refused too
    ("optimizer.nme=sgd", "unknown key 'optimizer.nme' (closest: optimizer.name, optimizer.eps, optimizer.beta2)"),
    ("freeze=gradul", "freeze=gradul: no such freeze config; choose one of fine_tune, fixed, freezeout, gradual, "
                      "milestones (closest: gradual)"),
    ("model=resnet19", "model=resnet19: no such model config; choose one of convnext_tiny, custom, densenet121, "
                       "efficientnet_b0, efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, hf, mobilenet_v3_large, "
                       "regnet_y_400mf, resnet18, resnet50, swin_t, timm, torchvision, vit_b_16 (closest: resnet18, "
                       "resnet50, densenet121)"),
    ("epochs=many", "epochs=many: Value 'many' of type 'str' could not be converted to Integer"),
    ("lr=abc", "lr=abc: expected a finite number or auto (the LR finder's suggestion)"),
    ("lr=nan", "lr=nan: expected a finite number or auto (the LR finder's suggestion)"),
    ("lr=inf", "lr=inf: expected a finite number or auto (the LR finder's suggestion)"),
    ("lr=1e-3,1e-2", "lr=1e-3,1e-2 lists several values: sweep them with -m (finetune train -m lr=1e-3,1e-2), or "
                     "quote a list as one value (lr='[...]')"),
    ("data.root=~/x", "data.root=~/x: Hydra reads ~ as syntax; quote the path (data.root='~/x') or write it out "
                      "(/home/you/...)"),
    ("device=gpu", "device=gpu: not a device; use auto, cpu, cuda or cuda:N"),
    ("checkpoint_every=-1", "checkpoint_every must be >= 0 (0: at epoch ends only), got -1"),
], ids=lambda v: v if "=" in v and len(v) < 24 else None)
def test_bad_keys_and_values_are_one_line_with_exit_2(tmp_path, capsys, override, message):
    assert_one_line_error(run_cli(tmp_path, capsys, override), message)


def test_a_batch_of_one_image_with_batchnorm_in_train_mode_is_explained(tmp_path, capsys):
    assert_one_line_error(run_cli(tmp_path, capsys, "batch_size=1", "data.train_size=2"),
                          "a batch of 1 image at step 0: BatchNorm in train mode needs at least 2; raise "
                          "batch_size or set freeze.bn_eval=true")


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, capsys, monkeypatch):
    from finetune.engine import checkpoint

    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # the checkpoint of epoch 1: the disk is full
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert_one_line_error(run_cli(tmp_path, capsys, "epochs=2"), f"could not write {last}: No space left on device")
    kept = torch.load(last, weights_only=True)  # the epoch-0 checkpoint, whole
    assert kept["epoch"] == 1 and len(kept["metrics"]) == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left


def test_a_non_finite_val_loss_stops_the_run(tmp_path, capsys, monkeypatch):
    from finetune.engine.step import Trainer

    real = Trainer.evaluate
    calls = []

    def evaluate(self, loader, average=False, **kw):
        calls.append(1)
        scores = real(self, loader, average, **kw)
        return {**scores, "loss": float("nan")} if len(calls) == 2 else scores

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    lrs = ", ".join(f"{g}=0.001" for g in ("stem", "layer1", "layer2", "layer3", "layer4"))
    assert_one_line_error(run_cli(tmp_path, capsys, "epochs=3", "schedule=constant"),
                          f"val loss became nan after step 5 (epoch 1) with LRs {lrs}, head=0.001; stopped, the last "
                          f"good checkpoint {last} is kept. Lower the LR or set grad_clip")
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_non_finite_batchnorm_statistics_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    from finetune.engine.step import Trainer

    real = Trainer.step_accumulated  # what the run calls for each optimizer step

    def step(self, batches, at, **kw):
        out = real(self, batches, at, **kw)
        if at == 4:  # epoch 1: a running statistic blows up while the loss looks fine
            self.model.bn1.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(Trainer, "step_accumulated", step)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    code, lines = run_cli(tmp_path, capsys, "epochs=3", "unfreeze=all")
    assert code == 2 and lines[0].startswith("finetune: error: bn1.running_var became non-finite by step ")
    assert lines[0].endswith(f"stopped, the last good checkpoint {last} is kept. Lower the LR or set grad_clip")
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1 and torch.isfinite(saved["model"]["bn1.running_var"]).all()


def test_a_directory_that_holds_a_run_is_not_reused_silently(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(tmp_path, capsys)[0] == 0
    first = (run / "checkpoints" / "last.pt").read_bytes()
    assert_one_line_error(run_cli(tmp_path, capsys, "seed=1"),
                          f"{run} already holds a run (last.pt); continue it with resume={run}, choose another "
                          "directory (hydra.run.dir=...) or replace it with overwrite=true")
    assert (run / "checkpoints" / "last.pt").read_bytes() == first
    assert run_cli(tmp_path, capsys, f"resume={run}")[0] == 0  # continuing it is fine
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")  # what eval of the old run wrote
    (run / "tensorboard").mkdir()
    (run / "notes.txt").write_text("mine")  # not finetune's: kept
    assert run_cli(tmp_path, capsys, "seed=1", "overwrite=true")[0] == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["seed"] == 1
    assert not (run / "eval").exists() and not (run / "tensorboard").exists()  # nothing of the old run is left
    assert (run / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- images


def test_images_become_correct_8_bit_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.data.transforms import to_rgb

    grey16 = np.full((4, 6), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (4, 6, 3) and (rgb == 128).all()  # not clipped to white
    floats = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert (np.asarray(to_rgb(floats)) == 128).all()
    # EXIF orientation 6 (rotated 90 degrees): the image is turned upright
    wide = Image.new("RGB", (6, 4), (10, 20, 30))
    exif = wide.getexif()
    exif[0x0112] = 6
    wide.save(tmp_path / "rot.jpg", exif=exif)
    with Image.open(tmp_path / "rot.jpg") as im:
        assert to_rgb(im).size == (4, 6)
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "1", "I;16"):
        assert to_rgb(Image.new(mode, (3, 3))).mode == "RGB", mode


def test_skip_bad_counts_truncated_images_in_the_summary(tmp_path, capsys, folder):
    import json

    good = folder / "train" / "bees" / "0.png"
    truncated = folder / "train" / "bees" / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])  # the header reads, the pixel data is cut short
    assert good.is_file()
    code, lines = run_cli(tmp_path, capsys, *imagefolder(folder), "data.skip_bad=true")
    assert code == 0, lines
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == 1


def test_a_symlink_loop_in_a_class_folder_counts_each_image_once(folder, tmp_path, caplog):
    from finetune.data.datasets import scan_split

    os.symlink(folder / "train" / "ants", folder / "train" / "ants" / "loop")  # train/ants/loop -> train/ants
    files = scan_split(str(folder / "train"), ["ants", "bees"])
    assert [len(files["ants"]), len(files["bees"])] == [2, 2]


def test_a_link_back_up_the_tree_never_relabels_an_image(folder):
    """ants/loop -> train/ and bees/loop2 -> train/: every image is read once, under the folder it lives in
    (before: 8 images, the bee photos under ants/loop/bees and the ant photos under bees/loop2/ants)."""
    from finetune.data.datasets import scan_split

    train = folder / "train"
    os.symlink("..", train / "ants" / "loop")
    os.symlink(train, train / "bees" / "loop2")
    files = scan_split(str(train), ["ants", "bees"])
    assert files == {name: [str(train / name / f"{i}.png") for i in range(2)] for name in ("ants", "bees")}


def test_an_image_outside_the_class_folders_belongs_to_the_one_class_that_links_it(folder, tmp_path):
    from finetune.base.errors import UserError
    from finetune.data.datasets import scan_split

    pool = tmp_path / "pool"
    pool.mkdir()
    Image.new("RGB", (16, 16)).save(pool / "x.png")
    train = folder / "train"
    os.symlink(pool / "x.png", train / "ants" / "x.png")  # a class folder of links to a pool: kept
    assert len(scan_split(str(train), ["ants", "bees"])["ants"]) == 3
    os.symlink(pool / "x.png", train / "bees" / "x.png")  # the same image under two labels: refused
    with pytest.raises(UserError, match="linked from class folders 'ants' and 'bees'"):
        scan_split(str(train), ["ants", "bees"])


def test_a_class_folder_that_links_to_another_is_named_in_a_warning(folder, caplog):
    from finetune.data.datasets import scan_split

    for split in ("train", "val"):
        os.symlink(folder / split / "bees", folder / split / "wasps")
    with caplog.at_level(logging.WARNING):
        scan_split(str(folder / "train"), ["ants", "bees", "wasps"])
    assert "class folders 'bees' and 'wasps'" in caplog.text and "labelled as both" in caplog.text


def test_one_class_is_refused(folder, tmp_path, capsys):
    import shutil

    for split in ("train", "val"):
        shutil.rmtree(folder / split / "bees")
    assert_one_line_error(run_cli(tmp_path, capsys, *imagefolder(folder)),
                          "the data has 1 class (ants); a classifier needs at least 2: add a folder per class "
                          "(ImageFolder: train/<class>/, val/<class>/)")


class RunsShell:
    """Unpickling this calls os.system, whose module torch's safe loader blocks with another message."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def test_a_torch_file_whose_pickle_calls_a_blocked_module_is_named_as_code(tmp_path, capsys):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"format": "finetune-checkpoint/1", "payload": RunsShell(marker)}, path)
    code, lines = run_cli(tmp_path, capsys, f"resume={path}")
    assert code == 2 and lines == [f"finetune: error: resume: checkpoint {path} is a pickle that would run code "
                                   f"({os.system.__module__}.system); finetune refuses to load it and never runs it: "
                                   "re-save the weights as a plain state dict or a .safetensors file"]
    assert not marker.exists()


def test_a_checkpoints_folder_is_a_checkpoint_and_eval_errors_name_ckpt(tmp_path, capsys):
    from tiny_runs import run_cli as cli_call

    code, err = cli_call(capsys, "eval", f"ckpt={tmp_path / 'nowhere'}")
    assert code == 2 and err == [f"finetune: error: ckpt: no checkpoint at {tmp_path / 'nowhere'} "
                                 "(give a run directory or a checkpoint file)"]
    from finetune.engine import checkpoint

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / checkpoint.LAST).write_bytes(b"")
    assert checkpoint.resolve_resume_path(str(tmp_path / "run" / "checkpoints")) == \
        tmp_path / "run" / "checkpoints" / checkpoint.LAST


def test_a_run_that_fails_midway_says_so_in_its_summary(tmp_path, capsys, monkeypatch):
    """A full disk at the second epoch's checkpoint (torch's zip writer reports a short write as a
    RuntimeError): one line, exit 2, and summary.json says failed with the reason, not running."""
    from finetune.engine import checkpoint

    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2775360 vs 2775256")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    code, lines = run_cli(tmp_path, capsys, "epochs=2")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(
        f"finetune: error: could not write {tmp_path / 'run' / 'checkpoints' / 'last.pt'}: ")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"].startswith("could not write")


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    code, lines = run_cli(tmp_path, capsys, f"hydra.run.dir={tmp_path / 'taken'}")
    assert (code, lines) == (2, [f"finetune: error: hydra.run.dir={tmp_path / 'taken'} is a file, not a folder; "
                                 "choose another run directory"])


def test_a_command_line_refused_before_anything_ran_leaves_no_run_directory(tmp_path, capsys, monkeypatch):
    from tiny_runs import run_cli as cli_call

    monkeypatch.chdir(tmp_path)
    code, err = cli_call(capsys, "train", *ARGS, "data=imagefolder", f"data.root={tmp_path / 'nowhere'}")
    assert code == 2 and err[-1].startswith("finetune: error: data.root")
    assert not (tmp_path / "outputs").exists()  # no outputs/<date>/<time> holding only Hydra's files


def _bytes(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_refused_command_changes_no_byte_of_the_run_it_names(tmp_path, capsys):
    """Hydra's own files (.hydra/, finetune.log) as a user's command writes them: before, a refused resume
    turned summary.json 'failed', wrote error.log and .hydra/overrides.yaml said epochs=2; a second run
    into the directory rewrote .hydra/config.yaml."""
    import tempfile

    from tiny_runs import run_cli as cli_call

    staged = set(Path(tempfile.gettempdir()).glob("finetune-log-*"))  # other processes' may come and go
    run = tmp_path / "run"
    code, lines = cli_call(capsys, "train", *ARGS, f"hydra.run.dir={run}")
    assert code == 0, lines
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "finetune.log").is_file()
    before = _bytes(run)
    code, lines = cli_call(capsys, "train", *ARGS[:-2], "epochs=2", "experiment=none", f"resume={run}",
                           f"hydra.run.dir={run}")
    assert code == 2 and lines[-1].startswith("finetune: error: resume: the checkpoint's run was planned with epochs=1")
    assert _bytes(run) == before
    code, lines = cli_call(capsys, "train", *ARGS, "lr=0.5", f"hydra.run.dir={run}")
    assert code == 2 and "already holds a run" in lines[-1]
    assert _bytes(run) == before
    # a resume that goes ahead records its own command line and appends to the run's log
    code, lines = cli_call(capsys, "train", *ARGS, f"resume={run}", f"hydra.run.dir={run}")
    assert code == 0, lines
    assert f"resume={run}" in (run / ".hydra" / "overrides.yaml").read_text()
    log_text = (run / "finetune.log").read_text()
    assert log_text.startswith(before["finetune.log"].decode()) and "nothing to train" in log_text
    assert set(Path(tempfile.gettempdir()).glob("finetune-log-*")) <= staged  # the staged logs' folders removed


def test_a_run_that_fails_before_its_first_report_says_so_in_its_summary(tmp_path, capsys, monkeypatch):
    """A NaN inside the first accumulation window: no summary.json was written before (the first report
    comes at the epoch's end)."""
    from finetune.tasks import SingleLabel

    real = SingleLabel.loss
    monkeypatch.setattr(SingleLabel, "loss", lambda self, *a: real(self, *a) * float("nan"))
    code, lines = run_cli(tmp_path, capsys, "accumulate=2", "epochs=1")
    assert code == 2 and "loss became nan at step 0" in lines[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "loss became nan" in summary["reason"]


def test_a_resume_with_other_adapter_settings_names_them(tmp_path, capsys):
    """Before: 'did data or the number of classes change?' for a changed peft.r."""
    vit = ["model=timm", "model.name=test_vit", "model.weights=null", "data=synthetic", "data.image_size=160",
           "data.num_classes=3", "data.train_size=16", "data.val_size=8", "batch_size=8", "progress=false",
           "device=cpu", "experiment=none", "peft=lora", "epochs=1"]
    run = tmp_path / "lora"
    code, lines = run_finetune(capsys, "train", *vit, f"hydra.run.dir={run}", *QUIET)
    assert code == 0, lines
    code, lines = run_finetune(capsys, "train", *vit, "peft.r=4", f"resume={run}", f"hydra.run.dir={run}", *QUIET)
    assert code == 2 and lines[-1].endswith("did the adapters' settings change (peft.kind, peft.r, peft.target, "
                                            "peft.groups)?"), lines


def test_characters_the_plot_font_lacks_are_one_log_line(tmp_path, caplog):
    import warnings

    from finetune.output.report import plot_confusion

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a raw matplotlib warning fails the test
        plot_confusion(tmp_path / "cm.png", [[3, 1], [0, 4]], ["\u8682\u8681", "\u871c\u8702"])  # ants, bees in Chinese
    lines = [r.getMessage() for r in caplog.records if "matplotlib's font" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("cm.png: ") and (tmp_path / "cm.png").is_file()
