"""Every op, every backend that runs here, against the torch backend and float64."""
from __future__ import annotations

import pytest
import torch

from teacache_fast import ops
from op_oracles import ATOL, DTYPES, SUM_RTOL, modulate64, partials64, runnable_backends

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = runnable_backends(DEV)

# (B, ..., C): one row, one channel, C not a power of two, C = 4096, odd batch,
# video-style leading dims.
SHAPES = [(1, 1, 8), (2, 3, 1), (1, 2, 3000), (3, 2, 4096), (2, 2, 3, 2, 5)]


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=DEV)


def _params(shape, dtype, seed, kind):
    B, C = shape[0], shape[-1]
    if kind == "none":
        return None
    p = _rand((B, C), dtype, seed, 0.5)
    return p.unsqueeze(1) if kind == "b1c" else p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("norm", ops.NORMS)
def test_modulate(backend, dtype, shape, norm):
    x = _rand(shape, dtype, 0, 3.0) + 1.0
    scale = _params(shape, dtype, 1, "bc")
    shift = _params(shape, torch.float32, 2, "b1c")  # scale/shift dtype may differ from x
    with ops.use_backend(backend):
        m = ops.modulate(x, scale, shift, norm=norm)
    with ops.use_backend("torch"):
        ref = ops.modulate(x, scale, shift, norm=norm)
    assert m.dtype == x.dtype and m.shape == x.shape
    exact = modulate64(x, scale, shift, norm, 1e-6)
    scale_mag = exact.abs().max().clamp(min=1.0)
    torch.testing.assert_close(m.double(), exact, atol=ATOL[dtype] * scale_mag, rtol=0)
    torch.testing.assert_close(m, ref, atol=ATOL[dtype] * scale_mag, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 2, 3000)], ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_rel_l1_partials(backend, dtype, shape, per_sample):
    cur, prev = _rand(shape, dtype, 3), _rand(shape, dtype, 4)
    with ops.use_backend(backend):
        p = ops.rel_l1_partials(cur, prev, per_sample=per_sample)
    assert p.dtype == torch.float32
    assert p.shape == ((shape[0], 2) if per_sample else (2,))
    # Inputs are exact in every dtype, so only fp32 accumulation order differs.
    torch.testing.assert_close(p.double(), partials64(cur, prev, per_sample), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
def test_modulated_rel_l1_(backend, dtype, shape, per_sample):
    norm = "rms" if shape[-1] == 4096 else "layer"
    x = _rand(shape, dtype, 5, 2.0)
    scale, shift = _params(shape, dtype, 6, "b1c"), _params(shape, dtype, 7, "bc")
    prev = _rand(shape, dtype, 8)
    prev0 = prev.clone()
    with ops.use_backend(backend):
        p = ops.modulated_rel_l1_(x, scale, shift, prev, norm=norm, per_sample=per_sample)
    exact_m = modulate64(x, scale, shift, norm, 1e-6)
    mag = exact_m.abs().max().clamp(min=1.0)
    # prev now holds the modulated input, rounded to the dtype.
    torch.testing.assert_close(prev.double(), exact_m, atol=ATOL[dtype] * mag, rtol=0)
    # The partials compare the stored (rounded) m with the old prev.
    expected = partials64(prev, prev0, per_sample)
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-5)
    # ... and stay close to the exact float64 indicator.
    torch.testing.assert_close(p.double(), partials64(exact_m, prev0, per_sample),
                               rtol=SUM_RTOL[dtype], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modulated_rel_l1_non_contiguous(backend):
    dtype = torch.bfloat16
    base = _rand((2, 7, 5), dtype, 9)
    x = base.transpose(1, 2)                   # (2, 5, 7), strided
    prev_store = _rand((2, 5, 10), dtype, 10)
    prev = prev_store[:, :, :7]                # (2, 5, 7), a slice
    scale = _rand((7, 2), dtype, 11).t()       # (2, 7), transposed
    shift = None
    x_c, prev_c, scale_c = x.contiguous(), prev.contiguous(), scale.contiguous()
    with ops.use_backend(backend):
        p = ops.modulated_rel_l1_(x, scale, shift, prev, per_sample=True)
    with ops.use_backend("torch"):
        p_ref = ops.modulated_rel_l1_(x_c, scale_c, shift, prev_c, per_sample=True)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev, prev_c, atol=ATOL[dtype] * 4, rtol=0)
    assert torch.equal(prev_store[:, :, 7:], _rand((2, 5, 10), dtype, 10)[:, :, 7:]), \
        "writing prev must not touch memory outside the view"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", [None, torch.float32], ids=["same", "fp32"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 3000), (2, 2, 3, 5)], ids=str)
