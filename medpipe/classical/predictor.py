"""The classical classifiers as ``train_classical`` saves them: ``models/classical/<model>.joblib``.

Each file is a pickled :class:`~medpipe.classical.models.ImageClassifier` (features -> scaling -> classifier)
holding the feature extractors of :mod:`medpipe.classical.features`. Unpickling imports those classes and
``predict_proba`` runs their code: this module imports them, so whatever loads a classical model (the
``evaluate`` stage, MLflow) depends on them.
"""

from __future__ import annotations

from pathlib import Path

import joblib

from medpipe.classical.models import ImageClassifier   # and, through it, medpipe.classical.features


def load(path: str | Path) -> ImageClassifier:
    """A classical classifier from its ``.joblib`` file (the loader ``train_classical`` names in MLflow)."""
    return joblib.load(path)
