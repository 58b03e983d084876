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
                       at its program id; the last program adds them in a fixed
                       order (``finish``: one launch, rel_l1.finish_in_last_program),
                       or the caller does (rel_l1.sum_partials).

Two paths, chosen by the launcher (constexpr SINGLE):
- the row in registers (rows of up to a few thousand channels): two tiles of
  power-of-two widths, [0, BLOCK_C) and [BLOCK_C, BLOCK_C + TAIL) (C = 3072 is
  2048 + 1024: no lane masked), every load of x and prev for the row issued
  before the first reduction, scale/shift loaded once per program; the
  statistics come from registers: one DRAM round trip per row;
- blocked, for wider rows: BLOCK_C columns at a time, the row re-read for each
  statistics pass (from L1/L2), then once more for the output.

Numerics: fp32 arithmetic, launched with fp fusion off (no FMA contraction) and
correctly rounded division and square root (div.rn, sqrt.rn: rstd is
1 / sqrt(var + eps), like torch's rsqrt on CPU and the CUDA backend), so every
op rounds as the torch backend's does; only the order of the sums differs.
LayerNorm statistics are an exact two-pass over the row (mean, then the mean
of centred squares), like ``torch.nn.functional.layer_norm``. Reduction order
is fixed by the launch configuration: within a program, lane-wise fp32
accumulators over its rows (and column blocks), then an exact integer sum
over lanes (rel_l1.exact_lane_sum), so the same input and config give the
same bits whatever layout the compiler picks for a (mis)aligned pointer. The
per-row statistics are tree sums in the layout the compiler picks;
tools/kernel_report.py checks that a misaligned x and prev leave it unchanged
at the benchmark shapes.

Grid: (B, ceil(R / rows_per_program)); a program never straddles two samples,
so per-sample partials are sums over axis 1 of the (B, programs, 2) output.
Self-contained with rel_l1.py (triton + torch only) so the two can be copied
into other projects.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .rel_l1 import Finish, exact_lane_sum, finish_args, finish_in_last_program

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
def _load_f32(ptr, cols, C):
    """fp32 values at cols (0 past C); bf16 is widened right after the load."""
    return tl.load(ptr + cols, mask=cols < C, other=0.0).to(tl.float32)


@triton.jit
def _checked_rstd(sum_sq, C, eps):
    """1 / sqrt(sum_sq / C + eps), each op correctly rounded (as torch and CUDA do).

    rstd is > 0 for every finite variance; 0 means the sum of squares overflowed
    (|x| >~ 1.8e19 in fp32), NaN a NaN input. Then m would be 0 (or shift) and the
    indicator would read "no change": make it NaN instead, so the step computes.
    """
    var = tl.math.div_rn(sum_sq, tl.cast(C, tl.float32))
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    return tl.where(rstd > 0.0, rstd, float("nan"))


@triton.jit
def _row_stats(x_row, C, eps, NORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, rstd) of one row in fp32, looping over column blocks (rows too wide
    for one tile); mean is 0 for RMSNorm."""
    cols = tl.arange(0, BLOCK_C)
    mean = 0.0
    if NORM == 1:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            acc += _load_f32(x_row, c0 + cols, C)
        mean = tl.math.div_rn(tl.sum(acc, axis=0), tl.cast(C, tl.float32))
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        d = tl.where(c0 + cols < C, _load_f32(x_row, c0 + cols, C) - mean, 0.0)
        acc2 += d * d
    return mean, _checked_rstd(tl.sum(acc2, axis=0), C, eps)


@triton.jit
def _tile_stats(xa, xb, cols_a, cols_b, C, eps, NORM: tl.constexpr, TAIL: tl.constexpr):
    """(mean, rstd) of a row held in registers as tile a (+ tile b when TAIL > 0):
    the exact two-pass statistics, with no second read of memory."""
    mean = 0.0
    if NORM == 1:
        total = tl.sum(xa, axis=0)
        if TAIL > 0:
            total += tl.sum(xb, axis=0)
        mean = tl.math.div_rn(total, tl.cast(C, tl.float32))
    da = tl.where(cols_a < C, xa - mean, 0.0)
    sum_sq = tl.sum(da * da, axis=0)
    if TAIL > 0:
        db = tl.where(cols_b < C, xb - mean, 0.0)
        sum_sq += tl.sum(db * db, axis=0)
    return mean, _checked_rstd(sum_sq, C, eps)


@triton.jit
def _modulated(v, mean, rstd, s1p, t, NORM: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_SHIFT: tl.constexpr):
    """fp32 m = norm(v) * (1 + scale) + shift, one rounding per op (no FMA)."""
    m = v
    if NORM == 1:
        m = (m - mean) * rstd
    if NORM == 2:
        m = m * rstd
    if HAS_SCALE:
        m = m * s1p
    if HAS_SHIFT:
        m = m + t
    return m


@triton.jit
def _params_tile(scale_row, shift_row, cols, C, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(1 + scale, shift) of one tile of columns, fp32 (0 where absent)."""
    s1p = 0.0
    t = 0.0
    if HAS_SCALE:
        s1p = 1.0 + _load_f32(scale_row, cols, C)
    if HAS_SHIFT:
        t = _load_f32(shift_row, cols, C)
    return s1p, t


@triton.jit
def _modulate_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, R, C, scale_bstride, shift_bstride,
                     eps, rows_per_program,
                     NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, TAIL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * rows_per_program
    scale_row = scale_ptr + b * scale_bstride
    shift_row = shift_ptr + b * shift_bstride
    cols_a = tl.arange(0, BLOCK_C)
    if SINGLE:
        # The row in registers: scale/shift once per program, x once per row.
        s1p_a, t_a = _params_tile(scale_row, shift_row, cols_a, C, HAS_SCALE, HAS_SHIFT)
        cols_b, s1p_b, t_b = 0, 0.0, 0.0
        if TAIL > 0:
            cols_b = BLOCK_C + tl.arange(0, TAIL)
            s1p_b, t_b = _params_tile(scale_row, shift_row, cols_b, C, HAS_SCALE, HAS_SHIFT)
    for i in range(0, rows_per_program):
        r = first + i
        if r < R:
            offset = (b * R + r) * C
            mean, rstd = 0.0, 1.0
            if SINGLE:
                xa, xb = _load_f32(x_ptr + offset, cols_a, C), 0.0
                if TAIL > 0:
                    xb = _load_f32(x_ptr + offset, cols_b, C)
                if NORM != 0:
                    mean, rstd = _tile_stats(xa, xb, cols_a, cols_b, C, eps, NORM, TAIL)
                ma = _modulated(xa, mean, rstd, s1p_a, t_a, NORM, HAS_SCALE, HAS_SHIFT)
                tl.store(out_ptr + offset + cols_a, _round_to(ma, out_ptr.dtype.element_ty),
                         mask=cols_a < C)
                if TAIL > 0:
                    mb = _modulated(xb, mean, rstd, s1p_b, t_b, NORM, HAS_SCALE, HAS_SHIFT)
                    tl.store(out_ptr + offset + cols_b, _round_to(mb, out_ptr.dtype.element_ty),
                             mask=cols_b < C)
            else:
                if NORM != 0:
                    mean, rstd = _row_stats(x_ptr + offset, C, eps, NORM, BLOCK_C)
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + cols_a
                    s1p, t = _params_tile(scale_row, shift_row, cols, C, HAS_SCALE, HAS_SHIFT)
                    m = _modulated(_load_f32(x_ptr + offset, cols, C), mean, rstd, s1p, t,
                                   NORM, HAS_SCALE, HAS_SHIFT)
                    tl.store(out_ptr + offset + cols, _round_to(m, out_ptr.dtype.element_ty),
                             mask=cols < C)


@triton.jit
def _rel_l1_tile(m, p, cols, C, prev_row):
    """Store m (already in prev's dtype) over prev; fp32 (|m - p|, |p|) lane sums."""
    tl.store(prev_row + cols, m, mask=cols < C)
    return tl.where(cols < C, tl.abs(m.to(tl.float32) - p), 0.0), tl.abs(p)


@triton.jit
def _rel_l1_row_blocked(x_row, prev_row, scale_row, shift_row, C, eps, acc_diff, acc_prev,
                        NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """One row too wide for registers, BLOCK_C columns at a time: the statistics
    pass(es), then m compared with prev and stored; returns the lane sums."""
    mean, rstd = 0.0, 1.0
    if NORM != 0:
        mean, rstd = _row_stats(x_row, C, eps, NORM, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        s1p, t = _params_tile(scale_row, shift_row, cols, C, HAS_SCALE, HAS_SHIFT)
        m = _modulated(_load_f32(x_row, cols, C), mean, rstd, s1p, t, NORM, HAS_SCALE, HAS_SHIFT)
        p = _load_f32(prev_row, cols, C)
        d, q = _rel_l1_tile(_round_to(m, prev_row.dtype.element_ty), p, cols, C, prev_row)
        acc_diff += d
        acc_prev += q
    return acc_diff, acc_prev


@triton.jit
def _modulated_rel_l1_kernel(x_ptr, scale_ptr, shift_ptr, prev_ptr, part_ptr, out_ptr, ticket_ptr, R, C,
                             scale_bstride, shift_bstride, eps, rows_per_program, outputs, per_output,
                             NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                             BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, TAIL: tl.constexpr,
                             FUSED: tl.constexpr, FIN_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    first = pid.to(tl.int64) * rows_per_program
    scale_row = scale_ptr + b * scale_bstride
    shift_row = shift_ptr + b * shift_bstride
    dtype = prev_ptr.dtype.element_ty
    cols_a = tl.arange(0, BLOCK_C)
    acc_diff = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_prev = tl.zeros([BLOCK_C], dtype=tl.float32)
    if SINGLE:
        s1p_a, t_a = _params_tile(scale_row, shift_row, cols_a, C, HAS_SCALE, HAS_SHIFT)
        cols_b, s1p_b, t_b = 0, 0.0, 0.0
        if TAIL > 0:
            cols_b = BLOCK_C + tl.arange(0, TAIL)
            s1p_b, t_b = _params_tile(scale_row, shift_row, cols_b, C, HAS_SCALE, HAS_SHIFT)
            tail_diff = tl.zeros([TAIL], dtype=tl.float32)
            tail_prev = tl.zeros([TAIL], dtype=tl.float32)
    for i in range(0, rows_per_program):
        r = first + i
        if r < R:
            offset = (b * R + r) * C
            if SINGLE:
                mean, rstd = 0.0, 1.0
                # Every load of the row first (x and prev, both tiles), then the
                # statistics from registers: one DRAM round trip per row.
                xa, xb = _load_f32(x_ptr + offset, cols_a, C), 0.0
                pa, pb = _load_f32(prev_ptr + offset, cols_a, C), 0.0
                if TAIL > 0:
                    xb = _load_f32(x_ptr + offset, cols_b, C)
                    pb = _load_f32(prev_ptr + offset, cols_b, C)
                if NORM != 0:
                    mean, rstd = _tile_stats(xa, xb, cols_a, cols_b, C, eps, NORM, TAIL)
                # Compare what is stored for the next call: m rounded to prev's dtype.
                ma = _round_to(_modulated(xa, mean, rstd, s1p_a, t_a, NORM, HAS_SCALE, HAS_SHIFT), dtype)
                d, q = _rel_l1_tile(ma, pa, cols_a, C, prev_ptr + offset)
                acc_diff += d
                acc_prev += q
                if TAIL > 0:
                    mb = _round_to(_modulated(xb, mean, rstd, s1p_b, t_b, NORM, HAS_SCALE, HAS_SHIFT),
                                   dtype)
                    d, q = _rel_l1_tile(mb, pb, cols_b, C, prev_ptr + offset)
                    tail_diff += d
                    tail_prev += q
            else:
                acc_diff, acc_prev = _rel_l1_row_blocked(x_ptr + offset, prev_ptr + offset, scale_row,
                                                         shift_row, C, eps, acc_diff, acc_prev,
                                                         NORM, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    sum_diff = exact_lane_sum(acc_diff)
    sum_prev = exact_lane_sum(acc_prev)
    if SINGLE:
        if TAIL > 0:
            sum_diff += exact_lane_sum(tail_diff)
            sum_prev += exact_lane_sum(tail_prev)
    out = part_ptr + (b * tl.num_programs(1) + pid) * 2
    tl.store(out, sum_diff)
    tl.store(out + 1, sum_prev)
    if FUSED:
        finish_in_last_program(part_ptr, out_ptr, ticket_ptr, outputs, per_output, FIN_BLOCK)


def _params(x, scale, shift):
    """Pointers (x itself stands in for an absent tensor) and batch strides of scale/shift."""
    def one(p):
        if p is None:
            return x, 0
        return p, (p.shape[1] if p.shape[0] > 1 else 0)
    (s, s_stride), (t, t_stride) = one(scale), one(shift)
    return s, t, s_stride, t_stride


def _tiles(C, block_c, tail):
    """Constexprs of the path: tail=None loops over BLOCK_C-wide column blocks;
    tail >= 0 holds the row in registers as [0, block_c) + [block_c, block_c + tail)."""
    if tail is not None and block_c + tail < C:
        raise ValueError(f"tiles of {block_c} + {tail} columns do not cover a row of {C}")
    return {"BLOCK_C": block_c, "SINGLE": tail is not None, "TAIL": tail or 0}


def modulate(x, scale, shift, out, norm, eps, *, block_c, tail, rows_per_program, num_warps):
    """Write ``norm(x) * (1 + scale) + shift`` into out.

    x, out: contiguous (B, R, C); scale, shift: contiguous (B or 1, C) or None;
    norm: "layer" | "rms" | "none"; tail: None (blocked path) or the width of the
    second register tile (0: one tile), see _tiles.
    """
    B, R, C = x.shape
    s, t, s_stride, t_stride = _params(x, scale, shift)
    grid = (B, triton.cdiv(R, rows_per_program))
    _modulate_kernel[grid](x, s, t, out, R, C, s_stride, t_stride, eps, rows_per_program,
                           NORM=NORM_CODES[norm], HAS_SCALE=scale is not None,
                           HAS_SHIFT=shift is not None, **_tiles(C, block_c, tail),
                           num_warps=num_warps, enable_fp_fusion=False)
    return out


def modulated_rel_l1_(x, scale, shift, prev, norm, eps, *, block_c, tail, rows_per_program,
                      num_warps, finish: Optional[Finish] = None):
    """prev <- modulate(x, ...) in one pass; return fp32 per-program partials (B, P, 2),
    or with ``finish`` their (B, 2) / (1, 2) sums from the same launch.

    ``partials[b, j] = [sum|m - prev|, sum|prev|]`` over the rows of program j of
    sample b, with m rounded to prev's dtype. Sum over P (fixed order) per
    sample, or over (B, P) for the whole batch.
    """
    B, R, C = x.shape
    programs = triton.cdiv(R, rows_per_program)
    partials = torch.empty((B, programs, 2), dtype=torch.float32, device=x.device)
    out, ticket, outputs, per_output, fused, fin_block = finish_args(partials, finish)
    s, t, s_stride, t_stride = _params(x, scale, shift)
    _modulated_rel_l1_kernel[(B, programs)](
        x, s, t, prev, partials, out, ticket, R, C, s_stride, t_stride, eps, rows_per_program,
        outputs, per_output, NORM=NORM_CODES[norm], HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, **_tiles(C, block_c, tail), FUSED=fused, FIN_BLOCK=fin_block,
        num_warps=num_warps, enable_fp_fusion=False)
    return out
