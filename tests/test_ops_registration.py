"""torch.library registration (opcheck, torch.compile) and backend selection."""
from __future__ import annotations

import pytest
import torch

from teacache_fast import ops
from teacache_fast.backends import BackendUnavailableError, backend_for

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _sample_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g).to(DEV)
    scale = torch.randn(2, 5, generator=g).to(DEV)
    shift = torch.randn(2, 5, generator=g).to(DEV)
    prev = torch.randn(2, 3, 5, generator=g).to(DEV)
    partials = torch.tensor([[0.1, 1.0], [0.5, 1.0]], device=DEV)
    state = torch.zeros(2, 2, device=DEV)
    force = torch.tensor([True, False], device=DEV)
    residual = torch.empty(2, 3, 5, device=DEV)
    mask = torch.tensor([True, False], device=DEV)
    return {
        "modulate": (x, scale, shift, "layer", 1e-6),
        "rel_l1_partials": (x, prev, True),
        "modulated_rel_l1_": (x, scale, shift, prev, "rms", 1e-6, False),
        "teacache_decide_": (partials, state, [1.0, 2.0, 0.5], 0.4, force, 3),
        "residual_capture_": (x, prev, residual),
        "residual_apply_": (x.clone(), prev, mask),
    }


@pytest.mark.parametrize("name", list(_sample_args()))
def test_opcheck(name):
    op = getattr(torch.ops.teacache_fast, name)
    torch.library.opcheck(op, _sample_args()[name])


def _all_ops(x, scale, shift, prev, state, residual, hidden):
    m = ops.modulate(x, scale, shift)
    p = ops.modulated_rel_l1_(x, scale, shift, prev)
    q = ops.rel_l1_partials(m, prev)
    flags = ops.teacache_decide_(p, state, [1.0, 0.0], 0.3, force=False)
    ops.residual_capture_(m, x, residual)
    ops.residual_apply_(hidden, residual, mask=flags.expand(hidden.shape[0]))
    return m, p, q, flags


def test_torch_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, generator=g).to(DEV)
    scale, shift = torch.randn(2, 6, generator=g).to(DEV), torch.randn(2, 1, 6, generator=g).to(DEV)
    prev0 = torch.randn(2, 4, 6, generator=g).to(DEV)
    hidden0 = torch.randn(2, 4, 6, generator=g).to(DEV)

    def run(fn):
        prev, state, residual, hidden = prev0.clone(), torch.zeros(2, device=DEV), \
            torch.empty(2, 4, 6, device=DEV), hidden0.clone()
        out = fn(x, scale, shift, prev, state, residual, hidden)
        return out + (prev, state, residual, hidden)

    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, fullgraph=True, backend="eager")
    for got, want in zip(run(compiled), run(_all_ops)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    explanation = torch._dynamo.explain(_all_ops)(x, scale, shift, prev0.clone(), torch.zeros(2, device=DEV),
                                                  torch.empty(2, 4, 6, device=DEV), hidden0.clone())
    assert explanation.graph_break_count == 0


def test_cpu_tensors_use_the_native_cpu_backend_or_torch(monkeypatch):
    from teacache_fast.backends.native import build
    assert backend_for(torch.zeros(1)) == ("cpu" if build.library()[0] is not None else "torch")
    # without the native kernels (no compiler, or switched off) CPU tensors take torch
    build.library.cache_clear()
    monkeypatch.setenv(build.ENV_OFF, "0")
    try:
        assert backend_for(torch.zeros(1)) == "torch"
        assert "turned the native CPU kernels off" in ops.unavailable_reason("cpu", "cpu")
    finally:
        build.library.cache_clear()


def _not_auto(device) -> str:
    """A runnable backend that ``auto`` would NOT pick for tensors on ``device``,
    so a test of forcing can fail."""
    auto = backend_for(torch.zeros(1, device=device))
    for name in ("triton", "torch", "cpu", "cuda"):
        if name != auto and ops.unavailable_reason(name, device) is None:
            return name
    pytest.skip(f"only {auto!r} runs on {device}")


def test_env_var_forces_backend(monkeypatch):
    forced = _not_auto(DEV)
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", forced)
    assert backend_for(torch.zeros(1, device=DEV)) == forced


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="TEACACHE_FAST_BACKEND"):
        ops.modulate(torch.zeros(1, 2), None, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_forced_cuda_on_cpu_tensor_says_why(monkeypatch):
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda' was forced.*(not built|needs CUDA tensors)"):
        ops.modulate(torch.zeros(1, 4), None, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_forced_triton_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.residual_apply_(torch.zeros(1, 4), torch.zeros(1, 4))


def test_use_backend_beats_env_and_restores(monkeypatch):
    auto = backend_for(torch.zeros(1, device=DEV))
    forced = _not_auto(DEV)
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", auto)
    with ops.use_backend(forced):
        assert backend_for(torch.zeros(1, device=DEV)) == forced
    assert backend_for(torch.zeros(1, device=DEV)) == auto
    monkeypatch.setenv("TEACACHE_FAST_BACKEND", "auto")
    with ops.use_backend(forced):
        assert backend_for(torch.zeros(1, device=DEV)) == forced
    assert backend_for(torch.zeros(1, device=DEV)) == auto


def test_requires_grad_is_rejected_under_grad_mode():
    x = torch.zeros(1, 2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="x requires grad"):
        ops.modulate(x, None, None)
    with torch.no_grad():
        assert ops.modulate(x, None, None).shape == x.shape


def test_one_coefficient_limit_everywhere():
    """ops, the vendorable Triton kernel and the torch-free C header state the
    limit separately (each must stand alone when copied); they must agree."""
    import pathlib
    import re as _re
    header = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "teacache_fast.h").read_text()
    c_limit = int(_re.search(r"#define TCF_MAX_COEFFICIENTS (\d+)", header).group(1))
    from teacache_fast.preset_json import MAX_DEGREE
    assert ops.MAX_COEFFICIENTS == c_limit == MAX_DEGREE + 1
    decide = pytest.importorskip("teacache_fast.kernels.decide")
    assert decide.MAX_COEFFICIENTS == ops.MAX_COEFFICIENTS
