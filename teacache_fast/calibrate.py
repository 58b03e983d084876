"""Fit a model's TeaCache polynomial from recorded runs.

TeaCache estimates how much the block stack's output changes between two
steps from how much its (timestep-modulated) input changed: ``poly(rel_in)``.
The reference project fits that polynomial with ``numpy.polyfit(x, y, 4)``
where x is the relative L1 of the modulated input and y the relative L1 of the
output between consecutive steps, over every step of a few dozen generations
(ali-vilab/TeaCache issue #2). This module does the same for any model:

1. record: wrap the model like ``apply_teacache`` but never skip; at every call
   keep the indicator's partial sums (exactly what the cache computes, through
   the same ops) and the relative L1 of the block stack's output against the
   previous call of the same branch;
2. fit: ``numpy.polyfit`` on the pairs (degree configurable), with R^2;
3. replay: run the decision op on the recorded indicators for a list of
   thresholds, predicting which steps a cached run computes (no model runs).

``calibrate(model, run_fn, runs=...)`` does all three and returns a
:class:`CalibrationResult` with ``.to_json(path)``, ``.plot(path)`` and
``.threshold_table()``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import ops
from ._version import __version__
from .models.base import first_and_last
from .preset_json import MAX_DEGREE, load_preset_json, save_preset_json  # noqa: F401 (re-export)

__all__ = [
    "CalibrationError", "Recording", "Recorder", "PolyFit", "CalibrationResult",
    "fit_polynomial", "fit_recording", "replay_decisions", "calibrate", "record", "pairs",
    "relative_l1", "forced_mask", "default_thresholds", "plot_fit", "load_preset_json",
]


class CalibrationError(ValueError):
    """The recordings cannot give a meaningful fit (too few pairs, NaN, ...)."""


# --------------------------------------------------------------------------- recordings

@dataclass
class Recording:
    """What one calibration recorded: per run, per CFG branch, per step.

    ``partials[r][b]`` is a float32 ``(num_steps, 2)`` array of the indicator's
    ``[sum|m - prev|, sum|prev|]`` at each call of branch ``b`` in run ``r``
    (row 0 compares with the cache's zero-initialised prev, so its ratio is
    not finite; it is never fitted and the first step is forced); ``out_rel[r][b]``
    is the float64 relative L1 of the block stack's output against the
    previous call of the same branch (row 0 is NaN).
    """

    partials: List[Dict[int, np.ndarray]] = field(default_factory=list)
    out_rel: List[Dict[int, np.ndarray]] = field(default_factory=list)
    model_class: str = "unknown"
    device: str = "cpu"  # where the model ran: the replay decides there, with the same kernels

    @property
    def num_runs(self) -> int:
        return len(self.partials)

    @property
    def branches(self) -> List[int]:
        return sorted(self.partials[0]) if self.partials else []

    @property
    def num_steps(self) -> int:
        self.check()
        return len(next(iter(self.partials[0].values())))

    def check(self) -> None:
        """Raise CalibrationError unless every run has the same branches and step counts."""
        if not self.partials:
            raise CalibrationError("the recording is empty: run_fn never called the model "
                                   "(or calibrate got runs=0)")
        if len(self.out_rel) != len(self.partials):
            raise CalibrationError(f"mismatched recording: {len(self.partials)} runs of inputs, "
                                   f"{len(self.out_rel)} of outputs")
        ref_branches = sorted(self.partials[0])
        ref_steps = len(self.partials[0][ref_branches[0]]) if ref_branches else 0
        for r, (p_run, o_run) in enumerate(zip(self.partials, self.out_rel)):
            if sorted(p_run) != ref_branches or sorted(o_run) != ref_branches:
                raise CalibrationError(
                    f"mismatched branches: run 0 has branches {ref_branches}, run {r} has "
                    f"{sorted(p_run)} (inputs) / {sorted(o_run)} (outputs); every run must call "
                    "the model with the same CFG branches")
            for b in ref_branches:
                n_in, n_out = len(p_run[b]), len(o_run[b])
                if n_in != ref_steps or n_out != ref_steps:
                    raise CalibrationError(
                        f"mismatched branches: run {r} branch {b} has {n_in} input / {n_out} output "
                        f"steps, expected {ref_steps} (run 0 branch {ref_branches[0]}); every branch "
                        "must be called once per step for the same number of steps")
        if ref_steps < 2:
            raise CalibrationError(f"each branch was called {ref_steps} time(s); at least 2 steps "
                                   "are needed to compare consecutive steps")

    def traces(self) -> List[Tuple[int, int]]:
        """(run, branch) pairs in a fixed order: run-major, branches ascending."""
        return [(r, b) for r in range(self.num_runs) for b in self.branches]

    def save(self, path) -> None:
        """Write the raw recordings (.npz) so they can be refitted without running the model."""
        self.check()
        arrays = {"model_class": np.array(self.model_class), "device": np.array(self.device),
                  "branches": np.array(self.branches)}
        for r, b in self.traces():
            arrays[f"partials_{r}_{b}"] = self.partials[r][b]
            arrays[f"out_rel_{r}_{b}"] = self.out_rel[r][b]
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "Recording":
        with np.load(path) as z:
            branches = [int(b) for b in z["branches"]]
            runs = sorted({int(k.split("_")[1]) for k in z.files if k.startswith("partials_")})
            rec = cls(model_class=str(z["model_class"]),
                      device=str(z["device"]) if "device" in z.files else "cpu")
            for r in runs:
                rec.partials.append({b: z[f"partials_{r}_{b}"].astype(np.float32) for b in branches})
                rec.out_rel.append({b: z[f"out_rel_{r}_{b}"].astype(np.float64) for b in branches})
        rec.check()
        return rec


def _step_window(step_range, num_steps: int) -> Tuple[int, int]:
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
    start, end = _step_window(step_range, recording.num_steps)
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


# --------------------------------------------------------------------------- fitting

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


# --------------------------------------------------------------------------- replay

ForcedRule = Callable[[int, int], bool]  # (step, num_steps) -> always compute?


def forced_mask(forced: ForcedRule, num_steps: int) -> np.ndarray:
    return np.array([bool(forced(i, num_steps)) for i in range(num_steps)])


def replay_decisions(recording: Recording, coefficients: Sequence[float], threshold: float, *,
                     forced: ForcedRule = first_and_last,
                     max_consecutive_skips: Optional[int] = None,
                     device=None, backend: Optional[str] = None) -> np.ndarray:
    """Compute flags ``(num_runs, num_branches, num_steps)`` that a cached run would take.

    Runs ``ops.teacache_decide_`` itself on the recorded partial sums, one
    call per step for all runs and branches at once, so the accumulation
    rounds exactly as the cache's does. It runs on ``device`` (default: where
    the recording was made) with ``backend`` (default: the automatic choice),
    i.e. the same decision kernel as the cached run. ``forced`` is the
    forced-step rule (default: first and last step; ``calibrate`` passes the
    wrapper's own rule: the family's, ret_steps and the window). Exact for the same
    inputs; in a real sampling loop a skipped step changes later inputs a
    little, so later indicators (and rarely a decision) may differ.
    """
    recording.check()
    n = recording.num_steps
    traces = recording.traces()
    p = np.stack([recording.partials[r][b] for r, b in traces]).astype(np.float32)  # (T, n, 2)
    # A step without a previous input: the cache sees prev = 0, which the op
    # treats as "not finite -> compute"; [0, 0] reproduces that.
    p[~np.isfinite(p).all(axis=-1)] = 0.0
    device = torch.device(device or recording.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")  # a GPU recording refitted elsewhere: same rule, torch kernels
    partials = torch.from_numpy(p).to(device)
    state = ops.new_decide_state((len(traces), 2), device)
    force_steps = torch.from_numpy(forced_mask(forced, n)).to(device)
    flags = torch.empty((len(traces), n), dtype=torch.bool, device=device)
    with ops.use_backend(backend) if backend else contextlib.nullcontext():
        for i in range(n):
            force = force_steps[i].expand(len(traces)).contiguous()
            flags[:, i] = ops.teacache_decide_(partials[:, i].contiguous(), state, coefficients,
                                               float(threshold), force=force,
                                               max_consecutive_skips=max_consecutive_skips)
    return flags.cpu().numpy().reshape(recording.num_runs, len(recording.branches), n)


def default_thresholds(per_step_estimate: np.ndarray, num_steps: int, count: int = 8) -> List[float]:
    """A 1-2-3-5 grid from about one step's estimate up to about half a run's total."""
    est = per_step_estimate[np.isfinite(per_step_estimate) & (per_step_estimate > 0)]
    if est.size == 0:
        return [0.1, 0.2, 0.4, 0.8]
    lo = float(np.median(est)) * 0.5
    hi = max(float(np.median(est)) * num_steps * 0.5, lo * 10)
    grid = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 3, 5)]
    grid = [float(f"{g:.3g}") for g in grid if lo <= g <= hi]
    if len(grid) > count:  # keep the ends, thin the middle
        idx = np.unique(np.linspace(0, len(grid) - 1, count).round().astype(int))
        grid = [grid[i] for i in idx]
    return grid


# --------------------------------------------------------------------------- result

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

    @property
    def coefficients(self) -> List[float]:
        return list(self.fit.coefficients)

    @property
    def r2(self) -> Optional[float]:
        return self.fit.r2

    def pairs(self):
        return pairs(self.recording, self.step_range)

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


def fit_recording(recording: Recording, degree: int = 4, *, step_range=None, variant=None,
                  forced: ForcedRule = first_and_last,
                  max_consecutive_skips: Optional[int] = None,
                  backend: Optional[str] = None) -> CalibrationResult:
    """Fit a polynomial to a recording (e.g. one loaded with ``Recording.load``)."""
    window = _step_window(step_range, recording.num_steps)
    x, y, _ = pairs(recording, window)
    return CalibrationResult(recording, fit_polynomial(x, y, degree), window, variant, forced,
                             max_consecutive_skips, backend)


# --------------------------------------------------------------------------- recording

class Recorder:
    """The wrapper's observer in record mode: collects one run at a time.

    The wrapper calls it after every computed step (with threshold 0 that is
    every call) as ``recorder(branch, step, partials, stream_in, stream_out)``.
    Everything stays on the model's device until :meth:`finish_run`, which
    reads the run back in one go (no host sync per step).
    """

    def __init__(self, model_class: str = "unknown", on_call: Optional[Callable[[int, int], None]] = None):
        self.recording = Recording(model_class=model_class)
        self.on_call = on_call
        self.start_run()

    def start_run(self) -> None:
        self._inputs: Dict[int, List[torch.Tensor]] = {}
        self._outputs: Dict[int, List[Optional[torch.Tensor]]] = {}
        self._prev_out: Dict[int, torch.Tensor] = {}

    def __call__(self, branch: int, step: int, partials: torch.Tensor, stream_in: torch.Tensor,
                 stream_out: torch.Tensor) -> None:
        del stream_in  # the residual is not needed: the output side compares outputs
        inputs = self._inputs.setdefault(branch, [])
        if step != len(inputs):
            raise CalibrationError(
                f"branch {branch} reached step {step} after {len(inputs)} recorded step(s): the run "
                "called the model more (or fewer) times per branch than num_steps, or a skip "
                "happened; calibration needs one call per branch and step, every step computed")
        inputs.append(partials.detach().clone())
        prev = self._prev_out.get(branch)
        out = stream_out.detach()
        if prev is None or prev.shape != out.shape or prev.dtype != out.dtype:
            self._outputs.setdefault(branch, []).append(None)
            self._prev_out[branch] = out.clone()
        else:
            self._outputs.setdefault(branch, []).append(ops.rel_l1_partials(out, prev))
            prev.copy_(out)
        if self.on_call is not None:
            self.on_call(branch, step)

    def finish_run(self) -> None:
        """Read the run's recordings back to the host and append them."""
        if not self._inputs:
            raise CalibrationError(
                f"run {self.recording.num_runs} never called the model's block stack: run_fn must "
                "run one whole generation with the model it is given")
        partials, out_rel = {}, {}
        self.recording.device = str(next(iter(self._inputs.values()))[0].device)
        for b, inputs in self._inputs.items():
            partials[b] = torch.stack(inputs).float().cpu().numpy()
            rows = []
            for o in self._outputs[b]:
                if o is None:
                    rows.append(math.nan)
                else:
                    num, den = o.cpu().double().tolist()
                    rows.append(num / den if den != 0 else math.inf if num else math.nan)
            out_rel[b] = np.asarray(rows, dtype=np.float64)
        self.recording.partials.append(partials)
        self.recording.out_rel.append(out_rel)
        self.start_run()


