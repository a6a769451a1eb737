"""Every `finetune` command line in the README and in the documentation site (docs/**/*.md), as typed:
its plan built as `finetune inspect ... inspect.format=json` builds it (a `train` line is inspected
instead of trained; a sweep is expanded into its jobs), and its LRs, schedules, trainable groups per epoch
and BatchNorm mode checked against what the text says beside it. A command line in a ```bash block without
a check here (CHECKS, or ELSEWHERE: run by another test) fails the first test."""

import itertools
import json
import re
import shlex

import pytest
from conftest import shared_data
from hydra.core.override_parser.overrides_parser import OverridesParser
from tiny_runs import ROOT

# the README and every page of the docs site (the benchmark records under docs/ hold no command lines)
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
LITE0 = ["stem", *(f"blocks_{i}" for i in range(7)), "neck", "head"]  # the default model's groups
BN_EVAL = "pretrained statistics in every layer (freeze.bn_eval)"
BN_FROZEN = "pretrained statistics in frozen groups, batch statistics in trainable ones"
EPOCHS, STEPS = 5, 6  # the defaults: 5 epochs of the synthetic set (192 images, batch 32)


def commands_in(text: str) -> list[str]:
    """The `finetune ...` lines of the ```bash blocks of a markdown text, continuations joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.split(r"\s+#", line)[0].strip()
            if command.startswith("finetune "):
                commands.append(" ".join(command.split()))
    return commands


def readme_commands() -> list[str]:
    """Every command line of the README and of the docs site, in order (repeats kept)."""
    return [c for path in SOURCES for c in commands_in(path.read_text())]


def jobs(command: str) -> list[list[str]]:
    """The override lists of the jobs a command runs (one, or one per point of a -m sweep)."""
    args = [a for a in shlex.split(command)[2:] if a != "-m"]
    values = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            values.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
        else:
            values.append([override.input_line])
    return [list(job) for job in itertools.product(*values)]


def inspect_json(capsys, overrides: list[str]) -> dict:
    capsys.readouterr()
    from finetune.commands import cli

    try:
        cli.main(["inspect", *overrides, "inspect.format=json"])
    except SystemExit as e:
        raise AssertionError(f"exit {e.code}: {capsys.readouterr().err}")
    return json.loads(capsys.readouterr().out)


def peaks(info) -> dict:
    return {g["name"]: g["lr"]["peak"] for g in info["groups"]}


def starts(info) -> dict:
    return {g["name"]: g["trainable_from_epoch"] for g in info["groups"]}


def names(info) -> list:
    return [g["name"] for g in info["groups"]]


def lp_ft_body_and_head(info, head=1e-2, body=2e-4):
    """lp_ft's LRs: the head at lr, every other group at lr / 50."""
    p = peaks(info)
    assert p["head"] == pytest.approx(head, rel=1e-6)
    for name, lr in p.items():
        if name != "head":
            assert lr == pytest.approx(body, rel=0.02), name  # cosine's peak falls between two steps


def check_unfreeze_5(info):  # "the head for one epoch, then the last 5 groups (lp_ft)"
    assert starts(info) == {"stem": None, "layer1": 1, "layer2": 1, "layer3": 1, "layer4": 1, "head": 0}
    assert info["batchnorm"] == BN_EVAL and info["recipe"]["name"] == "lp_ft"
    lp_ft_body_and_head(info)


def check_lp_ft_unfreeze(info, unfreeze, epochs=EPOCHS):  # `-m unfreeze=1,3,all` on the default model
    assert info["epochs"] == epochs
    n = len(info["groups"])
    count = n if unfreeze == "all" else int(unfreeze)
    expected = [None] * (n - count) + [1] * (count - 1) + [0]
    assert list(starts(info).values()) == expected


def check_fixed_2(info):  # "unfreeze the last N groups", no recipe: fixed, one_cycle, lr 1e-3 everywhere
    assert starts(info) == {"stem": None, "layer1": None, "layer2": None, "layer3": None, "layer4": 0, "head": 0}
    assert info["recipe"] is None and info["batchnorm"] == BN_FROZEN
    assert list(peaks(info).values()) == pytest.approx([1e-3] * 6, rel=0.02)  # one-cycle's peak between steps
    assert {g["schedule"]["kind"] for g in info["groups"]} == {"one_cycle"}


