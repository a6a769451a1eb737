"""peft=lora and friends per layer group: base weights under adapters stay bit for bit, the adapters and the
head train, the freeze schedule decides when, the export merges (or writes peft's format) and resume is exact."""

import json

import pytest
import torch
from tiny_runs import QUIET, run_cli

import finetune
from finetune.commands.train import train
from finetune.engine import checkpoint
from finetune.engine.setup import setup
from finetune.engine.signals import Interrupted

# timm's test_vit: a 6-block ViT (width 64) of 0.37 M parameters at 160 px, random init
VIT = ["model=timm", "model.name=test_vit", "model.weights=null", "data=synthetic", "data.image_size=160",
       "data.num_classes=3", "data.train_size=24", "data.val_size=12", "batch_size=8", "progress=false",
       "device=cpu", "experiment=lp_ft"]
LORA = [*VIT, "peft=lora"]


def compose(*overrides):
    return finetune.compose(list(overrides), probe=False)


def weights(run):
    return checkpoint.load_checkpoint(str(run), "ckpt")[1]["model"]


def test_adapters_sit_in_their_layers_groups_and_only_they_train_there():
    parts = setup(compose(*LORA), training=False)
    groups = {g.name: g for g in parts.groups}
    assert list(groups) == ["stem", *(f"blocks_{i}" for i in range(6)), "neck", "head"]
    # attention qkv and proj, MLP fc1 and fc2: an A and a B each
    assert sorted(groups["blocks_2"].adapters) == sorted(
        f"blocks.2.{layer}.lora_{ab}.default.weight" for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        for ab in "AB")
    assert "blocks.2.attn.qkv.base_layer.weight" in groups["blocks_2"].fixed
    assert set(groups["blocks_2"].fixed) == set(groups["blocks_2"].param_names) - set(groups["blocks_2"].adapters)
    # the patch embedding is a 16x16 convolution: no adapter (not pointwise), its weights fixed all the same
    assert groups["stem"].adapters == [] and groups["stem"].fixed == groups["stem"].param_names
    assert groups["head"].fixed == [] and groups["head"].adapters == []
    # peft.bias=all: the biases of adapted groups train too; peft.groups and peft.target narrow the layers
    parts = setup(compose(*LORA, "peft.bias=all", "peft.groups=[blocks_2,blocks_3]", "peft.target=attn"),
                  training=False)
    groups = {g.name: g for g in parts.groups}
    assert groups["blocks_1"].adapters == [] and groups["blocks_1"].fixed == []  # outside peft.groups: whole
    assert {n.split(".lora_")[0] for n in groups["blocks_3"].adapters} == {"blocks.3.attn.qkv", "blocks.3.attn.proj"}
    trainable = set(groups["blocks_3"].param_names) - set(groups["blocks_3"].fixed)
    assert trainable - set(groups["blocks_3"].adapters) == {
        n for n in groups["blocks_3"].param_names if n.endswith(".bias")}


