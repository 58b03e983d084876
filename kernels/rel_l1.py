# SPDX-License-Identifier: Apache-2.0
"""Partial sums of the relative L1 distance, finished in one launch.

``rel_l1_partials``: for cur, prev of shape (G, L) (G = samples, or 1 for the
                     whole tensor) each program reads ``tiles_per_program``
                     tiles of BLOCK elements of one group and writes fp32
                     ``[sum|cur - prev|, sum|prev|]`` at its program id:
                     (G, P, 2). Bytes: read cur and prev (2 x numel x itemsize).
                     With ``finish`` the last program adds them (one launch,
                     see ``finish_in_last_program``) and the call returns the
                     (G, 2) or (2,) sums.
``sum_partials``:    (G, P, 2) -> (G, 2): one program per group adds its P
                     partials in a fixed order (lane-wise over blocks of P,
                     then an exact sum over lanes): the second launch, for many
                     outputs (a large per-sample batch), where one last program
                     adding them all would serialize the finish.

No float atomics anywhere: the partition and the order of every sum depend on
the shape and launch configuration only, so the result has the same bits on
every run; the sums over a program's lanes are exact (``exact_lane_sum``), so
neither the compiler's layout (which follows the pointers' alignment) nor the
warps of the finishing launch change them. Programs never straddle groups.
Self-contained (triton + torch only) so it can be copied into other projects;
kernels/modulate.py imports the finishing helpers from here.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


class Finish(NamedTuple):
    """The fused second stage of a reduction launch.

    ticket: int32 (1,), zero before the launch; every launch leaves it zero, so
            one ticket serves every later launch on the same stream.
    per_sample: one output per group (sample), else one for the whole launch.
    max_block: cap on the lanes of the finishing sum (a power of two).
    """
    ticket: torch.Tensor
    per_sample: bool
    max_block: int


@triton.jit
def exact_lane_sum(v):
    """The sum of a vector of up to 2^14 non-negative fp32 lanes, independent
    of how the compiler lays the lanes out over threads (a tree sum's order
    follows the layout, which Triton derives from the pointers' alignment: a
    misaligned input would change the bits). The lanes are added exactly, as
    integers: each is scaled by 2^k in fp64 (k from the largest lane's
    exponent: it lands below 2^49, so 2^14 lanes stay below 2^63), truncated
    to int64 (the bits below 2^-k of the largest lane, far under fp32's
    precision of the sum, are dropped the same way whatever the order) and
    summed; then scaled back and rounded to fp32. A NaN or inf lane gives
    tl.sum's NaN or inf, which no order changes."""
    plain = tl.sum(v, axis=0)
    finite = (plain == plain) & (plain < float("inf"))
    v = tl.where(finite, v, 0.0)
    bits = tl.max(v, axis=0).to(tl.uint32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -126)  # the largest lane's exponent
    k = 48 - e
    scale = ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # 2^k, exact
    ints = (v.to(tl.float64) * scale).to(tl.int64)
    exact = (tl.sum(ints, axis=0).to(tl.float64) / scale).to(tl.float32)
    return tl.where(finite, exact, plain)


@triton.jit
def _sum_pairs(rows, P, BLOCK: tl.constexpr):
    """Sum P consecutive fp32 pairs at rows: lane-wise over blocks of BLOCK
    pairs in order, then exact_lane_sum (so the bits do not depend on the
    warps of the launch: fused or not, the same). .cg: read from L2, where the
    other programs' pairs are (never a stale L1 line)."""
    lanes = tl.arange(0, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, P, BLOCK):
        mask = j0 + lanes < P
        acc0 += tl.load(rows + (j0 + lanes) * 2, mask=mask, other=0.0, cache_modifier=".cg")
        acc1 += tl.load(rows + (j0 + lanes) * 2 + 1, mask=mask, other=0.0, cache_modifier=".cg")
    return exact_lane_sum(acc0), exact_lane_sum(acc1)


