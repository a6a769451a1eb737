"""The multi-label benchmark (scripts/bench_multilabel.py): 2x2 mosaics of real texture tiles, each mosaic
labelled with the classes of its tiles (1 to 4 labels), trained by finetune's default and by plain full
fine-tuning with binary cross-entropy (the same images, weights and epochs), several seeds; mAP and macro F1
of the last epoch."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from finetune.bench.results import mean_se, resumable_runs, train_on_label_files

METHODS = {
    "default (auto)": [],
    "plain full BCE": ["experiment=full"],  # every group at one LR from the start, BCE (the task from the labels)
}


def make_mosaics(root: Path, out: Path, counts: dict[str, int], tile: int = 112, seed: int = 0) -> dict:
    """out/img/<split>_<i>.jpg mosaics of 4 tiles (each a random image of a random class, centre-cropped and
    resized to `tile` px) and out/<split>.csv with their label sets; train tiles from root/train, val tiles
    from root/val."""
    from PIL import Image

    rng = random.Random(seed)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    (out / "img").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, n in counts.items():
        pools = {c: sorted(p for p in (root / split / c).iterdir() if p.is_file()) for c in classes}
        rows = []
        for i in range(n):
            picked = [rng.choice(classes) for _ in range(4)]
            mosaic = Image.new("RGB", (2 * tile, 2 * tile))
            for k, c in enumerate(picked):
                with Image.open(rng.choice(pools[c])) as im:
                    im = im.convert("RGB")
                    side = min(im.size)
                    left, top = (im.width - side) // 2, (im.height - side) // 2
                    piece = im.crop((left, top, left + side, top + side)).resize((tile, tile), Image.BILINEAR)
                mosaic.paste(piece, ((k % 2) * tile, (k // 2) * tile))
            name = f"img/{split}_{i:04d}.jpg"
            mosaic.save(out / name, quality=90)
            rows.append({"image": name, "labels": " ".join(sorted(set(picked)))})
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "labels"])
            writer.writeheader()
            writer.writerows(rows)
        sizes[split] = n
    return {"classes": classes, "images": sizes}


def run_one(files: Path, method: str, seed: int, out: Path, extra: list[str]) -> dict:
    summary, seconds = train_on_label_files(files, [*METHODS[method], *extra], seed, out)
    return {"method": method, "seed": seed, "map": summary["final_val_map"], "f1_macro": summary["final_val_f1_macro"],
            "recipe": summary["recipe"]["name"] if summary.get("recipe") else "none",
            "seconds": seconds}


def table(rows: list[dict]) -> tuple[str, dict]:
    stats = {m: {k: mean_se([r[k] for r in rows if r["method"] == m]) for k in ("map", "f1_macro")}
             for m in METHODS if any(r["method"] == m for r in rows)}
    lines = ["| method | mAP | macro F1 | seeds |", "|---|---|---|---|"]
    for m, s in stats.items():
        lines.append(f"| {m} | {s['map'][0]:.3f} +- {s['map'][1]:.3f} | {s['f1_macro'][0]:.3f} +- "
                     f"{s['f1_macro'][1]:.3f} | {sum(r['method'] == m for r in rows)} |")
    verdict = {}
    if len(stats) == 2:
        gap = stats["default (auto)"]["map"][0] - stats["plain full BCE"]["map"][0]
        verdict = {"default_minus_plain_map": round(gap, 4), "default_at_least_plain_plus_0.02": gap >= 0.02}
    return "\n".join(lines), verdict


def run(root: Path, out: Path, counts: dict[str, int], seeds: list[int], extra: list[str]) -> dict:
    files = out / "mosaics"
    made = json.loads((out / "mosaics.json").read_text()) if (out / "mosaics.json").is_file() else None
    if made is None:
        made = make_mosaics(root, files, counts)
        (out / "mosaics.json").write_text(json.dumps(made))
    rows = resumable_runs(out / "results.jsonl", seeds, list(METHODS),
                          lambda method, seed: run_one(files, method, seed, out / "runs" / f"{method.split()[0]}_{seed}",
                                                       extra))
    text, verdict = table(rows)
    return {"mosaics": made, "rows": rows, "table": text, "verdict": verdict}
