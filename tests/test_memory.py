"""Memory and long runs: nothing cached outlives remove_teacache, buffers are
reused from step to step, and ten mixed generations through one wrapper give
what fresh wrappers give."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import teacache_fast as tf
from teacache_fast.wrapper import CachedModel

from tiny_models import euler_sample, tiny_flux

STEPS = 6



pytestmark = pytest.mark.usefixtures("no_grad")


def _state_tensors(model):
    """Every tensor the cache holds per branch, by (branch, name), through the
    public accessor."""
    found = {}
    for index, b in tf.inspect(model).branches.items():
        for name in ("prev", "residual"):
            t = getattr(b, name)
            if t is not None:
                found[(index, name)] = t
    return found


def _cached_models_of(model):
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is CachedModel and o.model is model]


def test_remove_teacache_frees_every_cached_tensor(tiny):
    # CFG (two branches) and per-sample state: every kind of buffer exists.
    tf.apply_teacache(tiny.model, threshold=0.6, num_steps=STEPS, per_sample=True)
    euler_sample(tiny, tiny.latents(2), STEPS, guidance=2.0)
    held = _state_tensors(tiny.model)
    assert {name for _, name in held} >= {"prev", "residual"}
    assert all(b.decision is not None for b in tf.inspect(tiny.model).branches.values())
    assert {index for index, _ in held} == {0, 1}
    refs = {key: weakref.ref(t) for key, t in held.items()}
    del held
    tf.remove_teacache(tiny.model)
    gc.collect()
    alive = sorted(str(key) for key, r in refs.items() if r() is not None)
    assert not alive, f"still referenced after remove_teacache: {alive}"
    assert not _cached_models_of(tiny.model), "the CachedModel itself is still referenced"
    assert not tf.is_cached(tiny.model)


def test_buffers_are_allocated_once_and_reused(tiny):
    """prev, decision state and residual keep their storage from the first call on."""
    seen = []

    def record():
        seen.append({key: (t.data_ptr(), id(t)) for key, t in _state_tensors(tiny.model).items()
                     if not key[1].startswith("trace")})

    x0 = tiny.latents(1)
    with tf.teacache(tiny.model, threshold=0.6, num_steps=STEPS):
        s = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
        x = x0.clone()
        for i in range(STEPS):
            v = tiny.call(x, torch.full((1,), s[i]), 0)
            x = x + (s[i + 1] - s[i]) * v
            record()
        steps = tf.stats(tiny.model)["branches"][0]["steps"]
    assert not all(steps), "the run must skip some steps to exercise both paths"
    assert all(snapshot == seen[0] for snapshot in seen[1:]), seen


def test_state_holds_no_per_step_tensors(tiny):
    counts = []
    with tf.teacache(tiny.model, threshold=0.6, num_steps=12):
        s = torch.linspace(1.0, 0.0, 13).tolist()
        x = tiny.latents(1)
        for i in range(12):
            x = x + (s[i + 1] - s[i]) * tiny.call(x, torch.full((1,), s[i]), 0)
            counts.append(len(_state_tensors(tiny.model)))
    assert counts[-1] == counts[1], counts


class _Pipe:
    """What apply_teacache reads from a diffusers pipeline: transformer + scheduler."""

    def __init__(self, model):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.transformer = model
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)


def _generate(pipe, tiny_view, batch, steps, guidance, seed):
    pipe.scheduler.set_timesteps(steps)
    x = tiny_view.latents(batch, seed)
    for t in pipe.scheduler.timesteps:
        tt = (t / 1000).expand(batch)
        v = tiny_view.call(x, tt, 0)
        if guidance is not None:
            vu = tiny_view.call(x, tt, 1)
            v = vu + guidance * (v - vu)
        x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
    return x


# (batch, height, width, steps, guidance, per-run seed): sizes, batches, step
# counts and CFG on/off all change from one generation to the next.
RUNS = [(1, 4, 4, 6, None, 0), (2, 4, 4, 8, 3.0, 1), (1, 2, 6, 5, None, 2), (3, 4, 4, 6, None, 3),
        (1, 4, 4, 9, 2.0, 4), (2, 2, 2, 4, None, 5), (1, 6, 4, 7, 3.0, 6), (1, 4, 4, 6, None, 0),
        (2, 4, 6, 5, 2.0, 7), (1, 4, 4, 8, None, 8)]


def test_ten_mixed_generations_match_fresh_wrappers(tiny):
    pipe = _Pipe(tiny.model)
    long_run = []
    with tf.teacache(pipe, threshold=0.6):
        for batch, h, w, steps, guidance, seed in RUNS:
            view = tiny_flux(0, height=h, width=w, model=tiny.model)
            long_run.append((_generate(pipe, view, batch, steps, guidance, seed), tf.stats(pipe)))
    skipped = 0
    for (batch, h, w, steps, guidance, seed), (out, st) in zip(RUNS, long_run):
        view = tiny_flux(0, height=h, width=w, model=tiny.model)
        fresh_pipe = _Pipe(tiny.model)
        with tf.teacache(fresh_pipe, threshold=0.6):
            fresh = _generate(fresh_pipe, view, batch, steps, guidance, seed)
            fresh_st = tf.stats(fresh_pipe)
        assert torch.equal(out, fresh), (batch, h, w, steps, guidance)
        assert st["num_steps"] == steps and st["branches"] == fresh_st["branches"]
        assert len(st["branches"]) == (1 if guidance is None else 2)
        skipped += st["skipped"]
    assert skipped > 0, "the threshold must skip somewhere or the comparison proves little"
