"""The JSON preset file that ``teacache-fast calibrate`` writes and the wrapper reads.

One file holds one fitted polynomial and what it was fitted on::

    {
      "format": "teacache_fast.preset",
      "format_version": 1,
      "model_class": "FluxTransformer2DModel",
      "variant": "my-finetune",
      "coefficients": [498.6, -283.7, 55.8, -3.82, 0.264],   # highest power first
      "degree": 4,
      "num_pairs": 1470,
      "r2": 0.93,                        # null when the outputs were constant
      "fitted_range": [0.01, 0.42],      # the indicator range of the fitted pairs
      "negative_in_range": false,
      "sign_in_range": "positive",       # the polynomial's sign over it: positive / negative / mixed
      "convention": "all-pairs",         # or "step-means" (per-step means)
      "degree_errors": [[1, 3e-4], ...], # held-out MSE per degree when --degree auto chose it
      "step_range": [1, 50],             # steps [start, end) whose pairs were fitted
      "num_steps": 50,
      "num_runs": 30,
      "branches": [0],
      "library_version": "0.1.0",
      "thresholds": [{"threshold": 0.4, "computed_steps": 27.5, ...}, ...]   # optional
    }

A fit stored by ``coefficients="auto"`` adds ``auto_threshold`` (the threshold
used when the caller gives none), ``calibrated_by`` and
``calibrated_generation``.

:func:`load_preset_json` validates a file and returns it as a dict; errors
name the file and the field. Only ``coefficients`` is needed to run the cache;
the other fields say where the numbers came from.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any

from .ops import MAX_COEFFICIENTS

FORMAT = "teacache_fast.preset"
FORMAT_VERSION = 1
MAX_DEGREE = MAX_COEFFICIENTS - 1  # the highest degree the decision op evaluates

_REQUIRED = ("model_class", "coefficients", "degree")


class PresetFileError(ValueError):
    """A preset JSON file is unreadable or does not hold a valid preset."""


def _fail(path, msg: str) -> PresetFileError:
    return PresetFileError(f"preset file {os.fspath(path)!r}: {msg}")


def _finite(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))


def validate_preset(data: Any, path="<dict>") -> dict:
    """Check a preset dict (as read from JSON); return a normalised copy."""
    if not isinstance(data, dict):
        raise _fail(path, f"expected a JSON object, got {type(data).__name__}")
    if data.get("format", FORMAT) != FORMAT:
        raise _fail(path, f"'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise _fail(path, f"'format_version' {version!r} is not supported (this library reads "
                          f"version {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise _fail(path, f"missing field(s) {missing}; a preset needs {list(_REQUIRED)}")
    out = dict(data)
    if not isinstance(data["model_class"], str) or not data["model_class"]:
        raise _fail(path, f"'model_class' must be a non-empty string, got {data['model_class']!r}")
    variant = data.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise _fail(path, f"'variant' must be a string or null, got {variant!r}")
    coeffs = data["coefficients"]
    if not isinstance(coeffs, list) or not 1 <= len(coeffs) <= MAX_COEFFICIENTS:
        raise _fail(path, f"'coefficients' must be a list of 1 to {MAX_COEFFICIENTS} numbers "
                          f"(highest power first), got {coeffs!r}")
    for i, c in enumerate(coeffs):
        if not _finite(c):
            raise _fail(path, f"'coefficients'[{i}] must be a finite number, got {c!r}")
    out["coefficients"] = [float(c) for c in coeffs]
    degree = data["degree"]
    if isinstance(degree, bool) or not isinstance(degree, int) or degree != len(coeffs) - 1:
        raise _fail(path, f"'degree' must be len(coefficients) - 1 = {len(coeffs) - 1}, got {degree!r}")
    r2 = data.get("r2")
    if r2 is not None and not _finite(r2):
        raise _fail(path, f"'r2' must be a finite number or null, got {r2!r}")
    step_range = data.get("step_range")
    if step_range is not None and not (
            isinstance(step_range, list) and len(step_range) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in step_range)
            and 0 <= step_range[0] < step_range[1]):
        raise _fail(path, f"'step_range' must be [start, end) with 0 <= start < end, got {step_range!r}")
    fitted = data.get("fitted_range")
    if fitted is not None:
        if not (isinstance(fitted, list) and len(fitted) == 2 and all(_finite(v) for v in fitted)
                and fitted[0] <= fitted[1]):
            raise _fail(path, f"'fitted_range' must be [low, high] finite numbers with low <= high "
                              f"(the indicator range of the fit), got {fitted!r}")
        out["fitted_range"] = [float(v) for v in fitted]
    auto = data.get("auto_threshold")
    if auto is not None and not (_finite(auto) and auto >= 0):
        raise _fail(path, f"'auto_threshold' must be a finite number >= 0, got {auto!r}")
    sign = data.get("sign_in_range")
    if sign is not None and sign not in ("positive", "negative", "mixed"):
        raise _fail(path, f"'sign_in_range' must be 'positive', 'negative' or 'mixed', got {sign!r}")
    for key in ("num_pairs", "num_steps", "num_runs"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _fail(path, f"'{key}' must be an int >= 0, got {v!r}")
    return out


def load_preset_json(path) -> dict:
    """Read and validate a preset JSON file.

    Returns the dict (``coefficients`` as a list of floats, highest power
    first); raises :class:`PresetFileError` naming the file and the field.
    The wrapper's ``preset="path/to.json"`` is
    ``TeaCacheConfig(coefficients=load_preset_json(path)["coefficients"], ...)``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    return validate_preset(data, path)


def save_preset_json(data: dict, path) -> None:
    """Validate ``data`` and write it as indented JSON (strict: no NaN), atomically."""
    clean = validate_preset({"format": FORMAT, "format_version": FORMAT_VERSION, **data}, path)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    # written next to it, then renamed: a reader (another process loading a
    # coefficients="auto" fit) never sees half a file
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(clean, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def looks_like_preset_path(preset) -> bool:
    """True when a ``preset=`` argument names a JSON file rather than a built-in preset."""
    return isinstance(preset, (str, os.PathLike)) and os.fspath(preset).lower().endswith(".json")
