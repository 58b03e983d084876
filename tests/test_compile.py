"""torch.compile: the wrapped model, the graph breaks, fullgraph ops, the sync-free path.

A small pure-torch DiT (AdaLN blocks) keeps tracing fast; the wrapper sees it
through a custom Adapter, exactly as it would a model without a preset. The
tiny FLUX (tests/tiny_models.py) checks that the graphs compiled stay a fixed
set over many steps, CFG branches and generations.
Compiles use the "aot_eager" backend: it exercises Dynamo's
tracing and AOTAutograd's functionalization of the mutating custom ops
without paying for Inductor's C++ codegen on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest
from torch import nn

from teacache_fast import ops, sync_free
from teacache_fast import apply_teacache, remove_teacache, stats
from teacache_fast.models.base import Adapter, Modulated

COEFFS = [0.0, 0.0, 0.0, 1.0, 0.0]   # poly(r) = r
THRESHOLD = 0.3
STEPS = 8


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(c, 2 * c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def modulation(self, temb):
        scale, shift = self.ada(F.silu(temb)).chunk(2, dim=-1)
        return scale, shift

    def forward(self, hidden_states, temb):
        scale, shift = self.modulation(temb)
        m = self.norm(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        return hidden_states + self.mlp(m)


class TinyDiT(nn.Module):
    def __init__(self, c: int = 16, depth: int = 3, channels: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj_in = nn.Linear(channels, c)
        self.t_embed = nn.Sequential(nn.Linear(1, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList(Block(c) for _ in range(depth))
        self.proj_out = nn.Linear(c, channels)
        self.eval()

    def embed(self, hidden_states, timestep):
        h = self.proj_in(hidden_states)
        temb = self.t_embed(timestep.reshape(-1, 1).to(h.dtype))
        return h, temb

    def forward(self, hidden_states, timestep):
        h, temb = self.embed(hidden_states, timestep)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


def _indicator(call):
    scale, shift = call.model.blocks[0].modulation(call["temb"])
    return Modulated(call["hidden_states"], scale, shift)


ADAPTER = Adapter(name="tiny-dit", blocks=lambda m: list(m.blocks), indicator=_indicator,
                  coefficients=COEFFS)


def _sample(model_call, x, steps=STEPS):
    """Euler flow-matching loop; returns the final latents and every model output."""
    outs = []
    sig = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for i in range(steps):
        t = torch.full((x.shape[0],), sig[i])
        v = model_call(x, t)
        outs.append(v)
        x = x + (sig[i + 1] - sig[i]) * v
    return x, outs


def _latents(batch=1, n=6, seed=0):
    return torch.randn(batch, n, 4, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


def _eager_wrapped_run(model, x, steps=STEPS):
    apply_teacache(model, adapter=ADAPTER, threshold=THRESHOLD, num_steps=steps)
    try:
        final, outs = _sample(model, x, steps)
        return final, outs, stats(model)["branches"][0]["steps"]
    finally:
        remove_teacache(model)


# --------------------------------------------------------------------------- the wrapper compiled

def test_compiled_wrapped_model_matches_eager_wrapper():
    model, x = TinyDiT(), _latents()
    final_e, outs_e, steps_e = _eager_wrapped_run(model, x)
    assert any(steps_e) and not all(steps_e), steps_e  # both paths exercised

    apply_teacache(model, adapter=ADAPTER, threshold=THRESHOLD, num_steps=STEPS)
    compiled = torch.compile(model, backend="aot_eager")
    final_c, outs_c = _sample(compiled, x)
    steps_c = stats(model)["branches"][0]["steps"]
    remove_teacache(model)
    assert steps_c == steps_e
    for a, b in zip(outs_c, outs_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final_c, final_e, rtol=1e-6, atol=1e-6)


def _cfg_run(tiny, x, steps, after_step=None):
    """CFG Euler loop (cond, then uncond call per step); after_step(i) after each step."""
    sig = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for i in range(steps):
        t = torch.full((x.shape[0],), sig[i])
        v_c, v_u = tiny.call(x, t, 0), tiny.call(x, t, 1)
        x = x + (sig[i + 1] - sig[i]) * (v_u + 3.0 * (v_c - v_u))
        if after_step is not None:
            after_step(i)
    return x


def _branch_steps(model):
    return [b["steps"] for _, b in sorted(stats(model)["branches"].items())]


def test_compiled_flux_graph_count_bounded_over_steps_and_generations():
    """The default (host-read) path compiled: the host bookkeeping is not traced,
    so the graphs depend on the call's mode only, not on its step. A run that
    recompiled per step would exceed Dynamo's recompile limit (an error here,
    not the silent eager fallback)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from tiny_models import single_thread, tiny_flux

    steps, generations = 12, 2
    tiny = tiny_flux(0)
    model, x0 = tiny.model, tiny.latents()
    with single_thread():
        apply_teacache(model, threshold=0.3, num_steps=steps)
        want = []
        for _ in range(generations):
            want.append((_cfg_run(tiny, x0, steps), _branch_steps(model)))
        remove_teacache(model)
        flags = want[0][1]
        assert len(flags) == 2 and all(any(f) and not all(f) for f in flags), flags

        apply_teacache(model, threshold=0.3, num_steps=steps)
        counter = CompileCounterWithBackend("eager")
        compiled = tiny_flux(0, model=torch.compile(model, backend=counter))
        frames = []  # graphs compiled so far, after each step of each generation
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for final_e, steps_e in want:
                final_c = _cfg_run(compiled, x0, steps, lambda i: frames.append(counter.frame_count))
                assert _branch_steps(model) == steps_e
                assert torch.equal(final_c, final_e)
        remove_teacache(model)
    # both modes were met in the first half: nothing compiled after it, in
    # generation 1 or 2; and far fewer graphs than calls
    assert 0 < frames[-1] == frames[steps // 2 - 1] < 2 * steps, frames


def _break_sites(explanation):
    """(file, function) of the innermost user frame of each graph break."""
    sites = set()
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1]
        sites.add((frame.filename.replace("\\", "/").split("/teacache_fast/")[-1], frame.name))
    return sites


