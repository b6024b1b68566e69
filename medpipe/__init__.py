"""medpipe: a reproducible DVC pipeline for 2D medical image classification and segmentation."""

__version__ = "0.1.0"
