"""Model architectures, all listed in one registry (:mod:`medpipe.models.registry`).

Study CNNs (``cnn``), torchvision ResNets (``resnet``), EfficientNet-Lite0/1/2 with offline ImageNet
weights (``efficientnet``), transfer heads (``transfer``, ``attention``), where pretrained weights come
from (``weights``) and a factory that builds a classifier from a checkpoint's spec (``factory``).

    from medpipe.models import ARCHITECTURES, build_classifier, get_architecture
"""

from medpipe.models.errors import ArchitectureError, WeightsError
from medpipe.models.factory import build_classifier
from medpipe.models.registry import (
    ARCHITECTURES,
    Architecture,
    default_input_size,
    ensure_imagenet_weights,
    get_architecture,
    input_normalization,
    names,
)

__all__ = [
    "ARCHITECTURES", "Architecture", "ArchitectureError", "WeightsError", "build_classifier",
    "default_input_size", "ensure_imagenet_weights", "get_architecture", "input_normalization", "names",
]
