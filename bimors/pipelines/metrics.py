"""Classification metrics, always over every tile given (never a subsample), with the counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassificationReport:
    classnames: list[str]
    confusion: np.ndarray  # [true, predicted] counts

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    def per_class(self) -> dict[str, tuple[float, int]]:
        """class -> (accuracy, number of tiles); NaN accuracy for a class with no tiles."""
        totals = self.confusion.sum(axis=1)
        hits = np.diag(self.confusion)
        return {
            name: (float(hits[i] / totals[i]) if totals[i] else float("nan"), int(totals[i]))
            for i, name in enumerate(self.classnames)
        }

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "count": self.count, "correct": self.correct}


def classification_report(labels: np.ndarray, predictions: np.ndarray, classnames: list[str]) -> ClassificationReport:
    n = len(classnames)
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if len(labels) and (labels.min() < 0 or labels.max() >= n or predictions.min() < 0 or predictions.max() >= n):
        raise ValueError(f"labels and predictions must lie in 0..{n - 1}")
    confusion = np.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)
    return ClassificationReport(list(classnames), confusion)


def harmonic_mean(a: float, b: float) -> float:
    """The base-to-new protocol's HM; 0 when either side is 0."""
    return 2 * a * b / (a + b) if a + b > 0 else 0.0
