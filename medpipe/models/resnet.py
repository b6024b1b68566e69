"""torchvision's ResNet-18/34/50 as transfer-learning backbones.

``weights`` = ``imagenet`` (torchvision's weights API: the file in torch's hub cache, downloaded once where
the internet is reachable; offline it fails fast with a message saying where to put the file), ``none``
(random initialisation) or the path of a state dict. ImageNet inputs are normalised with
``IMAGENET_MEAN``/``IMAGENET_STD``.

The registry (:mod:`medpipe.models.registry`) builds these.
"""

from __future__ import annotations

from torch import nn

from medpipe.models.errors import WeightsError
from medpipe.models.transfer import FeatureClassifier
from medpipe.models.weights import load_state_file, resolve_weights, torchvision_imagenet

RESNETS = ("resnet18", "resnet34", "resnet50")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NATIVE_INPUT_SIZE = 224
MIN_INPUT_SIZE = 32  # stride 32: a 1x1 last feature map


class ResNetBody(nn.Sequential):
    """Stem and the four residual layers; the last feature map has stride 32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)

    def groups(self) -> list[nn.Module]:
        return [nn.ModuleList(list(self)[:4]), *list(self)[4:]]

    @property
    def gradcam_layer(self) -> nn.Module:
        return self[-1]  # layer4


def torchvision_resnet(arch: str, weights: str) -> nn.Module:
    """torchvision's ``arch`` with ``weights`` = ``imagenet``, ``none`` or a state-dict path (any ``fc``)."""
    from torchvision import models

    builder = getattr(models, arch)
    source = resolve_weights(weights)
    if source == "none":
        return builder(weights=None)
    if source == "imagenet":
        return builder(weights=torchvision_imagenet(arch))
    net = builder(weights=None)
    missing, unexpected = net.load_state_dict(load_state_file(source), strict=False)
    if [k for k in missing if not k.startswith("fc.")] or unexpected:
        raise WeightsError(f"{source} does not fit {arch}: missing {missing[:5]}..., "
                           f"unexpected {unexpected[:5]}...")
    return net


def build_resnet(arch: str, num_classes: int, input_size: int | None, dropout: float, weights: str,
                 head: str) -> FeatureClassifier:
    """The registry's builder: ResNet ``arch`` body, a new ``head``; any ``input_size`` (global pooling)."""
    net = torchvision_resnet(arch, weights)
    return FeatureClassifier(ResNetBody(net), net.fc.in_features, num_classes, head, dropout)
