"""residual_apply_(..., out=) (out = hidden + residual in one pass) and the
host-bool force of teacache_decide_ (a scalar: no per-call flag tensor).

Every runnable backend against the in-place op, the torch backend and float64,
on odd shapes, every dtype pair, non-contiguous inputs and outputs, and masks
whose bool bytes are 2..255. The CUDA kernel is covered through the emulator
(tests/test_cuda_emulated.py) and, where a GPU exists, by backend "cuda" here.
"""
from __future__ import annotations

import pytest
import torch

from teacache_fast import ops
from op_oracles import DTYPES, runnable_backends

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = runnable_backends(DEV)


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype=dtype, device=DEV)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _assert_bits(got, want, msg=""):
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    assert torch.equal(_bits(got), _bits(want)), msg


def _byte_mask(values):
    """A bool tensor whose bytes are the given values (torch may hold 2..255 in a bool)."""
    return torch.tensor(values, dtype=torch.uint8, device=DEV).view(torch.bool)


MASKS = {"none": None, "mixed": [1, 0, 1], "all-off": [0, 0, 0], "byte-2": [2, 0, 255]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
def test_out_matches_in_place_and_float64(backend, dtype, res_dtype, mask):
    B, N, C = 3, 5, 37                      # odd sizes: vector body and scalar tails
    hidden, residual = _rand((B, N, C), dtype, 1, 3.0), _rand((B, N, C), res_dtype, 2)
    m = None if MASKS[mask] is None else _byte_mask(MASKS[mask])
    h0 = hidden.clone()
    out = torch.full_like(hidden, float("nan"))
    with ops.use_backend(backend):
        ops.residual_apply_(hidden, residual, m, out=out)
        in_place = hidden.clone()
        ops.residual_apply_(in_place, residual, m)
    _assert_bits(hidden, h0, "out= changed hidden")
    _assert_bits(out, in_place, "out= and in place differ")
    with ops.use_backend("torch"):
        ref = torch.empty_like(hidden)
        ops.residual_apply_(hidden, residual, m, out=ref)
    _assert_bits(out, ref, "differs from the torch backend")
    # float64: one fp32 add rounded once is within half an ulp of the exact sum's rounding
    on = torch.ones(B, dtype=torch.bool, device=DEV) if m is None else \
        torch.tensor(MASKS[mask], device=DEV) != 0
    exact = torch.where(on[:, None, None], hidden.double() + residual.double(), hidden.double())
    torch.testing.assert_close(out.double(), exact.to(dtype).double(), rtol=2 ** -8, atol=1e-6)
    _assert_bits(out[~on], hidden[~on], "a masked-out sample is not a copy of hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_with_non_contiguous_tensors(backend, dtype):
    B, N, C = 2, 7, 11
    hidden = _rand((B, C, N), dtype, 3).transpose(1, 2)            # strided input
    residual = _rand((B, N, 2 * C), torch.float32, 4)[..., ::2]    # strided residual
    out_store = torch.full((B, N, C, 2), float("nan"), dtype=dtype, device=DEV)
    out = out_store[..., 0]                                        # strided output
    m = _byte_mask([0, 3])
    h0 = hidden.clone()
    with ops.use_backend(backend):
        ops.residual_apply_(hidden, residual, m, out=out)
    want = hidden.contiguous()
    with ops.use_backend("torch"):
        ops.residual_apply_(want, residual.contiguous(), m)
    _assert_bits(out, want)
    _assert_bits(hidden, h0)
    assert torch.isnan(out_store[..., 1].float()).all(), "wrote outside out's elements"


def test_skip_step_is_one_op_without_a_clone(monkeypatch):
    """BranchState.apply: one residual_apply_ with out=, no clone of the input."""
    from teacache_fast.cache.state import BranchState
    br = BranchState()
    inp = _rand((2, 3, 8), torch.bfloat16, 5)
    br.residual = _rand((2, 3, 8), torch.float32, 6)
    calls = []
    real = ops.residual_apply_
    monkeypatch.setattr(ops, "residual_apply_", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(torch.Tensor, "clone", lambda *a, **k: pytest.fail("apply cloned a tensor"))
    got = br.apply(inp)
    assert len(calls) == 1 and calls[0].get("out") is got
    want = inp.float() + br.residual
    _assert_bits(got, want.to(torch.bfloat16))


def _bad(fn, exc, words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), str(info.value)


def test_out_checks_name_the_argument():
    h, r = _rand((2, 3, 4), torch.float32, 7), _rand((2, 3, 4), torch.float32, 8)
    _bad(lambda: ops.residual_apply_(h, r, out=torch.empty(2, 3, 4, dtype=torch.float16, device=DEV)),
         TypeError, ["out", "dtype"])
    _bad(lambda: ops.residual_apply_(h, r, out=torch.empty(2, 3, 5, device=DEV)), ValueError, ["out"])
    _bad(lambda: ops.residual_apply_(h, r, out=torch.empty(2, 3, 4, device="meta")), ValueError, ["out"])
    _bad(lambda: ops.residual_apply_(h, r, out=torch.empty(1, 3, 4, device=DEV).expand(2, 3, 4)),
         ValueError, ["out", "stride"])
    _bad(lambda: ops.residual_apply_(h, r, out=r), ValueError, ["out", "residual"])
    _bad(lambda: ops.residual_apply_(h, r, out=h), ValueError, ["out", "hidden"])
    both = torch.zeros(2, 2, 3, 4, device=DEV)
    _bad(lambda: ops.residual_apply_(both[0], r, out=both.view(4, 3, 4)[1:3]), ValueError, ["hidden"])
    _bad(lambda: ops.residual_apply_(h, r, out="h"), TypeError, ["out"])
    g = torch.empty(2, 3, 4, device=DEV, requires_grad=True)
    _bad(lambda: ops.residual_apply_(h, r, out=g), RuntimeError, ["out"])
    # an expanded (read-only) hidden is fine when the result goes to out
    out = torch.empty(2, 3, 4, device=DEV)
    ops.residual_apply_(h[:1].expand(2, 3, 4), r, out=out)
    _assert_bits(out, h[:1] + r)


def test_out_variant_registration_and_compile():
    h, r = _rand((2, 3, 5), torch.float32, 9), _rand((2, 3, 5), torch.float32, 10)
    mask = torch.tensor([True, False], device=DEV)
    torch.library.opcheck(torch.ops.teacache_fast.residual_apply_out_, (h, r, mask, torch.empty_like(h)))

    def f(h, r, mask):
        out = torch.empty_like(h)
        ops.residual_apply_(h, r, mask, out=out)
        return out

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(h, r, mask)
    _assert_bits(got, f(h, r, mask))
    assert torch._dynamo.explain(f)(h, r, mask).graph_break_count == 0


# --------------------------------------------------------------------------- host-bool force

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("force", [False, True])
def test_host_bool_force_makes_no_tensor_and_matches_tensor_force(backend, force, monkeypatch):
    partials = torch.tensor([[0.1, 1.0], [0.5, 1.0], [0.0, 0.0], [2.0, 1.0]], device=DEV)
    state0 = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.1, 1.0], [float("nan"), 0.0]], device=DEV)
    coeffs, thr = [1.0, -0.5, 0.25], 0.3
    with ops.use_backend(backend):
        st_t = state0.clone()
        want = ops.teacache_decide_(partials, st_t, coeffs, thr, force=torch.full((4,), force, device=DEV),
                                    max_consecutive_skips=2)
        made = []
        for name in ("full", "ones", "zeros", "tensor"):
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, lambda *a, _n=name, _r=real, **k: made.append(_n) or _r(*a, **k))
        st_b = state0.clone()
        got = ops.teacache_decide_(partials, st_b, coeffs, thr, force=force, max_consecutive_skips=2)
        monkeypatch.undo()
    assert not made, f"the host-bool path built tensors with {made}"
    _assert_bits(got.to(torch.uint8), want.to(torch.uint8))
    _assert_bits(st_b, st_t)
    if force:
        assert got.all() and (st_b == 0).all()
    else:
        assert not got[0] and got[2]  # a skip and an invalid ratio: force False decides alone


