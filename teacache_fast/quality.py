"""How far a cached output is from the uncached one: PSNR and SSIM.

Built on torchmetrics (the optional extra ``quality``:
``pip install 'teacache_fast[quality]'``). Both figures compare ``output``
with ``reference`` (the uncached run's output) in float64:

* :func:`psnr`: ``10 log10(data_range^2 / MSE)`` in dB; ``inf`` when equal.
* :func:`ssim`: the mean structural similarity (Gaussian window, sigma 1.5,
  11 wide or the largest odd width the image allows); 1 when equal.
* :func:`compare`: both at once, and for video per frame (``frame_dim``):
  the mean over the frames and the worst frame.

``data_range`` defaults to the reference's value range (max - min), so
latents of any scale compare; pass it for images in a known range (1.0 for
[0, 1], 255 for uint8). Layouts: ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``
per image (SSIM needs the two spatial dimensions last); a video adds a frame
dimension anywhere before the last two (``frame_dim``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["psnr", "ssim", "compare", "QualityReport"]


def _metrics():
    try:
        from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                                   structural_similarity_index_measure)
    except ImportError as exc:
        raise ImportError("teacache_fast.quality needs torchmetrics: pip install "
                          "'teacache_fast[quality]' (or pip install torchmetrics)") from exc
    return peak_signal_noise_ratio, structural_similarity_index_measure


def _pair(output: Tensor, reference: Tensor):
    for name, t in (("output", output), ("reference", reference)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if output.shape != reference.shape:
        raise ValueError(f"output and reference must have the same shape, got {tuple(output.shape)} "
                         f"and {tuple(reference.shape)}")
    if output.numel() == 0:
        raise ValueError("output and reference are empty")
    out, ref = output.detach().double().cpu(), reference.detach().double().cpu()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        raise ValueError("output and reference must be finite (NaN/inf found)")
    return out, ref


def _range(ref: Tensor, data_range: Optional[float]) -> float:
    if data_range is None:
        span = float(ref.max() - ref.min())
        return span if span > 0 else 1.0
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) \
            or not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    return float(data_range)


def psnr(output: Tensor, reference: Tensor, *, data_range: Optional[float] = None) -> float:
    """PSNR of ``output`` against ``reference`` in dB (``inf`` when equal)."""
    out, ref = _pair(output, reference)
    metric, _ = _metrics()
    return float(metric(out, ref, data_range=_range(ref, data_range)))


def _as_images(t: Tensor) -> Tensor:
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    if t.dim() == 4:
        return t
    raise ValueError(f"SSIM takes (H, W), (C, H, W) or (N, C, H, W) images, got shape "
                     f"{tuple(t.shape)} (a video: compare(..., frame_dim=...))")


def ssim(output: Tensor, reference: Tensor, *, data_range: Optional[float] = None) -> float:
    """Mean SSIM of ``output`` against ``reference`` (1 when equal)."""
    out, ref = _pair(output, reference)
    return _ssim(out, ref, _range(ref, data_range))


def _ssim(out: Tensor, ref: Tensor, data_range: float) -> float:
    _, metric = _metrics()
    a, b = _as_images(out), _as_images(ref)
    side = min(a.shape[-2:])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3 x 3 pixels, got {tuple(a.shape[-2:])}")
    kernel = min(11, side if side % 2 else side - 1)
    return float(metric(a, b, data_range=data_range, kernel_size=kernel))


@dataclass
class QualityReport:
    """PSNR (dB) and SSIM of one output; per frame for a video (``frames`` > 0):
    ``psnr`` / ``ssim`` are then the means over the frames (frames equal to
    the reference, PSNR inf, left out of the PSNR mean unless every frame is),
    ``*_worst`` the worst frame."""
    psnr: float
    ssim: float
    psnr_worst: float
    ssim_worst: float
    frames: int = 0
    psnr_frames: List[float] = field(default_factory=list)
    ssim_frames: List[float] = field(default_factory=list)


def compare(output: Tensor, reference: Tensor, *, frame_dim: Optional[int] = None,
            data_range: Optional[float] = None) -> QualityReport:
    """PSNR and SSIM of ``output`` against ``reference``; per frame when
    ``frame_dim`` is given (e.g. 2 for a ``(B, C, F, H, W)`` video latent).
    The data range (default: the whole reference's) is the same for every frame."""
    out, ref = _pair(output, reference)
    rng = _range(ref, data_range)
    metric, _ = _metrics()
    if frame_dim is None:
        p, s = float(metric(out, ref, data_range=rng)), _ssim(out, ref, rng)
        return QualityReport(p, s, p, s)
    if isinstance(frame_dim, bool) or not isinstance(frame_dim, int) \
            or not -out.dim() <= frame_dim < out.dim():
        raise ValueError(f"frame_dim must be a dimension of the {out.dim()}-D tensors, got {frame_dim!r}")
    d = frame_dim % out.dim()
    if d >= out.dim() - 2:
        raise ValueError(f"frame_dim {frame_dim} is a spatial dimension; the last two are (H, W)")
    ps = [float(metric(o, r, data_range=rng)) for o, r in zip(out.unbind(d), ref.unbind(d))]
    ss = [_ssim(o, r, rng) for o, r in zip(out.unbind(d), ref.unbind(d))]
    finite = [p for p in ps if math.isfinite(p)]
    mean_p = sum(finite) / len(finite) if finite else math.inf
    return QualityReport(mean_p, sum(ss) / len(ss), min(ps), min(ss), len(ps), ps, ss)
