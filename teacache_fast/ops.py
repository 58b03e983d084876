"""Public TeaCache ops: argument checks, then dispatch to a backend.

Every op is a ``torch.library.custom_op`` in the ``teacache_fast`` namespace
with a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` sees
each one as a single graph node. The Python wrappers below validate arguments
(device, dtype, shape, emptiness, grad mode) *before* anything runs and raise
errors that name the argument; the backends below them assume valid input.

==========================  ======================================================
op                          what it computes
==========================  ======================================================
modulate                    ``norm(x) * (1 + scale) + shift``
rel_l1_partials             fp32 ``[sum|cur - prev|, sum|prev|]`` (per sample: (B, 2))
modulated_rel_l1_           both above in one pass; writes the new ``m`` into prev
teacache_decide_            ``acc += poly(rel)`` (or ``|poly(rel)|``); compute flags; updates state
residual_capture_           ``residual = out - inp`` into a preallocated buffer
residual_apply_             ``hidden += residual`` (optionally per-sample mask), or
                            ``out = hidden + residual`` with ``out=``
==========================  ======================================================

and, not one of the six (the sync-free wrapper's building block):

==========================  ======================================================
finish_span_                by a device flag: ``residual = out - inp`` or ``out += residual``
==========================  ======================================================
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .backends import (BACKENDS, BackendUnavailableError, backend_for,
                       unavailable_reason, use_backend)

# The six ops: their names are the contract (torch.ops.teacache_fast.<name>,
# teacache_fast._C.<name>, the Triton files, the benchmarks).
OP_NAMES = ("modulate", "rel_l1_partials", "modulated_rel_l1_", "teacache_decide_",
            "residual_capture_", "residual_apply_")

__all__ = [
    "OP_NAMES", "modulate", "rel_l1_partials", "modulated_rel_l1_", "teacache_decide_",
    "residual_capture_", "residual_apply_", "new_decide_state", "backend_for",
    "use_backend", "BackendUnavailableError", "SUPPORTED_DTYPES", "NORMS",
    "MAX_COEFFICIENTS", "unavailable_reason", "BACKENDS",
]

from ._checks import (MAX_COEFFICIENTS, NORMS, SUPPORTED_DTYPES, _as_coefficients, _check_bool,  # noqa: F401
                      _check_like, _check_norm, _check_out, _check_span, _check_same_device, _check_same_shape,
                      _check_tensor, _check_writable, _check_x, _modulation_rows, check_threshold)
from ._registered import (_decide, _decide_impl, _dispatch, _finish_span, _finish_span_impl,  # noqa: F401
                          _modulate, _modulate_impl, _modulated_rel_l1, _modulated_rel_l1_impl,
                          _rel_l1_partials, _rel_l1_partials_impl, _residual_apply,
                          _residual_apply_impl, _residual_apply_out, _residual_apply_out_impl,
                          _residual_capture, _residual_capture_impl)


def modulate(x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
             norm: str = "layer", eps: float = 1e-6) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` computed in fp32, returned in x's dtype.

    x: (B, *, C). scale/shift: (B, C), (B, 1, C) (or a batch of 1) or None.
    norm: "layer" (LayerNorm without affine), "rms" (RMSNorm without weight)
    or "none". A row whose statistics are not finite (NaN in it, or a sum of
    squares that overflows fp32: |x| >~ 1.8e19) comes out NaN, not 0, so the
    indicator of modulated_rel_l1_ is NaN and the decision computes.
    """
    _check_x(x)
    _check_norm(norm, eps)
    scale = _modulation_rows("scale", scale, x)
    shift = _modulation_rows("shift", shift, x)
    return _dispatch(_modulate_impl, _modulate, x)(x, scale, shift, norm, float(eps))


def rel_l1_partials(cur: Tensor, prev: Tensor, per_sample: bool = False) -> Tensor:
    """fp32 ``[sum|cur - prev|, sum|prev|]``: shape (2,), or (B, 2) per sample.

    The relative L1 distance of TeaCache is ``partials[..., 0] / partials[..., 1]``;
    the sums (not the ratio) are what sequence-parallel ranks all-reduce.
    """
    _check_tensor("cur", cur)
    _check_like("prev", prev, "cur", cur)
    _check_bool("per_sample", per_sample)
    if per_sample and cur.dim() < 2:
        raise ValueError(f"per_sample=True needs a batch dimension: cur must be (B, ...), "
                         f"got shape {tuple(cur.shape)}")
    return _dispatch(_rel_l1_partials_impl, _rel_l1_partials, cur)(cur, prev, per_sample)


def modulated_rel_l1_(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], prev: Tensor,
                      norm: str = "layer", eps: float = 1e-6, per_sample: bool = False) -> Tensor:
    """One pass of steps 1-2: ``m = modulate(x, ...)``; return rel_l1_partials(m, prev); prev <- m.

    Reads x and prev once and writes prev once (3 x numel x itemsize bytes);
    no m temporary. The partials compare prev with m rounded to prev's dtype,
    i.e. exactly the values stored for the next call.
    """
    _check_x(x)
    _check_norm(norm, eps)
    scale = _modulation_rows("scale", scale, x)
    shift = _modulation_rows("shift", shift, x)
    _check_like("prev", prev, "x", x)
    _check_writable("prev", prev)
    _check_bool("per_sample", per_sample)
    return _dispatch(_modulated_rel_l1_impl, _modulated_rel_l1, x)(x, scale, shift, prev, norm,
                                                                    float(eps), per_sample)


def new_decide_state(partials_shape=(2,), device="cpu") -> Tensor:
    """A fresh decision state (acc = 0, consecutive skips = 0) for partials of that shape."""
    shape = tuple(partials_shape)
    if not shape or shape[-1] != 2:
        raise ValueError(f"partials_shape must end with 2, got {shape}")
    return torch.zeros(shape, dtype=torch.float32, device=device)


