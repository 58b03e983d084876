"""Property tests (hypothesis) of every op against float64.

Hypothesis draws the *description* of a case (shape, dtype, memory layout,
magnitude, an injected special value, a seed) and the tensors are built from
it, so a failure shrinks to a readable case. Shapes include 1 and primes,
layouts include strided views, magnitudes run from zero to huge, and NaN/inf
go into the indicator (which must then ask for a compute).

The torch backend gets many examples; the Triton backend (interpreter, ~20 ms
a program) a few tiny ones.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from teacache_fast import ops
from teacache_fast.backends import unavailable_reason
from op_oracles import modulate64, partials64

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Largest magnitude whose squares/sums stay finite in the fp32 arithmetic of
# the ops (fp16 inputs cannot exceed 65504 anyway).
HUGE = {torch.float32: 1e15, torch.float16: 3e4, torch.bfloat16: 1e15}
MAGNITUDES = ("zero", "tiny", "unit", "large", "huge")
LAYOUTS = ("contiguous", "strided", "transposed")
SPECIALS = (None, "nan", "inf", "-inf")

TORCH = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# No shrinking under the interpreter: each shrink step relaunches kernels.
TRITON = settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.generate),
                  suppress_health_check=[HealthCheck.too_slow])


def _triton_skip_reason():
    if importlib.util.find_spec("teacache_fast.backends.triton") is None:
        return "Triton backend not written yet (teacache_fast/backends/triton.py)"
    return unavailable_reason("triton", "cpu")


needs_triton = pytest.mark.skipif(_triton_skip_reason() is not None,
                                  reason=str(_triton_skip_reason()))
# The interpreter runs kernels in numpy, which warns on the NaN/inf we feed on purpose.
quiet_numpy = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# --------------------------------------------------------------------------- case building

def _magnitude(name: str, dtype) -> float:
    return {"zero": 0.0, "tiny": 1e-3, "unit": 1.0, "large": 1e3, "huge": HUGE[dtype]}[name]


def make(shape, dtype, layout, magnitude, seed, special=None, special_at=0):
    """A tensor of ``shape`` with the given memory layout and value range.

    strided: a view of every other element of a wider buffer (last stride 2);
    transposed: the last two dims swapped in memory. One element may be NaN/inf.
    """
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * _magnitude(magnitude, dtype)
    if special is not None:
        values.view(-1)[special_at % values.numel()] = float(special)
    values = values.to(dtype)
    if layout == "strided":
        base = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        view = base[..., ::2]
        view.copy_(values)
        return view
    if layout == "transposed" and len(shape) >= 2:
        base = values.transpose(-1, -2).contiguous()
        return base.transpose(-1, -2)
    return values


@st.composite
def cases(draw, small=False):
    sizes = (1, 2, 3) if small else (1, 2, 3, 5, 7, 13)
    return dict(
        shape=(draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from(sizes)),
               draw(st.sampled_from((1, 2, 3, 7, 31) if not small else (1, 3, 7)))),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        magnitude=draw(st.sampled_from(MAGNITUDES)),
        special=draw(st.sampled_from(SPECIALS)),
        special_at=draw(st.integers(0, 10_000)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _x(case, seed_offset=0, with_special=True):
    return make(case["shape"], case["dtype"], case["layout"], case["magnitude"],
                case["seed"] + seed_offset, case["special"] if with_special else None,
                case["special_at"])


def _params(case, kind, dtype, seed_offset):
    """scale/shift in one of the accepted layouts: (B, C), (B, 1, C), (1, C), None."""
    B, _, C = case["shape"]
    if kind == "none":
        return None
    rows = 1 if kind == "1c" else B
    p = make((rows, C), dtype, "contiguous", "unit", case["seed"] + seed_offset) * 0.5
    return p.unsqueeze(1) if kind == "b1c" else p


def _sum_rtol(n: int) -> float:
    """Worst-case relative error of an fp32 sum of n non-negative fp32-rounded terms."""
    return (n + 2) * 2.0 ** -24


def _bits(t):
    """The raw bits of a tensor (NaN-safe bitwise comparison)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_close64(got, want64, rtol, atol):
    torch.testing.assert_close(got.double(), want64, rtol=rtol, atol=atol, equal_nan=True)


# --------------------------------------------------------------------------- modulate

def _check_modulate(case, norm, eps, scale_kind, shift_kind, param_dtype):
    x = _x(case)
    scale = _params(case, scale_kind, param_dtype, 1)
    shift = _params(case, shift_kind, param_dtype, 2)
    m = ops.modulate(x, scale, shift, norm=norm, eps=eps)
    assert m.shape == x.shape and m.dtype == x.dtype
    _assert_modulated(m, x, scale, shift, norm, eps)
    return x, scale, shift


