"""Sync-free state: the decision stays on the device (``sync_free=True``).

* :class:`DeviceSchedule` keeps a branch's step counter on the device with
  its forced-step table, so Python step counters do not recompile every step;
* :func:`decide` runs the indicator and the decision (``modulated_rel_l1_`` /
  ``rel_l1_partials`` + ``teacache_decide_``) and returns a 0-d bool tensor;
* :func:`finish_span_` at the end of the cached span picks, elementwise on the
  device, ``out`` (compute; the residual becomes ``out - in``) or
  ``in + residual`` (skip; the residual is kept);
* :class:`SyncFreeBranch` is one branch's device buffers and traces.

The skip itself (``torch.cond`` per block) is the wrapper's:
teacache_fast.wrapper.device. Numerics match the host-read mode bit for bit:
a computed step returns the blocks' output itself; a skipped one returns
``in + residual`` with one fp32 add rounded to the stream's dtype, as
``residual_apply_`` does; the residual is ``out - in`` rounded to the cache
dtype, as ``residual_capture_`` does.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from .state import indicator_partials_, reduce_partials_
from .decision import estimate
from .stats import branch_entry

__all__ = ["DeviceSchedule", "SyncFreeBranch", "decide", "decide_with_partials", "finish_span_"]


class DeviceSchedule:
    """The step counter of one branch on the device, with its forced-step table.

    A Python step counter would be a new constant for ``torch.compile`` on
    every call (a recompile per step); here the counter is a 0-d device
    tensor and ``forced[step]`` a device gather, so one graph serves the whole
    generation and the next ones: the counter wraps at the table's length, and
    step 0 must be forced (it resets the decision state and the residual).

    forced: one bool per step, e.g. ``[config.forced(s, n, rule) for s in range(n)]``.
    """

    def __init__(self, forced: Sequence[bool], device=None):
        forced = [bool(f) for f in forced]
        if not forced or not forced[0]:
            raise ValueError("forced must be a non-empty table whose step 0 is forced (True)")
        with torch.inference_mode(False):  # updated in place outside inference mode too
            self.forced = torch.tensor(forced, dtype=torch.bool, device=device)
            self.calls = torch.zeros((), dtype=torch.long, device=device)   # this generation's
            self.total = torch.zeros((), dtype=torch.long, device=device)   # since reset()
            self.starts = torch.zeros((), dtype=torch.long, device=device)  # step-0 calls
            self.last_t = torch.zeros(1, dtype=torch.float32, device=device)
            self.direction = torch.zeros(1, dtype=torch.float32, device=device)
            self.repeated = torch.zeros(1, dtype=torch.bool, device=device)  # this generation
            self.repeat_seen = torch.zeros((), dtype=torch.bool, device=device)  # since reset()

    @property
    def num_steps(self) -> int:
        return self.forced.numel()

    def tick(self, timestep: Optional[Tensor] = None) -> Tensor:
        """The 0-d bool 'forced' flag of this call; advances the counter (no host read)."""
        return self.next(timestep)[0]

    def next(self, timestep: Optional[Tensor] = None):
        """(forced, step): the call's 0-d bool flag and its (1,) long step index.

        With the call's ``timestep`` (a tensor), on the device: a timestep
        that moves against the generation's direction (learnt at step 1)
        restarts the count at step 0 (an interrupted run, then a new one); a
        step 1 with the timestep of step 0 means two calls per step (CFG
        without ``branches=2``): every call of that generation is forced
        (never a skip with the other branch's state) and ``repeat_seen`` is set.
        """
        step = torch.remainder(self.calls, self.num_steps).reshape(1)
        forced_extra = None
        if timestep is not None:
            t = timestep.reshape(-1)[:1].to(device=self.last_t.device, dtype=torch.float32)
            d = t - self.last_t
            back = (self.direction * d < 0) & (step > 0)
            step = torch.where(back, torch.zeros_like(step), step)
            first, second = step == 0, step == 1
            self.repeated.copy_(~first & (self.repeated | (second & (d == 0))))
            self.repeat_seen.logical_or_(self.repeated.reshape(()))
            self.direction.copy_(torch.where(first, torch.zeros_like(d),
                                             torch.where(second, torch.sign(d), self.direction)))
            self.last_t.copy_(t)
            forced_extra = self.repeated.reshape(())
        self.calls.copy_(step.reshape(()) + 1)
        self.total.add_(1)
        self.starts.add_((step == 0).reshape(()).to(torch.long))
        # index_select, not forced[step]: indexing by a 0-d tensor reads it on the host
        forced = self.forced.index_select(0, step).reshape(())
        if forced_extra is not None:
            forced = forced | forced_extra
        return forced, step

    def tensors(self):
        return [self.forced, self.calls, self.total, self.starts, self.last_t, self.direction,
                self.repeated, self.repeat_seen]

    def to(self, device) -> "DeviceSchedule":
        """Move the table and the counters (e.g. when the model moved after apply)."""
        for name in ("forced", "calls", "total", "starts", "last_t", "direction", "repeated",
                     "repeat_seen"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def reset(self) -> None:
        for t in self.tensors()[1:]:
            t.zero_()


def decide(indicator: Tensor, prev: Tensor, state: Tensor, coefficients: Sequence[float],
           threshold: float, *, force=False, scale: Optional[Tensor] = None,
           shift: Optional[Tensor] = None, norm: Optional[str] = "layer", eps: float = 1e-6,
           max_consecutive_skips: Optional[int] = None, process_group=None,
           accumulate_abs: bool = False) -> Tensor:
    """Indicator + decision on the device; returns the 0-d bool compute flag.

    norm=None compares ``indicator`` as is (an embedding); otherwise it is
    modulated first (``norm``, ``scale``, ``shift``). ``prev`` (the previous
    indicator) and ``state`` (fp32 ``(2,)``) are updated in place. force may
    be a Python bool (a constant under compile) or a 0-d bool tensor.
    process_group: all-reduce the partials over it first (sequence parallel).
    accumulate_abs: ``acc += |poly(rel)|`` (TeaCacheConfig.accumulate="abs").
    """
    return decide_with_partials(indicator, prev, state, coefficients, threshold, force=force,
                                scale=scale, shift=shift, norm=norm, eps=eps,
                                max_consecutive_skips=max_consecutive_skips,
                                process_group=process_group, accumulate_abs=accumulate_abs)[0]


def decide_with_partials(indicator: Tensor, prev: Tensor, state: Tensor,
                         coefficients: Sequence[float], threshold: float, *, force=False,
                         scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                         norm: Optional[str] = "layer", eps: float = 1e-6,
                         max_consecutive_skips: Optional[int] = None, process_group=None,
                         step: Optional[Tensor] = None, accumulate_abs: bool = False):
    """:func:`decide`, also returning the fp32 ``(2,)`` partials (for a trace).

    With a process_group the force flag is agreed on the device (any rank's
    force, or ranks at different ``step`` s, make every rank compute).
    """
    partials = indicator_partials_(indicator, prev, scale=scale, shift=shift, norm=norm, eps=eps)
    if process_group is not None:
        force = reduce_partials_(partials, process_group, force=force, step=step, sync_free=True)
    flag = ops.teacache_decide_(partials, state, coefficients, threshold, force=force,
                                max_consecutive_skips=max_consecutive_skips,
                                accumulate_abs=accumulate_abs)
    return flag, partials


def finish_span_(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> Tensor:
    """End of the cached span: writes the span's output into ``out`` and returns it.

    compute: out is the blocks' output, kept as is; residual <- out - inp.
    skip: out is ``inp`` passed through; out <- inp + residual, residual kept.
    ``residual`` (updated in place) may have another float dtype than the
    stream; it lives on the stream's device.
    """
    ops.finish_span_(compute, out, inp, residual)  # one launch on the CUDA backend
    return out


class SyncFreeBranch:
    """All device state of one CFG branch in the wrapper's sync-free mode.

    The schedule, the indicator's previous value, the decision state, the
    residual, and per-step traces of the compute flag and the partials
    (preallocated, written at the device step index; read only by
    :meth:`stats`). Buffers that depend on the activations' shape are made on
    the first call and remade when the shape changes (that call is then
    forced: the schedule restarts at step 0).
    """

    def __init__(self, forced: Sequence[bool], device=None):
        self.schedule = DeviceSchedule(forced, device)
        n = self.schedule.num_steps
        with torch.inference_mode(False):
            self.flags = torch.zeros(n, dtype=torch.bool, device=device)
            self.partials = torch.full((n, 2), float("nan"), dtype=torch.float32, device=device)
        self.prev: Optional[Tensor] = None
        self.state: Optional[Tensor] = None
        self.residual: Optional[Tensor] = None
        # per call (set by the first block, read by the span's end)
        self.compute: Optional[Tensor] = None
        self.stream_in: Optional[Tensor] = None
        self.captured: dict = {}

    def prepare(self, x: Tensor, stream: Tensor, cache_dtype=None) -> None:
        """Buffers for an indicator like ``x`` and a stream like ``stream``."""
        dtype = cache_dtype or stream.dtype
        if self.schedule.forced.device != x.device:
            self.schedule.to(x.device)
            self.flags, self.partials = self.flags.to(x.device), self.partials.to(x.device)
        if (self.prev is None or self.prev.shape != x.shape or self.prev.dtype != x.dtype
                or self.prev.device != x.device or self.residual.shape != stream.shape
                or self.residual.dtype != dtype):
            # normal tensors even under torch.inference_mode(): a later call under
            # no_grad updates them in place
            with torch.inference_mode(False):
                self.prev = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
                self.state = ops.new_decide_state((2,), x.device)
                self.residual = torch.zeros(stream.shape, dtype=dtype, device=stream.device)
            self.schedule.reset()

    def record(self, step: Tensor, compute: Tensor, partials: Tensor) -> None:
        """Write the call's flag and partials at its device step index."""
        self.flags.index_copy_(0, step, compute.reshape(1))
        self.partials.index_copy_(0, step, partials.reshape(1, 2))

    def reset(self) -> None:
        """A new generation: restart at step 0 (forced, so the cache refills)."""
        self.schedule.reset()
        if self.prev is not None:
            self.prev.zero_()

    def stats(self, coefficients=(), accumulate_abs: bool = False) -> dict:
        """This generation's steps so far in the stats schema, plus ``calls``
        and ``wraps`` (generations the device counter started on its own):
        the one host read of the traces."""
        sched = self.schedule
        n, calls, starts = int(sched.calls), int(sched.total), int(sched.starts)
        steps = self.flags[:n].tolist()
        p = self.partials[:n].cpu()
        computed = sum(steps)
        batch = self.residual.shape[0] if self.residual is not None else 0
        rel = (p[:, 0] / p[:, 1]).tolist()
        negative = sum(1 for r in rel if math.isfinite(r) and estimate(coefficients, r, accumulate_abs) < 0)
        entry = branch_entry(computed=computed, skipped=n - computed, steps=steps,
                             sample_computed=[computed] * batch,
                             sample_skipped=[n - computed] * batch,
                             rel_l1=rel, negative_estimates=negative)
        return dict(entry, calls=calls, wraps=max(0, starts - 1))

    def tensors(self):
        return [t for t in (self.flags, self.partials, self.prev, self.state, self.residual,
                            *self.schedule.tensors()) if t is not None]