# --------------------------------------------------------------------------- sync-free span end

def _composed_span_end(compute, out, inp, residual):
    """What cache.device_state.finish_span_ did before the fused op: four torch-backend ops."""
    with ops.use_backend("torch"):
        fresh = torch.empty_like(residual)
        ops.residual_capture_(out, inp, fresh)
        residual.copy_(torch.where(compute, fresh, residual))
        ops.residual_apply_(out, residual, mask=(~compute).reshape(1).expand(out.shape[0]).contiguous())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compute", [False, True])
def test_finish_span_matches_the_composed_ops(backend, dtype, res_dtype, compute):
    B, N, C = 2, 5, 37
    out0, inp = _rand((B, N, C), dtype, 11, 2.0), _rand((B, N, C), dtype, 12)
    res0 = _rand((B, N, C), res_dtype, 13, 0.5)
    flag = torch.tensor(compute, device=DEV)
    want_out, want_res = out0.clone(), res0.clone()
    _composed_span_end(flag, want_out, inp, want_res)
    out, res = out0.clone(), res0.clone()
    with ops.use_backend(backend):
        ops.finish_span_(flag, out, inp, res)
    _assert_bits(out, want_out)
    _assert_bits(res, want_res)
    if compute:
        _assert_bits(out, out0, "a computed span's output changed")
    else:
        _assert_bits(res, res0, "a skipped span changed the residual")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("byte", [0, 1, 2, 255])
