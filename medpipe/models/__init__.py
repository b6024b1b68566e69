"""Model architectures: study CNNs (``cnn``), torchvision ResNets (``resnet``), EfficientNet-Lite0 with
offline ImageNet weights (``efficientnet``), the attention head (``attention``) and a factory (``factory``)."""