def check_per_group_lr(info, group="layer4"):  # "a different LR per group": the last block 1e-3, the head 1e-2
    p = peaks(info)
    assert p[group] == pytest.approx(1e-3, rel=0.02) and p["head"] == pytest.approx(1e-2)
    lp_ft_body_and_head({"groups": [g for g in info["groups"] if g["name"] != group]})  # the rest: lp_ft's body


def check_per_group_schedule(info, group="layer4"):  # "a schedule per group (others keep the global schedule)"
    groups = {g["name"]: g for g in info["groups"]}
    head, block, stem = groups["head"], groups[group], groups["stem"]
    # the head's one-cycle starts from one_cycle's own settings: no warmup from the global cosine
    assert head["schedule"]["kind"] == "one_cycle" and head["schedule"]["warmup"] == 0
    assert head["lr"]["start"] == pytest.approx(1e-2 / 25)  # lp_ft's head LR / div_factor: no warmup before it
    assert head["lr"]["peak"] == pytest.approx(1e-2, rel=0.01)
    assert (block["schedule"]["kind"], block["schedule"]["t0"], block["schedule"]["t_mult"]) == ("sgdr", 1, 2)
    assert block["schedule"]["warmup"] == 0
    assert (stem["schedule"]["kind"], stem["schedule"]["warmup"]) == ("cosine", 0.5)


def check_gradual(info):  # ULMFiT: head first, one more group every epoch, LR / 2.6 per group down
    n = len(info["groups"])
    assert list(starts(info).values()) == [None] * (n - EPOCHS) + list(range(EPOCHS - 1, -1, -1))
    p = list(peaks(info).values())
    assert {g["schedule"]["kind"] for g in info["groups"]} == {"slanted_triangular"}
    # each group's own triangle peaks at its LR (within the steps it trains)
    for lower, upper in zip(p[n - EPOCHS:], p[n - EPOCHS + 1:]):
        assert lower == pytest.approx(upper / 2.6, rel=0.05)


def check_gradual_every_2(info):  # "one more every 2 epochs, at most 4 groups"
    n = len(info["groups"])
    assert list(starts(info).values()) == [None] * (n - 3) + [4, 2, 0]  # 5 epochs: 1, 1, 2, 2, 3 groups
    assert info["batchnorm"] == BN_EVAL  # lp_ft's freeze.bn_eval still applies: the README says so


