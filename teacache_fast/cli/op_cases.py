"""The op benchmark's cases: for each op, the callables to time (every backend
that runs on the device, the reference scripts' eager torch chain, and
torch.compile of it), built from the same inputs. Timed by
:mod:`teacache_fast.cli.bench_ops`."""
from __future__ import annotations

from typing import Any, Callable, Dict


def _torch_dtype(name: str):
    from .args import torch_dtype
    return torch_dtype(name)


# --------------------------------------------------------------------------- the cases

def _compiled(fn):
    import torch
    return torch.compile(fn, dynamic=False)


def _stateless_impls(backends, op_call: Callable[[], Any], eager: Callable, eager_args: tuple
                     ) -> Dict[str, Callable]:
    """The implementations of a case whose inputs do not change between calls:
    ``op_call`` under each backend, ``eager(*eager_args)`` and its torch.compile."""
    from teacache_fast import ops

    impls = {}
    for name in backends:
        def fused(name=name):
            with ops.use_backend(name):
                return op_call()
        impls[name] = fused
    compiled = _compiled(eager)
    impls["eager"] = lambda: eager(*eager_args)
    impls["compile"] = lambda: compiled(*eager_args)
    return impls


def _indicator_case(shape, dtype, device, backends) -> Dict[str, Callable]:
    """modulated_rel_l1_ vs the reference scripts' chain (norm, modulate, sub, abs, mean x2, div, .item())."""
    import torch
    import torch.nn.functional as F

    from teacache_fast import ops

    B, N, C = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    scale = (0.1 * torch.randn(B, C, generator=g)).to(device, dtype)
    shift = (0.1 * torch.randn(B, C, generator=g)).to(device, dtype)

    def chain(x, scale, shift, prev):
        m = F.layer_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return m, (m - prev).abs().mean() / prev.abs().mean()

    impls = {}
    for name in backends:
        prev = torch.randn(shape, generator=g).to(device, dtype)

        def fused(prev=prev, name=name):
            with ops.use_backend(name):
                return ops.modulated_rel_l1_(x, scale, shift, prev)
        impls[name] = fused

    for label, fn in (("eager", chain), ("compile", _compiled(chain))):
        state = {"prev": torch.randn(shape, generator=g).to(device, dtype)}

        def reference(state=state, fn=fn):
            m, rel = fn(x, scale, shift, state["prev"])
            state["prev"] = m          # the reference keeps m as the next call's prev
            return rel.item()          # ... and reads the ratio on the host every step
        impls[label] = reference
    return impls


def _modulate_case(shape, dtype, device, backends):
    import torch
    import torch.nn.functional as F

    from teacache_fast import ops

    B, N, C = shape
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(shape, generator=g).to(device, dtype)
    scale = (0.1 * torch.randn(B, C, generator=g)).to(device, dtype)
    shift = (0.1 * torch.randn(B, C, generator=g)).to(device, dtype)

    def eager(x, scale, shift):
        return F.layer_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    return _stateless_impls(backends, lambda: ops.modulate(x, scale, shift), eager, (x, scale, shift))


def _partials_case(shape, dtype, device, backends):
    import torch

    from teacache_fast import ops

    g = torch.Generator(device="cpu").manual_seed(2)
    cur = torch.randn(shape, generator=g).to(device, dtype)
    prev = torch.randn(shape, generator=g).to(device, dtype)

    def eager(cur, prev):
        return torch.stack(((cur - prev).abs().sum(dtype=torch.float32),
                            prev.abs().sum(dtype=torch.float32)))

    return _stateless_impls(backends, lambda: ops.rel_l1_partials(cur, prev), eager, (cur, prev))


def _capture_case(shape, dtype, device, backends):
    import torch

    from teacache_fast import ops

    g = torch.Generator(device="cpu").manual_seed(3)
    out = torch.randn(shape, generator=g).to(device, dtype)
    inp = torch.randn(shape, generator=g).to(device, dtype)
    residual = torch.empty_like(out)

    def eager(out, inp):
        return out - inp           # the reference allocates a new residual every computed step

    return _stateless_impls(backends, lambda: ops.residual_capture_(out, inp, residual), eager, (out, inp))


def _apply_case(shape, dtype, device, backends):
    import torch

    from teacache_fast import ops

    g = torch.Generator(device="cpu").manual_seed(4)
    # Small residuals: hidden grows by ~1e-4 per call, far from overflow over a run.
    residual = (1e-4 * torch.randn(shape, generator=g)).to(device, dtype)

    def eager(hidden, residual):
        hidden += residual
        return hidden

    # One hidden tensor for every implementation: the same pages (on CPU a
    # 50 MB tensor may or may not sit on huge pages, a 2x difference that
    # would follow the tensor, not the code), grown by ~1e-4 per call.
    hidden = torch.randn(shape, generator=g).to(device, dtype)
    impls = {}
    for name in backends:
        def fused(name=name):
            with ops.use_backend(name):
                ops.residual_apply_(hidden, residual)
        impls[name] = fused
    compiled = _compiled(eager)
    for label, fn in (("eager", eager), ("compile", compiled)):
        impls[label] = lambda fn=fn: fn(hidden, residual)
    return impls


def _decide_case(device, backends):
    """The decision: device-side op vs the reference's host read + numpy polynomial."""
    import numpy as np
    import torch

    from teacache_fast import ops

    from .flux_model import flux_preset

    coeffs = flux_preset()[1]   # the published FLUX.1-dev set; the op's cost does not depend on it
    threshold = 0.4
    partials = torch.tensor([0.07, 1.0], device=device)
    poly = np.poly1d(coeffs)
    host = {"acc": 0.0}

    def eager():
        rel = (partials[0] / partials[1]).item()   # host sync, as in the reference scripts
        host["acc"] += poly(rel)
        compute = host["acc"] >= threshold
        if compute:
            host["acc"] = 0.0
        return compute

    def poly_on_device(x):  # Horner, highest power first (numpy.poly1d order)
        y = torch.zeros_like(x)
        for c in coeffs:
            y = y * x + c
        return y

    def on_device(partials, acc):
        new_acc = acc + poly_on_device(partials[0] / partials[1])
        compute = new_acc >= threshold
        acc.copy_(torch.where(compute, torch.zeros_like(new_acc), new_acc))
        return compute

    impls = {}
    for name in backends:
        state = ops.new_decide_state((2,), device=device)

        def fused(state=state, name=name):
            with ops.use_backend(name):
                return ops.teacache_decide_(partials, state, coeffs, threshold)
        impls[name] = fused
    impls["eager"] = eager
    compiled = _compiled(on_device)
    acc = torch.zeros((), device=device)
    impls["compile"] = lambda: compiled(partials, acc)
    return impls


# op -> (its case, how many activation-sized arrays it moves: the bytes floor)
ARRAY_CASES = {
    "modulated_rel_l1_": (_indicator_case, 3),
    "modulate": (_modulate_case, 2),
    "rel_l1_partials": (_partials_case, 2),
    "residual_capture_": (_capture_case, 3),
    "residual_apply_": (_apply_case, 3),
}
