"""``coefficients="auto"``: self-calibration inside the cache.

``apply_teacache(model, coefficients="auto", threshold=t)`` first looks for a
fit stored for this model (:func:`calibration_path`: one JSON per model
class, config hash, variant and denoiser under ``calibration_dir`` or
``$TEACACHE_FAST_HOME/calibrations``, default ``~/.cache/teacache_fast``).
Found: the cache runs with it from the first call. Not found: the first
``runs`` generation(s) run uncached (threshold 0: bitwise the unwrapped
model) while the same :class:`~teacache_fast.calibrate.Recorder` as
``teacache-fast calibrate`` records the (indicator, output) relative-L1
pairs; when the generation ends (the clock's boundary: the last call of the
last branch, the pipeline's end, a reset, or the next generation's first
call) the pairs are fitted and checked (:class:`AutoSettings`: enough pairs,
R^2, the polynomial positive over the recorded range). A fit that passes is
stored as a preset JSON and the cache runs with it from the next generation
on; one that fails is not used: the model stays uncached, with a warning
naming the figure that failed. ``stats(model)["calibration"]`` and one
``logging`` line (logger ``teacache_fast.calibrate``) say which generation
calibrated and where the JSON went.

The threshold: the user's when given; otherwise the largest threshold of the
fit's replayed table whose predicted speedup of the block stack is at most
:data:`DEFAULT_SPEEDUP` (1.5x), stored in the JSON as ``auto_threshold``.

Layering: this module sits below ``api`` (which creates the controller) and
never imports it; it talks to the cache through the duck-typed hooks of
``wrapper.host.HostRunner`` (``placed`` / ``boundary``), the config's
``observer`` and ``CachedModel.retune``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..preset_json import load_preset_json, save_preset_json
from .fit import CONVENTIONS
from .recording import CalibrationError, ExpertRecorder
from .result import CalibrationResult, fit_recording

__all__ = ["AutoSettings", "AutoCalibration", "calibration_home", "calibration_path", "config_hash",
           "DEFAULT_SPEEDUP"]

log = logging.getLogger("teacache_fast.calibrate")

DEFAULT_SPEEDUP = 1.5   # the default threshold's predicted block-stack speedup, at most
_PLACEHOLDER = [1.0, 0.0]  # never consulted at threshold 0 (every step computes)


@dataclass(frozen=True)
class AutoSettings:
    """How ``coefficients="auto"`` calibrates (``apply_teacache(calibration=...)``).

    runs: generations recorded before the fit. degree: polynomial degree, or
    "auto" (held-out error). convention: "all-pairs" or "step-means".
    min_r2: the fit's R^2 must reach it. min_pairs: fitted points needed
    (None: 2 * (degree + 1), degree 4 for "auto"). The polynomial must be
    positive over the recorded indicator range (a negative estimate shrinks
    the accumulator).
    """
    runs: int = 1
    degree: Union[int, str] = 4
    convention: str = "all-pairs"
    min_r2: float = 0.8
    min_pairs: Optional[int] = None

    def check(self) -> "AutoSettings":
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ValueError(f"calibration runs must be an int >= 1, got {self.runs!r}")
        if self.degree != "auto" and (isinstance(self.degree, bool) or not isinstance(self.degree, int)
                                      or not 1 <= self.degree <= 4):
            raise ValueError(f"calibration degree must be an int in 1..4 or 'auto', got {self.degree!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"calibration convention must be one of {CONVENTIONS}, "
                             f"got {self.convention!r}")
        if isinstance(self.min_r2, bool) or not isinstance(self.min_r2, (int, float)) \
                or not -math.inf < self.min_r2 <= 1:
            raise ValueError(f"calibration min_r2 must be a number <= 1, got {self.min_r2!r}")
        if self.min_pairs is not None and (isinstance(self.min_pairs, bool)
                                           or not isinstance(self.min_pairs, int) or self.min_pairs < 1):
            raise ValueError(f"calibration min_pairs must be None or an int >= 1, got {self.min_pairs!r}")
        return self

    @property
    def needed_pairs(self) -> int:
        if self.min_pairs is not None:
            return self.min_pairs
        return 2 * ((4 if self.degree == "auto" else self.degree) + 1)

    @classmethod
    def of(cls, value: Any) -> "AutoSettings":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value.check()
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise TypeError(f"calibration: unknown key(s) {unknown}; known: "
                                f"{sorted(cls.__dataclass_fields__)}")
            return cls(**value).check()
        raise TypeError(f"calibration must be None, a dict or an AutoSettings, got {type(value).__name__}")


def calibration_home(calibration_dir=None) -> Path:
    """Where fits are stored: ``calibration_dir``, else ``$TEACACHE_FAST_HOME/calibrations``
    (default ``~/.cache/teacache_fast/calibrations``)."""
    if calibration_dir is not None:
        return Path(calibration_dir).expanduser()
    home = os.environ.get("TEACACHE_FAST_HOME") or os.path.join("~", ".cache", "teacache_fast")
    return Path(home).expanduser() / "calibrations"


def config_hash(model) -> str:
    """16 hex digits of the model's config (a diffusers ``model.config``; else
    its parameter names, shapes and dtypes)."""
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "items"):
        payload: Any = {str(k): v for k, v in cfg.items() if not str(k).startswith("_")}
    else:
        payload = [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(f"{type(model).__name__}:{text}".encode()).hexdigest()[:16]


def calibration_path(model, variant: Optional[str] = None, denoiser: Optional[str] = None,
                     calibration_dir=None) -> Path:
    """The JSON of one model: class, variant, denoiser (a pipeline's second
    expert is ``transformer_2``) and config hash."""
    parts = [type(model).__name__, variant or "default"]
    if denoiser not in (None, "transformer"):
        parts.append(denoiser)
    name = "-".join(p.replace(os.sep, "_") for p in parts) + f"-{config_hash(model)}.json"
    return calibration_home(calibration_dir) / name


class AutoCalibration:
    """One model's self-calibration: records, fits, checks, stores, retunes."""

    def __init__(self, model_class: str, path: Path, settings: AutoSettings,
                 threshold: Optional[float], variant: Optional[str] = None,
                 forced: Optional[Callable[[int, int], bool]] = None):
        self.model_class, self.path, self.settings = model_class, Path(path), settings
        self.threshold, self.variant, self.forced = threshold, variant, forced
        self.state = "recording"
        self.loaded: Optional[dict] = None
        self.generation = 0           # generations seen (1 = the first)
        self.calibrated_at: Optional[int] = None
        self.failure: Optional[str] = None
        self.result: Optional[CalibrationResult] = None
        self.recorder = ExpertRecorder(model_class)   # an expert runs part of the steps
        self._last = False
        self._new = True
        self._retune: Optional[Callable[..., None]] = None

    # ------------------------------------------------------------ set-up (api)

    @classmethod
    def start(cls, model, *, variant=None, denoiser=None, calibration_dir=None, settings=None,
              threshold=None, forced=None) -> "AutoCalibration":
        auto = cls(type(model).__name__, calibration_path(model, variant, denoiser, calibration_dir),
                   AutoSettings.of(settings), threshold, variant, forced)
        if auto.path.is_file():
            auto.loaded = load_preset_json(auto.path)
            auto.state = "loaded"
        return auto

    @property
    def recording(self) -> bool:
        return self.state == "recording"

    def config_fields(self) -> dict:
        """The TeaCacheConfig fields to apply with."""
        if self.loaded is not None:
            t = self.threshold if self.threshold is not None else self.loaded.get("auto_threshold")
            if t is None:
                raise ValueError(f"the stored calibration {os.fspath(self.path)!r} has no "
                                 "auto_threshold: pass threshold=")
            rng = self.loaded.get("fitted_range")
            return dict(coefficients=self.loaded["coefficients"], threshold=float(t),
                        fitted_range=tuple(rng) if rng else None)
        return dict(coefficients=list(_PLACEHOLDER), threshold=0.0, observer=self)

    def bind(self, retune: Callable[..., None]) -> None:
        self._retune = retune

    # ------------------------------------------------------------ the cache's hooks

    def placed(self, tick, last: bool) -> None:
        """A call was placed on the clock (before it decides)."""
        if tick.restarted is not None and not self._new:
            self.boundary(tick.restarted)
        if self._new:
            self._new = False
            self.generation += 1
        self._last = last

    def boundary(self, reason: str) -> None:
        """The current generation ended (or was cut: a call raised)."""
        if self._new:
            return
        self._new = True
        if not self.recording:
            return
        if reason == "call raised":
            self.recorder.start_run()   # an interrupted generation is not recorded
            return
        self._finish_run()

    def __call__(self, branch: int, step: int, partials, stream_in, stream_out) -> None:
        """The observer: one computed call (every call, at threshold 0)."""
        if not self.recording:
            return
        try:
            self.recorder(branch, step, partials, stream_in, stream_out)
        except CalibrationError as exc:
            self._fail(f"the calls do not form one run per branch ({exc})")
            return
        if self._last:   # the clock closed the generation at this call
            self._new = True
            self._finish_run()

    # ------------------------------------------------------------ fit and check

    def _finish_run(self) -> None:
        if not self.recorder.has_calls:
            return
        try:
            self.recorder.finish_run()
        except CalibrationError as exc:
            self._fail(str(exc))
            return
        if self.recorder.recording.num_runs >= self.settings.runs:
            self._fit()

    def _fit(self) -> None:
        s = self.settings
        try:
            result = fit_recording(self.recorder.recording, s.degree, variant=self.variant,
                                   convention=s.convention, **({"forced": self.forced}
                                                               if self.forced else {}))
        except CalibrationError as exc:
            self._fail(str(exc))
            return
        failed = check_fit(result, s)
        if failed:
            self.result = result
            self._fail(failed)
            return
        threshold = self.threshold if self.threshold is not None else default_threshold(result)
        data = result.to_dict()
        data.update(auto_threshold=float(threshold), calibrated_by="coefficients='auto'",
                    calibrated_generation=self.generation)
        save_preset_json(data, self.path)
        self.result, self.state, self.calibrated_at = result, "calibrated", self.generation
        self._retune(coefficients=result.coefficients, threshold=float(threshold),
                     fitted_range=tuple(result.fitted_range()), observer=None)
        log.info("TeaCache: %s calibrated at the end of generation %d (R^2 %.4f on %d pairs); "
                 "fit stored in %s; threshold %.4g from the next generation on", self.model_class,
                 self.generation, result.r2, result.fit.num_pairs, self.path, threshold)

    def _fail(self, why: str) -> None:
        self.state, self.failure = "failed", why
        if self._retune is not None:
            self._retune(observer=None)   # threshold stays 0: uncached
        warnings.warn(f"TeaCache ({self.model_class}): coefficients='auto' fit not used, the model "
                      f"stays uncached: {why}", RuntimeWarning, stacklevel=2)

    def stats(self) -> dict:
        out = {"state": self.state, "path": os.fspath(self.path), "generation": self.calibrated_at,
               "runs_recorded": self.recorder.recording.num_runs, "failure": self.failure}
        if self.result is not None:
            out.update(r2=self.result.r2, num_pairs=self.result.fit.num_pairs,
                       coefficients=self.result.coefficients)
        if self.loaded is not None:
            out.update(r2=self.loaded.get("r2"), coefficients=self.loaded["coefficients"])
        return out


def check_fit(result: CalibrationResult, settings: AutoSettings) -> Optional[str]:
    """None when the fit passes; else a sentence naming the figure that failed."""
    n, need = result.fit.num_pairs, settings.needed_pairs
    if n < need:
        return f"pairs = {n} < {need} needed (record more steps or runs: calibration runs=)"
    if result.r2 is None or result.r2 < settings.min_r2:
        r2 = "undefined (constant output)" if result.r2 is None else f"{result.r2:.4f}"
        return f"R^2 = {r2} < min_r2 {settings.min_r2}"
    if result.sign_in_range() != "positive":
        low, high = result.fitted_range()
        return (f"positivity: the polynomial is not positive over the recorded indicator range "
                f"[{low:.4g}, {high:.4g}]")
    return None


def default_threshold(result: CalibrationResult) -> float:
    """The largest table threshold predicting at most DEFAULT_SPEEDUP (else the smallest)."""
    rows = result.threshold_table()
    ok = [r["threshold"] for r in rows if r["speedup"] <= DEFAULT_SPEEDUP]
    return float(max(ok) if ok else min(r["threshold"] for r in rows))

