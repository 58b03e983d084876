"""Per-branch cache state and its numerics (host-read mode).

A :class:`BranchState` holds what one CFG branch keeps between calls: the
previous indicator (``prev``), the decision state, the residual of the last
computed step, and counters for stats. Its methods are the only place where
the wrapper's tensors meet the ops: the indicator's partial sums, the
residual's capture and its application.

:class:`CacheState` is one wrapped model's state: the call clock and the
branches. A new generation drops every branch (their buffers are freed).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..distributed import agree_, resolve_group
from ..lanes import ApplyLane, CaptureLane, EmbeddingLane, IndicatorLane
from .clock import CallClock, CallContext, Tick
from .config import TeaCacheConfig
from .decision import HostDecision

__all__ = ["BranchState", "CacheState", "indicator_partials_", "reduce_partials_", "sequence_group",
           "buffer_like"]


def buffer_like(t: Optional[Tensor], like: Tensor, *, dtype=None, device=None, zero=False,
                pin=False) -> Tensor:
    """``t`` when it already has ``like``'s shape (and the dtype / device asked
    for), else a fresh buffer: the one rule for every cache buffer."""
    dtype = dtype or like.dtype
    device = device or like.device
    if t is not None and t.shape == like.shape and t.dtype == dtype and t.device == device:
        return t
    if zero:
        return torch.zeros(like.shape, dtype=dtype, device=device)
    return torch.empty(like.shape, dtype=dtype, device=device, pin_memory=pin)


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


def sequence_group(process_group: Any, device: torch.device) -> Any:
    """The group a call's partials are summed over now, or None (no
    communication: the caller builds no facts). process_group: as for
    :func:`reduce_partials_`."""
    return None if process_group is None else resolve_group(process_group, device)


def reduce_partials_(partials: Tensor, process_group: Any, *, force=False,
                     facts: Optional[Dict[str, int]] = None, step: Optional[Tensor] = None,
                     sync_free: bool = False):
    """Sum the partials over a sequence-parallel group (in place), in rank
    order, so every rank holds the same bits; agree on the force flag and
    check the call's facts (step, schedule, shapes) across the ranks.

    process_group: None (no communication), a ProcessGroup, or the
    ``GroupSource`` that apply_teacache made (a diffusers context-parallel
    group found at each call). Returns the agreed force: ``force`` itself
    without a group; else the OR over the ranks. A disagreement on the
    facts raises on every rank (host mode); sync_free=True agrees on the
    device without a host read (the force a 0-d bool tensor, ``step`` the
    call's device step). See teacache_fast.distributed.agree_.
    """
    if process_group is None:
        return force
    return agree_(partials, process_group, force=force, facts=facts, step=step,
                  sync_free=sync_free)


class BranchState:
    """Everything one CFG branch keeps between calls."""

    def __init__(self):
        self.prev: Optional[Tensor] = None           # indicator of the previous call
        self.decision: Optional[HostDecision] = None  # [acc, skips] per state, on the host
        self.residual: Optional[Tensor] = None       # stream_out - stream_in of the last compute
        self.computed = 0
        self.skipped = 0
        self.sample_computed: Optional[List[int]] = None
        self.sample_skipped: Optional[List[int]] = None
        self.steps: List[bool] = []                  # per call: computed (all samples)?
        self.partials: Dict[int, List[List[float]]] = {}  # step -> the host rows read
        # the op calls of every call, checked once per argument signature (teacache_fast.lanes)
        self._indicator, self._embedding = IndicatorLane(), EmbeddingLane()
        self._capture, self._apply = CaptureLane(), ApplyLane()

    def refresh(self) -> None:
        """Drop the buffers (the shapes changed; the next call computes), keep the counters."""
        self.prev = self.decision = self.residual = None

    # ------------------------------------------------------------ indicator + decision

    def partials_(self, x: Tensor, how: Dict[str, Any], per_sample: bool) -> Tensor:
        """The indicator's partial sums against the previous call's; prev <- new."""
        self.prev = prev = buffer_like(self.prev, x, zero=True)  # a fresh prev: the call is forced
        if how.get("norm") is None:
            return self._embedding(x, prev, per_sample)
        return self._indicator(x, how.get("scale"), how.get("shift"), prev, how["norm"],
                               how.get("eps", 1e-6), per_sample)

    def decide(self, step: int, rows: List[List[float]], config: TeaCacheConfig,
               force: bool) -> List[bool]:
        """Host decision from the read partials (rows of ``[num, den]``); the
        rows are kept for stats (the indicator trace)."""
        if self.decision is None or len(self.decision) != len(rows):
            self.decision = HostDecision(len(rows))
        self.partials[step] = rows
        return self.decision.step(rows, config.coefficients, config.threshold, force,
                                  config.max_consecutive_skips, config.accumulate == "abs")

    def must_compute(self, stream: Tensor) -> bool:
        """No residual to reuse for a stream like this one."""
        return self.residual is None or self.residual.shape != stream.shape

    def record(self, flags: List[bool]) -> None:
        """Count one call's flags (one per sample)."""
        if self.sample_computed is None or len(self.sample_computed) != len(flags):
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

    # ------------------------------------------------------------ residual numerics

    def residual_buffer(self, like: Tensor, config: TeaCacheConfig) -> Tensor:
        device = config.cache_device or like.device
        pin = device.type == "cpu" and like.device.type == "cuda"
        self.residual = buffer_like(self.residual, like, dtype=config.cache_dtype, device=device,
                                    pin=pin)
        return self.residual

    def capture(self, out: Tensor, inp: Tensor, config: TeaCacheConfig) -> None:
        """A computed step: residual <- out - inp."""
        residual = self.residual
        if residual is None or residual.shape != inp.shape:  # allocated at the decision, as a rule
            residual = self.residual_buffer(inp, config)
        self._capture(out, inp, residual)

    def apply(self, inp: Tensor) -> Tensor:
        """A skipped step: ``inp + residual`` as a new tensor.

        Not in place: ``inp`` belongs to the model's code, which may still
        hold it (long skip connections). Out of place in one pass (read inp
        and the residual, write the result), not a clone then an add.
        """
        return self._apply(inp, self.residual)

    def capture_and_apply_(self, out: Tensor, inp: Tensor, computing: Tensor,
                           skip_mask: Tensor) -> Tensor:
        """Some samples computed (``computing``: their indices; ``out``: their
        outputs): capture their residuals, apply the others', merge."""
        residual = self.residual
        fresh = torch.empty(out.shape, dtype=residual.dtype, device=residual.device)
        ops.residual_capture_(out, inp.index_select(0, computing.to(inp.device)), fresh)
        residual.index_copy_(0, computing.to(residual.device), fresh)
        h = torch.empty_like(inp)
        ops.residual_apply_(inp, residual, mask=skip_mask, out=h)  # the computed ones: inp, then...
        h.index_copy_(0, computing.to(h.device), out)  # ...their outputs
        return h


class CacheState:
    """All host-read state of one wrapped model: the clock and the branches."""

    def __init__(self, config: TeaCacheConfig, scheduler: Any = None):
        self.config = config
        self.clock = CallClock(config.branches, config.num_steps, scheduler)
        self.branches: Dict[int, BranchState] = {}
        self.calls = 0

    @property
    def num_steps(self) -> Optional[int]:
        return self.clock.num_steps

    @property
    def generations(self) -> int:
        return self.clock.generations

    @property
    def restarts(self) -> Dict[str, int]:
        return dict(self.clock.restarts)

    def begin_call(self, timestep: Any, signature: Any, context: Optional[CallContext] = None,
                   inputs: Sequence[Any] = ()) -> Tick:
        """Place a call on the clock; a new generation drops every branch, a
        branch whose shapes changed is dropped alone."""
        tick = self.clock.next_call(timestep, signature, context, inputs)
        if tick.restarted is not None:
            self._drop()
        elif tick.fresh and tick.branch in self.branches:
            self.branches[tick.branch].refresh()
        self.calls += 1
        return tick

    def branch(self, index: int) -> BranchState:
        if index not in self.branches:
            self.branches[index] = BranchState()
        return self.branches[index]

    def restart(self) -> None:
        """A new generation now (``teacache_fast.reset``)."""
        self.clock.restart("reset")
        self._drop()

    def abandon(self) -> None:
        """A call raised: its generation ends, the next call starts a new one."""
        self.clock.abandon("call raised")

    def _drop(self) -> None:
        self.branches = {}
        self.calls = 0

    def tensors(self) -> Sequence[Tensor]:
        return [t for b in self.branches.values() for t in (b.prev, b.residual) if t is not None]
