"""The typed config schema. Hydra composes conf/*.yaml on top of it, so a wrong type or an unknown key
fails at composition time. Cross-field checks that need the model (unfreeze beyond the number of
groups, warmup longer than training) happen in finetune.core.plan before any training."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The choices of every key that takes one word from a fixed list: OmegaConf checks them when the config
# is composed (a wrong word is refused there, naming the choices), and the code that acts on a choice
# takes its list from here. Member names equal their values (OmegaConf reads a choice by name).


class ModelSource(StrEnum):
    torchvision = "torchvision"
    timm = "timm"
    hf = "hf"  # Hugging Face transformers: model.name is a hub id or a save_pretrained directory
    custom = "custom"  # model._target_: your own class


class OptimizerName(StrEnum):
    sgd = "sgd"
    adamw = "adamw"
    adam = "adam"
    rmsprop = "rmsprop"


class ScheduleKind(StrEnum):
    constant = "constant"
    step = "step"
    multistep = "multistep"
    exponential = "exponential"
    linear = "linear"
    cosine = "cosine"
    one_cycle = "one_cycle"
    sgdr = "sgdr"
    slanted_triangular = "slanted_triangular"


class SpreadKind(StrEnum):
    none = "none"
    body = "body"
    geometric = "geometric"
    ulmfit = "ulmfit"
    layer_decay = "layer_decay"


class PeftKind(StrEnum):
    none = "none"
    lora = "lora"
    dora = "dora"
    ia3 = "ia3"
    loha = "loha"
    lokr = "lokr"


class PeftBias(StrEnum):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class FreezeKind(StrEnum):
    fixed = "fixed"
    milestones = "milestones"
    gradual = "gradual"
    fine_tune = "fine_tune"
    freezeout = "freezeout"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class CacheDtype(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class HeadInit(StrEnum):
    none = "none"
    lbfgs = "lbfgs"


class BestMetric(StrEnum):
    auto = "auto"  # the task's main metric: val_acc (single_label), val_map (multilabel)
    val_acc = "val_acc"
    val_loss = "val_loss"
    val_map = "val_map"
    val_f1_macro = "val_f1_macro"
    val_f1_micro = "val_f1_micro"
    train_acc = "train_acc"
    train_loss = "train_loss"
    live_val_acc = "live_val_acc"
    live_val_loss = "live_val_loss"
    live_val_map = "live_val_map"


class SamplerKind(StrEnum):
    shuffle = "shuffle"  # every image once an epoch, in a seeded order
    balanced = "balanced"  # images drawn with replacement, each class equally often (skewed classes)


class TaskKind(StrEnum):
    auto = "auto"  # multilabel when the labels give an image several labels, else single_label
    single_label = "single_label"
    multilabel = "multilabel"


class TrackerMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class InspectFormat(StrEnum):
    table = "table"
    json = "json"



@dataclass
class ModelConfig:
    # the architecture: a torchvision or timm model name, or (source hf) a Hugging Face hub id or a local
    # save_pretrained directory (model=<choice> sets it)
    name: str = MISSING
    source: ModelSource = ModelSource.timm  # where model.name comes from (custom: model._target_)
    # DEFAULT | a weights enum name / timm pretrained tag | null (random init) | a local file
    # (.pth/.pt/.safetensors) | pkg:<python package> (weights shipped inside an installed package)
    weights: Optional[str] = "DEFAULT"
    groups: Optional[Any] = None  # explicit layer-group spec; null: the ready grouping for the model
    catch_all: Optional[str] = None  # group that takes every parameter no pattern matches
    drop_rate: float = 0.0  # dropout before the new head
    drop_path_rate: float = 0.0  # stochastic depth (timm models): residual branches dropped at up to this rate
    # your own model class (finetune/models/targets.py): built by hydra.utils.instantiate with `args`; `head` is
    # the module replaced by the new head (null: the last Linear)
    _target_: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of model._target_
    head: Optional[str] = None  # model._target_: the module the new head replaces (null: the last Linear)


@dataclass
class DataConfig:
    # digits | synthetic | imagefolder | webdataset | hf | custom | a torchvision dataset (cifar10, ...):
    # data=<choice> sets it
    name: str = MISSING
    root: Optional[str] = None  # imagefolder: DIR holding train/<class>/ and val/<class>/
    # webdataset: the train shards, a brace pattern of tar files written by `finetune shard` (quoted on the command
    # line: "data.train='DIR/train-{000000..000009}.tar'"), local paths or URLs; the class names come from the
    # index.json beside them
    train: Optional[str] = None
    # webdataset: the validation shards, a brace pattern like data.train; csv: the label files (CSV or TSV)
    val: Optional[str] = None
    # hf: a Hugging Face dataset, as a hub id, a directory written by save_to_disk, or a folder datasets.load_dataset
    # reads (an imagefolder: DIR/train/<class>/, DIR/validation/<class>/)
    path: Optional[str] = None
    image_column: str = "image"  # hf, csv: the column holding the images (csv: paths relative to the file)
    # hf: the column holding the labels (a ClassLabel names the classes); csv: the labels of each image,
    # several separated by spaces
    label_column: str = "label"
    # csv: one 0/1 column per label instead of label_column (null: label_column)
    label_columns: Optional[List[str]] = None
    val_fraction: float = 0.2  # csv with data.val=null: this share of data.train held out (seeded, stratified)
    # the train order: shuffle, or balanced (as many images an epoch, drawn so that every class comes equally
    # often: skewed classes; seeded, exact resume, split across processes like shuffle)
    sampler: SamplerKind = SamplerKind.shuffle
    train_split: str = "train"  # hf: the split to train on
    val_split: str = "validation"  # hf: the split to validate on (often validation or test)
    num_classes: int = 4  # synthetic only; real datasets count their classes
    train_size: int = 192  # synthetic only
    val_size: int = 96  # synthetic only
    image_size: Optional[int] = None  # null: the model's pretrained input size
    augment: bool = True  # random resized crops and flips for training (false: the eval transform)
    # with augment, through timm's factory (finetune/data/transforms.py): an auto-augment policy (rand-m9-mstd0.5-inc1:
    # RandAugment; original; augmix-m5-w4-d2) and random erasing (probability, random pixels)
    auto_augment: Optional[str] = None
    re_prob: float = 0.0  # random erasing: the probability per image (0: off)
    # batch mixing (torchvision's MixUp / CutMix; both: one of the two per batch): the Beta alpha, 0: off
    mixup: float = 0.0
    cutmix: float = 0.0  # CutMix: the Beta alpha, 0: off
    num_workers: int = -1  # -1: pick from the CPU count
    download: bool = True  # torchvision datasets
    skip_bad: bool = False  # skip unreadable images (counted) instead of failing
    # decode a large JPEG at reduced scale (1/2 .. 1/8, Pillow's draft mode) when its short side stays at or above
    # what the transforms read (train: a random crop's side at full size; eval: the resize): much faster on
    # camera photos, pixels slightly different from a full decode; small images are decoded as always
    draft: bool = True
    # resize the images once to what the transforms read (a JPEG copy under $XDG_CACHE_HOME/finetune/resized, keyed by
    # each file and the size): later epochs and runs decode small files; pixels differ slightly (needs data.draft)
    cache_resized: bool = False
    # your own dataset (finetune/models/targets.py): called with split=train|val and `args`
    _target_: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of data._target_, besides split


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw  # the ONE optimizer that holds every layer group
    momentum: float = 0.9  # sgd / rmsprop; beta1 for adam(w)
    nesterov: bool = False  # sgd: Nesterov momentum
    beta2: float = 0.999  # adam(w): the second-moment beta
    eps: float = 1e-8  # adam(w) / rmsprop: added to the denominator
    weight_decay: float = 0.01  # every group's (per_group.<group>.weight_decay: one group's own)
    no_decay_norm_bias: bool = True  # no weight decay on biases and normalisation parameters


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.one_cycle  # every group's LR schedule (per_group.<group>.schedule: its own)
    warmup: float = 0.0  # epochs of linear warmup from 0 (combinable with every kind)
    min_lr_ratio: float = 0.0  # cosine / sgdr / warmup floor, as a fraction of the group's LR
    step_size: float = 1.0  # step: epochs between decays
    gamma: float = 0.1  # step / multistep decay; exponential: factor per epoch
    milestones: List[float] = field(default_factory=list)  # multistep: epochs
    pct_start: float = 0.25  # one_cycle (fastai's defaults): the share of the steps the LR rises
    div_factor: float = 25.0  # one_cycle: it starts at the peak LR / div_factor
    final_div_factor: float = 1e5  # one_cycle: it ends at its start LR / final_div_factor
    cycle_momentum: bool = True  # one_cycle: the momentum (beta1) moves against the LR
    max_momentum: float = 0.95  # one_cycle: the momentum at the start and the end
    base_momentum: float = 0.85  # one_cycle: the momentum at the LR's peak
    t0: float = 1.0  # sgdr: epochs of the first cycle
    t_mult: float = 2.0  # sgdr: each cycle this many times longer
    restart_decay: float = 1.0  # sgdr: peak LR multiplied by this at every restart
    cut_frac: float = 0.1  # slanted triangular (ULMFiT): the share of the steps the LR rises
    ratio: float = 32.0  # slanted triangular: the peak LR / the lowest LR
    start_at_unfreeze: bool = True  # a group unfrozen later starts its schedule at its unfreeze step
    end_at_freeze: bool = False  # a group frozen for good before the end ends its schedule there (freezeout)


@dataclass
class LRSpreadConfig:
    kind: SpreadKind = SpreadKind.none  # geometric: fastai's slice
    lo: Optional[float] = None  # geometric: LR of the first group (the last group gets `lr`)
    factor: float = 2.6  # ulmfit: each lower group = the one above / factor
    decay: float = 0.75  # layer_decay: lr * decay ** depth (depth 0 = head)
    ratio: float = 0.1  # body: every group below the head at lr * ratio
    ramp: float = 0.0  # epochs over which the spread grows from uniform (every group at lr) to its ratios


@dataclass
class FreezeConfig:
    kind: FreezeKind = FreezeKind.fixed  # what trains when (see the freeze.* keys below)
    t0: float = 0.5  # freezeout: the first group freezes after this share of the epochs, the others later
    milestones: Dict[int, Any] = field(default_factory=dict)  # epoch -> trainable groups (int|all)
    every: int = 1  # gradual: one more group every `every` epochs
    head_epochs: int = 1  # fine_tune: head only for this many epochs, then all groups
    train_bn: bool = False  # train BatchNorm affine params even in frozen groups (fastai train_bn)
    bn_eval: bool = False  # every BatchNorm keeps its pretrained running statistics, trainable ones too


@dataclass
class InspectConfig:
    format: InspectFormat = InspectFormat.table  # the plan as a table, or as JSON for scripts
    params: bool = False  # also every parameter tensor: its group, effective LR and weight decay
    probe: bool = False  # under experiment=auto: run its probe (forward passes, no training), show its choice's plan


@dataclass
class LRFindConfig:
    """`finetune lr-find` and `lr=auto`: the LR range test (finetune/recipes/lr_find.py)."""

    steps: int = 100  # optimizer steps of the sweep
    start: float = 1e-7  # the swept group's first LR
    end: float = 10.0  # its last LR (the sweep stops earlier once the loss diverges)
    group: Optional[str] = None  # sweep this group alone (the others keep their LRs); null: every group
    epoch: int = 0  # the freeze state of this epoch of the recipe (0: its first)
    smooth: float = 0.98  # exponential smoothing of the loss (debiased)
    diverge: float = 4.0  # stop once the smoothed loss exceeds this many times its minimum


@dataclass
class AutoConfig:
    """experiment=auto: the probe that chooses the recipe before training (finetune/recipes/auto.py)."""

    enabled: bool = False  # experiment=auto sets it
    near: str = "lp_ft"  # the recipe when the pretrained top features fit the data
    far: str = "freezeout"  # the recipe when an earlier group's features fit it clearly better
    budget: float = 0.15  # the probe's compute, at most this share of the run's
    # far only when the top probe loses at most this under the data's own BatchNorm statistics
    bn_drop: float = 0.05
    far_min_steps: int = 20  # far only when the run has at least this many optimizer steps
    folds: int = 5  # cross-validation folds of the linear probes (within the train set)
    # keep each probe's result under $XDG_CACHE_HOME/finetune/probes (default ~/.cache), keyed by the model's
    # weights, the train files (paths, sizes, times) and every setting the probe reads: a sweep's jobs and
    # lr-find on the same data and model probe once; false: probe every time
    reuse: bool = True


@dataclass
class PeftConfig:
    """peft=<kind>: adapters in the layer groups below the head, through the peft library
    (finetune/models/adapters.py). A group with adapters trains only them (and biases, by peft.bias) when
    the freeze schedule trains it; its base weights never change."""

    kind: PeftKind = PeftKind.none  # peft=<choice> sets it: lora, dora, ia3, loha, lokr (none: no adapters)
    r: int = 8  # the adapters' rank (lora, dora, loha, lokr)
    alpha: float = 16.0  # their scale: alpha / r (lora, dora, loha, lokr)
    dropout: float = 0.0  # dropout on the adapters' input (lora, dora; loha and lokr: module dropout)
    # the layer groups that get adapters; null: every group below the head (a group with no module that
    # peft.target matches then keeps its base weights frozen)
    groups: Optional[List[str]] = None
    # a regex (re.search) over module names inside those groups: the Linear and Conv2d layers adapted; null:
    # every Linear (a ViT's attention and MLP) and every 1x1 convolution (a convnet's pointwise layers)
    target: Optional[str] = None
    bias: PeftBias = PeftBias.none  # biases that train with the adapters: none, all (of the group), lora_only


@dataclass
class LoggerConfig:
    """logger=<choice> (conf/logger/): the experiment trackers a run logs to, besides the CSV files of its
    directory; logger=[tensorboard,mlflow] for several (finetune/engine/trackers.py). MLflow and W&B get
    every group's LR at every step, the train loss and accuracy, every evaluation, the config as params and,
    at the end, the run's plots, CSV files and summary.json; their points are sent at each checkpoint, so a
    resumed run continues the same tracker run without a step twice."""

    tensorboard: bool = False  # RUN_DIR/tensorboard, beside the CSV files (logger=tensorboard sets it)
    mlflow: bool = False  # an MLflow run (logger=mlflow sets it; pip install "finetune[trackers]")
    wandb: bool = False  # a W&B run (logger=wandb sets it; pip install "finetune[trackers]")
    # MLflow's tracking server or store (http://localhost:5000, sqlite:///mlflow.db); null: a local store beside
    # the run directory, <its parent>/mlruns/mlflow.db (a sweep's jobs: one in the sweep directory)
    tracking_uri: Optional[str] = None
    experiment: str = "finetune"  # the MLflow experiment, and the W&B project unless logger.project names one
    project: Optional[str] = None  # the W&B project (null: logger.experiment)
    # W&B: online syncs as it trains; offline writes RUN_DIR/wandb/ for `wandb sync` later; null: online when
    # WANDB_API_KEY (or WANDB_MODE) is set, else offline
    mode: Optional[TrackerMode] = None


@dataclass
class LossConfig:
    # single-label, against skewed classes: a weight per class in the loss; none | balanced (n / (classes x
    # count), sklearn's rule) | a list, one weight per class
    class_weights: Any = "none"
    # logit adjustment (Menon et al., ICLR 2021): the training loss sees logits + this x log(class prior),
    # so rare classes are not out-scored by frequent ones; 0: off, 1: the paper's
    logit_adjust: float = 0.0


@dataclass
class TaskConfig:
    # what the model predicts (finetune/tasks/): single_label (one class per image) or multilabel (a set of
    # labels per image); auto: multilabel when the label file gives an image several labels
    kind: TaskKind = TaskKind.auto


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr_spread: LRSpreadConfig = field(default_factory=LRSpreadConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)
    auto: AutoConfig = field(default_factory=AutoConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # per-group settings: {group: {lr: ..., weight_decay: ..., schedule: {kind: ..., ...}}}
    per_group: Dict[str, Any] = field(default_factory=dict)
    unfreeze: Any = "all"  # last N groups trainable (head counted), or all
    epochs: int = 5  # epochs of training
    max_steps: Optional[int] = None  # end after this many optimizer steps (the plan spans them); null: epochs
    # the head group's peak LR, under every recipe (the other groups follow lr_spread); or auto: the LR
    # finder's suggestion
    lr: Any = 1e-3
    head_lr: Optional[float] = None  # the new head's own LR (overrides the spread for the head); recipes never set it
    batch_size: int = 32  # per micro-batch (and per process)
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation): the step sees batch_size x accumulate
    seed: int = 0  # data order, augmentation and the new head's init are functions of it
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto: bf16/fp16 on CUDA, fp32 on the CPU
    channels_last: Optional[bool] = None  # null: on for CUDA
    compile: bool = False  # torch.compile (compiled again when a freeze change flips requires_grad)
    # torchrun: BatchNorm in train mode normalises over the whole global batch (CUDA only)
    sync_bn: bool = False
    label_smoothing: float = 0.0  # the training loss's label smoothing (reported losses are without it)
    grad_clip: Optional[float] = None  # clip the gradients' total norm to this (null: off)
    # EMA of the weights with this half-life in epochs; evaluation and the checkpoint's "ema" use it
    ema_half_life: Optional[float] = None
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    eval_every: int = 0  # also evaluate every N steps (0: only at epoch ends); evals.csv, best.pt
    diag_every: int = -1  # per-group diagnostics every N steps (-1: 4 times an epoch; 0: off)
    # the frozen-prefix feature cache (finetune/engine/cache.py): used when the head alone trains above a frozen body
    cache: bool = True
    cache_views: Optional[int] = None  # K: augmentations repeat every K epochs, K views cached
    cache_dir: Optional[str] = None  # memory-mapped feature files here (reused across runs); null: memory
    cache_dtype: CacheDtype = CacheDtype.fp32  # the cached features' dtype (fp16 / bf16: half the memory)
    head_init: HeadInit = HeadInit.none  # lbfgs: fit the new head on the cached features before training
    # checkpoints/best.pt keeps the evaluation best by this (losses down, every other metric up); auto: the
    # task's main metric (val_acc; multilabel: val_map)
    best_metric: BestMetric = BestMetric.auto
    patience: int = 0  # early stopping: end after this many epochs without a best_metric gain of min_delta (0: off)
    min_delta: float = 0.0  # early stopping: the smallest gain of best_metric that counts
    time_limit: Optional[float] = None  # minutes: stop after the step that passes it, resumable (exit 3)
    deterministic: bool = False  # deterministic algorithms (cuDNN included): exact resume on a GPU too
    resume: Optional[str] = None  # run dir or checkpoint file
    overwrite: bool = False  # run in a directory that already holds a run, replacing it
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=<choice> or logger=[tensorboard,mlflow]
    verbose: bool = False  # show tracebacks for user errors
    progress: bool = True  # the progress bar (false: log lines only)
    # set by finetune.compose, not on the command line: the recipe applied, what it set, auto's choice
    recipe: Optional[Any] = None


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