@triton.jit
def finish_in_last_program(part_ptr, out_ptr, ticket_ptr, outputs, per_output, BLOCK: tl.constexpr):
    """Called by every program after it stored its pair: it takes an integer
    ticket; the program that takes the last one adds every output's pairs (in
    _sum_pairs' order) into out_ptr[2 * o], [2 * o + 1] and resets the ticket.
    The barrier orders all of this program's stores before the ticket, whose
    acq_rel atomic publishes them to (and acquires the others' for) the last."""
    tl.debug_barrier()
    total = tl.num_programs(0) * tl.num_programs(1)
    taken = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if taken == total - 1:
        for o in range(0, outputs):
            s0, s1 = _sum_pairs(part_ptr + o * per_output * 2, per_output, BLOCK)
            tl.store(out_ptr + 2 * o, s0)
            tl.store(out_ptr + 2 * o + 1, s1)
        tl.store(ticket_ptr, 0)


@triton.jit
def _rel_l1_partials_kernel(cur_ptr, prev_ptr, part_ptr, out_ptr, ticket_ptr, L, tiles_per_program,
                            outputs, per_output, BLOCK: tl.constexpr, FUSED: tl.constexpr,
                            FIN_BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    base = g * L
    first = pid.to(tl.int64) * tiles_per_program * BLOCK
    lanes = tl.arange(0, BLOCK)
    acc_diff = tl.zeros([BLOCK], dtype=tl.float32)
    acc_prev = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(0, tiles_per_program):
        offs = first + t * BLOCK + lanes
        mask = offs < L
        c = tl.load(cur_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(prev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc_diff += tl.abs(c - p)
        acc_prev += tl.abs(p)
    out = part_ptr + (g * tl.num_programs(1) + pid) * 2
    tl.store(out, exact_lane_sum(acc_diff))
    tl.store(out + 1, exact_lane_sum(acc_prev))
    if FUSED:
        finish_in_last_program(part_ptr, out_ptr, ticket_ptr, outputs, per_output, FIN_BLOCK)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    s0, s1 = _sum_pairs(part_ptr + g * P * 2, P, BLOCK)
    tl.store(out_ptr + g * 2, s0)
    tl.store(out_ptr + g * 2 + 1, s1)


def finish_args(partials: torch.Tensor, finish: Optional[Finish]):
    """(out, ticket, outputs, per_output, FUSED, FIN_BLOCK) for a kernel writing
    the (G, P, 2) ``partials``: per sample G outputs of P pairs, else 1 of G * P.
    Without finish the pointers are placeholders and out is the partials."""
    if finish is None:
        return partials, partials, 0, 0, False, 1
    G, P, _ = partials.shape
    outputs, per_output = (G, P) if finish.per_sample else (1, G * P)
    out = torch.empty((outputs, 2), dtype=torch.float32, device=partials.device)
    block = min(triton.next_power_of_2(per_output), finish.max_block)
    return out, finish.ticket, outputs, per_output, True, block


def rel_l1_partials(cur, prev, *, block, tiles_per_program, num_warps, finish: Optional[Finish] = None):
    """Contiguous cur, prev of shape (G, L) -> the fp32 per-program partials
    (G, P, 2), or with ``finish`` their (G, 2) / (1, 2) sums from the same launch."""
    G, L = cur.shape
    programs = triton.cdiv(triton.cdiv(L, block), tiles_per_program)
    partials = torch.empty((G, programs, 2), dtype=torch.float32, device=cur.device)
    out, ticket, outputs, per_output, fused, fin_block = finish_args(partials, finish)
    _rel_l1_partials_kernel[(G, programs)](cur, prev, partials, out, ticket, L, tiles_per_program,
                                           outputs, per_output, BLOCK=block, FUSED=fused,
                                           FIN_BLOCK=fin_block, num_warps=num_warps)
    return out


def sum_partials(partials, *, block, num_warps):
    """(G, P, 2) contiguous fp32 partials -> (G, 2), added in a fixed order."""
    G, P, _ = partials.shape
    out = torch.empty((G, 2), dtype=torch.float32, device=partials.device)
    _sum_partials_kernel[(G,)](partials, out, P, BLOCK=block, num_warps=num_warps)
    return out
