"""Argument checks of the public ops (teacache_fast.ops): each error names the
argument and says what was expected. Nothing here runs a kernel."""
from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORMS = ("layer", "rms", "none")
MAX_COEFFICIENTS = 9  # polynomial degree 0..8
_F32_MAX = 3.4028234663852886e38


# --------------------------------------------------------------------------- checks

def _dtype_names() -> str:
    return "float32, float16 or bfloat16"


def _check_tensor(name: str, t, *, min_dim: int = 1, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = _dtype_names() if dtypes is SUPPORTED_DTYPES else ", ".join(map(str, dtypes))
        raise TypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} requires grad: teacache_fast ops are inference-only and have no backward; "
            "call them under torch.no_grad() / torch.inference_mode() or pass a detached tensor")


def _check_same_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "they must be on the same device")


def _check_same_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(t.shape)}")


def _check_writable(name: str, t: Tensor) -> None:
    """t is written in place: no two of its elements may share memory (an
    expand()ed or broadcast_to() view has stride 0 and cannot take a write).

    torch's own rule (MemOverlap::Yes): a dimension of size > 1 with stride 0.
    Skipped while Dynamo traces (reading strides there would add guards and a
    private torch call would break the graph); eager calls are checked."""
    if torch.compiler.is_compiling():
        return
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise ValueError(
            f"{name} is written in place, so each of its elements needs its own memory; got shape "
            f"{tuple(t.shape)} with strides {t.stride()} (a stride-0 view, e.g. from expand() or "
            f"broadcast_to()): pass {name}.clone() or a freshly allocated tensor")


def _check_like(name: str, t, ref_name: str, ref: Tensor) -> None:
    """t is a valid tensor with ref's device, shape and dtype (e.g. prev vs x)."""
    _check_tensor(name, t)
    _check_same_device(name, t, ref_name, ref)
    _check_same_shape(name, t, ref_name, ref)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def _check_norm(norm, eps) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if type(eps) is float and 0.0 < eps < math.inf:  # the common case, without the ABC check
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def _modulation_rows(name: str, p, x: Tensor) -> Optional[Tensor]:
    """Check a scale/shift tensor against x (B, *, C); return it as (B or 1, C)."""
    if p is None:
        return None
    _check_tensor(name, p)
    _check_same_device(name, p, "x", x)
    B, C = x.shape[0], x.shape[-1]
    ok = (p.dim() == 2 or (p.dim() == 3 and p.shape[1] == 1)) and p.shape[-1] == C \
        and p.shape[0] in (1, B)
    if not ok:
        raise ValueError(f"{name} must have shape ({B}, {C}), ({B}, 1, {C}) or a batch of 1 "
                         f"to broadcast, for x of shape {tuple(x.shape)}; got {tuple(p.shape)}")
    return p if p.dim() == 2 else p.reshape(p.shape[0], C)


def _check_x(x: Tensor) -> None:
    _check_tensor("x", x, min_dim=2)


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def _as_coefficients(coefficients) -> List[float]:
    if isinstance(coefficients, torch.Tensor):
        if coefficients.dim() != 1:
            raise ValueError(f"coefficients must be 1-D, got shape {tuple(coefficients.shape)}")
        coefficients = coefficients.tolist()
    if isinstance(coefficients, (str, bytes)) or not hasattr(coefficients, "__iter__"):
        raise TypeError(f"coefficients must be a sequence of numbers, got {type(coefficients).__name__}")
    values = list(coefficients)
    if not 1 <= len(values) <= MAX_COEFFICIENTS:
        raise ValueError(f"coefficients must hold 1 to {MAX_COEFFICIENTS} numbers (highest power "
                         f"first, e.g. 5 for a degree-4 polynomial), got {len(values)}")
    out = []
    for i, c in enumerate(values):
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not abs(float(c)) <= _F32_MAX:
            # the decision evaluates the polynomial in fp32: 1e300 would be inf there
            raise ValueError(f"coefficients[{i}] must be a finite number within float32 range "
                             f"(|c| <= {_F32_MAX:.7g}), got {c!r}")
        out.append(float(c))
    return out


def check_threshold(threshold) -> float:
    """The one threshold rule (ops and TeaCacheConfig): a finite number >= 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the bytes a and b span share memory (a conservative range test)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    if sa.data_ptr() != sb.data_ptr():
        return False

    def span(t: Tensor):
        lo = t.data_ptr()
        hi = lo + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0) * t.element_size()
        return lo, hi + t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_out(out: Tensor, hidden: Tensor, residual: Tensor) -> None:
    _check_tensor("out", out)
    if out.dtype != hidden.dtype:
        raise TypeError(f"out must have hidden's dtype {hidden.dtype}, got {out.dtype}")
    _check_same_device("out", out, "hidden", hidden)
    _check_same_shape("out", out, "hidden", hidden)
    _check_writable("out", out)
    if torch.compiler.is_compiling():
        return
    if _overlaps(out, residual):
        raise ValueError("out shares memory with residual: out-of-place residual_apply_ needs an "
                         "out of its own (or omit out to add into hidden)")
    if _overlaps(out, hidden):
        raise ValueError("out shares memory with hidden: pass out=None to add into hidden in place, "
                         "or an out of its own")


def _check_span(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> None:
    """The arguments of ops.finish_span_."""
    _check_tensor("out", out)
    _check_writable("out", out)
    _check_like("inp", inp, "out", out)
    _check_tensor("residual", residual)
    _check_same_shape("residual", residual, "out", out)
    _check_same_device("residual", residual, "out", out)
    _check_writable("residual", residual)
    _check_tensor("compute", compute, min_dim=0, dtypes=(torch.bool,))
    _check_same_device("compute", compute, "out", out)
    if compute.dim() != 0:
        raise ValueError(f"compute must be a 0-d bool tensor, got shape {tuple(compute.shape)}")
