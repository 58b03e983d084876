"""Prepared op calls: the cache's hot path, checked once per argument signature.

A lane is one call site of the cache (a branch's indicator, its residual
capture, its residual apply). Its first call, and every call whose argument
signature differs from the last checked one, goes through teacache_fast.ops
with all of its checks. A later call with the same signature (the same tensor
types, shapes, dtypes, devices and contiguity, the same scalar arguments, the
same requested backend, grad mode off) would pass the same checks and be
shaped the same way, so it goes straight to the backend function. That saves
the checks and the shaping on every call of a generation (tens of
microseconds of host time per call on a small model, more in situ).

A call takes the checked op whenever ops itself would not call the
implementation directly: under torch.compile, a dispatch mode, the profiler,
with a tensor subclass, or with grad mode on. Results are those of the ops:
the same backend function runs on the same views.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops
from ._registered import _untraced
from .backends import backend_for, get_backend, requested_backend

__all__ = ["IndicatorLane", "EmbeddingLane", "CaptureLane", "ApplyLane"]


def _direct() -> bool:
    """Whether a call may skip the checks and torch.library dispatch: ops'
    rule for a direct call, with grad mode off (the grad checks then hold)."""
    return not torch.is_grad_enabled() and _untraced()


def _sig(t: Optional[Tensor]) -> Optional[Tuple]:
    """What the checks and the shaping read of a tensor argument."""
    if t is None:
        return None
    return type(t), t.shape, t.dtype, t.device, t.is_contiguous()


class _Lane:
    """The signature of the last call that passed the checks with every
    tensor contiguous, and the backend module that ran it."""

    __slots__ = ("key", "backend")

    def __init__(self):
        self.key = None
        self.backend = None

    def hit(self, key) -> bool:
        return key is not None and key == self.key

    def arm(self, key, tensors, ref: Tensor) -> None:
        """After a checked call: the next call with ``key`` goes direct, if
        every tensor is a plain contiguous Tensor (the shaping is then views)."""
        ok = key is not None and all(t is None or (type(t) is Tensor and t.is_contiguous())
                                     for t in tensors)
        self.key = key if ok else None
        self.backend = get_backend(backend_for(ref)) if ok else None


def _rows3(x: Tensor) -> Tensor:
    return x if x.dim() == 3 else x.view(x.shape[0], -1, x.shape[-1])


def _rows2(p: Optional[Tensor]) -> Optional[Tensor]:
    return p if p is None or p.dim() == 2 else p.view(p.shape[0], p.shape[-1])


class IndicatorLane(_Lane):
    """``ops.modulated_rel_l1_(x, scale, shift, prev, norm, eps, per_sample)``."""

    __slots__ = ()

    def __call__(self, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], prev: Tensor,
                 norm: str, eps: float, per_sample: bool) -> Tensor:
        key = ((_sig(x), _sig(scale), _sig(shift), _sig(prev), norm, eps, per_sample,
                requested_backend()) if _direct() else None)
        if self.hit(key):
            x3 = _rows3(x)
            return self.backend.modulated_rel_l1_(x3, _rows2(scale), _rows2(shift), prev.view(x3.shape),
                                                  norm, float(eps), per_sample)
        partials = ops.modulated_rel_l1_(x, scale, shift, prev, norm, eps, per_sample)
        self.arm(key, (x, scale, shift, prev), x)
        return partials


class EmbeddingLane(_Lane):
    """``ops.rel_l1_partials(x, prev, per_sample)``, then ``prev <- x`` (an
    indicator compared as is, e.g. a timestep embedding)."""

    __slots__ = ()

    def __call__(self, x: Tensor, prev: Tensor, per_sample: bool) -> Tensor:
        key = (_sig(x), _sig(prev), per_sample, requested_backend()) if _direct() else None
        if self.hit(key):
            rows = x.shape[0] if per_sample else 1
            partials = self.backend.rel_l1_partials(x.view(rows, -1), prev.view(rows, -1), per_sample)
        else:
            partials = ops.rel_l1_partials(x, prev, per_sample)
            self.arm(key, (x, prev), x)
        prev.copy_(x)
        return partials


class CaptureLane(_Lane):
    """``ops.residual_capture_(out, inp, residual)``."""

    __slots__ = ()

    def __call__(self, out: Tensor, inp: Tensor, residual: Tensor) -> None:
        key = (_sig(out), _sig(inp), _sig(residual), requested_backend()) if _direct() else None
        if self.hit(key):
            self.backend.residual_capture_(out.view(-1), inp.view(-1), residual.view(-1))
            return
        ops.residual_capture_(out, inp, residual)
        # a residual on another device (a CPU cache of GPU activations) keeps the op's copy path
        self.arm(key if residual.device == out.device else None, (out, inp, residual), out)


class ApplyLane(_Lane):
    """``inp + residual`` as a new tensor (``ops.residual_apply_(inp, residual, out=fresh)``).

    The lane allocates ``out`` itself, so it shares memory with neither input:
    the overlap checks of ``out=`` hold by construction.
    """

    __slots__ = ()

    def __call__(self, inp: Tensor, residual: Tensor) -> Tensor:
        key = (_sig(inp), _sig(residual), requested_backend()) if _direct() else None
        out = torch.empty_like(inp)
        if self.hit(key):
            B = inp.shape[0]
            self.backend.residual_apply_(inp.view(B, -1), residual.view(B, -1), None, out=out.view(B, -1))
            return out
        ops.residual_apply_(inp, residual, out=out)
        self.arm(key if residual.device == inp.device else None, (inp, residual, out), inp)
        return out
