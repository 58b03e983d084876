"""TeaCacheConfig: the settings of one cached model, checked in one place.

It is also the one place where the forced-step rule (the family's rule,
``ret_steps`` and the ``[start, end)`` window) becomes values: :meth:`forced`
for one step, :meth:`forced_table` for a whole schedule.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .. import ops

__all__ = ["TeaCacheConfig", "ACCUMULATE"]

ACCUMULATE = ("sum", "abs")  # how poly(rel) enters the accumulator


@dataclass
class TeaCacheConfig:
    """Settings of one cached model.

    threshold: skip while the accumulated estimate stays below it (0 never skips).
    coefficients: rescaling polynomial, highest power first (numpy.poly1d order).
    accumulate: "sum" (``acc += poly(rel)``, the official scripts) or "abs"
        (``acc += |poly(rel)|``, the convention some published sets were tuned
        with, e.g. FLUX.1-Kontext); apply_teacache takes the preset's.
    num_steps: transformer calls per branch in one generation; taken from the
        pipeline's scheduler when apply_teacache gets a pipeline.
    ret_steps: the first ret_steps steps always compute.
    start, end: fractions of the schedule; steps outside [start, end) compute.
    max_consecutive_skips: compute after that many skips in a row (None: no cap).
    cache_device: where residuals live (e.g. "cpu": pinned, non-blocking copies
        when the model is on CUDA); None: the activations' device.
    cache_dtype: residual dtype (e.g. torch.float32 for bf16 activations);
        None: the activations' dtype.
    per_sample: each sample of the batch decides alone.
    branches: calls per denoising step (CFG cond/uncond = 2); None: learnt from
        the timestep during the first step of each generation.
    backend: force an ops backend ("torch", "triton", "cuda"); None: automatic.
    observer: called after every computed step as
        observer(branch, step, partials, stream_in, stream_out) (calibration).
    fitted_range: (low, high) of the indicator the coefficients were fitted on
        (a calibrated preset file carries it); the wrapper warns once per
        generation when the indicator leaves it.
    sync_free: keep the decision on the device and skip with torch.cond (no
        host read, no graph break: the wrapped model compiles with
        torch.compile(fullgraph=True) and can be captured in a CUDA graph).
        Needs num_steps (or a pipeline) and a fixed number of branches
        (branches=, default 1); not with per_sample, observer or cache_device.
    """
    threshold: float = 0.0
    coefficients: Optional[Sequence[float]] = None
    num_steps: Optional[int] = None
    ret_steps: int = 0
    start: float = 0.0
    end: float = 1.0
    max_consecutive_skips: Optional[int] = None
    cache_device: Optional[Any] = None
    cache_dtype: Optional[torch.dtype] = None
    per_sample: bool = False
    branches: Optional[int] = None
    backend: Optional[str] = None
    observer: Optional[Callable[..., None]] = None
    sync_free: bool = False
    fitted_range: Optional[Tuple[float, float]] = None
    accumulate: str = "sum"   # last: positional construction of the older fields is unchanged

    def replace(self, **changes) -> "TeaCacheConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown TeaCacheConfig field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **changes)

    def validate(self) -> "TeaCacheConfig":
        """Check every field; return self. Errors name the field."""
        ops.check_threshold(self.threshold)
        if self.coefficients is None:
            raise ValueError("coefficients are required (5 floats, highest power first) for a model "
                             "without a preset; see teacache_fast.models.presets()")
        self.coefficients = ops._as_coefficients(self.coefficients)
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE} ('sum': acc += poly(rel); "
                             f"'abs': acc += |poly(rel)|), got {self.accumulate!r}")
        _check_int("num_steps", self.num_steps, minimum=1, optional=True)
        _check_int("ret_steps", self.ret_steps, minimum=0)
        _check_int("max_consecutive_skips", self.max_consecutive_skips, minimum=0, optional=True)
        _check_int("branches", self.branches, minimum=1, optional=True)
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {v!r}")
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        if self.cache_device is not None:
            try:
                self.cache_device = torch.device(self.cache_device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"cache_device must name a device, got {self.cache_device!r}") from exc
            _check_cache_device(self.cache_device)
        if self.cache_dtype is not None and self.cache_dtype not in ops.SUPPORTED_DTYPES:
            raise ValueError(f"cache_dtype must be one of {ops.SUPPORTED_DTYPES}, got {self.cache_dtype!r}")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {type(self.per_sample).__name__}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ValueError(f"backend must be None or one of {ops.BACKENDS}, got {self.backend!r}")
        if self.observer is not None and not callable(self.observer):
            raise TypeError("observer must be callable or None")
        if self.fitted_range is not None:
            low, high = (tuple(self.fitted_range) + (None, None))[:2]
            if len(tuple(self.fitted_range)) != 2 or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (low, high)) \
                    or not low <= high:
                raise ValueError(f"fitted_range must be (low, high) numbers with low <= high, "
                                 f"got {self.fitted_range!r}")
            self.fitted_range = (float(low), float(high))
        if not isinstance(self.sync_free, bool):
            raise TypeError(f"sync_free must be a bool, got {type(self.sync_free).__name__}")
        if self.sync_free:
            # these need the decision on the host: a batch split, a Python
            # callback, a host-side copy
            for name, why in (("per_sample", "splits the batch on the host"),
                              ("observer", "is a host callback on computed steps"),
                              ("cache_device", "moves residuals off the activations' device")):
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"sync_free=True cannot be combined with {name}= (it {why}); "
                                     f"use sync_free=False for {name}")
        return self

    def backend_scope(self):
        """A context in which the ops run on this config's backend (when one is forced)."""
        return ops.use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def forced(self, step: int, num_steps: int, rule: Callable[[int, int], bool]) -> bool:
        """Host-side forced-step rule: the family's rule, ret_steps and the window."""
        if step == 0 or step < self.ret_steps or rule(step, num_steps):
            return True
        return not (self.start * num_steps <= step < self.end * num_steps)

    def forced_table(self, num_steps: int, rule: Callable[[int, int], bool]) -> List[bool]:
        """:meth:`forced` for every step of a ``num_steps`` schedule."""
        return [self.forced(s, num_steps, rule) for s in range(num_steps)]


def _check_cache_device(dev: torch.device) -> None:
    """cache_device must hold real data here and now, not fail at the first call."""
    if dev.type == "meta":
        raise ValueError("cache_device must be a device that holds data, such as 'cpu' or 'cuda'; "
                         "got 'meta' (meta tensors have no storage: the residual could never be "
                         "applied)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cache_device={str(dev)!r} needs a CUDA device, but "
                             "torch.cuda.is_available() is False; use cache_device='cpu' or None")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"cache_device={str(dev)!r} names CUDA device {dev.index}, but only "
                             f"{count} CUDA device(s) are visible (indices 0..{count - 1})")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
            raise ValueError(f"cache_device={str(dev)!r} cannot hold tensors in this process: "
                             f"{type(exc).__name__}: {exc}") from exc


def _check_int(name: str, v, *, minimum: int, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        expected = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {expected}, got {v!r}")
