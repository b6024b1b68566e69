"""Evaluation and review: test metrics with bootstrap CIs, calibration, TTA, plots, Grad-CAM, champion."""
