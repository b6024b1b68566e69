"""Model architectures, all listed in one registry (:mod:`medpipe.models.registry`).

Study CNNs (``cnn``), torchvision ResNets (``resnet``), EfficientNet-Lite0/1/2 with offline ImageNet
weights (``efficientnet``), transfer heads (``transfer``, ``attention``), where pretrained weights come
from (``weights``) and a factory that builds a classifier from a checkpoint's spec (``factory``).

    from medpipe.models.registry import ARCHITECTURES, get_architecture
    from medpipe.models.factory import build_classifier

Import from the module that defines a name: a stage that needs one backbone (the classical features' frozen
EfficientNet-Lite0) does not load every architecture.
"""
