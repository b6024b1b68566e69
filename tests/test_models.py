"""Architectures: the study CNNs, ResNet/EfficientNet transfer models, the attention head, and the
offline EfficientNet-Lite0 ImageNet weights (key mapping and a real cat photo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpipe.models import efficientnet
from medpipe.models.attention import AttentionHead
from medpipe.models.cnn import CNNS, BrainMRICNN, TwoConvCNN
from medpipe.models.factory import build_classifier
from medpipe.models.resnet import WeightsError, build_transfer


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_two_conv_cnn_matches_the_study_parameter_count():
    assert trainable(TwoConvCNN(6, input_size=28)) == 421_894  # "about 422k parameters on 28x28x3 with 6 classes"



def test_brain_mri_cnn_layout():
    model = BrainMRICNN(2, input_size=240)
    conv = model.features[1]
    assert conv.kernel_size == (7, 7) and conv.stride == (1, 1) and conv.out_channels == 32
    # 240 + 2 * 2 padding - 7 + 1 = 238; two 4x4 max pools with stride 4: 238 -> 59 -> 14
    assert model.features(torch.zeros(1, 3, 240, 240)).shape == (1, 32, 14, 14)
    assert model.classifier[-1].in_features == 32 * 14 * 14


@pytest.mark.parametrize("arch", sorted(CNNS))
@pytest.mark.parametrize("size", [28, 64])
def test_cnns_give_logits_for_any_input_size(arch, size):
    model = build_classifier({"arch": arch, "num_classes": 4, "input_size": size})
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 4)
    out.sum().backward()
    assert isinstance(model.gradcam_layer, torch.nn.Module)


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
    model = build_transfer("resnet18", 3, "none", head)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert len(model.groups()) == 5 and model.gradcam_layer is model.body[-1]


def test_resnet_weights_from_a_state_dict_file(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    model = build_transfer("resnet18", 3, str(tmp_path / "r18.pt"))
    assert torch.equal(model.body[0].weight, source.conv1.weight)
    with pytest.raises(WeightsError, match="neither"):
        build_transfer("resnet18", 3, str(tmp_path / "missing.pt"))


def test_resnet_imagenet_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    """No cached file and no network: a clear message saying where to put the file, not a hang."""
    import socket

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: offline())
    with pytest.raises(WeightsError, match=r"Offline, copy that file to .*resnet18-f37072fd\.pth"):
        build_transfer("resnet18", 3, "imagenet")


# ---------------------------------------------------------------- EfficientNet-Lite0 offline weights

def test_key_mapping_follows_timm_stage_layout():
    state = torch.load(efficientnet.weights_file(), map_location="cpu", weights_only=True)
    mapped = efficientnet.map_lite0_keys(state)
    assert len(mapped) == len(state)
    assert mapped["blocks.0.0.conv_dw.weight"] is state["_blocks.0._depthwise_conv.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is state["_blocks.0._project_conv.weight"]  # no expansion in block 0
    assert mapped["blocks.1.0.conv_pw.weight"] is state["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.0.bn3.weight"] is state["_blocks.1._bn2.weight"]
    assert mapped["blocks.6.0.conv_pwl.weight"] is state["_blocks.15._project_conv.weight"]  # 16 blocks, 7 stages
    assert mapped["bn1.weight"] is state["_bn0.weight"] and mapped["bn2.weight"] is state["_bn1.weight"]
    assert mapped["classifier.weight"] is state["_fc.weight"]
    with pytest.raises(efficientnet.WeightsError):
        efficientnet.map_lite0_keys({"_blocks.16._bn0.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def imagenet_lite0():
    return efficientnet.efficientnet_lite0(1000).eval()


def _imagenet_top5(model, image: np.ndarray) -> list[int]:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        return model(x).topk(5).indices[0].tolist()


def test_pretrained_lite0_recognises_a_cat_and_an_espresso(imagenet_lite0):
    from skimage import data

    cat = _imagenet_top5(imagenet_lite0, data.chelsea())
    assert cat[0] in range(281, 286) and sum(c in range(281, 286) for c in cat) >= 3  # ImageNet cats 281-285
    assert _imagenet_top5(imagenet_lite0, data.coffee())[0] == 967  # espresso


def test_lite0_heads(imagenet_lite0):
    features = efficientnet.efficientnet_lite0(0)
    assert features(torch.zeros(2, 3, 64, 64)).shape == (2, efficientnet.FEATURES)
    assert torch.equal(features.conv_stem.weight, imagenet_lite0.conv_stem.weight)
    three = efficientnet.efficientnet_lite0(3)
    assert three.classifier.out_features == 3 and torch.all(three.classifier.bias == 0)
    assert 0.005 < three.classifier.weight.std().item() < 0.015  # normal(0, 0.01), not timm's uniform
    assert torch.equal(three.blocks[3][0].conv_pw.weight, imagenet_lite0.blocks[3][0].conv_pw.weight)
    random = efficientnet.efficientnet_lite0(3, pretrained=False)
    assert not torch.equal(random.conv_stem.weight, imagenet_lite0.conv_stem.weight)


def test_lite0_transfer_model_groups_cover_the_backbone():
    model = build_transfer("efficientnet_lite0", 3, "imagenet")
    groups = model.groups()
    assert len(groups) == 9  # stem, 7 stages, head convolution
    backbone = {id(p) for g in groups for p in g.parameters()}
    assert backbone == {id(p) for p in model.body.parameters()}
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_gradcam_layer_sees_the_last_feature_map(arch):
    model = build_transfer(arch, 3, "none").eval()
    seen = []
    model.gradcam_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(torch.zeros(1, 3, 64, 64))
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][-1] == 2  # called once, 64 px / 32 = 2
