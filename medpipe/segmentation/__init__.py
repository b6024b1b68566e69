"""Lesion segmentation: the U-Net spec and training, the classical pixel classifier, metrics, clean-up."""
