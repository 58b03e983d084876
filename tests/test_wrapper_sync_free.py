"""sync_free=True: the skip is a torch.cond, the decision never reaches the host.

On the tiny diffusers FLUX model: the whole wrapped transformer call compiles
with torch.compile(fullgraph=True) (a graph break or a host read of the flag
would raise), and the compiled sync-free run, the eager sync-free run and the
default (host-read) wrapper give bitwise the same outputs and compute/skip
sequence. Compiles use "aot_eager": Dynamo, functionalization of the mutating
ops and torch.cond lowering, without Inductor's C++ codegen.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import teacache_fast as tf

from tiny_models import euler_sample, single_thread, tiny_flux

STEPS = 6
THRESHOLD = 0.6



@pytest.fixture(autouse=True)
def _quiet():
    torch._dynamo.reset()
    with torch.no_grad(), single_thread():
        yield
    torch._dynamo.reset()


def _run(tiny, view=None, generations=1, guidance=None, **kwargs):
    """Sample with the wrapper on tiny.model (called through view); outputs and stats per generation."""
    view = view or tiny
    tf.apply_teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, **kwargs)
    try:
        runs = []
        for g in range(generations):
            out = euler_sample(view, tiny.latents(1, seed=g), STEPS, guidance=guidance)
            runs.append((out, tf.stats(tiny.model)))
        return runs
    finally:
        tf.remove_teacache(tiny.model)


def _steps(st):
    return {b: v["steps"] for b, v in st["branches"].items()}


def test_compiled_fullgraph_equals_the_default_wrapper_with_cfg(tiny):
    reference = _run(tiny, generations=2, guidance=2.0)
    for _, st in reference:
        flags = sum(_steps(st).values(), [])
        assert any(flags) and not all(flags), flags  # both paths are exercised
    counter = CompileCounterWithBackend("aot_eager")
    compiled = tiny_flux(0, model=torch.compile(tiny.model, fullgraph=True, backend=counter))
    got = _run(tiny, compiled, generations=2, guidance=2.0, sync_free=True, branches=2)
    for (out, st), (ref_out, ref_st) in zip(got, reference):
        assert torch.equal(out, ref_out)
        assert _steps(st) == _steps(ref_st)
        assert (st["computed"], st["skipped"]) == (ref_st["computed"], ref_st["skipped"])
    # per branch: one graph that allocates the buffers, one for every later step;
    # the second generation (the device counter wrapped) compiles nothing new
    assert counter.frame_count == 4, counter.frame_count
    assert got[1][1]["generations"] == 1


def test_eager_sync_free_equals_the_default_wrapper(tiny):
    (ref_out, ref_st), = _run(tiny)
    (out, st), = _run(tiny, sync_free=True)
    assert torch.equal(out, ref_out)
    assert _steps(st) == _steps(ref_st) and not all(st["branches"][0]["steps"])
    # the indicator trace: the same partials, read from the device only in stats()
    assert st["branches"][0]["rel_l1"][1:] == ref_st["branches"][0]["rel_l1"][1:]


class _Pipe:
    def __init__(self, model):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.transformer = model
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)


def test_pipeline_set_timesteps_rebuilds_the_device_schedule(tiny):
    """New step counts come from the watched scheduler, outside any compiled call."""
    def generate(pipe, steps):
        pipe.scheduler.set_timesteps(steps)
        x = tiny.latents(1)
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(tiny.call(x, (t / 1000).expand(1), 0), t, x, return_dict=False)[0]
        return x, tf.stats(pipe)

    results = {}
    for sync in (False, True):
        pipe = _Pipe(tiny.model)
        with tf.teacache(pipe, threshold=THRESHOLD, sync_free=sync):
            results[sync] = [generate(pipe, n) for n in (5, 3, 5)]
    for (a, sa), (b, sb) in zip(results[True], results[False]):
        assert torch.equal(a, b)
        assert _steps(sa) == _steps(sb) and sa["num_steps"] == sb["num_steps"]
    assert [len(st["branches"][0]["steps"]) for _, st in results[True]] == [5, 3, 5]


@pytest.mark.parametrize("override, message", [
    ({"per_sample": True}, "sync_free=True cannot be combined with per_sample="),
    ({"observer": lambda *a: None}, "sync_free=True cannot be combined with observer="),
    ({"cache_device": "cpu"}, "sync_free=True cannot be combined with cache_device="),
    ({"sync_free": 1}, "sync_free must be a bool"),
])
def test_sync_free_config_errors(tiny, override, message):
    kwargs = {"sync_free": True, **override}
    with pytest.raises((ValueError, TypeError), match=message):
        tf.apply_teacache(tiny.model, num_steps=STEPS, **kwargs)
    assert not tf.is_cached(tiny.model)


def test_sync_free_needs_num_steps_before_the_first_call(tiny):
    pipe = _Pipe(tiny.model)
    with tf.teacache(pipe, sync_free=True):
        assert tf.inspect(tiny.model).config.branches == 1  # the default: one branch
        with pytest.raises(RuntimeError, match="sync_free=True needs num_steps"):
            tiny.call(tiny.latents(1), torch.ones(1))


def test_abs_accumulation_reaches_both_runners_alike(tiny):
    # poly(rel) = -4 rel: negative everywhere, so "sum" never reaches the
    # threshold (only the forced first and last steps compute); "abs" does
    neg = [-4.0, 0.0]
    (_, st_sum), = _run(tiny, coefficients=neg)
    assert st_sum["computed"] == 2, _steps(st_sum)
    (ref_out, ref_st), = _run(tiny, coefficients=neg, accumulate="abs")
    (out, st), = _run(tiny, coefficients=neg, accumulate="abs", sync_free=True)
    assert ref_st["computed"] > 2 and ref_st["skipped"] > 0, _steps(ref_st)
    assert torch.equal(out, ref_out) and _steps(st) == _steps(ref_st)
