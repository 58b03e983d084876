# SPDX-License-Identifier: Apache-2.0
"""Fused norm + timestep modulation, and the one-pass TeaCache indicator.

``modulate``:          ``m = norm(x) * (1 + scale) + shift`` for x of shape
                       (B, R, C); scale/shift are (B or 1, C) rows or absent.
                       norm is LayerNorm without affine, RMSNorm without weight,
                       or none. Bytes: read x, write m (2 x numel x itemsize,
                       plus scale/shift rows).
``modulated_rel_l1_``: the same m, rounded to prev's dtype, compared with prev
                       and written into prev in one pass: read x, read prev,
                       write prev (3 x numel x itemsize); no m temporary. Each
                       program emits fp32 partials ``[sum|m - prev|, sum|prev|]``
                       at its program id; adding them (in a fixed order) is the
                       caller's second stage (see rel_l1.sum_partials).

Numerics: fp32 arithmetic. LayerNorm statistics are an exact two-pass over the
row (mean, then the mean of centred squares), like ``torch.nn.functional.
layer_norm``; the row is re-read for each pass (from L1/L2 for rows of a few
thousand channels). Reduction order is fixed by the launch configuration: within
a program, lane-wise fp32 accumulators over its rows and column blocks, then a
tree sum over lanes, so the same input and config give the same bits.

Grid: (B, ceil(R / rows_per_program)); a program never straddles two samples,
so per-sample partials are sums over axis 1 of the (B, programs, 2) output.
Self-contained (triton + torch only) so it can be copied into other projects.
"""
import torch
import triton
import triton.language as tl

NORM_CODES = {"none": 0, "layer": 1, "rms": 2}


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. bf16 goes through the bits: the
    Triton interpreter (3.x) truncates fp32 -> bf16 casts; on a GPU this is a
    few integer ops on a memory-bound kernel and gives the same bits as cvt.rn."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = tl.where(v != v, 0x7FC00000, bits + (((bits >> 16) & 1) + 0x7FFF))
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def _row_stats(x_row, C, eps, NORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, rstd) of one row in fp32; mean is 0 for RMSNorm."""
    cols = tl.arange(0, BLOCK_C)
    mean = 0.0
    if NORM == 1:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            acc += tl.load(x_row + c0 + cols, mask=c0 + cols < C, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cmask = c0 + cols < C
        v = tl.load(x_row + c0 + cols, mask=cmask, other=0.0).to(tl.float32)
        d = tl.where(cmask, v - mean, 0.0)
        acc2 += d * d
    rstd = tl.rsqrt(tl.sum(acc2, axis=0) / C + eps)
    # rstd is > 0 for every finite variance; 0 means the sum of squares overflowed
    # (|x| >~ 1.8e19 in fp32), NaN a NaN input. Then m would be 0 (or shift) and the
    # indicator would read "no change": make it NaN instead, so the step computes.
    rstd = tl.where(rstd > 0.0, rstd, float("nan"))
    return mean, rstd


@triton.jit
def _modulated_block(x_row, scale_row, shift_row, c0, C, mean, rstd,
                     NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """fp32 m for columns [c0, c0 + BLOCK_C) of one row (garbage past C: mask on store)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
    if NORM == 1:
        m = (m - mean) * rstd
    if NORM == 2:
        m = m * rstd
    if HAS_SCALE:
        m = m * (1.0 + tl.load(scale_row + cols, mask=cmask, other=0.0).to(tl.float32))
    if HAS_SHIFT:
        m = m + tl.load(shift_row + cols, mask=cmask, other=0.0).to(tl.float32)
    return m


@triton.jit
def _modulate_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, R, C, scale_bstride, shift_bstride,
                     eps, rows_per_program,
                     NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * rows_per_program
    scale_row = scale_ptr + b * scale_bstride
    shift_row = shift_ptr + b * shift_bstride
    cols = tl.arange(0, BLOCK_C)
    for i in range(0, rows_per_program):
        r = first + i
        if r < R:
            offset = (b * R + r) * C
            mean, rstd = 0.0, 1.0
            if NORM != 0:
                mean, rstd = _row_stats(x_ptr + offset, C, eps, NORM, BLOCK_C)
            for c0 in range(0, C, BLOCK_C):
                m = _modulated_block(x_ptr + offset, scale_row, shift_row, c0, C, mean, rstd,
                                     NORM, HAS_SCALE, HAS_SHIFT, BLOCK_C)
                tl.store(out_ptr + offset + c0 + cols, _round_to(m, out_ptr.dtype.element_ty),
                         mask=c0 + cols < C)


