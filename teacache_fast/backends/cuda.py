"""CUDA backend: the compiled kernels of csrc/ through ``teacache_fast._C``.

Same function signatures as :mod:`teacache_fast.backends.torch` (the reference).
This module checks what the C API cannot see from raw pointers (device, dtype,
contiguity, shapes), passes ``data_ptr()`` and the current CUDA stream, allocates
outputs and reduction workspaces with torch (so the caching allocator reuses
them), and turns a C API error into a ``RuntimeError`` carrying its message.
Misaligned pointers (e.g. a slice with an odd storage offset) are fine: the
kernels take 128-bit loads where alignment allows and scalar loads elsewhere.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import BackendUnavailableError

try:
    _C = importlib.import_module("teacache_fast._C")
    _IMPORT_ERROR: Optional[ImportError] = None
except ImportError as exc:  # the pure-Python install: the registry never picks us
    _C = None
    _IMPORT_ERROR = exc

# The C API's codes, as the module exports them (teacache_fast.h is their one home).
if _C is not None:
    _DTYPE_CODES = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}
    _NORM_CODES = {"none": _C.NORM_NONE, "layer": _C.NORM_LAYER, "rms": _C.NORM_RMS}
else:
    _DTYPE_CODES, _NORM_CODES = {}, {}


def _lib():
    if _C is None:
        raise BackendUnavailableError(f"CUDA extension teacache_fast._C is not built ({_IMPORT_ERROR})")
    return _C


def _check(name: str, t: Tensor, device: Optional[torch.device] = None) -> int:
    """Check a tensor the kernels read or write; return its dtype code."""
    if t.device.type != "cuda":
        raise BackendUnavailableError(f"the CUDA backend needs CUDA tensors, {name} is on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for the CUDA backend, got strides {t.stride()}")
    return code


def _check_flags(name: str, t: Tensor, count: int, device: torch.device) -> None:
    if t.dtype != torch.bool or t.device != device or not t.is_contiguous() or t.numel() != count:
        raise ValueError(f"{name} must be a contiguous bool tensor of {count} elements on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _call(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as exc:  # the C API's message, e.g. a CUDA error
        raise RuntimeError(f"teacache_fast CUDA backend: {exc}") from None


def _modulation_params(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]):
    """(scale, scale_stride, shift, shift_stride, param_code) for the C API.

    The kernels read scale/shift in x's dtype or in fp32; any other mix is
    upcast to fp32 here, which is exact (the reference computes in fp32 too).
    """
    params = [p for p in (scale, shift) if p is not None]
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None:
            _check(name, p, x.device)
    if all(p.dtype == x.dtype for p in params):
        code = _DTYPE_CODES[x.dtype]
    else:
        scale = None if scale is None else scale.float()
        shift = None if shift is None else shift.float()
        code = _DTYPE_CODES[torch.float32]

    def ptr_stride(p: Optional[Tensor]):
        if p is None:
            return 0, 0
        return p.data_ptr(), (p.shape[-1] if p.shape[0] > 1 else 0)  # batch of 1 broadcasts

    s_ptr, s_stride = ptr_stride(scale)
    t_ptr, t_stride = ptr_stride(shift)
    # The caller holds the (possibly upcast) tensors until the launch is queued:
    # a temporary freed earlier could be handed to the output allocated next.
    return (scale, shift), s_ptr, s_stride, t_ptr, t_stride, code


def modulate(x: Tensor, scale, shift, norm: str, eps: float) -> Tensor:
    lib = _lib()
    code = _check("x", x)
    B, R, C = x.shape
    keep, s_ptr, s_stride, t_ptr, t_stride, pcode = _modulation_params(x, scale, shift)
    out = torch.empty_like(x)
    with torch.cuda.device(x.device):
        _call(lib.modulate, x.data_ptr(), s_ptr, s_stride, t_ptr, t_stride, out.data_ptr(),
              B, R, C, code, pcode, _NORM_CODES[norm], float(eps), _stream(x.device))
    del keep
    return out


# Reduction workspaces: the C API's first word is a ticket that must be 0 before
# first use, and every call leaves it 0; so one zeroed workspace per (device,
# stream) serves every later call on that stream (calls on one stream run in
# order), grown when a larger shape comes. Inside a CUDA-graph capture a fresh
# one is allocated (a captured allocation belongs to the graph's pool).
_WORKSPACES: dict = {}


def _workspace(floats: int, device: torch.device) -> Tensor:
    floats = max(floats, 1)
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(floats, dtype=torch.float32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel() < floats:
        ws = torch.zeros(floats, dtype=torch.float32, device=device)
        _WORKSPACES[key] = ws
    return ws


def _partials_out(B: int, per_sample: bool, device: torch.device) -> Tensor:
    return torch.empty((B, 2) if per_sample else (2,), dtype=torch.float32, device=device)


def rel_l1_partials(cur: Tensor, prev: Tensor, per_sample: bool) -> Tensor:
    lib = _lib()
    code = _check("cur", cur)
    if _check("prev", prev, cur.device) != code or prev.shape != cur.shape:
        raise ValueError(f"prev must match cur ({cur.dtype} {tuple(cur.shape)}), "
                         f"got {prev.dtype} {tuple(prev.shape)}")
    B, L = cur.shape
    out = _partials_out(B, per_sample, cur.device)
    with torch.cuda.device(cur.device):
        ws = _workspace(_call(lib.rel_l1_workspace_size, B, L, code), cur.device)
        _call(lib.rel_l1_partials, cur.data_ptr(), prev.data_ptr(), out.data_ptr(), B, L, code,
              per_sample, ws.data_ptr(), ws.numel(), _stream(cur.device))
    return out


def modulated_rel_l1_(x: Tensor, scale, shift, prev: Tensor, norm: str, eps: float,
                      per_sample: bool) -> Tensor:
    lib = _lib()
    code = _check("x", x)
    if _check("prev", prev, x.device) != code or prev.shape != x.shape:
        raise ValueError(f"prev must match x ({x.dtype} {tuple(x.shape)}), "
                         f"got {prev.dtype} {tuple(prev.shape)}")
    B, R, C = x.shape
    keep, s_ptr, s_stride, t_ptr, t_stride, pcode = _modulation_params(x, scale, shift)
    out = _partials_out(B, per_sample, x.device)
    with torch.cuda.device(x.device):
        ws = _workspace(_call(lib.modulated_rel_l1_workspace_size, B, R, C, code), x.device)
        _call(lib.modulated_rel_l1_, x.data_ptr(), s_ptr, s_stride, t_ptr, t_stride,
              prev.data_ptr(), out.data_ptr(), B, R, C, code, pcode, _NORM_CODES[norm],
              float(eps), per_sample, ws.data_ptr(), ws.numel(), _stream(x.device))
    del keep
    return out


def teacache_decide_(partials: Tensor, state: Tensor, coefficients: Sequence[float],
                     threshold: float, force, max_skips: int,
                     accumulate_abs: bool = False) -> Tensor:
    """force: (S,) bool flags, or a Python bool for every state: False passes
    NULL (no forced step), True the never-skip rule (threshold 0), which
    computes and resets every state exactly as a forced step does."""
    lib = _lib()
    for name, t in (("partials", partials), ("state", state)):
        if _check(name, t, partials.device) != _DTYPE_CODES[torch.float32] or t.dim() != 2 \
                or t.shape[-1] != 2:
            raise ValueError(f"{name} must be a contiguous float32 (S, 2) tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if state.shape != partials.shape:
        raise ValueError(f"state must have the shape of partials {tuple(partials.shape)}, "
                         f"got {tuple(state.shape)}")
    S = partials.shape[0]
    force_ptr = 0
    if isinstance(force, Tensor):
        _check_flags("force", force, S, partials.device)
        force_ptr = force.data_ptr()
    elif force:
        threshold = 0.0
    compute = torch.empty(S, dtype=torch.bool, device=partials.device)
    with torch.cuda.device(partials.device):
        _call(lib.teacache_decide_, partials.data_ptr(), state.data_ptr(),
              [float(c) for c in coefficients], float(threshold), force_ptr,
              int(max_skips), bool(accumulate_abs), compute.data_ptr(), S, _stream(partials.device))
    return compute


def residual_capture_(out: Tensor, inp: Tensor, residual: Tensor) -> None:
    lib = _lib()
    code = _check("out", out)
    if _check("inp", inp, out.device) != code or inp.shape != out.shape:
        raise ValueError(f"inp must match out ({out.dtype} {tuple(out.shape)}), "
                         f"got {inp.dtype} {tuple(inp.shape)}")
    rcode = _check("residual", residual, out.device)
    if residual.numel() != out.numel():
        raise ValueError(f"residual must have {out.numel()} elements, got {residual.numel()}")
    with torch.cuda.device(out.device):
        _call(lib.residual_capture_, out.data_ptr(), inp.data_ptr(), residual.data_ptr(),
              out.numel(), code, rcode, _stream(out.device))


def residual_apply_(hidden: Tensor, residual: Tensor, mask: Optional[Tensor],
                    out: Optional[Tensor] = None) -> None:
    """hidden += residual, or with ``out`` out = hidden + residual (hidden kept)."""
    lib = _lib()
    code = _check("hidden", hidden)
    rcode = _check("residual", residual, hidden.device)
    if residual.shape != hidden.shape:
        raise ValueError(f"residual must have the shape of hidden {tuple(hidden.shape)}, "
                         f"got {tuple(residual.shape)}")
    B, L = hidden.shape
    mask_ptr = 0
    if mask is not None:
        _check_flags("mask", mask, B, hidden.device)
        mask_ptr = mask.data_ptr()
    out_ptr = 0
    if out is not None:
        if _check("out", out, hidden.device) != code or out.shape != hidden.shape:
            raise ValueError(f"out must match hidden ({hidden.dtype} {tuple(hidden.shape)}), "
                             f"got {out.dtype} {tuple(out.shape)}")
        out_ptr = out.data_ptr()
    with torch.cuda.device(hidden.device):
        _call(lib.residual_apply_, hidden.data_ptr(), residual.data_ptr(), mask_ptr, B, L, code,
              rcode, _stream(hidden.device), out_ptr)


def finish_span_(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> None:
    """The sync-free span end in one launch and one pass (tcf_finish_span)."""
    lib = _lib()
    code = _check("out", out)
    if _check("inp", inp, out.device) != code or inp.numel() != out.numel():
        raise ValueError(f"inp must match out ({out.dtype}, {out.numel()} elements), "
                         f"got {inp.dtype}, {inp.numel()}")
    rcode = _check("residual", residual, out.device)
    if residual.numel() != out.numel():
        raise ValueError(f"residual must have {out.numel()} elements, got {residual.numel()}")
    _check_flags("compute", compute.reshape(1), 1, out.device)
    with torch.cuda.device(out.device):
        _call(lib.finish_span_, compute.data_ptr(), out.data_ptr(), inp.data_ptr(), residual.data_ptr(),
              out.numel(), code, rcode, _stream(out.device))
