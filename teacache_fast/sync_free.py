"""Sync-free skipping: the decision stays on the device, the skip is a ``torch.cond``.

The default wrapper reads the compute flag on the host once per call (a
device->host sync, and a graph break under ``torch.compile``). Here the flag
never leaves the device:

* :class:`DeviceSchedule` keeps the step counter on the device and gives the
  call's "forced" flag, so Python step counters do not recompile every step;
* :func:`decide` runs the indicator and the decision (``modulated_rel_l1_`` /
  ``rel_l1_partials`` + ``teacache_decide_``) and returns a 0-d bool tensor;
* :func:`run_or_pass` runs one block under ``torch.cond(compute, block,
  passthrough)``: on a skipped step the block's work is not done, its inputs
  come back in its output's layout. Per block, so code that a model runs
  between its blocks (concatenations, projections) keeps running as it is;
* :func:`finish_span_` at the end of the cached span picks, elementwise on the
  device, ``out`` (compute; the residual becomes ``out - in``) or
  ``in + residual`` (skip; the residual is kept).

With these a whole transformer call compiles with ``fullgraph=True`` into one
graph that serves every step, and has no host read, so it can be captured in
a CUDA graph. CFG branches each need their own schedule and buffers. :func:`sync_free_step`
does all three for a block stack that is one function of the hidden state.

Numerics match the default wrapper bit for bit: a computed step returns the
blocks' output itself; a skipped one returns ``in + residual`` with one fp32
add rounded to the stream's dtype, as ``residual_apply_`` does; the residual
is ``out - in`` rounded to the cache dtype, as ``residual_capture_`` does.

Costs against the default wrapper: the span end touches the stream and the
residual on every step (an elementwise select instead of one branch), and the
decision is global to the call (``per_sample`` needs a host-side batch split,
which is what the default wrapper does).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import ops

__all__ = ["DeviceSchedule", "decide", "run_or_pass", "finish_span_", "sync_free_step"]


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
        self.forced = torch.tensor(forced, dtype=torch.bool, device=device)
        self.calls = torch.zeros((), dtype=torch.long, device=device)

    @property
    def num_steps(self) -> int:
        return self.forced.numel()

    def tick(self) -> Tensor:
        """The 0-d bool 'forced' flag of this call; advances the counter (no host read)."""
        step = torch.remainder(self.calls, self.num_steps).reshape(1)
        self.calls.add_(1)
        # index_select, not forced[step]: indexing by a 0-d tensor reads it on the host
        return self.forced.index_select(0, step).reshape(())

    def reset(self) -> None:
        self.calls.zero_()


def decide(indicator: Tensor, prev: Tensor, state: Tensor, coefficients: Sequence[float],
           threshold: float, *, force=False, scale: Optional[Tensor] = None,
           shift: Optional[Tensor] = None, norm: Optional[str] = "layer", eps: float = 1e-6,
           max_consecutive_skips: Optional[int] = None, process_group=None) -> Tensor:
    """Indicator + decision on the device; returns the 0-d bool compute flag.

    norm=None compares ``indicator`` as is (an embedding); otherwise it is
    modulated first (``norm``, ``scale``, ``shift``). ``prev`` (the previous
    indicator) and ``state`` (fp32 ``(2,)``) are updated in place. force may
    be a Python bool (a constant under compile) or a 0-d bool tensor.
    process_group: all-reduce the partials over it first (sequence parallel).
    """
    if norm is None:
        partials = ops.rel_l1_partials(indicator, prev)
        prev.copy_(indicator)
    else:
        partials = ops.modulated_rel_l1_(indicator, scale, shift, prev, norm=norm, eps=eps)
    if process_group is not None:
        from .distributed import allreduce_partials_
        allreduce_partials_(partials, process_group)
    return ops.teacache_decide_(partials, state, coefficients, threshold, force=force,
                                max_consecutive_skips=max_consecutive_skips)


def _clone_tensors(tree: Any) -> Any:
    # torch.cond branches may not return their inputs as they are.
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, tree)


def run_or_pass(compute: Tensor, block: Callable[..., Any], passthrough: Callable[..., Any],
                *args, **kwargs) -> Any:
    """``block(*args, **kwargs)`` when ``compute`` is set, else ``passthrough(...)``.

    passthrough returns what the block would, built from its inputs (same
    structure, shapes and dtypes: e.g. ``lambda hidden_states, **_: hidden_states``).
    Tensor arguments travel as ``torch.cond`` operands; everything else
    (ints, None, modules' settings) is closed over.
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    slots = [i for i, v in enumerate(flat) if isinstance(v, Tensor)]

    def rebuild(tensors):
        values = list(flat)
        for i, t in zip(slots, tensors):
            values[i] = t
        return pytree.tree_unflatten(values, spec)

    def on_compute(*tensors):
        a, kw = rebuild(tensors)
        return _clone_tensors(block(*a, **kw))

    def on_skip(*tensors):
        a, kw = rebuild(tensors)
        return _clone_tensors(passthrough(*a, **kw))

    return torch.cond(compute, on_compute, on_skip, tuple(flat[i] for i in slots))


def finish_span_(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> Tensor:
    """End of the cached span: writes the span's output into ``out`` and returns it.

    compute: out is the blocks' output, kept as is; residual <- out - inp.
    skip: out is ``inp`` passed through; out <- inp + residual, residual kept.
    ``residual`` (updated in place) may have another float dtype than the
    stream; it lives on the stream's device.
    """
    fresh = torch.empty_like(residual)
    ops.residual_capture_(out, inp, fresh)
    residual.copy_(torch.where(compute, fresh, residual))
    skip = (~compute).reshape(1).expand(out.shape[0]).contiguous()
    ops.residual_apply_(out, residual, mask=skip)
    return out


def sync_free_step(compute: Tensor, hidden: Tensor, residual: Tensor,
                   run_blocks: Callable[..., Tensor], *operands) -> Tensor:
    """One cached call of a stack that is a function of the hidden state.

    ``run_blocks(hidden, *operands)`` runs the whole span (every block) and
    returns the new hidden state; it runs only when ``compute`` is set.
    Returns the span's output; ``residual`` is updated in place.
    """
    out = run_or_pass(compute, run_blocks, lambda h, *_: h, hidden, *operands)
    return finish_span_(compute, out, hidden, residual)
