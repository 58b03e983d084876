"""float64 oracles and tolerances shared by the op tests."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from teacache_fast.backends import unavailable_reason

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Max abs error allowed for a value of magnitude ~1 rounded to the dtype
# (a couple of ulps: fp32 differs only by accumulation order).
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Relative tolerance for fp32 sums of values rounded to the dtype.
SUM_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def runnable_backends(device: str) -> list[str]:
    """Backends that can run on ``device`` here (triton only once its module exists)."""
    names = []
    for name in ("cuda", "triton", "cpu", "torch"):
        if unavailable_reason(name, device) is not None:
            continue
        if name == "triton":
            try:
                import teacache_fast.backends.triton  # noqa: F401
            except ImportError:
                continue
        names.append(name)
    return names


def modulate64(x, scale, shift, norm: str, eps: float) -> torch.Tensor:
    x = x.double()
    if norm == "layer":
        mean = x.mean(-1, keepdim=True)
        n = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    elif norm == "rms":
        ms = (x * x).mean(-1, keepdim=True)
        # a row whose statistics are not finite (inf in it) is NaN throughout, as
        # LayerNorm's is: the ops never let such a row read as "no change"
        n = torch.where(torch.isfinite(ms), x / torch.sqrt(ms + eps), float("nan"))
    else:
        n = x
    lead = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if scale is not None:
        n = n * (1 + scale.double().reshape(scale.shape[0], -1).reshape((-1,) + lead[1:]))
    if shift is not None:
        n = n + shift.double().reshape(shift.shape[0], -1).reshape((-1,) + lead[1:])
    return n


def partials64(cur, prev, per_sample: bool) -> torch.Tensor:
    cur, prev = cur.double(), prev.double()
    if per_sample:
        c, p = cur.reshape(cur.shape[0], -1), prev.reshape(prev.shape[0], -1)
        return torch.stack(((c - p).abs().sum(1), p.abs().sum(1)), dim=1)
    return torch.stack(((cur - prev).abs().sum(), prev.abs().sum()))


class RecordOps(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees (and runs it)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
