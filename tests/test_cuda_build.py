"""The compiled CUDA extension teacache_fast._C: build, import, CPU-side behaviour.

Skipped when _C is not built (the pure-Python install). GPU numerics of every op
are covered by the backend-parametrized op tests; the GPU test here targets the
cases the CUDA kernels special-case: misaligned pointers and widths that are not
a multiple of the vector width (scalar head/tail around 128-bit loads).
"""
import pytest
import torch

C = pytest.importorskip("teacache_fast._C", reason="CUDA extension teacache_fast._C is not built")

import teacache_fast  # noqa: E402
from teacache_fast import ops  # noqa: E402
from teacache_fast.backends import BackendUnavailableError, get_backend, use_backend  # noqa: E402

OPS = ops.OP_NAMES


def test_module_exports_the_six_ops_and_its_build():
    for name in OPS:
        assert callable(getattr(C, name)), name
    assert C.__version__ == teacache_fast.__version__
    assert C.CUDA_ARCHS and all(a.startswith(("sm_", "compute_")) for a in C.CUDA_ARCHS)
    assert C.CUDART_VERSION >= 11000
    assert (C.FLOAT32, C.FLOAT16, C.BFLOAT16) == (0, 1, 2)


def test_c_api_reports_bad_arguments_before_touching_cuda():
    # These fail validation, so they need no device (null pointers never reach a kernel).
    with pytest.raises(RuntimeError, match="x must not be NULL"):
        C.modulate(0, 0, 0, 0, 0, 0, 1, 1, 8, C.FLOAT32, C.FLOAT32, C.NORM_LAYER, 1e-6, 0)
    with pytest.raises(RuntimeError, match="unknown dtype code 9"):
        C.residual_capture_(16, 16, 16, 4, 9, C.FLOAT32, 0)
    with pytest.raises(RuntimeError, match="num_coefficients must be 1..9"):
        C.teacache_decide_(16, 16, [0.0] * 10, 0.1, 0, -1, False, 16, 1, 0)
    with pytest.raises(RuntimeError, match="workspace must not be NULL"):
        C.rel_l1_partials(16, 16, 16, 1, 8, C.FLOAT32, False, 0, 0, 0)


def test_device_error_explains_why_kernels_cannot_run():
    reason = C.device_error()
    if torch.cuda.is_available():
        assert reason == ""
    else:
        assert "tcf_device_check: CUDA error" in reason


def test_forced_cuda_backend_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", "cuda")
    hidden = torch.zeros(2, 3)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        ops.residual_apply_(hidden, torch.ones(2, 3))
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        ops.modulate(torch.randn(1, 2, 8))


def test_cuda_backend_module_rejects_cpu_tensors_itself():
    backend = get_backend("cuda")
    with pytest.raises(BackendUnavailableError, match="x is on cpu"):
        backend.modulate(torch.randn(1, 2, 8), None, None, "layer", 1e-6)


def test_info_says_cuda_is_built(capsys):
    from teacache_fast.cli import main

    assert main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("  cuda "))
    expected = "built, available on" if torch.cuda.is_available() else "built, no CUDA device"
    assert expected in line, line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset,width", [(0, 64), (1, 67), (3, 5), (5, 1031)])
def test_misaligned_and_odd_width_match_torch(dtype, offset, width):
    g = torch.Generator(device="cuda").manual_seed(width + offset)

    def rand(*shape, dt=dtype):
        flat = torch.randn(offset + torch.Size(shape).numel(), generator=g, device="cuda")
        return flat.to(dt)[offset:].view(shape)  # storage offset: not 16-byte aligned

    def misaligned_copy(t):  # same storage offset as rand(): vector body between scalar edges
        out = torch.empty(offset + t.numel(), dtype=t.dtype, device="cuda")[offset:].view(t.shape)
        return out.copy_(t)

    B, R = 2, 3
    x, prev = rand(B, R, width), rand(B, R, width)
    scale, shift = rand(B, width), rand(1, width, dt=torch.float32)  # mixed dtypes broadcast
    results = {}
    for name in ("torch", "cuda"):
        with torch.no_grad(), use_backend(name):
            p = misaligned_copy(prev)
            partials = ops.modulated_rel_l1_(x, scale, shift, p, per_sample=True)
            res = torch.empty(B, R, width, dtype=torch.float32, device="cuda")
            ops.residual_capture_(x, p, res)
            h = misaligned_copy(prev)
            hidden = misaligned_copy(prev)
            o = misaligned_copy(torch.full_like(prev, float("nan")))
            mask = torch.tensor([True, False], device="cuda")
            ops.residual_apply_(hidden, res, mask, out=o)   # out of place: hidden kept
            ops.residual_apply_(h, res, mask)
            assert torch.equal(o, h) and torch.equal(hidden, prev), name
            results[name] = (partials, p.float(), res, h.float())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(results["cuda"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # the masked-out sample is untouched, bit for bit
    assert torch.equal(results["cuda"][3][1], prev[1].float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compute", [False, True])
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.bfloat16])
def test_finish_span_one_launch_matches_torch(compute, res_dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    out0 = torch.randn(2, 7, 1031, generator=g, device="cuda").bfloat16()
    inp = torch.randn(2, 7, 1031, generator=g, device="cuda").bfloat16()
    res0 = torch.randn(2, 7, 1031, generator=g, device="cuda").to(res_dtype)
    flag = torch.tensor(compute, device="cuda")
    results = {}
    for name in ("torch", "cuda"):
        out, res = out0.clone(), res0.clone()
        with torch.no_grad(), use_backend(name):
            ops.finish_span_(flag, out, inp, res)
        results[name] = (out, res)
    for got, want in zip(results["cuda"], results["torch"]):
        assert torch.equal(got, want)
