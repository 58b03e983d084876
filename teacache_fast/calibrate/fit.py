"""The fit: (input rel-L1, output rel-L1) pairs, ``numpy.polyfit`` with checks
and R^2, and the plot of a fit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..preset_json import MAX_DEGREE
from .recording import CalibrationError, Recording

__all__ = ["relative_l1", "pairs", "PolyFit", "fit_polynomial", "plot_fit", "step_window",
           "CONVENTIONS", "convention_points", "select_degree", "sign_over"]

# How the pairs become fitted points: every (run, branch, step) pair, as the
# official scripts fit (the default), or one point per step, the mean over
# runs and branches, as other projects do (only ~num_steps points).
CONVENTIONS = ("all-pairs", "step-means")


def step_window(step_range, num_steps: int) -> Tuple[int, int]:
    """Clip a [start, end) step range to the steps that have a previous step (1..n-1)."""
    start, end = (1, num_steps) if step_range is None else step_range
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end <= start:
        raise CalibrationError(f"step_range must be (start, end) ints with 0 <= start < end, "
                               f"got {step_range!r}")
    start, end = max(start, 1), min(end, num_steps)
    if end <= start:
        raise CalibrationError(f"step_range {step_range!r} holds no step with a previous step "
                               f"(steps 1..{num_steps - 1} of {num_steps})")
    return start, end


def relative_l1(partials: np.ndarray) -> np.ndarray:
    """``num / den`` in float32, the division the decision op performs."""
    p = np.asarray(partials, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return p[..., 0] / p[..., 1]


def pairs(recording: Recording, step_range=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, step) float64 arrays of (input rel-L1, output rel-L1) for the fitted steps.

    Raises CalibrationError on mismatched branches or a non-finite value, naming
    the run, branch and step.
    """
    recording.check()
    start, end = step_window(step_range, recording.num_steps)
    xs, ys, steps = [], [], []
    for r, b in recording.traces():
        x = relative_l1(recording.partials[r][b][start:end]).astype(np.float64)
        y = np.asarray(recording.out_rel[r][b][start:end], dtype=np.float64)
        for name, v in (("input (indicator)", x), ("output", y)):
            bad = np.flatnonzero(~np.isfinite(v))
            if bad.size:
                s = start + int(bad[0])
                raise CalibrationError(
                    f"NaN/inf in the recordings: {name} relative L1 of run {r}, branch {b}, step {s} "
                    f"is {v[bad[0]]} ({bad.size} such value(s) in this run/branch); a zero previous "
                    "tensor or a diverging model gives this. Check the model in fp32, or exclude those "
                    "steps with step_range")
        xs.append(x)
        ys.append(y)
        steps.append(np.arange(start, end))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(steps)



@dataclass(frozen=True)
class PolyFit:
    """A fitted polynomial: coefficients highest power first (``numpy.poly1d`` order)."""

    coefficients: Tuple[float, ...]
    r2: Optional[float]  # None when y is constant (R^2 undefined)
    num_pairs: int

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    def __call__(self, x):
        return np.polyval(self.coefficients, x)


def _check_degree(degree) -> int:
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or not 0 <= degree <= MAX_DEGREE:
        raise CalibrationError(f"degree must be an int in 0..{MAX_DEGREE} (the decision op takes "
                               f"at most {MAX_DEGREE + 1} coefficients), got {degree!r}")
    return int(degree)


