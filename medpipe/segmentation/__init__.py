"""Lesion segmentation: the U-Net (spec, network, training, predictor, stage), the classical pixel classifier
(model, stage), metrics and clean-up."""
