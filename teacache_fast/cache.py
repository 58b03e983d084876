"""TeaCacheConfig and the cache state: per CFG branch, per sample, on the device.

Host side: a call clock that maps transformer calls to (branch, step) and
spots new generations; per-branch counters for stats. Device side: the
indicator's previous value, the decision state ``[acc, skips]`` and the
residual buffers. The host reads the decision once per call (one small copy);
nothing else here syncs.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops

__all__ = ["TeaCacheConfig", "BranchState", "CallClock", "CacheState", "decide", "indicator_partials_"]


@dataclass
class TeaCacheConfig:
    """Settings of one cached model.

    threshold: skip while the accumulated estimate stays below it (0 never skips).
    coefficients: rescaling polynomial, highest power first (numpy.poly1d order).
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

    def replace(self, **changes) -> "TeaCacheConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown TeaCacheConfig field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **changes)

    def validate(self) -> "TeaCacheConfig":
        """Check every field; return self. Errors name the field."""
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {t!r}")
        if self.coefficients is None:
            raise ValueError("coefficients are required (5 floats, highest power first) for a model "
                             "without a preset; see teacache_fast.models.presets()")
        self.coefficients = ops._as_coefficients(self.coefficients)
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
        if self.cache_dtype is not None and self.cache_dtype not in ops.SUPPORTED_DTYPES:
            raise ValueError(f"cache_dtype must be one of {ops.SUPPORTED_DTYPES}, got {self.cache_dtype!r}")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"per_sample must be a bool, got {type(self.per_sample).__name__}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ValueError(f"backend must be None or one of {ops.BACKENDS}, got {self.backend!r}")
        if self.observer is not None and not callable(self.observer):
            raise TypeError("observer must be callable or None")
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

    def forced(self, step: int, num_steps: int, rule: Callable[[int, int], bool]) -> bool:
        """Host-side forced-step rule: the family's rule, ret_steps and the window."""
        if step == 0 or step < self.ret_steps or rule(step, num_steps):
            return True
        return not (self.start * num_steps <= step < self.end * num_steps)


