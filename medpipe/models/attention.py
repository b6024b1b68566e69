"""The attention head of the brain-tumour study, on the last feature map of a backbone.

Channel attention (shared MLP over average- and max-pooled channels) and spatial attention (7x7
convolution over channel-wise average and max) reweight the feature map; a skip connection adds the
input back; a 1D-CNN branch reads the map as a sequence of H*W positions with C channels; the pooled
map and the pooled sequence features are concatenated, dropped out and classified. Label smoothing
lives in the loss (``train.label_smoothing``).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(stats))


class AttentionHead(nn.Module):
    """(B, C, H, W) feature map -> (B, num_classes) logits."""

    def __init__(self, channels: int, num_classes: int, seq_channels: int = 256, dropout: float = 0.3,
                 reduction: int = 16) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()
        self.sequence = nn.Sequential(
            nn.Conv1d(channels, seq_channels, 3, padding=1, bias=False), nn.BatchNorm1d(seq_channels),
            nn.ReLU(inplace=True),
            nn.Conv1d(seq_channels, seq_channels, 3, padding=1, bias=False), nn.BatchNorm1d(seq_channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels + seq_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = self.spatial(self.channel(x)) + x           # skip connection
        pooled = attended.mean(dim=(2, 3))                       # (B, C)
        seq = self.sequence(attended.flatten(2)).mean(dim=2)     # (B, S): 1D CNN over the H*W positions
        return self.fc(self.dropout(torch.cat([pooled, seq], dim=1)))