def test_finish_span_flag_byte_and_several_programs(backend, byte):
    # A bool whose byte is 2..255 is True (as torch reads it), and a span long
    # enough for several programs of every backend's launch.
    n = 2 * 4096 * 4 * 2 + 3
    out0, inp = _rand((n,), torch.bfloat16, 17, 2.0), _rand((n,), torch.bfloat16, 18)
    res0 = _rand((n,), torch.float32, 19, 0.5)
    flag = torch.tensor([byte], dtype=torch.uint8, device=DEV).view(torch.bool).reshape(())
    want_out, want_res = out0.clone(), res0.clone()
    _composed_span_end(torch.tensor(byte != 0, device=DEV), want_out, inp, want_res)
    out, res = out0.clone(), res0.clone()
    with ops.use_backend(backend):
        ops.finish_span_(flag, out, inp, res)
    _assert_bits(out, want_out)
    _assert_bits(res, want_res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finish_span_non_contiguous(backend):
    B, N, C = 2, 6, 9
    out0 = _rand((B, C, N), torch.bfloat16, 14).transpose(1, 2)
    inp = _rand((B, N, 2 * C), torch.bfloat16, 15)[..., ::2]
    res0 = _rand((B, C, N), torch.float32, 16).transpose(1, 2)
    for compute in (False, True):
        flag = torch.tensor(compute, device=DEV)
        want_out, want_res = out0.contiguous(), res0.contiguous()
        _composed_span_end(flag, want_out, inp.contiguous(), want_res)
        out, res = out0.clone(), res0.clone()
        assert not out.is_contiguous() and not res.is_contiguous()
        with ops.use_backend(backend):
            ops.finish_span_(flag, out, inp, res)
        _assert_bits(out, want_out)
        _assert_bits(res, want_res)


def test_finish_span_checks_and_registration():
    out, inp, res = (_rand((2, 3, 4), torch.float32, s) for s in (17, 18, 19))
    flag = torch.tensor(True, device=DEV)
    _bad(lambda: ops.finish_span_(flag.reshape(1), out, inp, res), ValueError, ["compute", "0-d"])
    _bad(lambda: ops.finish_span_(flag.float(), out, inp, res), TypeError, ["compute"])
    _bad(lambda: ops.finish_span_(flag, out, inp.half(), res), TypeError, ["inp"])
    _bad(lambda: ops.finish_span_(flag, out, inp, res[:1]), ValueError, ["residual"])
    _bad(lambda: ops.finish_span_(flag, out[:1].expand(2, 3, 4), inp, res), ValueError, ["out"])
    torch.library.opcheck(torch.ops.teacache_fast.finish_span_, (flag, out.clone(), inp, res.clone()))

    def f(flag, out, inp, res):
        ops.finish_span_(flag, out, inp, res)
        return out, res

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(flag, out.clone(), inp, res.clone())
    for g, w in zip(got, f(flag, out.clone(), inp, res.clone())):
        _assert_bits(g, w)
