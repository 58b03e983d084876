# SPDX-License-Identifier: Apache-2.0
"""TeaCache residual: capture ``out - inp``, apply ``hidden += residual``, end a sync-free span.

``residual_capture_``: residual = out - inp over L elements, fp32 arithmetic,
                       rounded once to residual's dtype (which may differ from
                       out/inp, e.g. an fp32 cache of bf16 activations). Bytes:
                       read out, read inp, write residual.
``residual_apply_``:   hidden (B, L) += residual (B, L) in fp32, rounded once to
                       hidden's dtype. With a (B,) bool mask, read on the device
                       (no host sync), samples whose flag is false are neither
                       read nor written. Bytes: read hidden and residual, write
                       hidden (for the masked-in samples). With ``out``:
                       out = hidden + residual, hidden unchanged (masked-out
                       samples copied); the same 3 passes instead of the 5 of
                       a clone then an in-place add.
``finish_span_``:      the sync-free span end, chosen per launch by a device
                       flag (one byte, read on the device): set, residual =
                       out - inp (read out, inp; write residual); clear, out +=
                       residual (read out, residual; write out). 3 passes
                       either way, one launch, no host read.

Elementwise, so there is no reduction order to fix. Each program handles
``tiles_per_program`` tiles of BLOCK elements of one sample.
Self-contained (triton + torch only) so it can be copied into other projects.
"""
import torch
import triton
import triton.language as tl


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
def _residual_capture_kernel(out_ptr, inp_ptr, res_ptr, L, tiles_per_program, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * tiles_per_program * BLOCK
    lanes = tl.arange(0, BLOCK)
    for t in range(0, tiles_per_program):
        offs = first + t * BLOCK + lanes
        mask = offs < L
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        i = tl.load(inp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + offs, _round_to(o - i, res_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_apply_kernel(hidden_ptr, res_ptr, mask_ptr, out_ptr, L, tiles_per_program,
                           HAS_MASK: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * tiles_per_program * BLOCK
    lanes = tl.arange(0, BLOCK)
    # In place, a masked-out sample gets an empty range: no loads, no stores.
    # Out of place, it is copied: hidden is read and written for every sample,
    # the residual only where the flag is set.
    end = L
    if HAS_MASK:
        # the bool flag's byte: any nonzero byte is True (torch may hold 2..255)
        end = L * (tl.load(mask_ptr + b) != 0).to(tl.int64)
    for t in range(0, tiles_per_program):
        offs = first + t * BLOCK + lanes
        add = offs < end
        live = add if IN_PLACE else offs < L
        h = tl.load(hidden_ptr + b * L + offs, mask=live, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + b * L + offs, mask=add, other=0.0).to(tl.float32)
        # r is 0 where masked out: h + 0 is h for every finite or inf h, but -0 + 0
        # is +0 and NaN payloads may change, so the copy takes h itself
        v = tl.where(add, h + r, h)
        tl.store(out_ptr + b * L + offs, _round_to(v, out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _span_end_kernel(out_ptr, inp_ptr, res_ptr, compute_ptr, L, tiles_per_program, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * tiles_per_program * BLOCK
    lanes = tl.arange(0, BLOCK)
    # The flag picks which range is empty: capture [0, L) and apply none, or
    # the reverse (any nonzero byte of the bool is True, as in residual_apply_).
    capture_end = L * (tl.load(compute_ptr) != 0).to(tl.int64)
    apply_end = L - capture_end
    for t in range(0, tiles_per_program):
        offs = first + t * BLOCK + lanes
        live = offs < L
        capture = offs < capture_end
        apply = offs < apply_end
        o = tl.load(out_ptr + offs, mask=live, other=0.0).to(tl.float32)
        i = tl.load(inp_ptr + offs, mask=capture, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + offs, mask=apply, other=0.0).to(tl.float32)
        tl.store(res_ptr + offs, _round_to(o - i, res_ptr.dtype.element_ty), mask=capture)
        tl.store(out_ptr + offs, _round_to(o + r, out_ptr.dtype.element_ty), mask=apply)


def residual_capture_(out, inp, residual, *, block, tiles_per_program, num_warps):
    """residual <- out - inp for contiguous 1-D tensors of equal length."""
    L = out.numel()
    grid = (triton.cdiv(triton.cdiv(L, block), tiles_per_program),)
    _residual_capture_kernel[grid](out, inp, residual, L, tiles_per_program,
                                   BLOCK=block, num_warps=num_warps)


def residual_apply_(hidden, residual, mask, *, block, tiles_per_program, num_warps, out=None):
    """hidden += residual for contiguous (B, L) tensors; mask: contiguous (B,) bool or None.

    out: a contiguous (B, L) tensor of hidden's dtype, not overlapping either
    input: out = hidden + residual (masked-out samples: out = hidden), hidden kept.
    """
    B, L = hidden.shape
    grid = (B, triton.cdiv(triton.cdiv(L, block), tiles_per_program))
    _residual_apply_kernel[grid](hidden, residual, hidden if mask is None else mask.view(torch.uint8),
                                 hidden if out is None else out, L, tiles_per_program,
                                 HAS_MASK=mask is not None, IN_PLACE=out is None, BLOCK=block,
                                 num_warps=num_warps)


def finish_span_(compute, out, inp, residual, *, block, tiles_per_program, num_warps):
    """compute (0-d bool): residual <- out - inp; else out += residual.

    out, inp, residual: contiguous 1-D tensors of equal length (residual may
    have another float dtype); compute on their device.
    """
    L = out.numel()
    grid = (triton.cdiv(triton.cdiv(L, block), tiles_per_program),)
    _span_end_kernel[grid](out, inp, residual, compute.view(torch.uint8), L, tiles_per_program,
                           BLOCK=block, num_warps=num_warps)
