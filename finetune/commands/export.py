"""`finetune export ckpt=RUN_DIR_OR_FILE format=torchscript|onnx|safetensors [out=DIR]`: the trained model
in a file a deployment can load, checked before it is called done: the export is run (TorchScript in
torch, ONNX in onnxruntime when installed, safetensors loaded back into a fresh model) on a batch other
than the one it was traced with, and compared with the model's own outputs; above the tolerance it fails.
Beside it, preprocess.json says how to feed it: mean, std, input size, interpolation, crop and the
class names in output order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import MISSING, OmegaConf

from finetune.base.errors import UserError, writing
from finetune.commands.saved import SavedModel, architecture, load, parse_args
from finetune.models import adapters

log = logging.getLogger("finetune")
FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "safetensors": "model.safetensors"}


@dataclass
class ExportArgs:
    ckpt: str = MISSING
    format: str = "onnx"  # torchscript | onnx | safetensors
    out: Optional[str] = None  # default: RUN_DIR/export
    tolerance: float = 1e-4  # max abs difference of the logits allowed
    average: bool = True
    opset: int = 18  # ONNX opset
    # a run with adapters (peft=...): true folds them into the base weights (peft's merge) and exports the plain
    # model; false writes the adapters alone in peft's format under OUT/adapter (format is then ignored)
    merge: bool = True


def _check(name: str, expected: torch.Tensor, got: torch.Tensor, tolerance: float) -> float:
    diff = float((expected.float() - torch.as_tensor(got).float()).abs().max())
    if not diff <= tolerance:
        raise UserError(f"export: the {name} export's outputs differ from the model's by {diff:.3g} "
                        f"(tolerance {tolerance:g}); the file was written but should not be used")
    return diff


def _to_torchscript(saved: SavedModel, path: Path, example: torch.Tensor, check: torch.Tensor) -> torch.Tensor:
    # tracing follows the eval-mode forward; scripting would reject much of timm's Python. torch now
    # calls TorchScript deprecated (torch.export's successor format is not yet what deployments load)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(saved.model, example, check_trace=False)
    with writing(path):
        traced.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")(check)


def _to_onnx(saved: SavedModel, path: Path, example: torch.Tensor, check: torch.Tensor, opset: int):
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    with writing(path), warnings.catch_warnings():
        # the TorchScript-based exporter: 4x quicker here than the torch.export-based one and quiet, and it
        # handles timm's and torchvision's models (torch calls it deprecated); a dynamic batch axis
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(saved.model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    if ort is None:
        log.warning("onnxruntime is not installed (pip install \"finetune[export]\"): %s is not checked", path)
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": check.numpy()})[0])


def _to_safetensors(saved: SavedModel, path: Path, check: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file, save_file


    state = {k: v.detach().contiguous().cpu() for k, v in saved.model.state_dict().items()}
    with writing(path):
        save_file(state, str(path), metadata={"format": "pt", "classes": json.dumps(saved.classes)})
    fresh = plain_architecture(saved).model  # adapters are merged before any export
    fresh.load_state_dict(load_file(str(path)))
    return fresh.eval()(check)


def plain_architecture(saved: SavedModel):
    """The run's architecture without adapters (the merged model's), no weights."""
    return architecture({**saved.config, "peft": None}, len(saved.classes))[0]


def _adapter(saved: SavedModel, out: Path, check: torch.Tensor) -> tuple[Path, torch.Tensor]:
    """merge=false: the adapters in peft's format, checked by loading them with peft onto a fresh model that
    holds the base weights and a new, untrained head (the trained layers outside the adapters come from the
    adapter files)."""
    from peft import PeftModel

    peft_cfg = OmegaConf.create(saved.config["peft"])
    trained_biases = [n for g in saved.groups for n in g.param_names if n.endswith(".bias") and n not in g.fixed
                      and not adapters.is_adapter(n) and g.adapters]
    if trained_biases and str(peft_cfg.kind) not in ("lora", "dora"):
        raise UserError(f"export: merge=false: peft's {peft_cfg.kind} format holds no biases, and this run trained "
                        f"{len(trained_biases)} (peft.bias={peft_cfg.bias}, e.g. {trained_biases[0]}): export merged "
                        "(merge=true, the default), or train with peft.bias=none")
    path = out / "adapter"
    with writing(path / "adapter_model.safetensors"):
        whole = adapters.save_adapter(saved.model, saved.groups, peft_cfg, path)
    # the check starts from what a user of the adapter starts from, the base as it was before training: the
    # parameters that never trained (and the buffers); whatever trained must come from the adapter files
    fixed = {adapters.base_name(n) for g in saved.groups for n in g.fixed}
    base = adapters.unload(saved.model)
    untrained = {n: t for n, t in base.state_dict().items()
                 if (n in fixed or n not in dict(base.named_parameters())) and not any(n.startswith(f"{m}.") for m in whole)}
    fresh = plain_architecture(saved).model
    fresh.load_state_dict(untrained, strict=False)
    loaded = PeftModel.from_pretrained(fresh, str(path)).eval()
    return path, loaded(check)


def run(argv: list[str]) -> Path:
    args = parse_args(ExportArgs, argv, "export")
    if args.format not in FORMATS:
        raise UserError(f"export: format must be one of {', '.join(FORMATS)}, got '{args.format}'")
    saved = load(args.ckpt, "cpu", args.average)  # exported from the CPU: the file runs anywhere
    if not args.merge and saved.groups is None:
        raise UserError("export: merge=false writes a run's adapters alone, and this run has none (peft=none)")
    out = Path(args.out) if args.out else saved.run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    size = saved.preprocess.input_size
    g = torch.Generator().manual_seed(0)
    example, check = (torch.randn(n, 3, size, size, generator=g) for n in (2, 3))  # another batch size too
    with torch.no_grad():
        expected = saved.model(check)  # the adapted model's: the merged export is checked against it
        if saved.groups is not None and args.merge:  # peft's merge: the plain architecture again
            saved = dataclasses.replace(saved, model=adapters.merge(saved.model))
        path = out / FORMATS[args.format]
        if not args.merge:
            path, got = _adapter(saved, out, check)
        elif args.format == "torchscript":
            got = _to_torchscript(saved, path, example, check)
        elif args.format == "onnx":
            got = _to_onnx(saved, path, example, check, args.opset)
        else:
            got = _to_safetensors(saved, path, check)
    what = args.format if args.merge else "peft adapter"
    diff = None if got is None else _check(what, expected, got, args.tolerance)
    p = saved.preprocess
    info = {"format": args.format if args.merge else "peft", "file": path.name, "input": [None, 3, size, size], "mean": list(p.mean),
            "std": list(p.std), "input_size": size, "interpolation": p.interpolation, "crop_pct": p.crop_pct,
            "resize": "short side to input_size / crop_pct, then centre crop to input_size; RGB scaled to [0, 1], "
                      "then (x - mean) / std", "classes": saved.classes,
            "model": {k: saved.config["model"].get(k) for k in ("name", "source")},
            "weights": "average" if saved.averaged else "live", "checkpoint": str(saved.path),
            # the task and its settings: multilabel's per-label thresholds turn its sigmoids into label sets
            "task": saved.task.state(),
            "max_abs_diff": diff}
    # every format exported here from this checkpoint, each with its own check (one file per format)
    before = _read_json(out / "preprocess.json")
    earlier = before.get("exports", {}) if before.get("checkpoint") == info["checkpoint"] else {}
    info["exports"] = {**earlier, info["format"]: {"file": path.name, "max_abs_diff": diff}}
    if saved.groups is not None:
        info["adapters"] = ("merged into the base weights (peft's merge)" if args.merge else
                            "peft's format: PeftModel.from_pretrained(<the base model with this head size>, DIR)")
    with writing(out / "preprocess.json"):
        (out / "preprocess.json").write_text(json.dumps(info, indent=2) + "\n")
    checked = "not checked (no onnxruntime)" if diff is None else f"max abs difference {diff:.2e} on a batch of 3"
    print(f"finetune: exported {path} ({checked}); preprocessing in {out / 'preprocess.json'}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
