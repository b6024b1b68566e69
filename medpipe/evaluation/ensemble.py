"""A soft vote of the trained classifiers, its members and weights chosen on the validation split only.

Greedy forward selection with replacement (Caruana et al., "Ensemble selection from libraries of
models", ICML 2004): starting from an empty vote, each round adds the candidate whose addition gives
the best validation score of the averaged probabilities (ties broken by the lower log loss, then by
name); after ``rounds`` rounds the best prefix is kept, and each member's weight is how often it was
picked. A model that never helps gets weight 0, so the vote is never worse on validation than its best
member.

That in-sample validation score is optimistic: the weights were fitted to those very images. The
score that decides whether the ensemble becomes champion is therefore *cross-fitted*: the images are
cut into ``folds`` stratified folds, weights are chosen on all folds but one and scored on the held-out
one, and the held-out predictions are pooled into one score. Test images are never looked at.

With several training seeds the vote is built once per seed from that seed's deep models (and the
classical models, which train once), so its mean ± std over seeds compares with every other model's.

The vote's probabilities are temperature-scaled as its last step (``calibrate``, on by default): a mean of
a sharp network and a flat random forest is neither, so one temperature is fitted on the vote's
validation probabilities (``calibration.fit_temperature``, after the weights are chosen). It never changes
the predicted class, so the validation scores and the test accuracy are those of the plain vote; the
probabilities, their ECE and log loss are the calibrated ones, and ``ensemble.json`` carries the
temperature so that ``medpipe-predict`` serves the same probabilities.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from medpipe.evaluation.calibration import apply_temperature, fit_temperature
from medpipe.metrics import classification_metrics

NAME = "ensemble"            # its name among the models (headline, predictions, medpipe-predict --model)
FILE = "ensemble.json"       # its members and weights, under reports/evaluate/ (a model file for medpipe-predict)
_EPS = 1e-12


@dataclass(frozen=True, eq=False)
class SoftVote:
    """The members' weights (summing to 1), the vote's temperature and its validation scores."""

    weights: dict[str, float]
    temperature: float             # the weighted mean is scaled by it (1 = as it is)
    validation_score: float        # cross-fitted: what the champion choice reads
    validation_in_sample: float    # with the final weights, on the images that chose them (optimistic)
    cross_fitted: np.ndarray       # (N, C) the cross-fitted probabilities that validation_score scores

    def predict(self, proba: Mapping[str, np.ndarray]) -> np.ndarray:
        return apply_temperature(combine(proba, self.weights), self.temperature)


def combine(proba: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The weighted mean of the members' (N, C) probabilities."""
    total = sum(weights.values())
    return sum(w / total * np.asarray(proba[name], dtype=np.float64) for name, w in weights.items() if w > 0)


def score(labels: np.ndarray, proba: np.ndarray, metric: str) -> float:
    value = classification_metrics(labels, proba)[metric]
    return float("nan") if value is None else float(value)


def _rank(labels: np.ndarray, proba: np.ndarray, metric: str) -> tuple[float, float]:
    """How good a vote is: its ``metric`` (undefined counts as worst), then the lower log loss."""
    value = score(labels, proba, metric)
    log_loss = -np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], _EPS, 1.0)))
    return (-np.inf if np.isnan(value) else value), -float(log_loss)


def select(proba: Mapping[str, np.ndarray], labels: np.ndarray, metric: str, rounds: int) -> dict[str, float]:
    """Caruana's greedy selection with replacement: {member: weight} over every candidate, weights sum to 1."""
    names = sorted(proba)
    total = np.zeros_like(proba[names[0]], dtype=np.float64)
    picks: list[str] = []
    best, best_size = None, 0
    for size in range(1, rounds + 1):
        ranks = {name: _rank(labels, (total + proba[name]) / size, metric) for name in names}
        pick = max(names, key=lambda name: ranks[name])   # max keeps the first name among equals
        picks.append(pick)
        total = total + proba[pick]
        if best is None or ranks[pick] > best:
            best, best_size = ranks[pick], size
    counts = Counter(picks[:best_size])
    return {name: counts.get(name, 0) / best_size for name in names}


def cross_fitted_proba(proba: Mapping[str, np.ndarray], labels: np.ndarray, metric: str, rounds: int,
                       folds: int, seed: int) -> np.ndarray:
    """The vote's (N, C) probabilities with every image voted by weights chosen without it (plain, no temperature;
    in-sample only where a class has a single image and no image can be held out)."""
    counts = np.bincount(labels)
    k = min(folds, int(counts[counts > 0].min()))
    if k < 2:
        return combine(proba, select(proba, labels, metric, rounds))
    held_out = np.zeros_like(np.asarray(next(iter(proba.values())), dtype=np.float64))
    for fit_idx, out_idx in StratifiedKFold(k, shuffle=True, random_state=seed).split(labels, labels):
        weights = select({n: p[fit_idx] for n, p in proba.items()}, labels[fit_idx], metric, rounds)
        held_out[out_idx] = combine({n: p[out_idx] for n, p in proba.items()}, weights)
    return held_out


def soft_vote(proba: Mapping[str, np.ndarray], labels: np.ndarray, metric: str, rounds: int, folds: int,
              seed: int, calibrate: bool = True) -> SoftVote:
    """The vote of ``proba`` (member -> validation probabilities (N, C)) fitted to ``labels``."""
    labels = np.asarray(labels)
    proba = {name: np.asarray(p, dtype=np.float64) for name, p in proba.items()}
    weights = {n: round(w, 6) for n, w in select(proba, labels, metric, rounds).items()}
    voted = combine(proba, weights)
    held_out = cross_fitted_proba(proba, labels, metric, rounds, folds, seed)
    return SoftVote(
        weights=weights,
        temperature=round(fit_temperature(voted, labels), 6) if calibrate else 1.0,
        validation_score=score(labels, held_out, metric),
        validation_in_sample=score(labels, voted, metric),
        cross_fitted=held_out,
    )
