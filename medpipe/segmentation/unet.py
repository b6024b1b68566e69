"""U-Net (Ronneberger et al. 2015) for binary segmentation, from scratch or on an EfficientNet-Lite0 encoder.

Both variants map a normalised (N, 3, H, W) batch to (N, 1, H, W) lesion logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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


class EfficientNetUNet(nn.Module):
    """U-Net decoder on the first ``depth + 1`` stages of EfficientNet-Lite0 (strides 2 ... 2**(depth+1)).

    The encoder is timm's ``tf_efficientnet_lite0`` in ``features_only`` mode; its weights are copied
    from ``medpipe.models.efficientnet.imagenet_state_dict()`` (ImageNet, read from the local weights
    package, no download) when ``pretrained``; such an encoder expects inputs normalised with mean = std = 0.5.
    """

    def __init__(self, depth: int = 4, base_width: int = 16, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        depth = min(depth, 4)
        self.encoder = timm.create_model(
            "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=tuple(range(depth + 1))
        )
        if pretrained:
            load_efficientnet_lite0_encoder(self.encoder)
        chans = self.encoder.feature_info.channels()  # [16, 24, 40, 112, 320][: depth + 1]
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


def load_efficientnet_lite0_encoder(encoder: nn.Module) -> None:
    """Copy ImageNet weights into a ``features_only`` EfficientNet-Lite0; every encoder key must be found."""
    from medpipe.models.efficientnet import imagenet_state_dict  # timm key names, read offline

    source = imagenet_state_dict()
    target = encoder.state_dict()
    missing = [k for k in target if k not in source]
    if missing:
        raise RuntimeError(f"EfficientNet-Lite0 weights lack {len(missing)} encoder keys, e.g. {missing[:3]}")
    encoder.load_state_dict({k: source[k] for k in target})


def build_unet(depth: int, base_width: int, encoder: str = "scratch", pretrained: bool = True) -> nn.Module:
    if encoder == "scratch":
        return UNet(3, depth, base_width)
    if encoder == "efficientnet_lite0":
        return EfficientNetUNet(depth, base_width, pretrained)
    raise ValueError(f"unknown U-Net encoder {encoder!r}: expected 'scratch' or 'efficientnet_lite0'")
