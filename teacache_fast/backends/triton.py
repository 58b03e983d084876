"""Triton backend: the kernels of ``kernels/`` behind the backend interface.

Same functions and signatures as :mod:`teacache_fast.backends.torch`; the
arguments arrive checked, contiguous and reshaped by :mod:`teacache_fast.ops`.
On CPU tensors it runs under the Triton interpreter (``TRITON_INTERPRET=1``),
which is how the tests reach these kernels without a GPU.

All launch math lives in :func:`launch_config`: the kernel files take block
sizes, work per program and warps as arguments, so they stay self-contained.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import triton

from teacache_fast.kernels import decide as _decide
from teacache_fast.kernels import modulate as _modulate
from teacache_fast.kernels import rel_l1 as _rel_l1
from teacache_fast.kernels import residual as _residual

# Widest vector a program works on at once. On a GPU 4096 elements over 16
# warps is 8 per thread: 16-byte loads for 16-bit dtypes, few registers. Under
# the interpreter a program costs ~20 ms whatever its width, but rows keep a
# smaller cap so that common widths (3000, 4096) take the multi-block path there
# too and the tests cover it.
_GPU_MAX_BLOCK = 4096
_CPU_MAX_ROW_BLOCK = 1024
_CPU_MAX_FLAT_BLOCK = 4096
# Row kernels hold a row of up to this many lanes in registers (one DRAM pass
# per row, ~8 fp32 values per thread and input); wider rows loop over blocks.
_GPU_MAX_ROW_TILE = 8192
_CPU_MAX_ROW_TILE = 2048
_ELEMS_PER_THREAD = 8
# The partition of every reduction is a function of the shape only, never of
# the GPU (the same bits on an A100, an H200 or a MIG slice): a grid of about
# _REFERENCE_SMS x (programs resident per SM) programs, one full wave on a
# 132-SM H100/H200; each program handles at most _MAX_ELEMS_PER_PROGRAM
# elements, so long inputs get more programs.
_REFERENCE_SMS = 132
_MAX_ELEMS_PER_PROGRAM = 1 << 16
# Resident programs per SM of a kernel launched with num_warps, as compiled for
# sm_90: 2048 threads per SM over 32 * num_warps (at most 32 programs), unless
# its registers allow fewer: those are listed by (kernel, num_warps, itemsize of
# the main input), with the registers ptxas gives them at the benchmark shapes
# (FLUX C=3072, Wan C=5120). tools/kernel_report.py measures them
# (benchmarks/results/kernels-sm90.md); tests/test_kernel_report.py fails when
# a compiled kernel fits a different number than its grid assumes. The row
# kernel holds x, prev, 1 + scale and shift of its row in registers (~100 per
# thread, no spills): 2 programs of 256 threads (C=3072), 1 of 512 (C=5120);
# capping the registers (maxnreg 64-80) spills, so the grid assumes what fits.
_RESIDENT_BY_REGISTERS: dict[tuple[str, int, int], int] = {
    ("_modulate_kernel", 8, 2): 4, ("_modulate_kernel", 8, 4): 4,       # 62-64 registers
    ("_modulate_kernel", 16, 2): 2,                                     # 57
    ("_modulated_rel_l1_kernel", 8, 2): 2, ("_modulated_rel_l1_kernel", 8, 4): 2,  # 99-104
    ("_modulated_rel_l1_kernel", 16, 2): 1,                             # 93
    ("_rel_l1_partials_kernel", 16, 2): 3, ("_rel_l1_partials_kernel", 16, 4): 3,  # 40 (fused finish)
    ("_span_end_kernel", 16, 4): 3,                                     # 38
}
# CPU (interpreter): rows or tiles per program, to keep grids small.
_CPU_PER_PROGRAM = 4


@dataclass(frozen=True)
class LaunchConfig:
    block: int        # BLOCK_C (row kernels) or BLOCK (flat kernels): elements per vector op
    per_program: int  # rows (row kernels) or tiles of `block` (flat kernels) per program
    num_warps: int
    tail: int | None = None  # row kernels: second register tile (0: none); None: blocked path


def resident_programs(kernel: str, num_warps: int, itemsize: int) -> int:
    """Programs per SM the grid of ``kernel`` assumes (itemsize: of its main input)."""
    return _RESIDENT_BY_REGISTERS.get((kernel, num_warps, itemsize),
                                      min(32, 2048 // (32 * num_warps)))


def _per_program(width: int, units: int, num_warps: int, kernel: str, itemsize: int) -> int:
    """Units of `width` elements per program: a fixed split of `units`, device-free."""
    target = _REFERENCE_SMS * resident_programs(kernel, num_warps, itemsize)
    return max(1, min(units // target, _MAX_ELEMS_PER_PROGRAM // width))


def launch_config(width: int, rows: int, groups: int, device: torch.device, *,
                  kernel: str = "", itemsize: int = 4,
                  cpu_max_block: int = _CPU_MAX_ROW_BLOCK) -> LaunchConfig:
    """Launch parameters for ``groups`` x ``rows`` units of ``width`` elements.

    A program works on ``per_program`` units of one group, ``block`` elements
    at a time (looping when width > block). The result is a pure function of
    the shape and the device type (not the GPU model or its SM count), so the
    reduction order, and hence the bits, is the same on every call and GPU.
    kernel, itemsize: which kernel (and main dtype size) the grid is for, to
    look up its residency.
    """
    if device.type != "cuda":
        return LaunchConfig(min(triton.next_power_of_2(width), cpu_max_block), _CPU_PER_PROGRAM, 1)
    block = min(triton.next_power_of_2(width), _GPU_MAX_BLOCK)
    num_warps = max(1, min(16, block // 256))
    return LaunchConfig(block, _per_program(width, groups * rows, num_warps, kernel, itemsize),
                        num_warps)


def _row_tiles(C: int, max_tile: int) -> tuple[int, int] | None:
    """(first tile, second tile) covering C lanes, powers of two (the second may
    be 0), or None when C is wider than max_tile. C = 3072 -> 2048 + 1024: no
    lane masked, where one 4096 tile would mask a quarter."""
    full = triton.next_power_of_2(C)
    if full > max_tile and C > max_tile:
        return None
    if full == C or C <= 32:
        return full, 0
    half = full // 2
    tail = triton.next_power_of_2(C - half)
    return (half, tail) if tail < half else (full, 0)


def row_config(C: int, rows: int, groups: int, device: torch.device, *, kernel: str = "",
               itemsize: int = 4) -> LaunchConfig:
    """launch_config for the row kernels (modulate, modulated_rel_l1_): a row
    that fits is held in registers (tail is not None), else the blocked path."""
    gpu = device.type == "cuda"
    tiles = _row_tiles(C, _GPU_MAX_ROW_TILE if gpu else _CPU_MAX_ROW_TILE)
    if tiles is None:
        cfg = launch_config(C, rows, groups, device, kernel=kernel, itemsize=itemsize)
        return LaunchConfig(cfg.block, cfg.per_program, cfg.num_warps, None)
    block, tail = tiles
    if not gpu:
        return LaunchConfig(block, _CPU_PER_PROGRAM, 1, tail)
    warps = max(1, (block + tail) // _ELEMS_PER_THREAD // 32)
    num_warps = min(16, 1 << (warps.bit_length() - 1))  # a power of two, rounded down
    return LaunchConfig(block, _per_program(C, groups * rows, num_warps, kernel, itemsize),
                        num_warps, tail)


def flat_config(length: int, groups: int, device: torch.device, *, kernel: str = "",
                itemsize: int = 4) -> LaunchConfig:
    """launch_config for ``groups`` flat runs of ``length`` elements, cut into tiles."""
    tile = min(triton.next_power_of_2(length),
               _GPU_MAX_BLOCK if device.type == "cuda" else _CPU_MAX_FLAT_BLOCK)
    return launch_config(tile, triton.cdiv(length, tile), groups, device, kernel=kernel,
                         itemsize=itemsize, cpu_max_block=_CPU_MAX_FLAT_BLOCK)


def _on(device: torch.device):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Up to this many outputs (samples, or 1 for the batch) the last program of a
# reduction launch adds the partials (one launch); more take sum_partials,
# whose programs share the outputs (one last program looping over a batch of
# thousands would serialize the finish). The same split as csrc/ (kFusedOutputs).
_FUSED_OUTPUTS = 64
_FINISH_MAX_BLOCK = 4096
# The fused finish's integer ticket, one per (device, stream): zero before the
# first launch and left zero by every launch, and launches on one stream run
# in order. CPU (interpreter): one per thread. Inside a CUDA-graph capture a
# fresh one (a captured allocation belongs to the graph's pool).
_TICKETS: dict = {}


def _ticket(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, threading.get_ident())
    ticket = _TICKETS.get(key)
    if ticket is None:
        ticket = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return ticket


def _fused_finish(groups: int, per_sample: bool, device: torch.device) -> _rel_l1.Finish | None:
    """The in-launch finish, or None where sum_partials takes the outputs."""
    if per_sample and groups > _FUSED_OUTPUTS:
        return None
    return _rel_l1.Finish(_ticket(device), per_sample, _FINISH_MAX_BLOCK)


def _finish(result: torch.Tensor, fused: bool, per_sample: bool) -> torch.Tensor:
    """The launch's (B, 2) / (1, 2) sums when fused, else its (B, P, 2) partials
    added by sum_partials in the same order; (B, 2) per sample, (2,) for the batch."""
    if not fused:
        B, P, _ = result.shape
        groups = result if per_sample else result.view(1, B * P, 2)
        cfg = launch_config(groups.shape[1], 1, groups.shape[0], result.device,
                            cpu_max_block=_CPU_MAX_FLAT_BLOCK)
        result = _rel_l1.sum_partials(groups, block=cfg.block, num_warps=min(cfg.num_warps, 4))
    return result if per_sample else result.view(2)


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """t when 16-byte aligned (or None), else an aligned copy. Triton derives
    a kernel's layout from its pointers' alignment, and the layout orders the
    row kernels' tree sums (the LayerNorm/RMSNorm statistics): a misaligned
    row could get other bits than the same row aligned (tools/kernel_report.py,
    "stats layout, misaligned rows"). A copy costs one more pass, only for
    such inputs (a view one element into its storage); fresh tensors are aligned."""
    return t if t is None or t.data_ptr() % 16 == 0 else t.clone()


def modulate(x, scale, shift, norm: str, eps: float) -> torch.Tensor:
    B, R, C = x.shape
    cfg = row_config(C, R, B, x.device, kernel="_modulate_kernel", itemsize=x.element_size())
    out = torch.empty_like(x)
    x, scale, shift = _aligned(x), _aligned(scale), _aligned(shift)
    with _on(x.device):
        _modulate.modulate(x, scale, shift, out, norm, eps, block_c=cfg.block, tail=cfg.tail,
                           rows_per_program=cfg.per_program, num_warps=cfg.num_warps)
    return out


def rel_l1_partials(cur, prev, per_sample: bool) -> torch.Tensor:
    G, L = cur.shape
    cfg = flat_config(L, G, cur.device, kernel="_rel_l1_partials_kernel", itemsize=cur.element_size())
    finish = _fused_finish(G, per_sample, cur.device)
    with _on(cur.device):
        result = _rel_l1.rel_l1_partials(cur, prev, block=cfg.block, tiles_per_program=cfg.per_program,
                                         num_warps=cfg.num_warps, finish=finish)
        return _finish(result, finish is not None, per_sample)


def modulated_rel_l1_(x, scale, shift, prev, norm: str, eps: float, per_sample: bool) -> torch.Tensor:
    B, R, C = x.shape
    cfg = row_config(C, R, B, x.device, kernel="_modulated_rel_l1_kernel",
                     itemsize=x.element_size())
    finish = _fused_finish(B, per_sample, x.device)
    x, scale, shift, buf = _aligned(x), _aligned(scale), _aligned(shift), _aligned(prev)
    with _on(x.device):
        result = _modulate.modulated_rel_l1_(x, scale, shift, buf, norm, eps, block_c=cfg.block,
                                             tail=cfg.tail, rows_per_program=cfg.per_program,
                                             num_warps=cfg.num_warps, finish=finish)
        if buf is not prev:
            prev.copy_(buf)
        return _finish(result, finish is not None, per_sample)


def teacache_decide_(partials, state, coefficients, threshold: float, force, max_skips: int,
                     accumulate_abs: bool = False) -> torch.Tensor:
    S = partials.shape[0]
    cfg = launch_config(S, 1, 1, partials.device)
    with _on(partials.device):
        return _decide.teacache_decide_(partials, state, coefficients, threshold, force, max_skips,
                                        accumulate_abs=accumulate_abs, block=cfg.block, num_warps=min(cfg.num_warps, 4))


def residual_capture_(out, inp, residual) -> None:
    cfg = flat_config(out.numel(), 1, out.device, kernel="_residual_capture_kernel",
                      itemsize=out.element_size())
    with _on(out.device):
        _residual.residual_capture_(out, inp, residual, block=cfg.block,
                                    tiles_per_program=cfg.per_program, num_warps=cfg.num_warps)


def residual_apply_(hidden, residual, mask, out=None) -> None:
    B, L = hidden.shape
    cfg = flat_config(L, B, hidden.device, kernel="_residual_apply_kernel",
                      itemsize=hidden.element_size())
    with _on(hidden.device):
        _residual.residual_apply_(hidden, residual, mask, block=cfg.block,
                                  tiles_per_program=cfg.per_program, num_warps=cfg.num_warps, out=out)


def finish_span_(compute, out, inp, residual) -> None:
    """The sync-free span end in one launch and 3 passes (the flag read on the device)."""
    cfg = flat_config(out.numel(), 1, out.device, kernel="_span_end_kernel", itemsize=out.element_size())
    with _on(out.device):
        _residual.finish_span_(compute, out, inp, residual, block=cfg.block,
                               tiles_per_program=cfg.per_program, num_warps=cfg.num_warps)