def _explain_third_call():
    """Explain a steady-state call: the clock has learnt the branches by then."""
    model, x = TinyDiT(), _latents()
    apply_teacache(model, adapter=ADAPTER, threshold=THRESHOLD, num_steps=STEPS)
    try:
        model(x, torch.full((1,), 0.9))
        model(x, torch.full((1,), 0.8))
        return torch._dynamo.explain(model)(x, torch.full((1,), 0.7))
    finally:
        remove_teacache(model)


def test_explain_no_break_inside_ops_and_only_the_wrapper_reads():
    sites = _break_sites(_explain_third_call())
    inside_ops = [s for s in sites if s[0].startswith(("ops.py", "backends/", "kernels/"))]
    assert not inside_ops, inside_ops
    assert ("wrapper/host.py", "_decide") in sites


def test_explain_one_break_site_per_step():
    explanation = _explain_third_call()
    assert _break_sites(explanation) == {("wrapper/host.py", "_decide")}
    # one break (the host region) per call; Dynamo may split the enclosing
    # frames at it, but the reasons name that one site once
    assert len(explanation.break_reasons) == 1, explanation.break_reasons


# --------------------------------------------------------------------------- ops, fullgraph

def _six_ops(x, scale, shift, prev, state, residual, hidden, mask):
    m = ops.modulate(x, scale, shift)
    r = ops.rel_l1_partials(m, prev, per_sample=True)
    p = ops.modulated_rel_l1_(x, scale, shift, prev)
    flags = ops.teacache_decide_(p, state, COEFFS, THRESHOLD, force=False)
    ops.residual_capture_(m, x, residual)
    ops.residual_apply_(hidden, residual, mask=mask & flags)
    return m, r, p, flags