@triton.jit
def _modulated_rel_l1_kernel(x_ptr, scale_ptr, shift_ptr, prev_ptr, part_ptr, R, C,
                             scale_bstride, shift_bstride, eps, rows_per_program,
                             NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    first = pid.to(tl.int64) * rows_per_program
    scale_row = scale_ptr + b * scale_bstride
    shift_row = shift_ptr + b * shift_bstride
    cols = tl.arange(0, BLOCK_C)
    acc_diff = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_prev = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, rows_per_program):
        r = first + i
        if r < R:
            offset = (b * R + r) * C
            mean, rstd = 0.0, 1.0
            if NORM != 0:
                mean, rstd = _row_stats(x_ptr + offset, C, eps, NORM, BLOCK_C)
            for c0 in range(0, C, BLOCK_C):
                cmask = c0 + cols < C
                m = _modulated_block(x_ptr + offset, scale_row, shift_row, c0, C, mean, rstd,
                                     NORM, HAS_SCALE, HAS_SHIFT, BLOCK_C)
                # Compare what is stored for the next call: m rounded to prev's dtype.
                m = _round_to(m, prev_ptr.dtype.element_ty)
                p = tl.load(prev_ptr + offset + c0 + cols, mask=cmask, other=0.0).to(tl.float32)
                acc_diff += tl.where(cmask, tl.abs(m.to(tl.float32) - p), 0.0)
                acc_prev += tl.abs(p)
                tl.store(prev_ptr + offset + c0 + cols, m, mask=cmask)
    out = part_ptr + (b * tl.num_programs(1) + pid) * 2
    tl.store(out, tl.sum(acc_diff, axis=0))
    tl.store(out + 1, tl.sum(acc_prev, axis=0))


def _params(x, scale, shift):
    """Pointers (x itself stands in for an absent tensor) and batch strides of scale/shift."""
    def one(p):
        if p is None:
            return x, 0
        return p, (p.shape[1] if p.shape[0] > 1 else 0)
    (s, s_stride), (t, t_stride) = one(scale), one(shift)
    return s, t, s_stride, t_stride


def modulate(x, scale, shift, out, norm, eps, *, block_c, rows_per_program, num_warps):
    """Write ``norm(x) * (1 + scale) + shift`` into out.

    x, out: contiguous (B, R, C); scale, shift: contiguous (B or 1, C) or None;
    norm: "layer" | "rms" | "none".
    """
    B, R, C = x.shape
    s, t, s_stride, t_stride = _params(x, scale, shift)
    grid = (B, triton.cdiv(R, rows_per_program))
    _modulate_kernel[grid](x, s, t, out, R, C, s_stride, t_stride, eps, rows_per_program,
                           NORM=NORM_CODES[norm], HAS_SCALE=scale is not None,
                           HAS_SHIFT=shift is not None, BLOCK_C=block_c, num_warps=num_warps)
    return out


def modulated_rel_l1_(x, scale, shift, prev, norm, eps, *, block_c, rows_per_program, num_warps):
    """prev <- modulate(x, ...) in one pass; return fp32 per-program partials (B, P, 2).

    ``partials[b, j] = [sum|m - prev|, sum|prev|]`` over the rows of program j of
    sample b, with m rounded to prev's dtype. Sum over P (fixed order) per
    sample, or over (B, P) for the whole batch.
    """
    B, R, C = x.shape
    programs = triton.cdiv(R, rows_per_program)
    partials = torch.empty((B, programs, 2), dtype=torch.float32, device=x.device)
    s, t, s_stride, t_stride = _params(x, scale, shift)
    _modulated_rel_l1_kernel[(B, programs)](
        x, s, t, prev, partials, R, C, s_stride, t_stride, eps, rows_per_program,
        NORM=NORM_CODES[norm], HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        BLOCK_C=block_c, num_warps=num_warps)
    return partials
