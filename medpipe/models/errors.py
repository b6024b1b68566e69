"""Expected failures of building a model: a wrong name or setting, or pretrained weights not to be had."""

from __future__ import annotations

from medpipe.errors import UserError


class ArchitectureError(UserError, ValueError):
    """An unknown architecture, head, family or U-Net encoder, or a setting the architecture does not take."""


class WeightsError(UserError, RuntimeError):
    """Pretrained weights cannot be found or do not fit the model."""
