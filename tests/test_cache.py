"""The frozen-prefix feature cache: epochs on cached features give the losses and weights that
recomputing the body gives; augmented views repeat; the log says why it is off; cache_dir is reused;
head_init=lbfgs; an exact resume in a cached epoch."""

import json
import logging

import pytest
import torch
from helpers import read_csv
from tiny_runs import (
    compose_cfg,
    run_cli,
)

from finetune.base.errors import UserError
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.signals import Interrupted

# lp_ft: epoch 0 trains the head alone (cached), epoch 1 everything (not); pretrained-style BN in eval
LP = ["experiment=lp_ft", "epochs=2", "data.augment=false", "diag_every=0"]


def weights(run):
    return torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)["model"]


def assert_same_run(a, b, tol=1e-5):
    for x, y in zip(read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert float(x[key]) == pytest.approx(float(y[key]), abs=tol), key
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=tol, msg=name)


def test_cached_epochs_train_as_recomputing_the_body_does(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    train(compose_cfg(*LP), tmp_path / "cached")
    assert "feature cache: on from epoch 0" in caplog.text
    assert "feature cache: off in epoch 1: groups below the head train" in caplog.text
    train(compose_cfg(*LP, "cache=false"), tmp_path / "plain")
    assert_same_run(tmp_path / "cached", tmp_path / "plain")


def test_augmented_views_repeat_and_are_cached(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    views = ["experiment=none", "unfreeze=1", "epochs=3", "data.augment=true", "cache_views=2", "diag_every=0"]
    train(compose_cfg(*views), tmp_path / "cached")
    assert "2 view(s)" in caplog.text
    train(compose_cfg(*views, "cache=false"), tmp_path / "plain")  # the same augmentations, recomputed
    assert_same_run(tmp_path / "cached", tmp_path / "plain")


def test_the_log_says_why_the_cache_is_off(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    train(compose_cfg("experiment=none", "unfreeze=1", "epochs=1", "data.augment=true"), tmp_path / "a")
    assert "feature cache: off in epoch 0: data.augment=true draws new crops every epoch" in caplog.text
    train(compose_cfg(*LP, "freeze.train_bn=true", "epochs=1"), tmp_path / "b")
    assert "off in epoch 0: BatchNorm parameters below the head train (freeze.train_bn)" in caplog.text
    train(compose_cfg(*LP, "epochs=1", "model.drop_rate=0.3"), tmp_path / "c")  # dropout inside the head: fine
    assert caplog.text.count("feature cache: on from epoch 0") == 1


def test_cache_dir_is_reused_by_the_next_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    store = tmp_path / "features"
    train(compose_cfg(*LP, f"cache_dir={store}", "cache_dtype=fp16"), tmp_path / "first")
    assert len(list(store.glob("*/view0.npy"))) == 1
    train(compose_cfg(*LP, f"cache_dir={store}", "cache_dtype=fp16"), tmp_path / "second")
    assert "feature cache: reusing" in caplog.text
    assert_same_run(tmp_path / "first", tmp_path / "second", tol=0)


def test_head_init_fits_the_head_on_the_cached_features_first(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    fitted = train(compose_cfg(*LP, "head_init=lbfgs", "epochs=1"), tmp_path / "fitted")
    plain = train(compose_cfg(*LP, "epochs=1"), tmp_path / "plain")
    assert "head_init=lbfgs: the head fitted on 24 cached feature vectors" in caplog.text
    assert fitted["final_val_loss"] < plain["final_val_loss"]
    with pytest.raises(UserError, match="head_init=lbfgs fits the head on cached features, but the cache is off"):
        train(compose_cfg(*LP, "head_init=lbfgs", "cache=false"), tmp_path / "off")


def test_resume_inside_a_cached_epoch_is_exact(tmp_path):
    cfg = ["experiment=none", "unfreeze=1", "epochs=2", "data.augment=false", "checkpoint_every=1"]
    train(compose_cfg(*cfg), tmp_path / "straight")
    with pytest.raises(Interrupted):
        train(compose_cfg(*cfg), tmp_path / "run", stop_at_step=4)
    train(compose_cfg(*cfg, f"resume={tmp_path / 'run'}"), tmp_path / "run")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_body_that_trained_in_between_is_cached_again(tmp_path, caplog):
    # head alone, then everything, then the head alone again (freezing back): the second cache is fresh
    caplog.set_level(logging.INFO, logger="finetune")
    again = ["experiment=none", "epochs=3", "data.augment=false", "freeze.kind=milestones", "freeze.bn_eval=true",
             "++freeze.milestones={0: 1, 1: all, 2: 1}"]
    train(compose_cfg(*again), tmp_path / "cached")
    assert caplog.text.count("feature cache: 24 images x 1 view(s)") == 2
    train(compose_cfg(*again, "cache=false"), tmp_path / "plain")
    assert_same_run(tmp_path / "cached", tmp_path / "plain")


def test_the_averages_val_metrics_in_a_cached_epoch_are_those_of_the_saved_average(tmp_path, capsys, caplog):
    """Epoch 0 trains every group, epoch 1 the head alone on cached features: the weight average's body
    then still differs from the live one, so its val metrics come from the images, as `finetune eval`
    of the saved average computes them."""
    caplog.set_level(logging.INFO, logger="finetune")
    train(compose_cfg("experiment=none", "epochs=2", "ema_half_life=1", "data.augment=false",
                      "freeze.kind=milestones", "++freeze.milestones={1: 1}"), tmp_path / "run")
    assert "feature cache: on from epoch 1" in caplog.text
    code, err = run_cli(capsys, "eval", f"ckpt={tmp_path / 'run'}", "num_workers=0")
    assert code == 0, err
    result = json.loads((tmp_path / "run" / "eval" / "val" / "metrics.json").read_text())
    last = read_csv(tmp_path / "run" / "metrics.csv")[-1]
    assert result["weights"] == "average"
    assert float(last["val_loss"]) == pytest.approx(result["loss"], rel=1e-5)
    assert float(last["val_acc"]) == pytest.approx(result["accuracy"], abs=1e-6)


def _entry(store):
    (entry,) = [p for p in store.iterdir() if p.is_dir()]
    return entry


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_cache_entry_is_computed_again_with_one_warning(tmp_path, caplog, damage):
    """Before: zeroed data (header intact) was reused without a word and the head never learned; a truncated
    file was a numpy traceback."""
    import numpy as np

    caplog.set_level(logging.INFO, logger="finetune")
    store = tmp_path / "features"
    train(compose_cfg(*LP, f"cache_dir={store}"), tmp_path / "first")
    view = _entry(store) / "view0.npy"
    if damage == "zeroed":
        data = np.load(view, mmap_mode="r+")
        data[:] = 0
        data.flush()
    else:
        view.write_bytes(view.read_bytes()[:-100])
    caplog.clear()
    train(compose_cfg(*LP, f"cache_dir={store}"), tmp_path / "second")
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 1 and "computing the features again" in damaged[0]
    assert "feature cache: reusing" not in caplog.text
    assert_same_run(tmp_path / "first", tmp_path / "second", tol=0)
    caplog.clear()  # the entry written again is whole: the third run reuses it
    train(compose_cfg(*LP, f"cache_dir={store}"), tmp_path / "third")
    assert "feature cache: reusing" in caplog.text and "is damaged" not in caplog.text


def test_a_run_waits_for_the_run_filling_its_key_and_reuses_what_it_wrote(tmp_path, caplog):
    import shutil
    import threading

    from finetune.engine.cache import store_lock

    caplog.set_level(logging.INFO, logger="finetune")
    store = tmp_path / "features"
    train(compose_cfg(*LP, f"cache_dir={store}"), tmp_path / "first")
    entry = _entry(store)
    kept = tmp_path / "kept"
    shutil.move(entry, kept)
    held, release = threading.Event(), threading.Event()

    def other_run():  # holds the key, then "finishes" the entry, as a concurrent run would
        with store_lock(entry):
            held.set()
            release.wait(60)
            shutil.move(kept, entry)

    other = threading.Thread(target=other_run)
    other.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    train(compose_cfg(*LP, f"cache_dir={store}"), tmp_path / "second")
    other.join()
    assert "another run is filling" in caplog.text and "feature cache: reusing" in caplog.text
    assert [p.name for p in store.iterdir() if p.is_dir()] == [entry.name]  # no second copy computed