def fit_polynomial(x, y, degree: int = 4) -> PolyFit:
    """``numpy.polyfit(x, y, degree)`` with checks, and the fit's R^2.

    Errors: non-finite values, fewer pairs than ``degree + 1``, fewer distinct
    x values than ``degree + 1`` (a constant input determines no curve).
    """
    degree = _check_degree(degree)
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise CalibrationError(f"x and y must have the same length, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CalibrationError("NaN/inf in the pairs: x has "
                               f"{int((~np.isfinite(x)).sum())}, y has {int((~np.isfinite(y)).sum())} "
                               "non-finite value(s)")
    if x.size < degree + 1:
        raise CalibrationError(f"too few pairs for degree {degree}: got {x.size}, need at least "
                               f"{degree + 1}; record more runs or steps, or lower the degree")
    distinct = np.unique(x).size
    if distinct < degree + 1:
        what = "the input relative L1 is constant" if distinct == 1 else \
            f"the input relative L1 takes only {distinct} distinct value(s)"
        raise CalibrationError(
            f"constant input: {what}, which cannot determine a degree-{degree} polynomial "
            f"(needs {degree + 1} distinct values). The indicator does not change between steps: "
            "check that the model's input really depends on the timestep, or lower the degree")
    coefficients = np.polyfit(x, y, degree)
    residuals = y - np.polyval(coefficients, x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = None if ss_tot == 0.0 else 1.0 - float(np.sum(residuals ** 2)) / ss_tot
    return PolyFit(tuple(float(c) for c in coefficients), r2, int(x.size))


def convention_points(x, y, steps, convention: str = "all-pairs"):
    """(x, y, steps) as fitted under ``convention`` (see :data:`CONVENTIONS`)."""
    if convention not in CONVENTIONS:
        raise CalibrationError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    x, y, steps = (np.asarray(a) for a in (x, y, steps))
    if convention == "all-pairs":
        return x, y, steps
    uniq = np.unique(steps)
    xm = np.array([x[steps == s].mean() for s in uniq], dtype=np.float64)
    ym = np.array([y[steps == s].mean() for s in uniq], dtype=np.float64)
    return xm, ym, uniq


def _folds(n: int, k: int):
    """Interleaved held-out folds over points sorted by x (each fold spans the range)."""
    return [np.arange(i, n, k) for i in range(k)]


def select_degree(x, y, max_degree: int = 4, folds: int = 5) -> Tuple[int, list]:
    """The degree (1..max_degree, default 4 as the published sets) with the lowest
    held-out error, and the errors.

    k-fold cross-validation on the points sorted by x (interleaved folds, so
    each fold spans the whole range; deterministic). The smallest degree whose
    mean held-out squared error is within 5% of the best (or below 1e-10 of
    y's variance: clean data) wins, so clean data of degree d picks d.
    Returns (degree, [(degree, held-out MSE), ...]).
    """
    max_degree = _check_degree(max_degree)
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    k = min(folds, x.size)
    errors = []
    for d in range(1, max_degree + 1):
        sq = []
        for held in _folds(x.size, k):
            keep = np.setdiff1d(np.arange(x.size), held)
            if np.unique(x[keep]).size < d + 1:
                sq = None
                break
            c = np.polyfit(x[keep], y[keep], d)
            sq.append(np.mean((y[held] - np.polyval(c, x[held])) ** 2))
        if sq is None:
            break
        errors.append((d, float(np.mean(sq))))
    if not errors:
        raise CalibrationError(f"too few distinct pairs ({np.unique(x).size}) to choose a degree by "
                               "held-out error; record more runs or steps, or give the degree")
    best = min(e for _, e in errors)
    floor = max(best * 1.05, 1e-10 * float(np.var(y)))
    return next(d for d, e in errors if e <= floor), errors


def sign_over(coefficients, low: float, high: float, points: int = 257) -> str:
    """"positive", "negative" or "mixed": the polynomial's sign over [low, high]."""
    v = np.polyval(coefficients, np.linspace(low, high, points))
    if np.all(v > 0):
        return "positive"
    if np.all(v < 0):
        return "negative"
    return "mixed"


def plot_fit(path, x, y, steps, fit: PolyFit, title: str = "") -> None:
    """Scatter of (x, y) coloured by step, the fitted curve, and residuals below."""
    # The Agg canvas directly (no pyplot): no GUI backend, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 7), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    points = top.scatter(x, y, c=steps, s=10, cmap="viridis", alpha=0.8)
    fig.colorbar(points, ax=[top, bottom], label="step")
    grid = np.linspace(float(np.min(x)), float(np.max(x)), 200)
    r2 = "undefined" if fit.r2 is None else f"{fit.r2:.4f}"
    top.plot(grid, fit(grid), color="crimson", label=f"degree {fit.degree} fit, R^2 = {r2}")
    top.set_ylabel("output relative L1")
    top.set_title(f"{title}: {fit.num_pairs} pairs" if title else f"{fit.num_pairs} pairs")
    top.legend(loc="upper left")
    bottom.scatter(x, y - fit(x), c=steps, s=8, cmap="viridis", alpha=0.8)
    bottom.axhline(0.0, color="crimson", linewidth=1)
    bottom.set_xlabel("input (modulated) relative L1")
    bottom.set_ylabel("residual")
    fig.savefig(path, dpi=110)