def _target_model(target):
    """The transformer of a model or a pipeline (what apply_teacache wraps)."""
    return target if isinstance(target, torch.nn.Module) else getattr(target, "transformer", target)


# num_steps given to the wrapper when the caller lets the recording find it:
# never reached, so the wrapper's step count never wraps in the middle of a run.
_UNBOUNDED_STEPS = 1 << 30


def record(target, run_fn: Callable[[object, int], object], runs: int, *,
           num_steps: Optional[int] = None, preset: Optional[str] = None, variant: Optional[str] = None,
           adapter=None, progress: bool = False, **config) -> Tuple[Recording, Callable[[int, int], bool]]:
    """Run ``run_fn(target, r)`` for r in range(runs) with the cache in record mode.

    target: a transformer (or a pipeline) that ``apply_teacache`` accepts;
    run_fn: one whole generation (all steps, every CFG branch). The cache is
    attached with threshold 0 (never skips) and the recorder as its observer,
    and removed afterwards. Returns the recording and the forced-step rule the
    cache applies with these settings (for :func:`replay_decisions`).
    ``config``: TeaCacheConfig fields that shape the decision (ret_steps,
    start, end, max_consecutive_skips, branches, per_sample, backend).
    """
    from .cache import TeaCacheConfig
    from .api import apply_teacache, remove_teacache, reset
    from .models import adapter_for

    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise CalibrationError(f"runs must be an int >= 1, got {runs!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                  or num_steps < 2):
        raise CalibrationError(f"num_steps must be None or an int >= 2, got {num_steps!r}")
    for name in ("threshold", "observer", "coefficients"):
        if name in config:
            raise TypeError(f"record()/calibrate() set {name} themselves (record mode); do not pass it")
    if config.get("per_sample"):
        raise CalibrationError("per_sample=True is not supported: calibration fits and replays the "
                               "whole-batch indicator (calibrate with batch 1, or without per_sample)")
    model = _target_model(target)
    if adapter is None:
        adapter = adapter_for(model, preset=preset, variant=variant)
    recorder = Recorder(type(model).__name__)
    # Record mode: threshold 0 computes every step; the coefficients then never matter.
    cfg = TeaCacheConfig(threshold=0.0, coefficients=[1.0, 0.0], observer=recorder,
                         num_steps=num_steps or _UNBOUNDED_STEPS).replace(**config)
    apply_teacache(target, cfg, adapter=adapter)
    bar = None
    if progress:  # one tick per step of branch 0 (per run when the step count is not known)
        from tqdm.auto import tqdm
        bar = tqdm(total=runs * num_steps if num_steps else runs, unit="step" if num_steps else "run",
                   desc="calibrate")
        if num_steps:
            recorder.on_call = lambda branch, step: bar.update(1) if branch == 0 else None
    try:
        for r in range(runs):
            reset(target)
            run_fn(target, r)
            recorder.finish_run()
            if bar is not None and not num_steps:
                bar.update(1)
    finally:
        remove_teacache(target)
        if bar is not None:
            bar.close()
    rec = recorder.recording
    rec.check()
    if num_steps is not None and rec.num_steps != num_steps:
        raise CalibrationError(f"num_steps={num_steps} but each branch was called {rec.num_steps} "
                               "times per run")
    rule_cfg = cfg.replace(observer=None)

    def forced(step: int, n: int) -> bool:
        return rule_cfg.forced(step, n, adapter.forced)

    forced.__name__ = f"{adapter.name}:{getattr(adapter.forced, '__name__', 'rule')}"
    return rec, forced


def calibrate(model_or_factory, run_fn: Callable[[object, int], object], *, runs: int = 8,
              num_steps: Optional[int] = None, degree: int = 4, step_range=None,
              preset: Optional[str] = None, variant: Optional[str] = None, adapter=None,
              progress: bool = False, **config) -> CalibrationResult:
    """Record ``runs`` generations without skipping, fit the polynomial, return the result.

    model_or_factory: a transformer or pipeline (anything ``apply_teacache``
    takes), or a zero-argument callable building one. run_fn(model, r): one
    whole generation for run r (e.g. prompt r % len(prompts), seed r); it must
    call the model once per step and CFG branch. num_steps: calls per branch
    per run (None: found from the first run). step_range: (start, end) of the
    steps whose pairs are fitted (default all). preset / variant / adapter: how
    the cache attaches (default: the preset of the model's class; a custom
    Adapter for other models). ``config``: TeaCacheConfig fields that shape
    the decision, used by the replay (ret_steps, start, end,
    max_consecutive_skips, ...).

    >>> result = calibrate(model, run_fn, runs=20, num_steps=28)
    >>> result.to_json("my_model.json"); result.plot("fit.png")
    >>> print(result.format_table())
    >>> apply_teacache(model, preset="my_model.json", threshold=0.3, num_steps=28)
    """
    target = model_or_factory
    if not isinstance(target, torch.nn.Module) and callable(target) \
            and not hasattr(target, "transformer"):
        target = target()
    recording, forced = record(target, run_fn, runs, num_steps=num_steps, preset=preset,
                               variant=variant, adapter=adapter, progress=progress, **config)
    return fit_recording(recording, degree, step_range=step_range, variant=variant, forced=forced,
                         max_consecutive_skips=config.get("max_consecutive_skips"),
                         backend=config.get("backend"))
