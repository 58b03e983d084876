"""Pure-torch backend: the readable reference, the CPU path and the test oracle.

Every function receives arguments already checked and reshaped by
``teacache_fast.ops``:

* ``x``/``prev``: contiguous ``(B, R, C)``; ``scale``/``shift``: contiguous
  ``(B or 1, C)`` or None; ``cur``/``prev`` of rel_l1_partials: ``(B, L)``.
* Arithmetic is fp32. Reductions run over fixed row chunks whose fp32 partial
  sums are added in a fixed order, so results are bitwise reproducible, and the
  chunks keep temporaries small (the allocator reuses them instead of paging in
  fresh multi-MB buffers every call, which is what makes the eager chain slow).
"""
from __future__ import annotations

from typing import Sequence

import torch

# Elements processed per chunk: big enough to amortise op dispatch, small enough
# that fp32 temporaries (~1 MiB each) stay in cache.
_CHUNK_ELEMS = 1 << 18


def _rows_per_chunk(width: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, width))


def _normalize(x32: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A fresh fp32 buffer holding norm(x32) (the caller modifies it in place)."""
    if norm == "layer":
        # Exact two-pass statistics (mean, then the mean of centred squares), not
        # F.layer_norm or var_mean: on CPU they lose digits when |mean| >> std,
        # and this backend is the oracle of the others
        centred = x32 - x32.mean(dim=-1, keepdim=True)
        var = centred.square().mean(dim=-1, keepdim=True)
        return centred.mul_(_checked_rstd(var, eps))
    if norm == "rms":
        # F.rms_norm's arithmetic (the same bits on CPU), with the overflow check
        return x32 * _checked_rstd(x32.square().mean(dim=-1, keepdim=True), eps)
    return x32.clone()


def _checked_rstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(var + eps) (var is overwritten), NaN where the statistics are not finite.

    rstd is > 0 for every finite variance; it is 0 when the sum of squares
    overflowed fp32 (|x| >~ 1.8e19), which would make the normalized row 0
    and the indicator read "no change". A NaN row makes the decision compute
    instead. Finite statistics keep their bits.
    """
    v = var.add_(eps)
    # rstd + 0 * v, one op: + 0 exactly when v is finite (> 0), NaN (0 * inf) when not
    return torch.rsqrt(v).add_(v, alpha=0.0)


def _modulate_chunk(x: torch.Tensor, scale1p: torch.Tensor | None, shift: torch.Tensor | None,
                    norm: str, eps: float) -> torch.Tensor:
    """fp32 ``norm(x) * (1 + scale) + shift`` of a (rows, C) chunk of one sample."""
    m = _normalize(x.float(), norm, eps)
    if scale1p is not None:
        m.mul_(scale1p)
    if shift is not None:
        m.add_(shift)
    return m


def _sample_params(scale, shift, b):
    """fp32 (1 + scale[b]) and shift[b] rows, broadcasting a batch of 1."""
    s = None if scale is None else 1.0 + scale[b if scale.shape[0] > 1 else 0].float()
    t = None if shift is None else shift[b if shift.shape[0] > 1 else 0].float()
    return s, t


def modulate(x, scale, shift, norm: str, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    B, R, C = x.shape
    step = _rows_per_chunk(C)
    for b in range(B):
        s, t = _sample_params(scale, shift, b)
        for r0 in range(0, R, step):
            out[b, r0:r0 + step] = _modulate_chunk(x[b, r0:r0 + step], s, t, norm, eps)
    return out


def _finish(chunk_sums: list[torch.Tensor], per_sample: bool, B: int, device) -> torch.Tensor:
    """Stack per-chunk (2,) partials and add them in a fixed order."""
    if not chunk_sums:
        return torch.zeros((B, 2) if per_sample else (2,), dtype=torch.float32, device=device)
    stacked = torch.stack(chunk_sums)  # (B * chunks, 2), sample-major
    if per_sample:
        return stacked.view(B, -1, 2).sum(dim=1)
    return stacked.sum(dim=0)


def _batch_partials(diff_l1: torch.Tensor, prev_l1: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """(B,) sums -> (B, 2) partials, or (2,) added over the batch in a fixed order."""
    partials = torch.stack((diff_l1, prev_l1), dim=-1)
    return partials if per_sample else partials.sum(dim=0)


def rel_l1_partials(cur, prev, per_sample: bool) -> torch.Tensor:
    B, L = cur.shape
    if B * L <= _CHUNK_ELEMS:  # one pass over the whole batch: a handful of ops, no slicing
        c, p = cur.float(), prev.float()
        return _batch_partials((c - p).abs_().sum(dim=1), p.abs().sum(dim=1), per_sample)
    step = _CHUNK_ELEMS
    sums = []
    for b in range(B):
        for i in range(0, L, step):
            c = cur[b, i:i + step].float()
            p = prev[b, i:i + step].float()
            sums.append(torch.stack(((c - p).abs_().sum(), p.abs().sum())))
    return _finish(sums, per_sample, B, cur.device)


def _modulated_rel_l1_small(x, scale, shift, prev, norm: str, eps: float, per_sample: bool):
    """modulated_rel_l1_ of a batch that fits one chunk, all samples at once:
    the same per-row arithmetic as the chunked path, in a third of the ops
    (per-op dispatch is most of the cost at this size)."""
    m = _normalize(x.float(), norm, eps)
    if scale is not None:
        m.mul_((1.0 + scale.float()).unsqueeze(1))
    if shift is not None:
        m.add_(shift.float().unsqueeze(1))
    if prev.dtype != torch.float32:
        stored = m.to(prev.dtype)
        m.copy_(stored)               # m now holds the stored values, exactly
        p32 = prev.float()
    else:
        stored, p32 = m, prev
    # both sums in one reduction: [|m - prev|, |prev|] per sample -> (2, B)
    sums = torch.stack((m - p32, p32)).abs_().sum(dim=(2, 3))
    prev.copy_(stored)
    return sums.t().contiguous() if per_sample else sums.sum(dim=1)


def modulated_rel_l1_(x, scale, shift, prev, norm: str, eps: float, per_sample: bool) -> torch.Tensor:
    B, R, C = x.shape
    if B * R * C <= _CHUNK_ELEMS:
        return _modulated_rel_l1_small(x, scale, shift, prev, norm, eps, per_sample)
    step = _rows_per_chunk(C)
    low_precision = prev.dtype != torch.float32
    sums = []
    for b in range(B):
        s, t = _sample_params(scale, shift, b)
        for r0 in range(0, R, step):
            m = _modulate_chunk(x[b, r0:r0 + step], s, t, norm, eps)
            p = prev[b, r0:r0 + step]
            # The indicator compares prev with m rounded to the storage dtype, so
            # every backend reads back exactly what it wrote. In-place arithmetic
            # on chunk-sized buffers keeps every pass in cache.
            if low_precision:
                stored = m.to(p.dtype)
                m.copy_(stored)                       # m now holds the stored values, exactly
                p32 = p.float()
                diff_l1 = m.sub_(p32).abs_().sum()
                prev_l1 = p32.abs_().sum()
                p.copy_(stored)
            else:
                prev_l1 = p.abs().sum()
                diff_l1 = p.sub_(m).abs_().sum()      # |prev - m| in prev's storage...
                p.copy_(m)                            # ...which then takes the new m
            sums.append(torch.stack((diff_l1, prev_l1)))
    return _finish(sums, per_sample, B, x.device)


def poly_eval(coefficients: Sequence[float], r: torch.Tensor) -> torch.Tensor:
    """Horner evaluation, highest power first (numpy.poly1d order), in fp32."""
    acc = torch.zeros_like(r)
    for c in coefficients:
        acc = acc * r + c
    return acc


def teacache_decide_(partials, state, coefficients, threshold: float, force, max_skips: int,
                     accumulate_abs: bool = False) -> torch.Tensor:
    """Steps 3-4 of the algorithm for S independent states (see ops.teacache_decide_).

    force: (S,) bool flags, or a Python bool for every state (no tensor made)."""
    num, den = partials[:, 0], partials[:, 1]
    acc, skips = state[:, 0], state[:, 1]
    rel = num / den
    valid = torch.isfinite(num) & torch.isfinite(den) & (den != 0) & torch.isfinite(rel)
    poly = poly_eval(coefficients, torch.where(valid, rel, torch.zeros_like(rel)))
    new_acc = acc + (poly.abs() if accumulate_abs else poly)
    compute = force | ~valid | ~torch.isfinite(new_acc) | (new_acc >= threshold)
    if threshold <= 0.0:  # threshold 0 disables skipping, whatever the sign of poly
        compute = torch.ones_like(compute)
    if max_skips >= 0:
        compute = compute | (skips >= max_skips)
    # a corrupt skip counter (NaN, inf, negative) cannot be trusted: compute (and reset it)
    compute = compute | ~(torch.isfinite(skips) & (skips >= 0))
    state[:, 0] = torch.where(compute, torch.zeros_like(new_acc), new_acc)
    state[:, 1] = torch.where(compute, torch.zeros_like(skips), skips + 1)
    return compute


def residual_capture_(out, inp, residual) -> None:
    if residual.dtype == out.dtype:
        # torch computes 16-bit subtraction in fp32 and rounds once: the contract
        torch.sub(out, inp, out=residual)
        return
    L = out.numel()
    step = _CHUNK_ELEMS
    for i in range(0, L, step):  # another cache dtype: fp32 difference, rounded once
        torch.sub(out[i:i + step].float(), inp[i:i + step].float(), out=residual[i:i + step])


def residual_apply_(hidden, residual, mask, out=None) -> None:
    """hidden (+)= residual; with ``out`` (not hidden itself): out = hidden +
    residual, hidden untouched, masked-out samples copied from hidden."""
    dst = hidden if out is None else out
    if mask is None:
        # type promotion: fp32 arithmetic, one rounding to hidden's dtype; one pass
        # (read both, write dst) whether in place or not
        torch.add(hidden, residual, out=dst)
        return
    B, L = hidden.shape
    step = _CHUNK_ELEMS
    for b in range(B):
        for i in range(0, L, step):
            h32 = hidden[b, i:i + step].float()
            new = h32 + residual[b, i:i + step].float()
            # torch.where keeps the mask on the device (no host sync) and leaves
            # masked-out samples bit for bit as they were
            dst[b, i:i + step].copy_(torch.where(mask[b], new, h32))


def composed_finish_span(capture, apply):
    """finish_span_ from a backend's residual_capture_ and residual_apply_: the
    capture into a fresh buffer, a device select of the residual, the masked
    apply (the backends without a fused span-end kernel)."""

    def finish_span_(compute, out, inp, residual) -> None:
        """compute (0-d bool): residual <- out - inp; else out += residual. Flat, contiguous."""
        fresh = torch.empty_like(residual)
        capture(out, inp, fresh)
        residual.copy_(torch.where(compute, fresh, residual))
        apply(out.view(1, -1), residual.view(1, -1), torch.logical_not(compute).reshape(1))

    return finish_span_


finish_span_ = composed_finish_span(residual_capture_, residual_apply_)
