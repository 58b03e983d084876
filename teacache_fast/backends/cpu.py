"""Native CPU backend: the fused indicator ops in one pass over each row.

``modulate``, ``rel_l1_partials``, ``modulated_rel_l1_`` and ``teacache_decide_``
run the C kernels of ``backends/native/cpu_kernels.c`` (compiled on first use,
see ``native/build.py``): each row is read once, normalized, modulated,
rounded to the stored dtype and compared in vector blocks, where the torch
backend needs a dozen passes and as many op dispatches; the decision is one
call where the torch backend runs about 40 small ops (its bits are the torch
backend's). The residual ops are one torch op already; out of place and
larger than the caches they run natively with streaming stores (no read of
the lines they write); the sync-free span end reads its flag on the host (CPU
memory, no sync) and runs one of them.

Arguments arrive checked and shaped by teacache_fast.ops (contiguous (B, R, C)
rows; scale/shift contiguous (B or 1, C)). Results agree with the torch
backend to fp32 rounding (sums in double, rows added in order, so the bits do
not depend on the thread count), not bitwise.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from . import torch as _reference
from .native.build import library

__all__ = ["modulate", "rel_l1_partials", "modulated_rel_l1_", "teacache_decide_",
           "residual_capture_", "residual_apply_", "finish_span_"]

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NORMS = {"layer": 0, "rms": 1, "none": 2}

# Residual ops of at least this many bytes, with every tensor bf16 or every
# one fp32, go native (tcf_cpu_residual): out of place with streaming stores
# (at that size the tensors do not stay in the caches, and a normal store first
# reads every line it writes: 4 tensors' traffic for 3 tensors' bytes), bf16 in
# place in deinterleaved blocks. The rest (smaller, mixed or fp16 dtypes, fp32
# in place, masked) is the torch backend's one op. Measured in the op benchmark
# (benchmarks/results/cpu-*.md): flux-b2 bf16 capture 1.2x torch's sub, flux
# bf16 in-place apply 1.3x torch's add_.
_STREAM_MIN_BYTES = 16 << 20
_STREAMED_DTYPES = (torch.bfloat16, torch.float32)


def _streamed(op: str, a: Tensor, b: Tensor, dst: Tensor, subtract: bool) -> bool:
    """Run dst = a -/+ b natively when it pays off; False: the caller runs torch.
    In place (dst is a) the stores are normal ones (the lines are in the cache
    already), and only bf16 gains (its deinterleaved blocks; torch's fp32
    add_ is as fast, measured)."""
    if dst.dtype not in _STREAMED_DTYPES or not a.dtype == b.dtype == dst.dtype \
            or dst.numel() * dst.element_size() < _STREAM_MIN_BYTES \
            or (dst is a and dst.dtype == torch.float32):
        return False
    _run(op, "tcf_cpu_residual", a.data_ptr(), b.data_ptr(), dst.data_ptr(), _DTYPES[dst.dtype],
         dst.numel(), int(subtract), int(dst is not a), torch.get_num_threads())
    return True


def residual_capture_(out: Tensor, inp: Tensor, residual: Tensor) -> None:
    if not _streamed("residual_capture_", out, inp, residual, subtract=True):
        _reference.residual_capture_(out, inp, residual)


def residual_apply_(hidden: Tensor, residual: Tensor, mask: Optional[Tensor], out: Optional[Tensor] = None) -> None:
    if mask is not None or not _streamed("residual_apply_", hidden, residual,
                                         hidden if out is None else out, subtract=False):
        _reference.residual_apply_(hidden, residual, mask, out)


def finish_span_(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> None:
    """The sync-free span end. On the CPU the flag is host memory, so reading
    it costs no device sync: one of the two residual ops runs, 3 passes (the
    torch backend's device-side select makes a fresh capture and a masked
    apply, about 8)."""
    if compute.item():
        residual_capture_(out, inp, residual)
    else:
        residual_apply_(out.view(1, -1), residual.view(1, -1), None)


def _lib():
    lib, reason = library()
    if lib is None:
        raise RuntimeError(f"the native CPU kernels are not available: {reason}")
    return lib


def _params(t: Optional[Tensor]):
    if t is None:
        return None, 0, 0
    return t.data_ptr(), _DTYPES[t.dtype], t.shape[0]


def _partials(B: int, per_sample: bool) -> Tensor:
    return torch.empty((B, 2) if per_sample else (2,), dtype=torch.float32)


_profiling = torch._C._autograd._profiler_enabled


def _run(op: str, kernel: str, *args) -> None:
    """Call the native ``kernel``; under the torch profiler the call is
    recorded as ``teacache_fast::cpu::<kernel>`` (the op benchmark counts it)."""
    fn = getattr(_lib(), kernel)
    if _profiling():
        with torch.profiler.record_function(f"teacache_fast::cpu::{kernel}"):
            status = fn(*args)
    else:
        status = fn(*args)
    if status:
        raise MemoryError(f"teacache_fast cpu backend: {op} could not allocate its row scratch")


def modulate(x, scale, shift, norm: str, eps: float) -> Tensor:
    B, R, C = x.shape
    out = torch.empty_like(x)
    _run("modulate", "tcf_cpu_modulate", x.data_ptr(), _DTYPES[x.dtype], *_params(scale), *_params(shift),
         out.data_ptr(), B, R, C, _NORMS[norm], eps, torch.get_num_threads())
    return out


def rel_l1_partials(cur, prev, per_sample: bool) -> Tensor:
    B, L = cur.shape
    out = _partials(B, per_sample)
    _run("rel_l1_partials", "tcf_cpu_rel_l1_partials", cur.data_ptr(), prev.data_ptr(), _DTYPES[cur.dtype],
         B, L, int(per_sample), out.data_ptr(), torch.get_num_threads())
    return out


def modulated_rel_l1_(x, scale, shift, prev, norm: str, eps: float, per_sample: bool) -> Tensor:
    B, R, C = x.shape
    out = _partials(B, per_sample)
    _run("modulated_rel_l1_", "tcf_cpu_modulated_rel_l1", x.data_ptr(), _DTYPES[x.dtype], *_params(scale),
         *_params(shift), prev.data_ptr(), B, R, C, _NORMS[norm], eps, int(per_sample), out.data_ptr(),
         torch.get_num_threads())
    return out


# (the list, its fp32 ctypes array): a run uses one set; replaced as one
# tuple, so a thread with another set never reads a half-updated pair
_LAST_COEFFICIENTS = (None, None)


def _fp32_coefficients(coefficients):
    """The coefficients as a C float array (each rounded to fp32), made once per set."""
    global _LAST_COEFFICIENTS
    entry = _LAST_COEFFICIENTS
    if entry[0] != coefficients:
        entry = (list(coefficients), (ctypes.c_float * len(coefficients))(*coefficients))
        _LAST_COEFFICIENTS = entry
    return entry[1]


def teacache_decide_(partials, state, coefficients, threshold: float, force, max_skips: int,
                     accumulate_abs: bool = False) -> Tensor:
    """One native call for S states (the torch backend's fp32 arithmetic, bit
    for bit); force: (S,) bool flags, or a Python bool for every state."""
    S = partials.shape[0]
    coeffs = _fp32_coefficients(coefficients)
    compute = torch.empty(S, dtype=torch.bool)
    flags = force.data_ptr() if isinstance(force, Tensor) else None
    _run("teacache_decide_", "tcf_cpu_decide", partials.data_ptr(), state.data_ptr(), S, coeffs,
         len(coefficients), threshold, int(threshold <= 0.0), flags,
         int(bool(force)) if flags is None else 0, max_skips, int(accumulate_abs), compute.data_ptr())
    return compute
