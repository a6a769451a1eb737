"""The five regimes a default recipe must hold in (issue: recipes across domains): near-ImageNet photos,
a far-off domain, textures, and steel defects with few and with many images per class. A regime is a
dataset of the shared datasets folder (../shared/data beside a checkout), how many of its train images
per class, and its input size; the recipes and the plain baselines train on the same images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.bench import runs
from finetune.bench.images import make_digits, train_subset
from finetune.bench.results import RecipeStats, load_results, save_results
from finetune.bench.runs import MODEL


@dataclass(frozen=True)
class Regime:
    folder: str  # under the datasets folder; "digits": the embedded digits, written under --out
    per_class: int | None = None  # train images per class (--train-per-class)
    size: int | None = None  # input size, when not the model's 224


REGIMES = {
    "hymenoptera": Regime("hymenoptera"),
    "digits": Regime("digits", size=96),
    "dtd10": Regime("dtd10"),
    "neu6_30": Regime("neu6", per_class=30),
    "neu6_200": Regime("neu6"),
}


def folder(regime: str, model: str = MODEL) -> str:
    """A regime's results folder and record name: the regime, and the backbone when it is not MODEL
    (digits_lite1), so runs of two backbones never share a folder."""
    return regime if model == MODEL else f"{regime}_{model.removeprefix('efficientnet_')}"


def lookup(regime: str) -> Regime:
    if regime not in REGIMES:
        raise SystemExit(f"unknown regime {regime}; choose from {', '.join(REGIMES)}")
    return REGIMES[regime]


def regime_data(regime: str, datasets: Path, out: Path) -> Path:
    """The ImageFolder of `regime` in `datasets`; its derived data (digits) under `out`, made if need be."""
    if lookup(regime).folder != "digits":
        return datasets / REGIMES[regime].folder
    if not (out / "digits_data" / "train").is_dir():
        make_digits(out / "digits_data")
    return out / "digits_data"


def _images(regime: str, datasets: Path, out: Path) -> list[str]:
    """--data and --train-per-class of `regime`: the same images for the recipes and the plain baselines."""
    data, per_class = regime_data(regime, datasets, out), REGIMES[regime].per_class
    return ["--data", str(data)] + (["--train-per-class", str(per_class)] if per_class else [])


def _overrides(regime: str) -> list[str]:
    """The Hydra overrides of `regime`'s runs (its input size)."""
    size = lookup(regime).size
    return [f"data.image_size={size}"] if size else []


def regime_args(regime: str, datasets: Path, out: Path) -> list[str]:
    """bench_transfer's data arguments of `regime`."""
    return _images(regime, datasets, out) + [a for o in _overrides(regime) for a in ("--set", o)]


def plain_args(regime: str, datasets: Path, out: Path) -> list[str]:
    """The plain baselines' data arguments of `regime` (the same images, the same input size)."""
    return _images(regime, datasets, out) + ["--size", str(lookup(regime).size or 224)]


def rescore_auto(regime: str, datasets: Path, out: Path, docs: Path, seeds: int, epochs: int,
                 model: str = MODEL) -> dict[str, RecipeStats]:
    """auto in `regime` from its probes alone: each seed's probe, in a child as in the benchmark, and the
    record's run of the recipe it chose with that seed (auto trains exactly its choice, bit for bit:
    tests/test_auto.py). Written to <out>/<regime>/auto_probes/results.json, which --report merges."""
    here = out / folder(regime, model)
    recorded = load_results(docs / f"{folder(regime, model)}.json")
    data, per_class = regime_data(regime, datasets, out), REGIMES[regime].per_class
    if per_class:  # the images bench_transfer's --train-per-class trains on
        data = train_subset(data, per_class, here)
    found = []
    for seed in range(seeds):
        cfg = runs.compose_configs([("auto", seed)], data, epochs, _overrides(regime), model)[("auto", seed)]
        chose, seconds = runs.probe_auto(cfg, seed, here / "auto_probes", reuse=True)
        trained = [r for r in recorded[chose].runs if r.seed == seed] if chose in recorded else []
        if not trained:
            raise SystemExit(f"{regime}: auto chose {chose} for seed {seed}, which the record has not run; "
                             f"run it: --regimes {regime} --recipes {chose}")
        found.append(runs.scored_as_auto(trained[0], chose, seconds))
        print(f"{regime} seed {seed}: auto chose {chose} ({seconds:.0f} s probe)", flush=True)
    stats = {"auto": RecipeStats("auto", found)}
    (here / "auto_probes").mkdir(parents=True, exist_ok=True)
    save_results(stats, here / "auto_probes" / "results.json")
    return stats
