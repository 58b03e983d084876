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
    # No reduction: the same fp32 operations in the same order, rounded once
    # (round-to-nearest-even, also for bf16 under the interpreter).
    x = _rand((3, 5, 77), torch.bfloat16, 7, 50.0)
    scale, shift = _rand((3, 77), torch.bfloat16, 8), _rand((3, 77), torch.bfloat16, 9)
    m = _triton(ops.modulate, x, scale, shift, norm="none")
    ref = _torch(ops.modulate, x, scale, shift, norm="none")
    if DEV == "cpu":  # a GPU may fuse the multiply-add: one rounding fewer
        assert torch.equal(m, ref)
    else:
        torch.testing.assert_close(m, ref, atol=ATOL[torch.bfloat16], rtol=0)


# --------------------------------------------------------------------------- fused indicator

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [BLOCK_C + 1, 3000], ids=lambda c: f"C{c}")
def test_modulated_rel_l1_program_partials(dtype, C):
    # Call the launcher directly: 3 rows per program over 7 rows leaves a
    # 1-row program; each program's partials must be those of its own rows.
    B, R, per = 2, 7, 3
    x = _rand((B, R, C), dtype, 10, 3.0)
    scale, shift = _rand((1, C), dtype, 11, 0.5), _rand((B, C), dtype, 12)
    prev = _rand((B, R, C), dtype, 13)
    prev0 = prev.clone()
    parts = kmod.modulated_rel_l1_(x, scale, shift, prev, "layer", 1e-6, block_c=BLOCK_C,
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
    for threshold in (0.0, 0.3, 1.0):
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


def test_decide_launcher_rejects_too_many_coefficients():
    p = torch.zeros((1, 2), device=DEV)
    with pytest.raises(ValueError, match="coefficients"):
        kdecide.teacache_decide_(p, p.clone(), [1.0] * 10, 0.1,
                                 torch.zeros(1, dtype=torch.bool, device=DEV), -1,
                                 block=1, num_warps=1)


# --------------------------------------------------------------------------- launch heuristics

@pytest.mark.parametrize("width,rows,groups", [(1, 1, 1), (3072, 4096, 1), (5120, 75600, 2),
                                               (64, 10**6, 1), (20000, 3, 1)])
def test_gpu_launch_config_bounds(monkeypatch, width, rows, groups):
    # Pure arithmetic: checked here with a pretend 132-SM device.
    monkeypatch.setattr(tb, "_sm_count", lambda index: 132)
    cfg = tb.launch_config(width, rows, groups, torch.device("cuda", 0))
    assert cfg.block & (cfg.block - 1) == 0 and cfg.block <= 4096
    assert cfg.block >= min(width, 4096)
    assert 1 <= cfg.num_warps <= 16 and cfg.num_warps & (cfg.num_warps - 1) == 0
    assert cfg.per_program == 1 or cfg.per_program * width <= 1 << 16
    programs = groups * -(-rows // cfg.per_program)
    assert programs >= min(groups * rows, 8 * 132)  # fills the device when there is work
