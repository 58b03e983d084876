# SPDX-License-Identifier: Apache-2.0
"""Partial sums of the relative L1 distance, with a deterministic second stage.

``rel_l1_partials``: for cur, prev of shape (G, L) (G = samples, or 1 for the
                     whole tensor) each program reads ``tiles_per_program``
                     tiles of BLOCK elements of one group and writes fp32
                     ``[sum|cur - prev|, sum|prev|]`` at its program id:
                     output (G, P, 2). Bytes: read cur and prev
                     (2 x numel x itemsize).
``sum_partials``:    (G, P, 2) -> (G, 2): one program per group adds its P
                     partials in a fixed order (lane-wise over blocks of P,
                     then a tree sum over lanes). No float atomics, so the
                     result has the same bits on every run.

Reduction order: lane-wise fp32 accumulators over a program's tiles, a tree sum
over lanes, then the second stage. Programs never straddle groups.
Self-contained (triton + torch only) so it can be copied into other projects.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rel_l1_partials_kernel(cur_ptr, prev_ptr, part_ptr, L, tiles_per_program,
                            BLOCK: tl.constexpr):
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
    tl.store(out, tl.sum(acc_diff, axis=0))
    tl.store(out + 1, tl.sum(acc_prev, axis=0))


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    rows = part_ptr + g * P * 2
    lanes = tl.arange(0, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, P, BLOCK):
        mask = j0 + lanes < P
        acc0 += tl.load(rows + (j0 + lanes) * 2, mask=mask, other=0.0)
        acc1 += tl.load(rows + (j0 + lanes) * 2 + 1, mask=mask, other=0.0)
    tl.store(out_ptr + g * 2, tl.sum(acc0, axis=0))
    tl.store(out_ptr + g * 2 + 1, tl.sum(acc1, axis=0))


def rel_l1_partials(cur, prev, *, block, tiles_per_program, num_warps):
    """fp32 per-program partials (G, P, 2) of contiguous cur, prev of shape (G, L)."""
    G, L = cur.shape
    programs = triton.cdiv(triton.cdiv(L, block), tiles_per_program)
    partials = torch.empty((G, programs, 2), dtype=torch.float32, device=cur.device)
    _rel_l1_partials_kernel[(G, programs)](cur, prev, partials, L, tiles_per_program,
                                           BLOCK=block, num_warps=num_warps)
    return partials


def sum_partials(partials, *, block, num_warps):
    """(G, P, 2) contiguous fp32 partials -> (G, 2), added in a fixed order."""
    G, P, _ = partials.shape
    out = torch.empty((G, 2), dtype=torch.float32, device=partials.device)
    _sum_partials_kernel[(G,)](partials, out, P, BLOCK=block, num_warps=num_warps)
    return out
