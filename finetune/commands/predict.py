"""`finetune predict ckpt=RUN_DIR_OR_FILE input=DIR|FILE|GLOB [out=predictions.csv] [top_k=5]`: the model's
top-k classes and probabilities for every image, as a CSV (path, class_1, prob_1, ...); for a multi-label
model each image's label set at the run's thresholds (path, labels: space-separated, as label files hold
them, then p_<label> for every label). Class names and preprocessing come from the checkpoint, and the
run's weight average when it kept one. A file that
cannot be read gets a row with its error instead of stopping the others.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader, Dataset

from finetune.base.errors import UserError
from finetune.commands.saved import load, parse_args
from finetune.data import datasets, images, transforms
from finetune.data import loaders as data_mod
from finetune.output import report
from finetune.output.progress import bar


@dataclass
class PredictArgs:
    ckpt: str = MISSING
    input: str = MISSING  # an image, a folder (searched recursively) or a glob pattern
    out: str = "predictions.csv"
    top_k: int = 5
    batch_size: int = 64
    device: str = "auto"
    tta: bool = False
    average: bool = True
    num_workers: int = -1
    progress: bool = True


def find_images(spec: str) -> list[str]:
    """The image files `spec` names: one file, every image under a folder, or a glob's matches; sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in datasets.IMAGE_EXTENSIONS)
    matches = sorted(m for m in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(m))
    if not matches and not any(c in spec for c in "*?["):
        raise UserError(f"predict: input={spec}: no such file or folder")
    return matches


class _Files(Dataset):
    """(image tensor, index, error) per file; an unreadable file yields a blank image and its error."""
    def __init__(self, files: list[str], transform, size: int):
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(images.load_rgb(self.files[i])), i, ""
        except Exception as e:  # PIL raises many types for broken files
            return torch.zeros(3, self.size, self.size), i, f"{type(e).__name__}: {e}"[:200]


@torch.no_grad()
def run(argv: list[str]) -> Path:
    args = parse_args(PredictArgs, argv, "predict")
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("predict: top_k and batch_size must be >= 1")
    files = find_images(args.input)
    if not files:
        raise UserError(f"predict: input={args.input} holds no image files ({', '.join(datasets.IMAGE_EXTENSIONS)})")
    saved = load(args.ckpt, args.device, args.average)
    size = saved.preprocess.input_size
    dataset = _Files(files, transforms.eval_transform(size, saved.preprocess), size)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=data_mod.resolve_workers(args.num_workers, False))
    k = min(args.top_k, len(saved.classes))
    multilabel = saved.task.name == "multilabel"
    rows = []
    with bar(len(loader), "predicting", enabled=args.progress) as advance:
        for x, index, errors in loader:
            probs = saved.probabilities(x, args.tta).cpu()
            if multilabel:  # the label set at the run's thresholds, as label files hold it, and every probability
                chosen = saved.task.predict(probs)
                for row_p, row_on, i, error in zip(probs.tolist(), chosen.tolist(), index.tolist(), errors):
                    row = {"path": files[i], "error": error,
                           "labels": "" if error else " ".join(c for c, on in zip(saved.classes, row_on) if on)}
                    row.update({f"p_{c}": "" if error else round(p, 6) for c, p in zip(saved.classes, row_p)})
                    rows.append(row)
                advance()
                continue
            top_p, top_i = probs.topk(k, dim=1)
            for row_p, row_i, i, error in zip(top_p.tolist(), top_i.tolist(), index.tolist(), errors):
                row = {"path": files[i], "error": error}
                for rank, (prob, cls) in enumerate(zip(row_p, row_i), 1):
                    row[f"class_{rank}"] = "" if error else saved.classes[cls]
                    row[f"prob_{rank}"] = "" if error else round(prob, 6)
                rows.append(row)
            advance()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if multilabel:
        fields = ["path", "labels", *[f"p_{c}" for c in saved.classes], "error"]
    else:
        fields = ["path", *[f"{c}_{r}" for r in range(1, k + 1) for c in ("class", "prob")], "error"]
    report.write_csv(out, rows, fields)
    bad = sum(1 for r in rows if r["error"])
    note = f"; {bad} could not be read (their rows say why)" if bad else ""
    print(f"finetune: predicted {len(rows) - bad} images with {saved.path} "
          f"({'weight average' if saved.averaged else 'live weights'}) into {out}{note}")
    return out