def _assert_modulated(m, x, scale, shift, norm, eps):
    """m (x's dtype) against the float64 oracle rounded to that dtype (fp16 may overflow)."""
    want = modulate64(x, scale, shift, norm, eps).to(x.dtype).double()
    # Normalized values are O(sqrt(C)); with norm="none" they keep x's magnitude.
    mag = want.abs().nan_to_num(0, 0, 0).amax().clamp(min=1.0).item()
    eps_d = EPS[x.dtype]
    atol = (2 * eps_d + 64 * 2.0 ** -24) * mag
    if norm == "layer":
        # fp32 LayerNorm is ill-conditioned when |x| >> std: x - mean carries an
        # error of ~ulp(|x|), which the division by std amplifies. Any fp32
        # implementation (the kernels too) has it; allow it, and no more.
        x64 = x.double().reshape(-1, x.shape[-1])
        std = (x64.var(-1, unbiased=False) + eps).sqrt()
        cond = (x64.abs().amax(-1) / std).nan_to_num(0, 0, 0).max().item()
        gain = 1.0 if scale is None else (1 + scale.double().abs()).amax().item()
        atol += 8 * 2.0 ** -24 * cond * gain
    _assert_close64(m, want, rtol=2 * eps_d, atol=atol)


MOD_ARGS = dict(norm=st.sampled_from(ops.NORMS), eps=st.sampled_from((1e-6, 1e-5, 0.1)),
                scale_kind=st.sampled_from(("bc", "b1c", "1c", "none")),
                shift_kind=st.sampled_from(("bc", "b1c", "1c", "none")),
                param_dtype=st.sampled_from(DTYPES))


@TORCH
@given(case=cases(), **MOD_ARGS)
def test_modulate_torch(case, norm, eps, scale_kind, shift_kind, param_dtype):
    _check_modulate(case, norm, eps, scale_kind, shift_kind, param_dtype)


# --------------------------------------------------------------------------- rel_l1_partials

def _check_partials(case, per_sample):
    cur, prev = _x(case, 0), _x(case, 7, with_special=False)
    p = ops.rel_l1_partials(cur, prev, per_sample=per_sample)
    B = case["shape"][0]
    assert p.dtype == torch.float32 and p.shape == ((B, 2) if per_sample else (2,))
    # cur - prev is exact in fp64 for these dtypes, so the oracle is the true sum.
    want = partials64(cur, prev, per_sample)
    n = cur.numel()
    _assert_close64(p, want, rtol=_sum_rtol(n) + 2.0 ** -24, atol=1e-30)
    return cur, prev, p


@TORCH
@given(case=cases(), per_sample=st.booleans())
def test_rel_l1_partials_torch(case, per_sample):
    _check_partials(case, per_sample)


# --------------------------------------------------------------------------- modulated_rel_l1_ + decide

def _check_indicator(case, norm, per_sample, scale_kind):
    """modulated_rel_l1_ = modulate + rel_l1_partials, and non-finite -> compute."""
    x = _x(case)
    scale = _params(case, scale_kind, case["dtype"], 1)
    shift = _params(case, "bc", case["dtype"], 2)
    prev = _x(case, 7, with_special=False)
    old = prev.clone()
    with torch.no_grad():
        p = ops.modulated_rel_l1_(x, scale, shift, prev, norm=norm, per_sample=per_sample)
    # prev now holds m rounded to its dtype.
    _assert_modulated(prev, x, scale, shift, norm, 1e-6)
    # The partials compare the stored new prev with the old one, in fp64.
    want = partials64(prev, old, per_sample)
    _assert_close64(p, want, rtol=_sum_rtol(x.numel()) + 2.0 ** -24, atol=1e-30)
    # Decision: with a threshold out of reach, only an invalid indicator
    # (NaN/inf or a zero denominator) may compute, and it must.
    state = ops.new_decide_state(p.shape)
    flags = ops.teacache_decide_(p, state, [1.0, 0.0], 1e30)
    num, den = p[..., 0], p[..., 1]
    invalid = ~torch.isfinite(num) | ~torch.isfinite(den) | (den == 0)
    assert torch.equal(flags, invalid)
    if case["special"] is not None:
        assert flags.any(), "an inf/NaN in the indicator input must force a compute"
    return x, scale, shift, old, p


@TORCH
@given(case=cases(), norm=st.sampled_from(ops.NORMS), per_sample=st.booleans(),
       scale_kind=st.sampled_from(("bc", "1c", "none")))
def test_modulated_rel_l1_torch(case, norm, per_sample, scale_kind):
    _check_indicator(case, norm, per_sample, scale_kind)


def _poly64(coefficients, r):
    acc = 0.0
    for c in coefficients:
        acc = acc * r + c
    return acc


@TORCH
@given(lead=st.sampled_from(((), (1,), (3,), (2, 2))),
       coefficients=st.lists(st.floats(-4, 4), min_size=1, max_size=ops.MAX_COEFFICIENTS),
       threshold=st.floats(0, 3),
       max_skips=st.sampled_from((None, 0, 1, 3)),
       steps=st.lists(st.tuples(st.sampled_from(("ok", "ok", "ok", "nan", "inf", "zero_den")),
                                st.floats(0, 1.5), st.floats(1e-3, 1e3), st.booleans()),
                      min_size=1, max_size=8))
