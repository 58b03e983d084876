"""Edge cases of the Triton kernels: block and program boundaries, the
deterministic second stage, bf16 rounding, the launch heuristics.

The general op-by-op comparison over every backend is tests/test_ops.py; this
file aims at what only the kernels can get wrong. On CPU the kernels run under
the Triton interpreter (conftest sets TRITON_INTERPRET=1), so grids stay tiny.
"""
from __future__ import annotations

import pytest
import torch

from teacache_fast import ops
from teacache_fast.backends import unavailable_reason
from op_oracles import ATOL, modulate64, partials64

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if unavailable_reason("triton", DEV) is not None:
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton', DEV)}",
                allow_module_level=True)

from teacache_fast.backends import triton as tb  # noqa: E402
from teacache_fast.kernels import decide as kdecide  # noqa: E402
from teacache_fast.kernels import modulate as kmod  # noqa: E402
from teacache_fast.kernels import rel_l1 as krel  # noqa: E402

CFG = tb.launch_config(4096, 1, 1, torch.device(DEV))
BLOCK_C = CFG.block                # row block of this device for wide rows
ROWS = CFG.per_program             # rows per program of this device
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rand(shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(dtype=dtype, device=DEV)


def _triton(fn, *args, **kwargs):
    with ops.use_backend("triton"):
        return fn(*args, **kwargs)


def _torch(fn, *args, **kwargs):
    with ops.use_backend("torch"):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- modulate

@pytest.mark.parametrize("C", [1, BLOCK_C - 1, BLOCK_C, BLOCK_C + 1, 3000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("norm", ops.NORMS)
def test_modulate_block_boundaries(C, norm):
    # ROWS + 1 rows: the second program of each sample has a single row.
    x = _rand((2, ROWS + 1, C), torch.bfloat16, 1, 2.0, 0.5)
    scale, shift = _rand((2, C), torch.bfloat16, 2, 0.5), _rand((1, 1, C), torch.float32, 3)
    m = _triton(ops.modulate, x, scale, shift, norm=norm)
    exact = modulate64(x, scale, shift.reshape(1, C), norm, 1e-6)
    mag = exact.abs().max().clamp(min=1.0)
    torch.testing.assert_close(m.double(), exact, atol=ATOL[torch.bfloat16] * mag, rtol=0)
    torch.testing.assert_close(m, _torch(ops.modulate, x, scale, shift, norm=norm),
                               atol=ATOL[torch.bfloat16] * mag, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_wide_row_with_large_mean(dtype):
    # 16387 channels (several column blocks, ragged tail) around a mean of 300:
    # a one-pass E[x^2] - E[x]^2 would lose most bits of the variance here.
    x = _rand((1, 1, 16387), dtype, 4, 1.0, 300.0 if dtype != torch.float16 else 30.0)
    m = _triton(ops.modulate, x, None, None, norm="layer")
    torch.testing.assert_close(m.double(), modulate64(x, None, None, "layer", 1e-6),
                               atol=ATOL[dtype] * 4, rtol=0)


def test_modulate_video_shape_non_contiguous():
    # (B, T, H, W, C) from a transpose, C just over one block, scale as (B, 1, C).
    C = BLOCK_C + 1
    base = _rand((2, 2, 3, C, 2), torch.float16, 5)
    x = base.transpose(-1, -2)
    scale = _rand((2, 1, C), torch.float16, 6, 0.3)
    m = _triton(ops.modulate, x, scale, None, norm="rms")
    assert m.shape == x.shape and m.is_contiguous()
    torch.testing.assert_close(m, _torch(ops.modulate, x.contiguous(), scale, None, norm="rms"),
                               atol=ATOL[torch.float16], rtol=0)


def test_modulate_none_matches_torch_bitwise():
    # No reduction: the same fp32 operations in the same order, each rounded
    # once (fp fusion is off at launch, so no FMA on a GPU either), then one
    # round-to-nearest-even to bf16 (also under the interpreter).
    x = _rand((3, 5, 77), torch.bfloat16, 7, 50.0)
    scale, shift = _rand((3, 77), torch.bfloat16, 8), _rand((3, 77), torch.bfloat16, 9)
    m = _triton(ops.modulate, x, scale, shift, norm="none")
    ref = _torch(ops.modulate, x, scale, shift, norm="none")
    assert torch.equal(m, ref)


def _exact_stat_rows(B, R, C, seed):
    """fp32 rows whose sums are exact in any order: 0.75 + a shuffled +-v pair
    set (v in quarters, |v| <= 4), so mean = 0.75 and sum((x - mean)^2) are
    exact; what is left to round is sum / C, + eps, sqrt, 1 / . and the
    elementwise ops, each correctly rounded in torch and in the kernels."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-16, 17, (B, R, C // 2), generator=g).float() / 4
    row = torch.cat([v, -v, torch.zeros(B, R, C % 2)], -1)
    perm = torch.argsort(torch.rand(B, R, C, generator=g), -1)
    return (torch.gather(row, -1, perm) + 0.75).to(DEV)


# C=7, 1000: one tile; 1025, 2000: two tiles; 3000: the blocked path (on CPU).
@pytest.mark.parametrize("C", [7, 1025, 2000, 3000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("norm", ops.NORMS)
def test_modulate_matches_torch_bitwise_fp32(C, norm):
    # Bitwise, not to the last ulp: with the statistics' sums exact (so the
    # summation order, which differs between torch and the kernels, cannot
    # matter), every remaining op is rounded the same way: div.rn for the
    # means, sqrt.rn then div.rn for rstd (torch's rsqrt on CPU is 1 / sqrt),
    # no FMA contraction. On arbitrary rows the two differ only through the
    # order of the sums (a few ulps, see test_modulate_block_boundaries).
    x = _exact_stat_rows(2, 3, C, C)
    scale, shift = _rand((2, C), seed=30), _rand((1, C), seed=31)
    m = _triton(ops.modulate, x, scale, shift, norm=norm)
    assert torch.equal(m, _torch(ops.modulate, x, scale, shift, norm=norm))
    prev_tr, prev_to = _rand(x.shape, seed=32), _rand(x.shape, seed=32)
    p_tr = _triton(ops.modulated_rel_l1_, x, scale, shift, prev_tr, norm=norm, per_sample=True)
    p_to = _torch(ops.modulated_rel_l1_, x, scale, shift, prev_to, norm=norm, per_sample=True)
    assert torch.equal(prev_tr, prev_to)
    torch.testing.assert_close(p_tr, p_to, rtol=1e-5, atol=0)  # sums: different orders


# --------------------------------------------------------------------------- fused indicator

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [BLOCK_C + 1, 3000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("single", [False, True], ids=["blocked", "registers"])
def test_modulated_rel_l1_program_partials(dtype, C, single):
    # Call the launcher directly: 3 rows per program over 7 rows leaves a
    # 1-row program; each program's partials must be those of its own rows.
    # Both paths: blocked (BLOCK_C columns at a time) and the row in registers
    # (two tiles: 1024 + 1 lanes, or 2048 + 1024 with 72 masked).
    block, tail = tb._row_tiles(C, 4096) if single else (BLOCK_C, None)
    B, R, per = 2, 7, 3
    x = _rand((B, R, C), dtype, 10, 3.0)
    scale, shift = _rand((1, C), dtype, 11, 0.5), _rand((B, C), dtype, 12)
    prev = _rand((B, R, C), dtype, 13)
    prev0 = prev.clone()
    parts = kmod.modulated_rel_l1_(x, scale, shift, prev, "layer", 1e-6, block_c=block, tail=tail,
                                   rows_per_program=per, num_warps=CFG.num_warps)
    assert parts.shape == (B, 3, 2) and parts.dtype == torch.float32
    # prev holds m rounded to dtype, like the torch backend's
    ref_prev = prev0.clone()
    _torch(ops.modulated_rel_l1_, x, scale, shift, ref_prev)
    torch.testing.assert_close(prev, ref_prev, atol=ATOL[dtype] * 4, rtol=0)
    for j in range(3):
        rows = slice(j * per, (j + 1) * per)
        expected = partials64(prev[:, rows], prev0[:, rows], per_sample=True)
        torch.testing.assert_close(parts[:, j].double(), expected, rtol=1e-5, atol=1e-4)


def test_per_sample_partials_add_up_to_batch_partials():
    x = _rand((3, ROWS * 2 + 1, 1000), torch.float16, 14)
    prev0 = _rand(x.shape, torch.float16, 15)
    p_a, p_b = prev0.clone(), prev0.clone()
    per = _triton(ops.modulated_rel_l1_, x, None, None, p_a, norm="rms", per_sample=True)
    whole = _triton(ops.modulated_rel_l1_, x, None, None, p_b, norm="rms", per_sample=False)
    assert per.shape == (3, 2) and whole.shape == (2,)
    assert torch.equal(p_a, p_b)
    torch.testing.assert_close(per.sum(0), whole, rtol=1e-5, atol=0)
    torch.testing.assert_close(per.double(), partials64(p_a, prev0, True), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- partials, second stage

def test_rel_l1_many_programs_and_second_stage_loop():
    # 16-element tiles, 2 per program: 13 programs per sample for L = 405, and a
    # second stage whose 4-wide block loops 4 times with a ragged tail.
    cur, prev = _rand((2, 405), seed=16), _rand((2, 405), seed=17)
    parts = krel.rel_l1_partials(cur, prev, block=16, tiles_per_program=2, num_warps=1)
    assert parts.shape == (2, 13, 2)
    torch.testing.assert_close(parts.double().sum(1), partials64(cur, prev, True), rtol=1e-6, atol=0)
    last = partials64(cur[:, 384:], prev[:, 384:], True)  # the last program: 21 elements
    torch.testing.assert_close(parts[:, -1].double(), last, rtol=1e-6, atol=0)
    total = krel.sum_partials(parts, block=4, num_warps=1)
    torch.testing.assert_close(total.double(), parts.double().sum(1), rtol=1e-6, atol=0)
    again = krel.sum_partials(parts.clone(), block=4, num_warps=1)
    assert torch.equal(total, again)


import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _exact_sum_kernel(v_ptr, out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr, krel.exact_lane_sum(tl.load(v_ptr + tl.arange(0, BLOCK))))


def _exact_sum(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty(1, dtype=torch.float32, device=v.device)
    _exact_sum_kernel[(1,)](v, out, BLOCK=v.numel())
    return out[0]


@pytest.mark.parametrize("spread", [1.0, 1e30, 1e-30], ids=["unit", "huge", "tiny"])
def test_exact_lane_sum_ignores_the_lane_order(spread):
    # The lanes of a program's sum are laid out over threads as the compiler
    # chooses (from the pointers' alignment): any permutation gives the same
    # bits, within 1 ulp of the float64 sum (values over 2^40 of range).
    g = torch.Generator().manual_seed(40)
    v = (torch.rand(4096, generator=g) * torch.exp2(torch.randint(-20, 20, (4096,), generator=g).float()) * spread)
    v = v.to(DEV)
    want = _exact_sum(v)
    for seed in range(3):
        perm = torch.randperm(4096, generator=torch.Generator().manual_seed(seed)).to(DEV)
        assert torch.equal(_exact_sum(v[perm].contiguous()), want)
    exact = v.double().sum()
    assert abs(want.double() - exact) <= exact * 2.0 ** -23
    assert _exact_sum(torch.zeros(64, device=DEV)) == 0.0


def test_exact_lane_sum_non_finite_lanes():
    v = torch.ones(256, device=DEV)
    v[7] = float("inf")
    assert _exact_sum(v) == float("inf")
    v[9] = float("nan")
    assert _exact_sum(v).isnan()
    big = torch.full((256,), 3e38, device=DEV)  # finite lanes, a sum past fp32's range
    assert _exact_sum(big) == float("inf")
    denormal = torch.full((256,), 1e-40, device=DEV)
    torch.testing.assert_close(_exact_sum(denormal).double(), denormal.double().sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shift", [1, 3], ids=lambda s: f"off{s}")
def test_misaligned_inputs_give_the_aligned_bits(monkeypatch, shift):
    # Views starting 1 or 3 elements into their storage (not 16-byte aligned)
    # give the bits of aligned copies: the indicator and rel_l1_partials.
    C = 1000
    xs = _rand((2 * 5 * C + shift,), torch.bfloat16, 41)[shift:].view(2, 5, C)
    ps = _rand((2 * 5 * C + shift,), torch.bfloat16, 42)[shift:].view(2, 5, C)
    assert xs.data_ptr() % 16 and ps.data_ptr() % 16
    scale, shift_t = _rand((2, C), torch.bfloat16, 43), _rand((2, C), torch.bfloat16, 44)
    xa, pa = xs.clone(), ps.clone()
    seen = []  # the row kernels get aligned rows: Triton's layout, and so its sums' order, follows alignment
    real = kmod.modulated_rel_l1_
    monkeypatch.setattr(kmod, "modulated_rel_l1_", lambda x, s, t, prev, *a, **k: seen.append(
        (x.data_ptr() % 16, prev.data_ptr() % 16)) or real(x, s, t, prev, *a, **k))
    got = _triton(ops.modulated_rel_l1_, xs, scale, shift_t, ps, per_sample=True)
    assert seen == [(0, 0)]
    monkeypatch.undo()
    want = _triton(ops.modulated_rel_l1_, xa, scale, shift_t, pa, per_sample=True)
    assert torch.equal(got, want) and torch.equal(ps, pa)
    assert torch.equal(_triton(ops.rel_l1_partials, xs.reshape(2, -1), ps.reshape(2, -1), per_sample=True),
                       _triton(ops.rel_l1_partials, xa.reshape(2, -1), pa.reshape(2, -1), per_sample=True))


def _sum_partials_forbidden(*args, **kwargs):
    raise AssertionError("a fused reduction launched the second stage")


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per_sample"])
def test_fused_finish_is_one_launch_with_the_second_stages_bits(monkeypatch, per_sample):
    # Up to _FUSED_OUTPUTS outputs the last program adds the partials (no
    # sum_partials launch), in sum_partials' order: the same bits as the two
    # launches, and the ticket is left at zero for the next call.
    x = _rand((3, 4 * ROWS + 1, 1000), torch.bfloat16, 30)
    prev0 = _rand(x.shape, torch.bfloat16, 31)
    n = 3 * tb.flat_config(1 << 20, 3, torch.device(DEV)).block * tb.flat_config(1 << 20, 3, torch.device(DEV)).per_program + 5
    cur, prev = _rand((3, n), torch.float32, 32), _rand((3, n), torch.float32, 33)
    cfg = tb.row_config(1000, x.shape[1], 3, x.device, kernel="_modulated_rel_l1_kernel", itemsize=2)
    kw = dict(block_c=cfg.block, tail=cfg.tail, rows_per_program=cfg.per_program, num_warps=1)
    parts = kmod.modulated_rel_l1_(x, None, None, prev0.clone(), "layer", 1e-6, **kw)
    groups = (cur, prev) if per_sample else (cur.view(1, -1), prev.view(1, -1))  # as ops passes them
    flat = tb.flat_config(groups[0].shape[1], groups[0].shape[0], cur.device)
    flat_parts = krel.rel_l1_partials(*groups, block=flat.block, tiles_per_program=flat.per_program,
                                      num_warps=1)
    assert parts.shape[1] > 1 and flat_parts.shape[1] > 1  # several programs to finish

    def two_launches(p):
        groups = p if per_sample else p.view(1, -1, 2)
        block = min(tb._FINISH_MAX_BLOCK, 1 << (groups.shape[1] - 1).bit_length())
        out = krel.sum_partials(groups, block=block, num_warps=1)
        return out if per_sample else out.view(2)

    monkeypatch.setattr(krel, "sum_partials", _sum_partials_forbidden)
    ticket = tb._ticket(x.device)
    fused = _triton(ops.modulated_rel_l1_, x, None, None, prev0.clone(), norm="layer", per_sample=per_sample)
    assert ticket.item() == 0
    fused_flat = _triton(ops.rel_l1_partials, cur, prev, per_sample=per_sample)
    assert ticket.item() == 0
    monkeypatch.undo()
    assert torch.equal(fused, two_launches(parts))
    assert torch.equal(fused_flat, two_launches(flat_parts))
    torch.testing.assert_close(fused_flat.double(), partials64(cur, prev, per_sample), rtol=1e-6, atol=0)


def test_many_outputs_take_the_second_stage(monkeypatch):
    # More samples than the last program should add alone: sum_partials
    # finishes them (one program per sample), with the fused path's results.
    B = tb._FUSED_OUTPUTS + 1
    cur, prev = _rand((B, 33), torch.float16, 34), _rand((B, 33), torch.float16, 35)
    calls = []
    real = krel.sum_partials
    monkeypatch.setattr(krel, "sum_partials", lambda *a, **k: calls.append(1) or real(*a, **k))
    per = _triton(ops.rel_l1_partials, cur, prev, per_sample=True)
    assert calls == [1]
    torch.testing.assert_close(per.double(), partials64(cur, prev, True), rtol=1e-3, atol=0)
    whole = _triton(ops.rel_l1_partials, cur, prev, per_sample=False)  # one output: fused
    assert calls == [1]
    torch.testing.assert_close(whole.double(), partials64(cur, prev, False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rel_l1_partials_ragged_tiles_bitwise_repeatable(dtype):
    flat = tb.flat_config(10**4, 1, torch.device(DEV))
    n = flat.block * flat.per_program + 1     # one element into a second program
    cur, prev = _rand((1, n), dtype, 18), _rand((1, n), dtype, 19)
    p1 = _triton(ops.rel_l1_partials, cur, prev)
    p2 = _triton(ops.rel_l1_partials, cur, prev)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(p1.double(), partials64(cur, prev, False), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- residual

def test_residual_capture_rounds_to_nearest_even_in_other_dtype():
    # fp32 activations, bf16 cache: one round-to-nearest-even of the fp32
    # difference, the same bits as torch (ties included: exact halves below).
    out = _rand((3, 2, 777), torch.float32, 20, 10.0)
    ties = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8)], device=DEV)
    out.view(-1)[:3] = ties
    inp = _rand((3, 2, 777), torch.float32, 21)
    inp.view(-1)[:3] = 0.0
    residual = torch.empty(out.shape, dtype=torch.bfloat16, device=DEV)
    _triton(ops.residual_capture_, out, inp, residual)
    assert torch.equal(residual, (out - inp).to(torch.bfloat16))


def test_residual_apply_mask_many_programs():
    B, L = 3, 5 * tb.flat_config(10**6, 3, torch.device(DEV)).block + 7
    hidden = _rand((B, L), torch.bfloat16, 22)
    before = hidden.clone()
    residual = _rand((B, L), torch.float32, 23)
    mask = torch.tensor([False, True, False], device=DEV)
    _triton(ops.residual_apply_, hidden, residual, mask=mask)
    assert torch.equal(hidden[0], before[0]) and torch.equal(hidden[2], before[2])
    assert torch.equal(hidden[1], (before[1].float() + residual[1]).to(torch.bfloat16))


# --------------------------------------------------------------------------- decide

def _decide_both(partials, coefficients, threshold, force, max_skips, state0):
    out = []
    for run in (_triton, _torch):
        state = state0.clone()
        flags = run(ops.teacache_decide_, partials, state, coefficients, threshold,
                    force=force, max_consecutive_skips=max_skips)
        out.append((flags, state))
    return out


@pytest.mark.parametrize("coefficients", [[0.5], [1.0, -2.0, 3.0, -4.0, 0.25],
                                          [1e-3, -2e-2, 0.1, 0.4, -1.0, 2.0, 0.3, -0.7, 0.05]],
                         ids=["degree0", "degree4", "degree8"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e30 / 1e-30
def test_decide_matches_torch_bitwise(coefficients):
    nan, inf = float("nan"), float("inf")
    partials = torch.tensor([[0.1, 1.0], [0.37, 0.9], [nan, 1.0], [1.0, 0.0], [inf, 1.0],
                             [1.0, inf], [0.0, 0.0], [-0.2, 1.0], [3.0, 1.5], [1e30, 1e-30]],
                            device=DEV)
    state0 = torch.stack((torch.linspace(-0.5, 0.9, 10), torch.arange(10.0) % 4), dim=1).to(DEV)
    force = torch.zeros(10, dtype=torch.bool, device=DEV)
    force[8] = True
    # 1e-50 rounds to 0 in fp32: "threshold <= 0" is decided on the double in
    # every backend, the comparison with acc on the fp32 threshold.
    for threshold in (0.0, 1e-50, 0.3, 1.0):
        for max_skips in (None, 0, 2):
            (f_tr, s_tr), (f_to, s_to) = _decide_both(partials, coefficients, threshold, force,
                                                      max_skips, state0)
            assert torch.equal(f_tr, f_to), (threshold, max_skips)
            assert torch.equal(s_tr, s_to), (threshold, max_skips)


def test_decide_abs_accumulation_matches_torch_bitwise():
    # negative for r > 0.5: abs and sum part there
    coefficients = [-4.0, 1.0, 0.5]
    partials = torch.tensor([[0.1, 1.0], [0.7, 1.0], [0.9, 1.0], [0.3, 0.5]], device=DEV)
    results = []
    for run in (_triton, _torch):
        for acc_abs in (False, True):
            state = ops.new_decide_state((4, 2), device=DEV)
            for _ in range(3):
                flags = run(ops.teacache_decide_, partials, state, coefficients, 10.0,
                            accumulate_abs=acc_abs)
            results.append((flags, state))
    (f_tr, s_tr), (fa_tr, sa_tr), (f_to, s_to), (fa_to, sa_to) = results
    assert torch.equal(f_tr, f_to) and torch.equal(s_tr, s_to)
    assert torch.equal(fa_tr, fa_to) and torch.equal(sa_tr, sa_to)
    assert bool((s_tr[1:3, 0] < 0).all()) and bool((sa_tr[1:3, 0] > 0).all())


def test_decide_hand_worked_degree4_sequence():
    # poly(r) = r^4 - r^3 + 0.5 r^2 + 2 r + 0.01, threshold 0.5, at most 1 skip in a row.
    coefficients = [1.0, -1.0, 0.5, 2.0, 0.01]
    state = ops.new_decide_state((2,), device=DEV)
    seen = []
    for num, force in [(0.0, True), (0.1, False), (0.1, False), (0.05, False), (0.2, False)]:
        partials = torch.tensor([num, 1.0], device=DEV)
        flag = _triton(ops.teacache_decide_, partials, state, coefficients, 0.5, force=force,
                       max_consecutive_skips=1)
        seen.append((bool(flag), round(float(state[0]), 6), float(state[1])))
    # poly(0.1) = 0.0001 - 0.001 + 0.005 + 0.2 + 0.01 = 0.2141
    # poly(0.05) = 0.00000625 - 0.000125 + 0.00125 + 0.1 + 0.01 = 0.11113125
    # poly(0.2) = 0.0016 - 0.008 + 0.02 + 0.4 + 0.01 = 0.4236
    assert seen == [(True, 0.0, 0.0),          # forced
                    (False, 0.2141, 1.0),      # 0.2141 < 0.5: skip
                    (True, 0.0, 0.0),          # 0.4282 < 0.5, but one skip is the limit
                    (False, 0.111131, 1.0),    # skip
                    (True, 0.0, 0.0)]          # 0.5347 >= 0.5: compute


@pytest.mark.parametrize("threshold,never_skip", [(0.0, 1), (-1.0, 1), (1e-50, 0), (0.3, 0)])
def test_decide_never_skip_is_decided_on_the_double(monkeypatch, threshold, never_skip):
    # On a GPU the kernel receives the threshold as fp32, where 1e-50 is 0; the
    # interpreter keeps the double, so the flag the launcher passes is checked
    # here: positive thresholds allow skips in every backend (torch and CUDA
    # test "threshold <= 0" on the double too).
    launches = []

    class _Record:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)
    monkeypatch.setattr(kdecide, "_decide_kernel", _Record())
    p = torch.zeros((1, 2), device=DEV)
    kdecide.teacache_decide_(p, p.clone(), [1.0], threshold, torch.zeros(1, dtype=torch.bool, device=DEV),
                             -1, block=1, num_warps=1)
    (args,) = launches
    assert args[5] == float(threshold) and args[6] == never_skip


def test_decide_launcher_rejects_too_many_coefficients():
    p = torch.zeros((1, 2), device=DEV)
    with pytest.raises(ValueError, match="coefficients"):
        kdecide.teacache_decide_(p, p.clone(), [1.0] * 10, 0.1,
                                 torch.zeros(1, dtype=torch.bool, device=DEV), -1,
                                 block=1, num_warps=1)


# --------------------------------------------------------------------------- launch heuristics

@pytest.mark.parametrize("width,rows,groups", [(1, 1, 1), (3072, 4096, 1), (5120, 75600, 2),
                                               (64, 10**6, 1), (20000, 3, 1)])
def test_gpu_launch_config_bounds(width, rows, groups):
    # Pure arithmetic, for a pretend GPU: no SM count enters it.
    gpu = torch.device("cuda", 0)
    for kernel, cfg in (("_rel_l1_partials_kernel", tb.launch_config(
                            width, rows, groups, gpu, kernel="_rel_l1_partials_kernel", itemsize=2)),
                        ("_modulated_rel_l1_kernel", tb.row_config(
                            width, rows, groups, gpu, kernel="_modulated_rel_l1_kernel", itemsize=2))):
        assert cfg.block & (cfg.block - 1) == 0 and cfg.block <= 8192
        if cfg.tail is None:
            assert cfg.block >= min(width, 4096)
        else:  # the row in registers: two power-of-two tiles cover it, none wasted
            assert cfg.tail & (cfg.tail - 1) == 0 and cfg.tail < cfg.block
            assert cfg.block + cfg.tail >= width > (cfg.block + cfg.tail) // 2
        assert 1 <= cfg.num_warps <= 16 and cfg.num_warps & (cfg.num_warps - 1) == 0
        assert cfg.per_program == 1 or cfg.per_program * width <= 1 << 16
        programs = groups * -(-rows // cfg.per_program)
        # a full wave on a 132-SM GPU when there is work
        assert programs >= min(groups * rows, 132 * tb.resident_programs(kernel, cfg.num_warps, 2))


@pytest.mark.parametrize("C,tiles", [(3072, (2048, 1024)), (5120, (4096, 1024)), (4096, (4096, 0)),
                                     (3000, (2048, 1024)), (3500, (4096, 0)), (17, (32, 0)),
                                     (8192, (8192, 0)), (8193, None)])
def test_row_tiles(C, tiles):
    assert tb._row_tiles(C, 8192) == tiles


class _FakeProps:
    def __init__(self, sms):
        self.multi_processor_count = sms


@pytest.mark.parametrize("op", ["modulated_rel_l1_", "rel_l1_partials"])
def test_same_bits_for_two_sm_counts(monkeypatch, op):
    # The GPU launch math (block sizes, the partition of the reduction) runs
    # on CPU tensors under the interpreter, for a pretend GPU of 2 SMs and one
    # of 3: a split sized by the SM count gives other sums (48 rows: 3 or 2
    # rows per program at 8 programs per SM), a fixed split the same bits.
    gpu = torch.device("cuda", 0)
    launch, row = tb.launch_config, tb.row_config
    monkeypatch.setattr(tb, "launch_config", lambda w, r, g, device, **kw: launch(w, r, g, gpu, **kw))
    monkeypatch.setattr(tb, "row_config", lambda C, r, g, device, **kw: row(C, r, g, gpu, **kw))
    monkeypatch.setattr(tb, "_REFERENCE_SMS", 2)  # keep the interpreter's grid small
    x = _rand((1, 48, 96), seed=40, offset=0.3)
    results = []
    for sms in (2, 3):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, n=sms: _FakeProps(n))
        if op == "modulated_rel_l1_":
            prev = _rand(x.shape, seed=41)
            parts = _triton(ops.modulated_rel_l1_, x, None, None, prev, norm="layer")
            results.append((parts, prev))
        else:
            results.append((_triton(ops.rel_l1_partials, x.view(1, -1), _rand((1, 48 * 96), seed=41)),))
    for a, b in zip(*results):
        assert torch.equal(a, b)
