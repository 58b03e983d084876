"""CalibrationResult: a fit, the recording it came from, and what it predicts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np

from .._version import __version__
from ..models.base import first_and_last
from ..preset_json import save_preset_json
from .fit import (PolyFit, convention_points, fit_polynomial, pairs, plot_fit, select_degree,
                  sign_over, step_window)
from .recording import CalibrationError, Recording
from .replay import ForcedRule, default_thresholds, forced_mask, replay_decisions

__all__ = ["CalibrationResult", "fit_recording"]


@dataclass
class CalibrationResult:
    """A fitted polynomial, the recordings it came from, and what they predict."""

    recording: Recording
    fit: PolyFit
    step_range: Tuple[int, int]
    variant: Optional[str] = None
    forced: ForcedRule = first_and_last
    max_consecutive_skips: Optional[int] = None
    backend: Optional[str] = None  # the cache's forced backend, if any: the replay uses it too
    convention: str = "all-pairs"  # how the pairs became fitted points (fit.CONVENTIONS)
    degree_errors: Optional[list] = None  # [(degree, held-out MSE)] when the degree was chosen

    @property
    def coefficients(self) -> List[float]:
        return list(self.fit.coefficients)

    @property
    def r2(self) -> Optional[float]:
        return self.fit.r2

    def pairs(self):
        return pairs(self.recording, self.step_range)

    def fitted_range(self) -> List[float]:
        """[low, high] of the indicator values the fit saw; the wrapper warns outside it."""
        x, _, _ = self.pairs()
        return [float(np.min(x)), float(np.max(x))]

    def negative_in_range(self) -> bool:
        """Whether the fitted polynomial goes below 0 inside the fitted range."""
        low, high = self.fitted_range()
        return bool(np.min(self.fit(np.linspace(low, high, 257))) < 0)

    def sign_in_range(self) -> str:
        """"positive", "negative" or "mixed" over the fitted range."""
        return sign_over(self.coefficients, *self.fitted_range())

    def predict(self, threshold: float) -> np.ndarray:
        """Compute flags (runs, branches, steps) replayed at ``threshold``."""
        return replay_decisions(self.recording, self.coefficients, threshold, forced=self.forced,
                                max_consecutive_skips=self.max_consecutive_skips, backend=self.backend)

    def threshold_table(self, thresholds: Optional[Iterable[float]] = None) -> List[dict]:
        """Per threshold, the computed steps a cached run takes on the recorded runs.

        ``computed_steps`` is the mean over runs and branches (``min``/``max``
        alongside); ``speedup`` is num_steps / mean, the block stack's share.
        """
        n = self.recording.num_steps
        if thresholds is None:
            x, _, _ = self.pairs()
            thresholds = default_thresholds(self.fit(x), n)
        rows = []
        for t in thresholds:
            counts = self.predict(t).sum(axis=-1)  # (runs, branches)
            mean = float(counts.mean())
            rows.append({"threshold": float(t), "computed_steps": mean,
                         "min_computed": int(counts.min()), "max_computed": int(counts.max()),
                         "num_steps": n, "speedup": n / mean})
        return rows

    def format_table(self, thresholds: Optional[Iterable[float]] = None) -> str:
        lines = [f"{'threshold':>10} {'computed':>9} {'min':>4} {'max':>4} {'of':>4} {'speedup':>8}"]
        for row in self.threshold_table(thresholds):
            lines.append(f"{row['threshold']:>10.4g} {row['computed_steps']:>9.2f} {row['min_computed']:>4} "
                         f"{row['max_computed']:>4} {row['num_steps']:>4} {row['speedup']:>7.2f}x")
        return "\n".join(lines)

    def to_dict(self, thresholds: Optional[Iterable[float]] = None) -> dict:
        return {
            "model_class": self.recording.model_class,
            "variant": self.variant,
            "coefficients": self.coefficients,
            "degree": self.fit.degree,
            "num_pairs": self.fit.num_pairs,
            "r2": self.fit.r2,
            "fitted_range": self.fitted_range(),
            "negative_in_range": self.negative_in_range(),
            "sign_in_range": self.sign_in_range(),
            "convention": self.convention,
            "degree_errors": [[d, e] for d, e in self.degree_errors] if self.degree_errors else None,
            "step_range": list(self.step_range),
            "num_steps": self.recording.num_steps,
            "num_runs": self.recording.num_runs,
            "branches": self.recording.branches,
            "forced_steps": np.flatnonzero(forced_mask(self.forced, self.recording.num_steps)).tolist(),
            "library_version": __version__,
            "thresholds": self.threshold_table(thresholds),
        }

    def to_json(self, path, thresholds: Optional[Iterable[float]] = None) -> None:
        """Write the preset file that ``apply_teacache(..., preset=path)`` reads."""
        save_preset_json(self.to_dict(thresholds), path)

    def plot(self, path) -> None:
        """PNG: the pairs coloured by step with the fitted curve, and the residuals."""
        x, y, steps = self.pairs()
        title = self.recording.model_class + (f" ({self.variant})" if self.variant else "")
        plot_fit(path, x, y, steps, self.fit, title=title)


def fit_recording(recording: Recording, degree: Union[int, str] = 4, *, step_range=None,
                  variant=None, forced: ForcedRule = first_and_last,
                  max_consecutive_skips: Optional[int] = None,
                  backend: Optional[str] = None, convention: str = "all-pairs") -> CalibrationResult:
    """Fit a polynomial to a recording (e.g. one loaded with ``Recording.load``).

    degree: an int, or "auto" (the degree with the lowest held-out error,
    :func:`~teacache_fast.calibrate.fit.select_degree`). convention:
    "all-pairs" (every run, branch and step, as the official scripts) or
    "step-means" (one point per step, the mean over runs and branches).
    """
    window = step_window(step_range, recording.num_steps)
    x, y, steps = convention_points(*pairs(recording, window), convention)
    errors = None
    if degree == "auto":
        degree, errors = select_degree(x, y)
    elif isinstance(degree, str):
        raise CalibrationError(f"degree must be an int or 'auto', got {degree!r}")
    return CalibrationResult(recording, fit_polynomial(x, y, degree), window, variant, forced,
                             max_consecutive_skips, backend, convention, errors)