@pytest.mark.parametrize("overrides, message", [
    (["peft.groups=[blocks_9]"], "peft.groups: 'blocks_9' is not a layer group of this model; its groups: stem"),
    (["peft.groups=[stem]"], "peft.groups: no layer of group 'stem' is a Linear or a 1x1 convolution"),
    (["peft.target=nothing_like_this"], "peft: no layer to adapt in the groups below the head"),
    (["peft.target='attn[('"], "peft.target: 'attn[(' is not a regular expression"),
    (["peft.r=0"], "peft.r: the adapters' rank must be at least 1, got 0"),
])
def test_bad_peft_settings_are_one_line(overrides, message, capsys, tmp_path):
    code, err = run_cli(capsys, "train", *LORA, *overrides, *QUIET, f"hydra.run.dir={tmp_path}")
    assert code == 2 and err[-1].startswith(f"finetune: error: {message}"), err


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Two epochs under lp_ft: the head alone in epoch 0, the adapters (and the head) in epoch 1."""
    root = tmp_path_factory.mktemp("lora")
    cfg = compose(*LORA, "epochs=2")
    start = {n: p.detach().clone() for n, p in setup(cfg, training=False).model.named_parameters()}
    train(cfg, root / "run")
    return root, start


def test_base_weights_stay_bit_for_bit_while_adapters_and_head_train(lora_run):
    root, start = lora_run
    end = weights(root / "run")
    base = [n for n in start if ".lora_" not in n and not n.startswith("head.")]
    assert base and all(torch.equal(start[n], end[n]) for n in base)
    moved = [n for n in start if ".lora_B." in n and not torch.equal(start[n], end[n])]
    assert len(moved) == 24  # every block's four B matrices (zero at the start) left zero
    assert not torch.equal(start["head.weight"], end["head.weight"])
    # lp_ft: the head alone in epoch 0, then the adapters at the body's LR
    trace = [r for r in (root / "run" / "lr_trace.csv").read_text().splitlines()[1:]]
    rows = [dict(zip(("step", "epoch", "group", "lr", "momentum", "trainable"), r.split(","))) for r in trace]
    assert {r["trainable"] for r in rows if r["group"] == "blocks_2" and r["epoch"] == "0"} == {"0"}
    assert {r["trainable"] for r in rows if r["group"] == "blocks_2" and r["epoch"] == "1"} == {"1"}


def test_inspect_shows_base_and_adapter_counts_per_group(capsys):
    from finetune.commands import cli

    capsys.readouterr()
    cli.main(["inspect", *LORA, "inspect.format=json", *QUIET])
    info = json.loads(capsys.readouterr().out)
    block = next(g for g in info["groups"] if g["name"] == "blocks_0")
    # test_vit's blocks: qkv 64x192, proj 64x64, fc1 64x192, fc2 192x64; r=8: r x (in + out) each
    assert block["adapter_params"] == 8 * (64 + 192) + 8 * (64 + 64) + 8 * (64 + 192) + 8 * (192 + 64)
    assert block["params"] == block["base_params"] + block["adapter_params"]
    assert block["trainable_params"] == block["adapter_params"]  # peft.bias=none: the adapters alone
    head = next(g for g in info["groups"] if g["name"] == "head")
    assert head["adapter_params"] == 0 and head["base_params"] == 64 * 3 + 3


def test_resume_with_adapters_is_bit_identical(lora_run, tmp_path):
    root, _ = lora_run
    cfg = compose(*LORA, "epochs=2")
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "first", stop_at_step=4)  # mid-epoch 1: adapters training, AdamW state for them
    train(compose(*LORA, "epochs=2", f"resume={tmp_path / 'first'}"), tmp_path / "second")
    a, b = checkpoint.load_checkpoint(str(root / "run"), "ckpt")[1], checkpoint.load_checkpoint(
        str(tmp_path / "second"), "ckpt")[1]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (root / "run" / "lr_trace.csv").read_text() == (tmp_path / "second" / "lr_trace.csv").read_text()


def test_eval_and_the_merged_export_reproduce_the_adapted_model(lora_run, capsys, tmp_path):
    root, _ = lora_run
    run = root / "run"
    code, err = run_cli(capsys, "eval", f"ckpt={run}")
    assert code == 0, err
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(json.loads((run / "summary.json").read_text())["final_val_acc"])
    code, err = run_cli(capsys, "export", f"ckpt={run}", "format=safetensors", f"out={tmp_path / 'merged'}")
    assert code == 0, err
    info = json.loads((tmp_path / "merged" / "preprocess.json").read_text())
    assert info["max_abs_diff"] <= 1e-4 and "merged" in info["adapters"]
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any(".lora_" in k or "base_layer" in k for k in merged)  # the plain architecture
    base = weights(run)
    # a merged layer moved by exactly its adapters' product; an unadapted one not at all
    assert not torch.equal(merged["blocks.1.attn.qkv.weight"], base["blocks.1.attn.qkv.base_layer.weight"])
    assert torch.equal(merged["blocks.1.norm1.weight"], base["blocks.1.norm1.weight"])


def test_the_adapter_alone_loads_with_peft(lora_run, capsys, tmp_path):
    root, _ = lora_run
    code, err = run_cli(capsys, "export", f"ckpt={root / 'run'}", "merge=false", f"out={tmp_path}")
    assert code == 0, err
    info = json.loads((tmp_path / "preprocess.json").read_text())
    assert info["format"] == "peft" and info["max_abs_diff"] <= 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["modules_to_save"] == ["head"]
    code, err = run_cli(capsys, "export", f"ckpt={root / 'run'}", "merge=false", f"out={tmp_path}")
    assert code == 0, err


def test_merge_false_without_adapters_is_refused(capsys, tmp_path):
    train(compose(*VIT, "epochs=1", "max_steps=1", "experiment=none"), tmp_path / "plain")
    code, err = run_cli(capsys, "export", f"ckpt={tmp_path / 'plain'}", "merge=false")
    assert code == 2 and err[-1] == ("finetune: error: export: merge=false writes a run's adapters alone, and this "
                                     "run has none (peft=none)")


@pytest.mark.parametrize("kind", ["dora", "ia3", "loha", "lokr"])
def test_every_peft_kind_trains_its_adapters_alone(kind, tmp_path):
    cfg = compose(*VIT, f"peft={kind}", "epochs=2", "max_steps=4", "freeze=fixed", "experiment=none")
    start = {n: p.detach().clone() for n, p in setup(cfg, training=False).model.named_parameters()}
    train(cfg, tmp_path / "run")
    end = weights(tmp_path / "run")
    adapter = [n for n in start if ".default" in n]
    base = [n for n in start if n not in adapter and not n.startswith("head.")]
    assert adapter and any(not torch.equal(start[n], end[n]) for n in adapter)
    assert all(torch.equal(start[n], end[n]) for n in base)


@pytest.mark.slow
def test_the_benchmark_measures_what_adapters_save():
    """scripts/bench_peft.py's smoke run: each mode in its own process, LoRA training a share of the
    parameters with that share of the optimizer state, the head alone keeping almost no activations."""
    from finetune.bench.adapters import run_all, table

    rows = {r["mode"]: r for r in run_all("test_vit", batch=2, size=160, steps=1, rank=8)}
    full, lora, head = rows["full"], rows["lora"], rows["head"]
    assert head["trainable"] == 64 * 10 + 10 and lora["trainable"] == head["trainable"] + 6 * 8 * (
        (64 + 192) + (64 + 64) + (64 + 192) + (192 + 64))
    # AdamW: two moments of every trained parameter, 4 bytes each
    assert [r["optimizer_bytes"] for r in (full, lora, head)] == [8 * r["trainable"] for r in (full, lora, head)]
    assert head["activation_bytes"] < 0.05 * full["activation_bytes"] < lora["activation_bytes"]
    assert table([full, lora, head]).count("\n") == 4
    # a tiny model's step may leave the process's peak RSS where imports put it: no ratio, no error
    assert "0 MiB (n/a)" in table([{**full, "peak_rss_mib": 0.0}, lora, head])


def test_lora_on_a_hugging_face_vit_trains_merges_and_loads_with_peft(tmp_path, capsys):
    """model=hf with peft=lora: adapters on the transformers ViT's attention and MLP layers, its base fixed,
    the merged export and peft's format both reproducing the adapted model."""
    from test_hf_models import save_tiny, vit_processor

    path = save_tiny(tmp_path / "vit-tiny", "vit", vit_processor())
    cfg = compose("model=hf", f"model.name={path}", "data=synthetic", "data.image_size=32", "data.num_classes=2",
                  "data.train_size=16", "data.val_size=8", "batch_size=8", "progress=false", "device=cpu",
                  "experiment=lp_ft", "epochs=2", "peft=lora")
    groups = {g.name: g for g in setup(cfg, training=False).groups}
    # query, key, value, attention output, intermediate and output dense layers of each of the 2 layers
    assert [len(groups[n].adapters) // 2 for n in ("embeddings", "blocks_0", "blocks_1", "neck", "head")] == [
        0, 6, 6, 0, 0]
    start = {n: p.detach().clone() for n, p in setup(cfg, training=False).model.named_parameters()}
    train(cfg, tmp_path / "run")
    end = weights(tmp_path / "run")
    assert all(torch.equal(start[n], end[n]) for n in start if ".lora_" not in n and ".classifier." not in n)
    assert any(not torch.equal(start[n], end[n]) for n in start if ".lora_B." in n)
    for extra in ("format=onnx", "merge=false"):
        code, err = run_cli(capsys, "export", f"ckpt={tmp_path / 'run'}", extra, f"out={tmp_path / extra[:5]}")
        assert code == 0, err
        assert json.loads((tmp_path / extra[:5] / "preprocess.json").read_text())["max_abs_diff"] <= 1e-4


