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
from ..preset_json import MAX_DEGREE, load_preset_json  # noqa: F401 (re-exports)
from .fit import PolyFit, fit_polynomial, pairs, plot_fit, relative_l1
from .recording import CalibrationError, ExpertRecorder, Recorder, Recording
from .replay import default_thresholds, forced_mask, replay_decisions
from .result import CalibrationResult, fit_recording
from .run import calibrate, record, record_experts

__all__ = [
    "CalibrationError", "Recording", "Recorder", "ExpertRecorder", "record_experts", "PolyFit", "CalibrationResult",
    "fit_polynomial", "fit_recording", "replay_decisions", "calibrate", "record", "pairs",
    "relative_l1", "forced_mask", "default_thresholds", "plot_fit", "load_preset_json",
]