def test_fullgraph_six_ops_functionalized_matches_eager():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, generator=g)
    args = lambda: (x, torch.randn(2, 7, generator=torch.Generator().manual_seed(1)),  # noqa: E731
                    torch.randn(2, 1, 7, generator=torch.Generator().manual_seed(2)),
                    x + 0.05, ops.new_decide_state(), torch.zeros(2, 5, 7, dtype=torch.bfloat16),
                    torch.ones(2, 5, 7), torch.tensor([True, False]))
    eager_args, compiled_args = args(), args()
    want = _six_ops(*eager_args)
    explanation = torch._dynamo.explain(_six_ops)(*args())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    got = torch.compile(_six_ops, fullgraph=True, backend="aot_eager")(*compiled_args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(compiled_args, eager_args):  # the mutated inputs: prev, state, residual, hidden
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- sync-free path

class SyncFreeCache:
    """The device state of one branch in sync-free mode, as the wrapper would hold it."""

    def __init__(self, model: TinyDiT, x: torch.Tensor, steps: int = STEPS):
        h, _ = model.embed(x, torch.zeros(x.shape[0]))
        self.prev = torch.zeros_like(h)
        self.state = ops.new_decide_state()
        self.residual = torch.zeros_like(h)
        # the wrapper's default rule: the first and the last step compute
        self.schedule = sync_free.DeviceSchedule([s in (0, steps - 1) for s in range(steps)])


def sync_free_call(model: TinyDiT, x, t, cache: SyncFreeCache):
    """A whole cached transformer call without a host read; returns (output, compute flag)."""
    h, temb = model.embed(x, t)
    scale, shift = model.blocks[0].modulation(temb)
    compute = sync_free.decide(h, cache.prev, cache.state, COEFFS, THRESHOLD,
                               force=cache.schedule.tick(), scale=scale, shift=shift)
    inp = h
    for block in model.blocks:
        h = sync_free.run_or_pass(compute, block, lambda hidden_states, temb: hidden_states, h, temb)
    h = sync_free.finish_span_(compute, h, inp, cache.residual)
    return model.proj_out(h), compute


def test_sync_free_fullgraph_one_graph_matches_eager_wrapper():
    from torch._dynamo.testing import CompileCounterWithBackend

    model, x0 = TinyDiT(), _latents()
    _, outs_e, steps_e = _eager_wrapped_run(model, x0)
    assert any(steps_e) and not all(steps_e), steps_e

    probe = SyncFreeCache(model, x0)
    explanation = torch._dynamo.explain(sync_free_call)(model, x0, torch.zeros(1), probe)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    counter = CompileCounterWithBackend("aot_eager")
    step_fn = torch.compile(sync_free_call, fullgraph=True, backend=counter)
    cache = SyncFreeCache(model, x0)
    sig = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
    for generation in range(2):  # the device counter wraps: generation 2 replays generation 1
        x, flags, outs = x0.clone(), [], []
        for i in range(STEPS):
            v, compute = step_fn(model, x, torch.full((1,), sig[i]), cache)
            outs.append(v)
            flags.append(bool(compute))  # read by the test only, after the call
            x = x + (sig[i + 1] - sig[i]) * v
        assert flags == steps_e, generation
        for a, b in zip(outs, outs_e):
            assert torch.equal(a, b)
    assert counter.frame_count == 1, "one graph for every step of every generation"


def test_device_schedule():
    sched = sync_free.DeviceSchedule([True, False, False, True])
    assert [bool(sched.tick()) for _ in range(9)] == [True, False, False, True] * 2 + [True]
    sched.reset()
    assert bool(sched.tick())
    with pytest.raises(ValueError, match="step 0 is forced"):
        sync_free.DeviceSchedule([False, True])


def test_sync_free_step_eager_equals_manual_cache():
    """sync_free_step on a stack given as one function: compute, then skip."""
    model, x = TinyDiT(), _latents(batch=2)
    h, temb = model.embed(x, torch.zeros(2))

    def stack(hidden, temb):
        for block in model.blocks:
            hidden = block(hidden, temb)
        return hidden

    residual = torch.zeros_like(h, dtype=torch.bfloat16)  # a narrower cache dtype
    out = sync_free.sync_free_step(torch.tensor(True), h, residual, stack, temb)
    assert torch.equal(out, stack(h, temb))
    expected_residual = torch.empty_like(residual)
    ops.residual_capture_(stack(h, temb), h, expected_residual)
    assert torch.equal(residual, expected_residual)

    h2 = h + 0.01
    before = residual.clone()
    skipped = sync_free.sync_free_step(torch.tensor(False), h2, residual, stack, temb)
    want = h2.clone()
    ops.residual_apply_(want, before)
    assert torch.equal(skipped, want)
    assert torch.equal(residual, before)  # a skip keeps the residual
