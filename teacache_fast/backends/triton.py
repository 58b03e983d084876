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
import functools
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
# GPU: programs wanted per SM (several resident programs hide memory latency);
# each program handles at most this many elements, so work still spreads out.
_PROGRAMS_PER_SM = 8
_MAX_ELEMS_PER_PROGRAM = 1 << 16
# CPU (interpreter): rows or tiles per program, to keep grids small.
_CPU_PER_PROGRAM = 4


@dataclass(frozen=True)
class LaunchConfig:
    block: int        # BLOCK_C (row kernels) or BLOCK (flat kernels): elements per vector op
    per_program: int  # rows (row kernels) or tiles of `block` (flat kernels) per program
    num_warps: int


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(width: int, rows: int, groups: int, device: torch.device, *,
                  cpu_max_block: int = _CPU_MAX_ROW_BLOCK) -> LaunchConfig:
    """Launch parameters for ``groups`` x ``rows`` units of ``width`` elements.

    A program works on ``per_program`` units of one group, ``block`` elements
    at a time (looping when width > block). The result is a pure function of
    the shape and the device, so the reduction order, and hence the bits, is
    the same on every call.
    """
    if device.type != "cuda":
        return LaunchConfig(min(triton.next_power_of_2(width), cpu_max_block), _CPU_PER_PROGRAM, 1)
    block = min(triton.next_power_of_2(width), _GPU_MAX_BLOCK)
    num_warps = max(1, min(16, block // 256))
    target = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else
                                          torch.cuda.current_device())
    per_program = max(1, min((groups * rows) // target, _MAX_ELEMS_PER_PROGRAM // width))
    return LaunchConfig(block, per_program, num_warps)


def flat_config(length: int, groups: int, device: torch.device) -> LaunchConfig:
    """launch_config for ``groups`` flat runs of ``length`` elements, cut into tiles."""
    tile = min(triton.next_power_of_2(length),
               _GPU_MAX_BLOCK if device.type == "cuda" else _CPU_MAX_FLAT_BLOCK)
    return launch_config(tile, triton.cdiv(length, tile), groups, device,
                         cpu_max_block=_CPU_MAX_FLAT_BLOCK)


def _on(device: torch.device):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _finish(partials: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """(B, P, 2) per-program partials -> (B, 2) per sample, or (2,) for the batch."""
    B, P, _ = partials.shape
    groups = partials if per_sample else partials.view(1, B * P, 2)
    cfg = launch_config(groups.shape[1], 1, groups.shape[0], partials.device,
                        cpu_max_block=_CPU_MAX_FLAT_BLOCK)
    out = _rel_l1.sum_partials(groups, block=cfg.block, num_warps=min(cfg.num_warps, 4))
    return out if per_sample else out.view(2)


def modulate(x, scale, shift, norm: str, eps: float) -> torch.Tensor:
    B, R, C = x.shape
    cfg = launch_config(C, R, B, x.device)
    out = torch.empty_like(x)
    with _on(x.device):
        _modulate.modulate(x, scale, shift, out, norm, eps, block_c=cfg.block,
                           rows_per_program=cfg.per_program, num_warps=cfg.num_warps)
    return out


def rel_l1_partials(cur, prev, per_sample: bool) -> torch.Tensor:
    G, L = cur.shape
    cfg = flat_config(L, G, cur.device)
    with _on(cur.device):
        partials = _rel_l1.rel_l1_partials(cur, prev, block=cfg.block,
                                           tiles_per_program=cfg.per_program,
                                           num_warps=cfg.num_warps)
        return _finish(partials, per_sample)


def modulated_rel_l1_(x, scale, shift, prev, norm: str, eps: float, per_sample: bool) -> torch.Tensor:
    B, R, C = x.shape
    cfg = launch_config(C, R, B, x.device)
    with _on(x.device):
        partials = _modulate.modulated_rel_l1_(x, scale, shift, prev, norm, eps, block_c=cfg.block,
                                               rows_per_program=cfg.per_program,
                                               num_warps=cfg.num_warps)
        return _finish(partials, per_sample)


def teacache_decide_(partials, state, coefficients, threshold: float, force, max_skips: int,
                     accumulate_abs: bool = False) -> torch.Tensor:
    S = partials.shape[0]
    cfg = launch_config(S, 1, 1, partials.device)
    with _on(partials.device):
        return _decide.teacache_decide_(partials, state, coefficients, threshold, force, max_skips,
                                        accumulate_abs=accumulate_abs, block=cfg.block, num_warps=min(cfg.num_warps, 4))


def residual_capture_(out, inp, residual) -> None:
    cfg = flat_config(out.numel(), 1, out.device)
    with _on(out.device):
        _residual.residual_capture_(out, inp, residual, block=cfg.block,
                                    tiles_per_program=cfg.per_program, num_warps=cfg.num_warps)


def residual_apply_(hidden, residual, mask) -> None:
    B, L = hidden.shape
    cfg = flat_config(L, B, hidden.device)
    with _on(hidden.device):
        _residual.residual_apply_(hidden, residual, mask, block=cfg.block,
                                  tiles_per_program=cfg.per_program, num_warps=cfg.num_warps)
