"""What every command that runs a model builds first, built one way: the seed, the device, the model with
its fresh head and layer groups, the data, and the plan. Training (finetune.engine.loop.Run), auto's
probe, inspect and the LR finder (through Run) all start here, so they see the same model, data and
step counts."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from finetune import tasks
from finetune.base.checksum import digest
from finetune.base.errors import UserError
from finetune.config.presets import schedule_presets
from finetune.core.groups import LayerGroup, build_groups
from finetune.core.optim import layer_depths
from finetune.core.plan import Plan, build_plan
from finetune.data import datasets, transforms
from finetune.data.loaders import DataBundle, build_data
from finetune.engine import distributed
from finetune.engine.distributed import World
from finetune.engine.step import resolve_device, resolve_precision, seed_everything
from finetune.models import adapters
from finetune.models.build import ModelBundle, build_model
from finetune.tasks import Task

log = logging.getLogger("finetune")


def build_parts(cfg) -> tuple[ModelBundle, list[LayerGroup], int]:
    """The model with its fresh head (and adapters, peft=...), its layer groups, and the data's number of
    classes."""
    num_classes = datasets.num_classes(cfg.data)
    bundle = build_model(cfg.model, num_classes)
    return bundle, model_groups(bundle, cfg.model, cfg.get("peft")), num_classes


def model_groups(bundle: ModelBundle, model_cfg, peft_cfg=None) -> list[LayerGroup]:
    """The layer groups of a built model (model.groups or its ready grouping); with peft_cfg's adapters
    added to the model first (in place), each in its layer's group."""
    spec = model_cfg.groups if model_cfg.get("groups") is not None else bundle.group_spec
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    groups = build_groups(bundle.model, spec, model_cfg.get("catch_all"))
    if peft_cfg is not None and str(peft_cfg.kind) != "none":
        groups = adapters.add(bundle.model, groups, peft_cfg)
    return groups