def test_residual_capture_and_apply(backend, dtype, res_dtype, shape):
    res_dtype = res_dtype or dtype
    out, inp = _rand(shape, dtype, 12), _rand(shape, dtype, 13)
    residual = torch.empty(shape, dtype=res_dtype, device=DEV)
    with ops.use_backend(backend):
        ops.residual_capture_(out, inp, residual)
    exact = out.double() - inp.double()
    torch.testing.assert_close(residual.double(), exact, atol=2 * ATOL[res_dtype], rtol=0)

    hidden = _rand(shape, dtype, 14)
    expected = (hidden.double() + residual.double()).to(dtype)
    with ops.use_backend(backend):
        ops.residual_apply_(hidden, residual)
    # fp32 add then one rounding: exactly what rounding the float64 sum gives, up to ties.
    torch.testing.assert_close(hidden, expected, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_apply_mask_and_strides(backend):
    B = 3
    hidden_store = _rand((B, 4, 9), torch.float16, 15)
    hidden = hidden_store[:, :, ::2]             # strided (B, 4, 5)
    before = hidden.clone()
    residual = _rand((B, 4, 5), torch.float32, 16)
    mask = torch.tensor([True, False, True], device=DEV)
    with ops.use_backend(backend):
        ops.residual_apply_(hidden, residual, mask=mask)
    expected = before.clone()
    expected[mask] = (before[mask].float() + residual[mask]).to(torch.float16)
    assert torch.equal(hidden[1], before[1]), "masked-out sample changed"
    torch.testing.assert_close(hidden, expected, atol=ATOL[torch.float16], rtol=0)
    assert torch.equal(hidden_store[:, :, 1::2], _rand((B, 4, 9), torch.float16, 15)[:, :, 1::2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_capture_to_cpu_cache(backend):
    out, inp = _rand((2, 3, 6), torch.bfloat16, 17), _rand((2, 3, 6), torch.bfloat16, 18)
    residual = torch.empty((2, 3, 6), dtype=torch.float32, device="cpu")
    with ops.use_backend(backend):
        ops.residual_capture_(out, inp, residual)
        if DEV == "cuda":
            torch.cuda.synchronize()
    torch.testing.assert_close(residual, (out.float() - inp.float()).cpu())


# --------------------------------------------------------------------------- decide

LINEAR = [1.0, 0.0]  # poly(r) = r, so acc is the plain sum of ratios


def _decide_sequence(backend, steps, threshold=0.5, max_skips=None, coefficients=LINEAR):
    state = ops.new_decide_state((2,), device=DEV)
    flags, accs = [], []
    for num, den, force in steps:
        partials = torch.tensor([num, den], dtype=torch.float32, device=DEV)
        with ops.use_backend(backend):
            f = ops.teacache_decide_(partials, state, coefficients, threshold, force=force,
                                     max_consecutive_skips=max_skips)
        assert f.shape == () and f.dtype == torch.bool
        flags.append(bool(f))
        accs.append(float(state[0]))
    return flags, accs


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_hand_worked_sequence(backend):
    inf, nan = float("inf"), float("nan")
    steps = [
        (0.0, 0.0, True),    # first step: forced (prev was empty)
        (0.2, 1.0, False),   # acc 0.2 -> skip
        (0.2, 1.0, False),   # acc 0.4 -> skip
        (0.2, 1.0, False),   # acc 0.6 >= 0.5 -> compute, reset
        (nan, 1.0, False),   # NaN -> compute
        (0.1, 0.0, False),   # zero denominator -> compute
        (0.1, 1.0, False),   # acc 0.1 -> skip
        (inf, 1.0, False),   # inf -> compute
        (0.1, 1.0, True),    # forced: compute, no accumulation
        (0.3, 1.0, False),   # acc 0.3 -> skip
    ]
    flags, accs = _decide_sequence(backend, steps)
    assert flags == [True, False, False, True, True, True, False, True, True, False]
    assert accs == pytest.approx([0.0, 0.2, 0.4, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_skip_limit_and_threshold_zero(backend):
    steps = [(0.0, 1.0, True)] + [(0.01, 1.0, False)] * 6
    flags, _ = _decide_sequence(backend, steps, max_skips=2)
    assert flags == [True, False, False, True, False, False, True]
    # A polynomial that is negative everywhere would skip forever; threshold 0 never skips.
    flags, _ = _decide_sequence(backend, steps, threshold=0.0, coefficients=[-1.0])
    assert all(flags)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_per_state_and_force_mask(backend):
    partials = torch.tensor([[0.1, 1.0], [0.9, 1.0], [0.1, 1.0]], device=DEV)
    state = ops.new_decide_state((3, 2), device=DEV)
    force = torch.tensor([False, False, True], device=DEV)
    with ops.use_backend(backend):
        f = ops.teacache_decide_(partials, state, [2.0, 0.0, 0.0], 0.5, force=force)
    # poly(r) = 2 r^2: 0.02 skip, 1.62 compute, forced compute
    assert f.tolist() == [False, True, True]
    torch.testing.assert_close(state[:, 0], torch.tensor([0.02, 0.0, 0.0], device=DEV))
    assert state[:, 1].tolist() == [1.0, 0.0, 0.0]


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_bitwise_determinism(backend, per_sample):
    x = _rand((2, 33, 3000), torch.bfloat16, 19, 4.0)
    scale, shift = _params(x.shape, torch.bfloat16, 20, "bc"), _params(x.shape, torch.bfloat16, 21, "bc")
    prev0 = _rand(x.shape, torch.bfloat16, 22)
    results = []
    for _ in range(2):
        prev = prev0.clone()
        with ops.use_backend(backend):
            p = ops.modulated_rel_l1_(x, scale, shift, prev, per_sample=per_sample)
            q = ops.rel_l1_partials(x, prev0, per_sample=per_sample)
        results.append((p, q, prev))
    for a, b in zip(*results):
        assert torch.equal(a, b)
