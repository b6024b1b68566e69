"""Where tensors run: the device ``train.device`` names, bf16 autocast, moving batches, batched prediction.

Prediction needs these and nothing of the training loop: the saved classifiers and U-Nets
(:mod:`medpipe.training.predictor`, :mod:`medpipe.segmentation.predictor`) predict through here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware: a CUDA GPU that supports it, a CPU with AVX-512 BF16 or AMX.
    Elsewhere (AVX2 CPUs: most laptops and CI runners) bf16 is emulated, and a ResNet-18 step at 64 px ran 11x
    slower than in fp32 (docs/experiments.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(device: torch.device, precision: str) -> str:
    """``train.precision``: ``auto`` is bf16 where :func:`native_bf16`, else fp32; ``bf16`` and ``fp32`` as named."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA when ``precision`` is ``bf16`` (or ``auto`` on native bf16), otherwise nothing."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(value: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move a tensor (or a tuple/list/dict of them) to ``device``; 4-D float tensors optionally NHWC in memory."""
    if isinstance(value, torch.Tensor):
        value = value.to(device, non_blocking=True)
        if channels_last and value.ndim == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, channels_last) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, channels_last) for k, v in value.items()}
    return value


@torch.inference_mode()
def predict_batches(model: nn.Module, batches: Iterable, device: torch.device | None = None,
                    channels_last: bool = True) -> tuple[torch.Tensor, Any]:
    """Concatenate ``model`` outputs (as float32 on CPU) and the targets over ``batches``."""
    device = device or next(model.parameters()).device
    outputs, targets = [], []
    for inputs, target in batches:
        outputs.append(model(to_device(inputs, device, channels_last)).float().cpu())
        targets.append(target)
    out = torch.cat(outputs)
    if targets and isinstance(targets[0], torch.Tensor):
        return out, torch.cat(targets)
    return out, targets