def check_geometric(info):  # fastai slice(1e-5, 1e-3): the head at lr, the first group at lo
    p = list(peaks(info).values())
    assert p[-1] == pytest.approx(1e-3, rel=0.02) and p[0] == pytest.approx(1e-5, rel=0.02)
    ratios = [b / a for a, b in zip(p, p[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=0.05)


def check_ulmfit(info):
    p = list(peaks(info).values())
    assert p[-1] == pytest.approx(1e-3, rel=0.02)
    for lower, upper in zip(p, p[1:]):
        assert lower == pytest.approx(upper / 2.6, rel=0.05)


def check_layer_decay(info):  # lr * decay ** depth, depth as timm counts it; the head at head_lr
    p = list(peaks(info).values())
    assert p[-1] == pytest.approx(1e-2, rel=0.02)
    assert p[-2] == p[-3] == pytest.approx(1e-3 * 0.7, rel=0.02)  # the neck counts with the last stage
    # timm's layers of EfficientNet-Lite0: the stem and each of its 16 blocks, so the stem sits 17 deep
    assert p[0] == pytest.approx(1e-3 * 0.7 ** 17, rel=0.02)


def check_full(info, unfreeze):  # every trainable group from epoch 0, one LR, cosine
    n = len(info["groups"])
    count = n if unfreeze == "all" else int(unfreeze)
    assert list(starts(info).values()) == [None] * (n - count) + [0] * count
    assert list(peaks(info).values()) == pytest.approx([1e-3] * n, rel=0.02)
    assert info["recipe"]["name"] == "full"


def check_linear_probe(info):  # "the head alone": every other group frozen throughout, the head at 1e-2
    assert info["recipe"]["name"] == "linear_probe" and names(info) == LITE0
    assert list(starts(info).values()) == [None] * (len(LITE0) - 1) + [0]
    assert peaks(info)["head"] == pytest.approx(1e-2, rel=0.02)


def check_unfreeze_3(info):  # "at most the last 3 groups: blocks_6, neck, head" (auto's lp_ft: the head first)
    assert names(info)[-3:] == ["blocks_6", "neck", "head"]
    check_lp_ft_unfreeze(info, "3")
    lp_ft_body_and_head(info)


def check_hymenoptera(info):  # 245 train images, batch 32: 7 full steps
    assert info["steps_per_epoch"] == 7
    lp_ft_body_and_head(info)


def check_auto(info):  # the probe chooses when training starts: inspect shows lp_ft's plan, names freezeout
    assert info["steps_per_epoch"] == 37  # neu6: 1200 train images
    assert info["warnings"][0] == ("experiment=auto chooses experiment=lp_ft or experiment=freezeout when "
                                   "training starts (a probe of the train images); this plan is lp_ft's: inspect "
                                   "experiment=freezeout for the other")
    lp_ft_body_and_head(info)


def check_default_plan(info):  # the default command line's plan: lp_ft on the default model, every group
    assert names(info) == LITE0
    check_lp_ft_unfreeze(info, "all")
    lp_ft_body_and_head(info)


def check_groups(expected):
    def check(info):
        assert names(info) == expected
    return check


def check_sweep_lr(info, lr):  # a swept lr is the head's LR; lp_ft's body follows at lr / 50
    lp_ft_body_and_head(info, head=float(lr), body=float(lr) / 50)


def by_job(check, key):
    """A check of one sweep job that receives the job's value of `key`."""
    def job_check(info, overrides):
        value = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key)
        check(info, value)
    return job_check


VIT_S = ["stem", *(f"blocks_{i}" for i in range(12)), "neck", "head"]


def adapters_in(info) -> list:
    return [g["name"] for g in info["groups"] if g.get("adapter_params")]


def check_lora_default(info):  # "adds them to every group below the head, whose base weights then never change"
    # every Lite0 block and the neck hold 1x1 convolutions; the stem's only convolution is 3x3
    assert adapters_in(info) == LITE0[1:-1]
    groups = {g["name"]: g for g in info["groups"]}
    assert all(groups[n]["trainable_params"] == groups[n]["adapter_params"] for n in LITE0[:-1])
    assert groups["head"]["trainable_params"] == groups["head"]["params"] and groups["stem"]["trainable_params"] == 0


def check_lora_last_blocks(info):  # peft.groups=[blocks_8 .. blocks_11]: adapters there, the rest as without
    assert names(info) == VIT_S and adapters_in(info) == VIT_S[9:13]
    groups = {g["name"]: g for g in info["groups"]}
    # attention (qkv 384x1152, proj 384x384) and MLP (fc1 384x1536, fc2 1536x384) at r=8
    assert groups["blocks_8"]["adapter_params"] == 8 * (384 + 1152 + 384 + 384 + 384 + 1536 + 1536 + 384)
    assert groups["blocks_7"]["trainable_params"] == groups["blocks_7"]["params"]  # outside peft.groups: whole


def check_lora_attention(info):  # peft.target=attn: the attention layers of every block
    assert adapters_in(info) == VIT_S[1:13]
    assert {g["adapter_params"] for g in info["groups"] if g["name"].startswith("blocks_")} == {
        8 * (384 + 1152 + 384 + 384)}


CHECKS = {
    "finetune train peft=lora": check_lora_default,
    "finetune train model=timm model.name=vit_small_patch16_224 model.weights=null peft=lora "
    "peft.groups=[blocks_8,blocks_9,blocks_10,blocks_11]": check_lora_last_blocks,
    "finetune inspect model=timm model.name=vit_small_patch16_224 model.weights=null peft=lora peft.target=attn":
        check_lora_attention,
    "finetune train model=resnet18 unfreeze=5": check_unfreeze_5,
    "finetune inspect model=resnet18 unfreeze=5": check_unfreeze_5,
    "finetune train -m unfreeze=1,3,all": by_job(check_lp_ft_unfreeze, "unfreeze"),
    "finetune train model=resnet18 unfreeze=2 experiment=none": check_fixed_2,
    "finetune train model=resnet18 +per_group.layer4.lr=1e-3 +per_group.head.lr=1e-2": check_per_group_lr,
    "finetune train +per_group.blocks_6.lr=1e-3 +per_group.head.lr=1e-2":
        lambda info: check_per_group_lr(info, "blocks_6"),
    "finetune train +per_group.head.schedule.kind=one_cycle "
    "+per_group.blocks_6.schedule='{kind: sgdr, t0: 1, t_mult: 2}'":
        lambda info: check_per_group_schedule(info, "blocks_6"),
    "finetune train experiment=linear_probe": check_linear_probe,
    "finetune train experiment=full": lambda info: check_full(info, "all"),
    "finetune train unfreeze=3": check_unfreeze_3,
    "finetune train model=resnet18 schedule=cosine +per_group.head.schedule.kind=one_cycle "
    "+per_group.layer4.schedule='{kind: sgdr, t0: 1, t_mult: 2}'": check_per_group_schedule,
    "finetune train experiment=gradual": check_gradual,
    "finetune train freeze=gradual freeze.every=2 unfreeze=4": check_gradual_every_2,
    "finetune train lr=1e-3 lr_spread.kind=geometric lr_spread.lo=1e-5": check_geometric,
    "finetune train lr=1e-3 lr_spread.kind=ulmfit lr_spread.factor=2.6": check_ulmfit,
    "finetune train lr=1e-3 lr_spread.kind=layer_decay lr_spread.decay=0.7 head_lr=1e-2": check_layer_decay,
    "finetune train -m unfreeze=1,3,all experiment=full": by_job(check_full, "unfreeze"),
    "finetune train data=imagefolder data.root=../shared/data/hymenoptera": check_hymenoptera,
    "finetune inspect data=imagefolder data.root=../shared/data/hymenoptera": check_hymenoptera,
    "finetune train data=imagefolder data.root=../shared/data/neu6": check_auto,
    "finetune train model=torchvision model.name=regnet_y_400mf":
        check_groups(["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "finetune train model=timm model.name=convnext_tiny":
        check_groups(["stem", "stages_0", "stages_1", "stages_2", "stages_3", "neck", "head"]),
    "finetune inspect model=resnet18": check_groups(RESNET),
    "finetune train model=efficientnet_lite2": check_groups(LITE0),  # offline, the default model's groups
    "finetune train model=resnet18 'model.groups={stem: [conv1, bn1], early: [layer1, layer2], late: [layer3, "
    "layer4], head: fc}'": check_groups(["stem", "early", "late", "head"]),
    "finetune train -m data=imagefolder data.root=../shared/data/hymenoptera unfreeze=1,3,all epochs=3":
        by_job(lambda info, unfreeze: check_lp_ft_unfreeze(info, unfreeze, epochs=3), "unfreeze"),
    "finetune train -m data=imagefolder data.root=../shared/data/hymenoptera lr=3e-3,1e-2,3e-2 epochs=3": by_job(check_sweep_lr, "lr"),
    "finetune train -m lr=1e-4,1e-3,1e-2 hydra/launcher=joblib hydra.launcher.n_jobs=2": by_job(check_sweep_lr, "lr"),
    "finetune train -m lr=1e-4,1e-3 hydra/launcher=submitit_local": by_job(check_sweep_lr, "lr"),
    "finetune train -m lr=1e-4,1e-3 hydra/launcher=slurm hydra.launcher.partition=gpu": by_job(check_sweep_lr, "lr"),
    # a tracker changes nothing the run computes: the default model's plan under auto's lp_ft (test_trackers
    # runs each tracker)
    "finetune train logger=mlflow": check_default_plan,
    "finetune train data=hf data.path=../shared/data/hymenoptera": check_hymenoptera,  # HF's image-folder reader
    "finetune train logger=[tensorboard,mlflow] logger.tracking_uri=http://localhost:5000": check_default_plan,
    "finetune train logger=wandb": check_default_plan,
}
# checked elsewhere: they download, read a run that is not there, or are not a plan
ELSEWHERE = {
    "finetune train loss.class_weights=balanced": "test_tasks (balanced weights resume bit for bit)",
    "finetune train data.sampler=balanced": "test_tasks (the balanced sampler resumes bit for bit)",
    "finetune train loss.logit_adjust=1": "test_tasks (logit adjustment's shift and loss)",
    "finetune train data=csv data.train=labels_train.csv data.val=labels_val.csv":
        "test_tasks (a multi-label run from a label file, as typed)",
    "finetune train model=hf model.name=google/vit-base-patch16-224": "downloads (test_hf_models: a local dir)",
    "finetune train model=hf model.name=google/vit-base-patch16-224 peft=lora": "downloads (test_adapters)",
    "finetune train model=hf model.name=/models/my-vit": "test_hf_models (a save_pretrained directory)",
    "finetune train data=cifar10": "downloads CIFAR-10 (test_data)",
    "finetune train hparams_search=optuna hydra.sweeper.n_trials=20": "test_sweep runs a 3-trial study",
    "finetune summarize multirun/2026-12-01/10-00-00": "test_sweep",
    "finetune train resume=outputs/2026-11-21/10-00-00": "test_resume",
    "finetune lr-find model=resnet18 data=imagefolder data.root=../shared/data/hymenoptera": "test_lr_find",
    "finetune lr-find model=resnet18 lr_find.group=layer4 lr_find.epoch=1": "test_lr_find (one group alone)",
    "finetune train lr=auto": "test_lr_find (lr=auto trains as lr=<suggestion>)",
    "finetune train data.auto_augment=rand-m9-mstd0.5-inc1 data.re_prob=0.25 model.drop_path_rate=0.1":
        "test_augment (timm's policy and erasing, seeded; stochastic depth in timm's blocks)",
    "finetune train experiment=full data.mixup=0.2 data.cutmix=1.0": "test_augment (mixes, resumes exactly)",
    "finetune train model=custom model._target_=my_model.SmallNet ++model.args.width=32 model.head=fc "
    "data=custom data._target_=my_model.Stripes data.image_size=32 experiment=none epochs=3": "test_targets",
    "finetune inspect inspect.probe=true data=imagefolder data.root=../shared/data/neu6":
        "test_auto (inspect.probe: the plan of the recipe the probe chose)",
    "finetune eval ckpt=outputs/2026-11-21/10-00-00": "test_model_commands",
    "finetune eval ckpt=outputs/2026-11-21/10-00-00 split=test tta=true": "test_model_commands",
    "finetune predict ckpt=outputs/2026-11-21/10-00-00 input=photos/ out=predictions.csv": "test_model_commands",
    "finetune export ckpt=outputs/2026-11-21/10-00-00 format=onnx": "test_model_commands",
    "finetune shard data.root=../shared/data/hymenoptera out=shards/hymenoptera":
        "test_shards (run as typed, then the train line below inspected on what it wrote)",
    "finetune train data=webdataset \"data.train='shards/hymenoptera/train-{000000..000000}.tar'\" "
    "\"data.val='shards/hymenoptera/val-{000000..000000}.tar'\"": "test_shards (inspected on the shards written)",
    "finetune train data=hf data.path=/data/beans data.label_column=labels": "test_hf_data (a save_to_disk dir)",
    "finetune train data=hf data.path=AI-Lab-Makerere/beans data.label_column=labels":
        "downloads (test_hf_data: offline, the one-line error)",
}


def test_every_readme_command_is_checked():
    commands = readme_commands()
    assert len(commands) >= 20
    assert len(commands_in((ROOT / "README.md").read_text())) >= 10  # both the README and the docs are read
    assert len(commands_in((ROOT / "docs" / "guide" / "sweeps.md").read_text())) >= 5
    unchecked = [f"{path.relative_to(ROOT)}: {c}" for path in SOURCES for c in commands_in(path.read_text())
                 if c not in CHECKS and c not in ELSEWHERE]
    assert not unchecked, f"command lines without a check (add one to CHECKS): {unchecked}"
    gone = (set(CHECKS) | set(ELSEWHERE)) - set(commands)
    assert not gone, f"checks for commands neither the README nor the docs have any more: {sorted(gone)}"


@pytest.mark.parametrize("command", list(CHECKS))
def test_readme_command_does_what_the_readme_says(command, capsys, monkeypatch):
    for name in re.findall(r"\.\./shared/data/(\w+)", command):
        shared_data(name)  # skips where the shared images are missing
    monkeypatch.chdir(ROOT)  # data.root=../shared/... is relative to the checkout, as the docs type it
    check = CHECKS[command]
    for overrides in jobs(command):
        info = inspect_json(capsys, overrides)
        # the default recipe is auto, which inspect shows as its near recipe; a named recipe is itself
        named = any(o.split("=")[0] == "experiment" for o in overrides)
        assert info.get("auto") == (None if named else {"near": "lp_ft", "far": "freezeout"})
        assert named or info["recipe"]["name"] == "lp_ft"
        if getattr(check, "__name__", "") == "job_check":
            check(info, overrides)
        else:
            check(info)