def head_module(model: nn.Module, groups) -> tuple[str, nn.Module | None]:
    """(name, module) of the head group (the last group): the module that owns exactly its parameters;
    None when no single module does (the feature cache and auto's probe then stay off)."""
    names = set(groups[-1].param_names)
    for name, module in model.named_modules():
        own = {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
        if own == names and name:
            return name, module
    return "", None


def check_accumulate(accumulate: int, micro_batches: int) -> int:
    if accumulate < 1:
        raise UserError(f"accumulate must be >= 1 (micro-batches per optimizer step), got {accumulate}")
    if accumulate > micro_batches:
        raise UserError(f"accumulate={accumulate} is more than the {micro_batches} batches of an epoch; lower "
                        "it or batch_size")
    return int(accumulate)


@dataclass
class Setup:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    model: nn.Module
    groups: list[LayerGroup]
    preprocess: dict  # what eval / predict / export need: mean, std, input_size, interpolation, crop_pct
    data: DataBundle
    accumulate: int
    # the plan counts optimizer steps (an epoch's last may take fewer micro-batches)
    steps_per_epoch: int
    head_name: str
    head: nn.Module | None
    task: Task  # what the model predicts: its loss and metrics (finetune/tasks/)

    def plan(self, cfg) -> Plan:
        return build_plan(cfg, [g.name for g in self.groups], self.steps_per_epoch,
                          layer_depths(self.model, self.groups), presets=schedule_presets())


def setup(cfg, world: World = distributed.SINGLE, *, training: bool = True, weights: bool = True) -> Setup:
    """Seed, device, model, groups and data as `cfg` says. `training`: the run's own data (augmented,
    sharded across `world`'s ranks, persistent workers) and sync_bn; else centre crops in one process
    (auto's probe, inspect). `weights=False` builds the architecture alone (inspect: no download)."""
    if cfg.deterministic:
        _deterministic_cublas()
    seed_everything(cfg.seed)  # the same on every rank: the replicas start equal
    device = resolve_device(distributed.device_name(cfg.device, world))
    if training:
        distributed.init(world, device)
    amp_dtype = resolve_precision(cfg.precision, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if not weights:
        cfg = OmegaConf.merge(cfg, {"model": {"weights": None}})
    bundle, groups, _ = build_parts(cfg)
    model = _sync_batchnorm(bundle.model, cfg.sync_bn, device, world) if training else bundle.model
    if training:
        data = build_data(cfg.data, bundle.preprocess, batch_size=cfg.batch_size, seed=cfg.seed,
                          pin_memory=device.type == "cuda", persistent_workers=True, rank=world.rank,
                          world=world.size, views=cfg.cache_views, task_kind=str(cfg.task.kind))
    else:
        data = build_data(OmegaConf.merge(cfg.data, {"augment": False}), bundle.preprocess,
                          batch_size=cfg.batch_size, seed=cfg.seed, task_kind=str(cfg.task.kind))
    size = transforms.image_size(cfg.data, bundle.preprocess)
    skewed = str(cfg.loss.class_weights) != "none" or float(cfg.loss.logit_adjust)
    task = tasks.build(cfg, len(data.classes), data.multilabel, data.class_counts() if skewed else None)
    if training:
        if task.name == "multilabel":
            why = "task=auto: some images have several labels" if str(cfg.task.kind) == "auto" else "task=multilabel"
            log.info("data: %d train / %d val images, %d labels, multi-label (%s), %d px", len(data.train),
                     len(data.val), len(data.classes), why, size)
        else:
            log.info("data: %d train / %d val images, %d classes, %d px", len(data.train), len(data.val),
                     len(data.classes), size)
        if world.enabled:  # before DDP, which would fail on another head size with a traceback
            distributed.agree({"class list": list(data.classes), "number of train images": len(data.train),
                               "number of val images": len(data.val), "config": _config_digest(cfg)})
            _check_world_batch(len(data.train), cfg.batch_size, world)
            log.info("distributed: %d processes (%s), batch_size %d per process: %d images per step", world.size,
                     "nccl" if device.type == "cuda" else "gloo", cfg.batch_size,
                     cfg.batch_size * world.size * cfg.accumulate)
    model.to(device)
    accumulate = check_accumulate(cfg.accumulate, data.steps_per_epoch)
    name, head = head_module(model, groups)
    if task.name != "single_label" and (float(cfg.data.mixup) or float(cfg.data.cutmix)):
        raise UserError(f"data.mixup / data.cutmix mix one class per image; task {task.name} has label sets: set "
                        "them to 0")
    return Setup(device, amp_dtype, channels_last, model, groups,
                 {**dataclasses.asdict(bundle.preprocess), "input_size": size}, data, accumulate,
                 -(-data.steps_per_epoch // accumulate), name, head, task)


def _config_digest(cfg) -> str:
    """A digest of the resolved config (the same command line on every rank gives the same one)."""
    return digest(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), 12)


def _deterministic_cublas() -> None:
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG (its condition for deterministic results) when it creates its
    handle at the first matmul on a GPU, so it is set here, before anything of the run (auto's probe
    included) computes; once set it cannot be taken back, so it stays set."""
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        log.warning("deterministic=true: CUDA was in use before finetune could set CUBLAS_WORKSPACE_CONFIG; "
                    "for deterministic cuBLAS start with CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def _sync_batchnorm(model: nn.Module, sync_bn: bool, device: torch.device, world: World) -> nn.Module:
    """sync_bn=true: BatchNorm layers in train mode normalise with the statistics of the whole global
    batch (every rank's shard), as one process would; those in eval mode (frozen groups, bn_eval) use
    their running statistics and exchange nothing."""
    if not sync_bn:
        return model
    if device.type != "cuda":
        raise UserError("sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                        "on the CPU each process normalises its own shard")
    if not world.enabled:
        log.warning("sync_bn=true has no effect with one process")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _check_world_batch(images: int, batch_size: int, world: World) -> None:
    if images < batch_size * world.size:
        raise UserError(f"{images} train images are fewer than one step of {world.size} processes x "
                        f"batch_size {batch_size}; lower batch_size (it is per process)")
