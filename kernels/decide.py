# SPDX-License-Identifier: Apache-2.0
"""TeaCache decision on the device: ``acc += poly(num / den)``, compute or skip.

For S independent states (one per CFG branch / sample), with partials (S, 2)
``[num, den]`` and state (S, 2) ``[acc, consecutive_skips]`` (fp32, updated in
place), writes the bool compute flags (S,):

    rel     = num / den                      (invalid: num, den, rel not finite or den == 0)
    new_acc = acc + poly(rel if valid else 0)   (|poly(...)| with accumulate_abs)
    compute = force | invalid | new_acc not finite | new_acc >= threshold
              | threshold <= 0 | (max_skips >= 0 and skips >= max_skips)
              | skips not a finite number >= 0 (a corrupt state computes)
    acc, skips = (0, 0) if compute else (new_acc, skips + 1)

poly is evaluated in fp32 by Horner's rule, highest power first (numpy.poly1d
order), one rounding per multiply and per add (launched without FMA
contraction) so it matches a plain fp32 torch evaluation bit for bit.
Bytes: a few per state; the point is no host sync, not bandwidth. Bool
tensors (force in, flags out) travel as their 0/1 bytes.
Self-contained (triton + torch only) so it can be copied into other projects.
"""
import torch
import triton
import triton.language as tl

MAX_COEFFICIENTS = 9


@triton.jit
def _finite(v):
    return tl.abs(v) < float("inf")  # false for inf and NaN


@triton.jit
def _decide_kernel(part_ptr, state_ptr, force_ptr, flags_ptr, S, threshold, never_skip, max_skips,
                   c0, c1, c2, c3, c4, c5, c6, c7, c8, ACC_ABS: tl.constexpr, HAS_FORCE: tl.constexpr,
                   BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < S
    num = tl.load(part_ptr + 2 * i, mask=mask, other=0.0)
    den = tl.load(part_ptr + 2 * i + 1, mask=mask, other=1.0)
    acc = tl.load(state_ptr + 2 * i, mask=mask, other=0.0)
    skips = tl.load(state_ptr + 2 * i + 1, mask=mask, other=0.0)
    if HAS_FORCE:
        force = tl.load(force_ptr + i, mask=mask, other=0) != 0
    else:  # a host bool: it arrives folded into never_skip
        force = tl.zeros([BLOCK], dtype=tl.int1)

    ok = _finite(num) & _finite(den) & (den != 0.0)
    # Divide only valid pairs (the interpreter's numpy warns on 0/0 and inf/inf).
    rel = tl.math.div_rn(tl.where(ok, num, 0.0), tl.where(ok, den, 1.0))
    valid = ok & _finite(rel)
    r = tl.where(valid, rel, 0.0)
    # Coefficients arrive left-padded with zeros to MAX_COEFFICIENTS, which
    # leaves the Horner value unchanged.
    p = tl.zeros([BLOCK], dtype=tl.float32)
    p = p * r + c0
    p = p * r + c1
    p = p * r + c2
    p = p * r + c3
    p = p * r + c4
    p = p * r + c5
    p = p * r + c6
    p = p * r + c7
    p = p * r + c8
    if ACC_ABS:
        p = tl.abs(p)
    new_acc = acc + p

    compute = force | (~valid) | (~_finite(new_acc)) | (new_acc >= threshold)
    compute = compute | (never_skip != 0)  # threshold <= 0 never skips, whatever poly's sign
    compute = compute | ((max_skips >= 0.0) & (skips >= max_skips))
    # a corrupt skip counter (NaN, inf, negative) cannot be trusted: compute (and reset it)
    compute = compute | ~((skips >= 0.0) & _finite(skips))
    tl.store(state_ptr + 2 * i, tl.where(compute, 0.0, new_acc), mask=mask)
    tl.store(state_ptr + 2 * i + 1, tl.where(compute, 0.0, skips + 1.0), mask=mask)
    tl.store(flags_ptr + i, compute.to(tl.uint8), mask=mask)


def teacache_decide_(partials, state, coefficients, threshold, force, max_skips, *, block,
                     num_warps, accumulate_abs=False):
    """Return bool flags (S,); partials, state: contiguous fp32 (S, 2); force: (S,) bool,
    or a Python bool for every state (a scalar argument: no flag tensor is made).

    coefficients: 1..9 floats, highest power first. max_skips < 0 means no limit.
    accumulate_abs: acc += |poly(rel)| instead of poly(rel).
    """
    coeffs = [float(c) for c in coefficients]
    if not 1 <= len(coeffs) <= MAX_COEFFICIENTS:
        raise ValueError(f"coefficients must hold 1 to {MAX_COEFFICIENTS} numbers, got {len(coeffs)}")
    coeffs = [0.0] * (MAX_COEFFICIENTS - len(coeffs)) + coeffs
    S = partials.shape[0]
    flags = torch.empty((S,), dtype=torch.bool, device=partials.device)
    has_force = isinstance(force, torch.Tensor)
    # "threshold <= 0" on the double, as torch and CUDA test it (a positive threshold
    # below fp32's range rounds to 0 in the kernel, yet it still allows skips); a forced
    # step computes and resets the state exactly as never skipping does
    never_skip = float(threshold) <= 0.0 or (not has_force and bool(force))
    _decide_kernel[(triton.cdiv(S, block),)](
        partials, state, (force if has_force else flags).view(torch.uint8), flags.view(torch.uint8), S,
        float(threshold), int(never_skip), float(max_skips), *coeffs,
        ACC_ABS=bool(accumulate_abs), HAS_FORCE=has_force, BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False)
    return flags