def _check_int(name: str, v, *, minimum: int, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        expected = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {expected}, got {v!r}")


def indicator_partials_(x: Tensor, prev: Tensor, *, scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None, norm: Optional[str] = "layer",
                        eps: float = 1e-6, per_sample: bool = False) -> Tensor:
    """fp32 partials of the indicator against ``prev``; prev <- the new indicator.

    norm=None compares ``x`` as is (a timestep embedding); otherwise x is
    modulated first, in the same fused pass (modulated_rel_l1_).
    """
    if norm is None:
        partials = ops.rel_l1_partials(x, prev, per_sample)
        prev.copy_(x)
        return partials
    return ops.modulated_rel_l1_(x, scale, shift, prev, norm, eps, per_sample)


def decide(partials: Tensor, state: Tensor, coefficients: Sequence[float], threshold: float, *,
           force, max_consecutive_skips: Optional[int] = None, process_group=None) -> Tensor:
    """Partials -> compute flags, on the device, without a host sync.

    The one place where ranks of a sequence-parallel group must agree: the
    fp32 partials are summed over the group right here, before deciding, in
    rank order (bitwise the same on every rank; see teacache_fast.distributed).
    """
    if process_group is not None:
        from .distributed import allreduce_partials_
        allreduce_partials_(partials, process_group)
    return ops.teacache_decide_(partials, state, coefficients, threshold, force=force,
                                max_consecutive_skips=max_consecutive_skips)


class CallClock:
    """Maps transformer calls to (branch, step) with host counters only.

    Three ways to tell, best first:

    * ``stepped`` (a pipeline's scheduler is watched): the scheduler's step()
      ends a denoising step, so branch = calls since the last step() and step
      = step() calls so far. Exact even when the calls per step change (CFG
      truncation), and nothing is read.
    * ``branches`` known: calls go round robin, branch = call % branches.
    * otherwise the first step of each generation reads the timestep on the
      host (one small read per call of that step only) until it changes: the
      number of calls that shared it is the number of branches.
    """

    # more calls than this without a scheduler step: the loop does not use the
    # watched scheduler, fall back to the other two ways
    MAX_CALLS_PER_STEP = 8

    def __init__(self, branches: Optional[int], stepped: bool = False):
        self.fixed = branches
        self.stepped = stepped
        self.reset()

    def reset(self) -> None:
        self.period = self.fixed
        self.calls = 0
        self.in_step = 0      # stepped mode: calls since the last scheduler step
        self.steps = 0        # stepped mode: scheduler steps so far
        self.first_t: Optional[float] = None
        self.last_t: Optional[float] = None
        self.direction = 0  # +1 / -1 once two different timesteps were seen

    def step_done(self) -> None:
        """The scheduler finished a denoising step (stepped mode)."""
        if self.in_step:
            self.steps += 1
            self.in_step = 0

    def went_back(self, t: Optional[float]) -> bool:
        """Did the timestep move against this generation's direction? (A new
        generation: most pipelines count down, Lumina's count up.)"""
        if self.stepped or t is None or self.last_t is None or t == self.last_t:
            return False
        return self.direction != 0 and (t > self.last_t) != (self.direction > 0)

    def needs_timestep(self) -> bool:
        return not self.stepped and self.period is None

    def tick(self, t: Optional[float]) -> Tuple[int, int]:
        """(branch, step) of the next call; t: its timestep when read, else None."""
        if self.stepped:
            branch, step = self.in_step, self.steps
            self.in_step += 1
        elif self.period is None:
            if self.calls == 0 or t is None:
                self.first_t = t
                branch, step = self.calls, 0
                if t is None:  # no timestep to learn from: a single branch
                    self.period = 1
                    branch = 0
            elif t == self.first_t:
                branch, step = self.calls, 0
            else:
                self.period = self.calls
                branch, step = 0, 1
        else:
            branch, step = self.calls % self.period, self.calls // self.period
        self.calls += 1
        if t is not None:
            if self.last_t is not None and t != self.last_t and self.direction == 0:
                self.direction = 1 if t > self.last_t else -1
            self.last_t = t
        return branch, step


@dataclass
class BranchState:
    """Everything one CFG branch keeps between calls."""
    signature: Any = None
    prev: Optional[Tensor] = None           # indicator of the previous call
    decision: Optional[Tensor] = None       # fp32 [acc, skips] (per sample: (B, 2))
    residual: Optional[Tensor] = None       # stream_out - stream_in of the last compute
    computed: int = 0
    skipped: int = 0
    sample_computed: Optional[List[int]] = None
    sample_skipped: Optional[List[int]] = None
    steps: List[bool] = field(default_factory=list)        # per call: computed (all samples)?
    # (num_steps, *partials.shape) device partials, NaN where no call wrote;
    # preallocated so a step adds no tensor to the state; read in stats()
    trace: Optional[Tensor] = None
    last_step: int = -1

    # rows preallocated at first: num_steps may be a huge "unbounded" count
    # (calibration without a known step count); past it the trace doubles
    TRACE_ROWS = 256

    def record_partials(self, step: int, partials: Tensor, num_steps: int) -> None:
        """Write the call's partials into row ``step`` of the preallocated trace."""
        t = self.trace
        if t is None or t.shape[1:] != partials.shape or t.device != partials.device:
            t = None
        if t is None or step >= t.shape[0]:
            rows = min(num_steps, max(self.TRACE_ROWS, 2 * (t.shape[0] if t is not None else 0),
                                      step + 1))
            grown = torch.full((rows,) + tuple(partials.shape), math.nan, dtype=torch.float32,
                               device=partials.device)
            if t is not None:
                grown[:t.shape[0]].copy_(t)
            self.trace = t = grown
        t.select(0, step).copy_(partials)
        self.last_step = max(self.last_step, step)

    def record(self, flags: List[bool]) -> None:
        if self.sample_computed is None:
            self.sample_computed = [0] * len(flags)
            self.sample_skipped = [0] * len(flags)
        for i, f in enumerate(flags):
            if f:
                self.sample_computed[i] += 1
            else:
                self.sample_skipped[i] += 1
        any_compute = any(flags)
        self.computed += int(any_compute)
        self.skipped += int(not any_compute)
        self.steps.append(any_compute)


class CacheState:
    """All state of one wrapped model: the clock and the branches."""

    def __init__(self, config: TeaCacheConfig, stepped: bool = False):
        self.config = config
        self.clock = CallClock(config.branches, stepped)
        self.branches: Dict[int, BranchState] = {}
        self.num_steps: Optional[int] = config.num_steps
        self.calls = 0
        self.generations = 0

    def reset(self) -> None:
        """Forget everything cached (buffers are freed) and start a new generation."""
        self.clock.reset()
        self.branches = {}
        self.calls = 0

    def branch(self, index: int) -> BranchState:
        if index not in self.branches:
            self.branches[index] = BranchState()
        return self.branches[index]

    def stats(self) -> Dict[str, Any]:
        """Counters and the indicator trace; the only place the trace is read back.

        ``rel_l1`` has one entry per step up to the last one called (NaN for a
        step this branch was not called at).
        """
        out: Dict[str, Any] = {"calls": self.calls, "num_steps": self.num_steps,
                               "generations": self.generations,
                               "computed": 0, "skipped": 0, "branches": {}}
        for index, b in sorted(self.branches.items()):
            rel = []
            if b.trace is not None and b.last_step >= 0:
                p = b.trace[:b.last_step + 1].reshape(b.last_step + 1, -1, 2).cpu()
                with torch.no_grad():
                    r = p[..., 0] / p[..., 1]
                rel = [row[0] if len(row) == 1 else row for row in r.tolist()]
            out["branches"][index] = {
                "computed": b.computed, "skipped": b.skipped, "steps": list(b.steps),
                "sample_computed": list(b.sample_computed or []),
                "sample_skipped": list(b.sample_skipped or []),
                "rel_l1": rel,
            }
            out["computed"] += b.computed
            out["skipped"] += b.skipped
        return out