def test_the_head_epoch_of_lp_ft_with_adapters_runs_from_the_feature_cache(tmp_path, caplog):
    """The body, adapters included, is frozen while the head trains alone: its features are cached; once the
    adapters train, the cache is off (they change the features)."""
    caplog.set_level("INFO", logger="finetune")
    train(compose(*LORA, "epochs=2", "data.augment=false"), tmp_path / "run")
    assert "feature cache: on from epoch 0" in caplog.text
    assert "feature cache: off in epoch 1: groups below the head train" in caplog.text


def test_merge_false_keeps_trained_biases_or_refuses_a_format_that_cannot_hold_them(tmp_path, capsys):
    """peft.bias=all trains the adapted groups' biases: LoRA's format holds them and its export is checked
    from the base as it was before training; LoHa's holds none: refused (before: written without them, and
    the check, which loaded the trained biases first, could not notice)."""
    for kind in ("lora", "loha"):
        train(compose(*VIT, f"peft={kind}", "peft.bias=all", "epochs=1", "max_steps=2", "freeze=fixed",
                      "experiment=none"), tmp_path / kind)
    code, err = run_cli(capsys, "export", f"ckpt={tmp_path / 'lora'}", "merge=false", f"out={tmp_path / 'out'}")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "preprocess.json").read_text())["max_abs_diff"] <= 1e-4
    code, err = run_cli(capsys, "export", f"ckpt={tmp_path / 'loha'}", "merge=false", f"out={tmp_path / 'out2'}")
    assert code == 2 and err[-1].startswith("finetune: error: export: merge=false: peft's loha format holds no "
                                            "biases, and this run trained ") and "peft.bias=all" in err[-1], err


def test_the_adapter_check_starts_from_the_base_before_training(tmp_path, capsys, monkeypatch):
    """A trained bias the adapter file leaves out shows in the check (before: the check loaded the trained
    base first, so the difference could not show)."""
    from finetune.models import adapters

    train(compose(*VIT, "peft=lora", "peft.bias=all", "epochs=1", "max_steps=2", "freeze=fixed",
                  "experiment=none", "lr=0.05"), tmp_path / "run")
    real = adapters.peft_config
    monkeypatch.setattr(adapters, "peft_config", lambda cfg, modules, bias="none": real(cfg, modules, "none"))
    code, err = run_cli(capsys, "export", f"ckpt={tmp_path / 'run'}", "merge=false", f"out={tmp_path / 'out'}")
    assert code == 2 and "peft adapter" in err[-1], err