def teacache_decide_(partials: Tensor, state: Tensor, coefficients, threshold: float, *,
                     force=False, max_consecutive_skips: Optional[int] = None,
                     accumulate_abs: bool = False) -> Tensor:
    """Steps 3-4 on the device; returns bool compute flags of shape ``partials.shape[:-1]``.

    state (fp32, same shape as partials) holds ``[acc, consecutive_skips]`` and
    is updated in place. Per state: ``acc += poly(num / den)``; compute when
    ``force``, when ``acc >= threshold``, when ``consecutive_skips`` reached
    ``max_consecutive_skips``, or when the ratio or acc is not finite (zero
    denominator, inf, NaN), or when the skip counter is not a finite number
    >= 0 (a corrupt state: a NaN counter would defeat ``max_consecutive_skips``);
    a compute resets acc and the skip counter (a forced step does not
    accumulate). ``threshold == 0`` never skips. No host sync.
    accumulate_abs: ``acc += |poly(num / den)|`` instead (TeaCacheConfig's
    ``accumulate="abs"``, the convention of some published sets).
    """
    _check_tensor("partials", partials, dtypes=(torch.float32,))
    if partials.shape[-1] != 2:
        raise ValueError(f"partials must have shape (..., 2), got {tuple(partials.shape)}")
    _check_tensor("state", state, dtypes=(torch.float32,))
    _check_same_device("state", state, "partials", partials)
    _check_same_shape("state", state, "partials", partials)
    _check_writable("state", state)
    coeffs = _as_coefficients(coefficients)
    check_threshold(threshold)
    lead = partials.shape[:-1]
    if isinstance(force, torch.Tensor):
        if force.dtype != torch.bool:
            raise TypeError(f"force must be a bool or a bool tensor, got dtype {force.dtype}")
        _check_same_device("force", force, "partials", partials)
        if force.shape != lead:
            raise ValueError(f"force must have shape {tuple(lead)} (partials without the last "
                             f"dimension), got {tuple(force.shape)}")
    elif not isinstance(force, bool):
        raise TypeError(f"force must be a bool or a bool tensor, got {type(force).__name__}")
    if max_consecutive_skips is None:
        max_skips = -1
    elif isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, numbers.Integral) \
            or max_consecutive_skips < 0:
        raise ValueError(f"max_consecutive_skips must be None or an int >= 0, got {max_consecutive_skips!r}")
    else:
        max_skips = int(max_consecutive_skips)
    _check_bool("accumulate_abs", accumulate_abs)
    # a host bool travels as a scalar (no per-call flag tensor, no fill launch)
    flags, force_all = (force, False) if isinstance(force, Tensor) else (None, force)
    return _dispatch(_decide_impl, _decide, partials)(partials, state, coeffs, float(threshold),
                                                      flags, max_skips, accumulate_abs, force_all)


def residual_capture_(out: Tensor, inp: Tensor, residual: Tensor) -> None:
    """``residual = out - inp`` (fp32 arithmetic) into a preallocated buffer.

    residual may have any supported float dtype (an fp32 cache of bf16
    activations is fine) and may live on another device (e.g. pinned CPU).
    """
    _check_tensor("out", out)
    _check_like("inp", inp, "out", out)
    _check_tensor("residual", residual)
    _check_same_shape("residual", residual, "out", out)
    _check_writable("residual", residual)
    _dispatch(_residual_capture_impl, _residual_capture, out)(out, inp, residual)


def residual_apply_(hidden: Tensor, residual: Tensor, mask: Optional[Tensor] = None, *,
                    out: Optional[Tensor] = None) -> None:
    """``hidden += residual`` in place (fp32 add, rounded once to hidden's dtype).

    mask: optional (B,) bool tensor on hidden's device; only samples whose
    mask is set change. residual may have another float dtype or device.
    out: write ``hidden + residual`` into ``out`` instead (hidden's dtype,
    shape and device, sharing memory with neither input) and leave hidden as
    it is: one pass (read hidden and residual, write out), where
    ``hidden.clone()`` then an in-place add takes two. Samples whose mask is
    not set get hidden's values copied, bit for bit.
    """
    _check_tensor("hidden", hidden)
    if out is None:
        _check_writable("hidden", hidden)
    _check_tensor("residual", residual)
    _check_same_shape("residual", residual, "hidden", hidden)
    if mask is not None:
        _check_tensor("mask", mask, dtypes=(torch.bool,))
        _check_same_device("mask", mask, "hidden", hidden)
        if mask.shape != (hidden.shape[0],):
            raise ValueError(f"mask must have shape ({hidden.shape[0]},) (one flag per sample of "
                             f"hidden), got {tuple(mask.shape)}")
    if out is None:
        _dispatch(_residual_apply_impl, _residual_apply, hidden)(hidden, residual, mask)
        return
    _check_out(out, hidden, residual)
    _dispatch(_residual_apply_out_impl, _residual_apply_out, hidden)(hidden, residual, mask, out)


def finish_span_(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> None:
    """The end of a sync-free cached span, chosen on the device by ``compute``
    (a 0-d bool tensor; no host read): set, ``residual = out - inp`` (out, the
    blocks' output, kept); clear, ``out += residual`` (out holds the span's
    input passed through; residual kept). The numerics of residual_capture_
    and residual_apply_; the CUDA backend does it in one launch and one pass.
    Not one of OP_NAMES: the sync-free wrapper's building block."""
    _check_span(compute, out, inp, residual)
    _dispatch(_finish_span_impl, _finish_span, out)(compute, out, inp, residual)