def test_decide_matches_float64_state_machine(lead, coefficients, threshold, max_skips, steps):
    """A step sequence against a float64 model of the algorithm (same rules)."""
    state = ops.new_decide_state(lead + (2,))
    acc, skips = 0.0, 0
    for kind, rel, den, force in steps:
        num = {"ok": rel * den, "nan": math.nan, "inf": math.inf, "zero_den": rel}[kind]
        den = 0.0 if kind == "zero_den" else den
        partials = torch.tensor([num, den], dtype=torch.float32).expand(lead + (2,)).contiguous()
        r32 = partials[(0,) * len(lead)].double()
        r = (r32[0] / r32[1]).item() if kind == "ok" else math.nan
        new_acc = acc + _poly64(coefficients, r) if kind == "ok" else math.nan
        # fp32 Horner vs fp64: skip cases that land within rounding of the threshold.
        scale = 1.0 + sum(abs(c) for c in coefficients) * max(1.0, abs(r) if kind == "ok" else 1.0) ** 8
        assume(not (kind == "ok" and abs(new_acc - threshold) <= 1e-5 * scale))
        compute = (force or kind != "ok" or new_acc >= threshold or threshold == 0
                   or (max_skips is not None and skips >= max_skips))
        flags = ops.teacache_decide_(partials, state, coefficients, threshold,
                                     force=force, max_consecutive_skips=max_skips)
        assert flags.shape == lead and flags.dtype == torch.bool
        assert flags.all().item() == compute and (flags == compute).all()
        acc, skips = (0.0, 0) if compute else (new_acc, skips + 1)
        torch.testing.assert_close(state[..., 0].double(), torch.full(lead, acc, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5 * scale)
        assert (state[..., 1] == skips).all()


# --------------------------------------------------------------------------- residual ops

def _check_residuals(case, res_dtype, use_mask, mask_bits):
    out, inp = _x(case, 0), _x(case, 3, with_special=False)
    residual = make(case["shape"], res_dtype, case["layout"], "unit", 99)
    residual.fill_(123.0)  # stale contents must be overwritten
    ops.residual_capture_(out, inp, residual)
    want = out.double() - inp.double()
    # One fp32 rounding, then one to the cache dtype.
    rtol = 2.0 ** -24 + EPS[res_dtype]
    _assert_close64(residual, want.to(res_dtype).double(), rtol=rtol, atol=1e-30)

    hidden = _x(case, 5, with_special=False)
    before = hidden.clone()
    B = case["shape"][0]
    mask = torch.tensor([(mask_bits >> b) & 1 == 1 for b in range(B)]) if use_mask else None
    ops.residual_apply_(hidden, residual, mask)
    added = before.double() + residual.double()
    rtol = 2.0 ** -24 + EPS[case["dtype"]]
    for b in range(B):
        if mask is not None and not mask[b]:
            assert torch.equal(_bits(hidden[b]), _bits(before[b])), "a masked-out sample changed"
            continue
        # Cancellation: the error is relative to the operands, not to their sum.
        operands = before[b].double().abs().amax() + residual[b].double().abs().nan_to_num(0, 0, 0).amax()
        torch.testing.assert_close(hidden[b].double(), added[b].to(hidden.dtype).double(),
                                   rtol=rtol, atol=rtol * operands.item() + 1e-30, equal_nan=True)


@TORCH
@given(case=cases(), res_dtype=st.sampled_from(DTYPES), use_mask=st.booleans(),
       mask_bits=st.integers(0, 7))
def test_residual_ops_torch(case, res_dtype, use_mask, mask_bits):
    # A huge difference overflows a narrower cache dtype in both the op and
    # the oracle; keep magnitudes the cache dtype can hold for finite checks.
    assume(not (case["magnitude"] == "huge" and res_dtype == torch.float16))
    _check_residuals(case, res_dtype, use_mask, mask_bits)


# --------------------------------------------------------------------------- triton: a few tiny cases

@needs_triton
@quiet_numpy
@TRITON
@given(case=cases(small=True), norm=st.sampled_from(ops.NORMS), per_sample=st.booleans())
def test_triton_indicator_ops(case, norm, per_sample):
    with ops.use_backend("triton"):
        _check_modulate(case, norm, 1e-6, "bc", "b1c", case["dtype"])
        _check_partials(case, per_sample)
        _check_indicator(case, norm, per_sample, "1c")


@needs_triton
@quiet_numpy
@TRITON
@given(case=cases(small=True), res_dtype=st.sampled_from(DTYPES), mask_bits=st.integers(0, 7))
def test_triton_residual_ops(case, res_dtype, mask_bits):
    assume(not (case["magnitude"] == "huge" and res_dtype == torch.float16))
    with ops.use_backend("triton"):
        _check_residuals(case, res_dtype, True, mask_bits)
