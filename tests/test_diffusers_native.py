"""Living inside diffusers: hooks that compose with diffusers' own, the
pipeline's current scheduler, copies, compiled modules, several denoisers,
and the warning for a polynomial that does not fit (issue 12)."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import teacache_fast as tf

from tiny_models import tiny_flux

pytestmark = pytest.mark.usefixtures("no_grad")

STEPS = 8


class MiniPipe:
    """The parts of a diffusers pipeline TeaCache meets: ``transformer``(s),
    ``scheduler``, a ``__call__`` that sets the timesteps, wraps each call in
    ``cache_context`` and steps the scheduler, and resets stateful hooks at
    the end (``maybe_free_model_hooks``)."""

    def __init__(self, tiny, scheduler=None, tiny_2=None):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.tiny, self.tiny_2 = tiny, tiny_2
        self.transformer = tiny.model
        if tiny_2 is not None:
            self.transformer_2 = tiny_2.model
        self.scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=1.0)

    @classmethod
    def from_pipe(cls, pipe, scheduler=None):
        return cls(pipe.tiny, scheduler or pipe.scheduler, pipe.tiny_2)

    def __call__(self, x0, steps, guidance=None, boundary=None):
        self.scheduler.set_timesteps(steps)
        x = x0.clone()
        for i, t in enumerate(self.scheduler.timesteps):
            tiny = self.tiny if boundary is None or i < boundary else self.tiny_2
            ts = (t / 1000).expand(x.shape[0])
            with tiny.model.cache_context("cond"):
                v = tiny.call(x, ts, 0)
            if guidance is not None:
                with tiny.model.cache_context("uncond"):
                    vu = tiny.call(x, ts, 1)
                v = vu + guidance * (v - vu)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        for m in (self.tiny, self.tiny_2):
            if m is not None:
                m.model._reset_stateful_cache()
        return x


def _fresh_run(scheduler_cls, steps, threshold=0.5, **kw):
    """What a fresh wrapper on a fresh pipeline gives."""
    pipe = MiniPipe(tiny_flux(0), scheduler_cls(shift=1.0))
    x0 = pipe.tiny.latents(1)
    with tf.teacache(pipe, threshold=threshold):
        out = pipe(x0, steps, **kw)
        return out, tf.stats(pipe)["branches"]


def test_scheduler_swapped_after_apply_is_followed(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = MiniPipe(tiny)
    x0 = tiny.latents(1)
    with tf.teacache(pipe, threshold=0.5):
        pipe(x0, 5)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        out = pipe(x0, STEPS)
        st = tf.stats(pipe)["branches"]
    expected, st_fresh = _fresh_run(FlowMatchEulerDiscreteScheduler, STEPS)
    assert st == st_fresh and len(st[0]["steps"]) == STEPS and st[0]["steps"][-1]
    assert torch.equal(out, expected)


def test_from_pipe_with_a_new_scheduler_is_a_fresh_run(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = MiniPipe(tiny)
    x0 = tiny.latents(1)
    with tf.teacache(pipe, threshold=0.5):
        pipe(x0, 5)
        other = MiniPipe.from_pipe(pipe, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
        out = other(x0, STEPS)
        st = tf.stats(pipe)["branches"]
        again = pipe(x0, 5)  # back to the first pipeline and its scheduler
        st_again = tf.stats(pipe)["branches"]
    expected, st_fresh = _fresh_run(FlowMatchEulerDiscreteScheduler, STEPS)
    assert st == st_fresh and torch.equal(out, expected)
    expected5, st5 = _fresh_run(FlowMatchEulerDiscreteScheduler, 5)
    assert st_again == st5 and torch.equal(again, expected5)


def test_deepcopy_and_pickle_of_a_cached_model_are_clear_errors(tiny):
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS):
        with pytest.raises(TypeError, match="TeaCache attached"):
            copy.deepcopy(tiny.model)
        with pytest.raises(TypeError, match="TeaCache attached"):
            torch.save(tiny.model, io.BytesIO())
        with pytest.raises(TypeError, match="TeaCache attached"):
            pickle.dumps(tiny.model)
    # removed: copies are plain models again, and a copy runs its own weights
    clone = copy.deepcopy(tiny.model)
    torch.nn.init.zeros_(clone.proj_out.weight)
    torch.nn.init.zeros_(clone.proj_out.bias)
    x, t = tiny.latents(1), torch.full((1,), 0.5)
    assert not torch.equal(tiny_flux(0, model=clone).call(x, t), tiny.call(x, t))


def test_diffusers_cache_and_teacache_refuse_each_other(tiny):
    from diffusers.hooks import FirstBlockCacheConfig
    m = tiny.model
    m.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(ValueError, match="FirstBlockCacheConfig.*disable_cache"):
            tf.apply_teacache(m, threshold=0.5, num_steps=STEPS)
        assert not tf.is_cached(m) and m.is_cache_enabled
    finally:
        m.disable_cache()
    tf.apply_teacache(m, threshold=0.5, num_steps=STEPS)
    try:
        m.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        with pytest.raises(RuntimeError, match="FirstBlockCacheConfig was enabled.*after TeaCache"):
            with m.cache_context("cond"):
                tiny.call(tiny.latents(1), torch.full((1,), 0.5))
        m.disable_cache()
    finally:
        tf.remove_teacache(m)


def test_remove_keeps_hooks_diffusers_added_after():
    """Group offloading (cpu -> cpu) installed after TeaCache survives its removal."""
    tiny = tiny_flux(0)  # its own model: group offloading stays on it
    m, x = tiny.model, tiny.latents(1)
    t = torch.full((1,), 0.5)
    plain = tiny.call(x, t)
    tf.apply_teacache(m, threshold=0.5, num_steps=STEPS)
    m.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)
    tf.remove_teacache(m)
    registry = m.__dict__.get("_diffusers_hook")
    names = [n for mod in m.modules() if "_diffusers_hook" in mod.__dict__
             for n in mod.__dict__["_diffusers_hook"].hooks]
    assert registry is not None and names and "teacache_fast" not in names
    assert any("group_offloading" in n for n in names), names
    assert torch.equal(tiny.call(x, t), plain)


def test_plain_module_overridden_after_us_keeps_its_override():
    """Without diffusers' registry: an override made after TeaCache stays, ours is switched off."""
    from toy_models import ToyDiT, toy_adapter
    torch.manual_seed(0)
    model, adapter = ToyDiT(), toy_adapter()
    x = torch.randn(1, 5, 4)
    tf.apply_teacache(model, adapter=adapter, threshold=0.0, num_steps=4, coefficients=[1.0, 0.0])
    theirs = model.forward

    def wrapped(*args, **kwargs):
        return theirs(*args, **kwargs) * 2
    model.forward = wrapped
    tf.remove_teacache(model)
    assert model.forward is wrapped
    assert torch.equal(model(x, torch.tensor([0.5])), 2 * type(model).forward(model, x, torch.tensor([0.5])))


def test_compiled_module_before_and_after_apply(tiny):
    compiled = torch.compile(tiny.model, backend="eager")
    x0 = tiny.latents(1)
    tf.apply_teacache(compiled, threshold=0.0, num_steps=STEPS)
    try:
        assert tf.is_cached(tiny.model) and tf.is_cached(compiled)
        out = tiny_flux(0, model=compiled).call(x0, torch.full((1,), 0.5))
        assert tf.stats(compiled)["calls"] == 1
        assert torch.equal(out, tiny.call(x0, torch.full((1,), 0.5)))  # threshold 0, step 0
    finally:
        tf.remove_teacache(compiled)
    assert not tf.is_cached(tiny.model)
    tf.apply_teacache(tiny.model, threshold=0.0, num_steps=STEPS)
    later = torch.compile(tiny.model, backend="eager")
    try:
        assert tf.stats(later)["calls"] == 0 and tf.inspect(later).mode == "host"
    finally:
        tf.remove_teacache(later)


def test_every_denoiser_of_a_pipeline_is_cached():
    """Wan2.2-style: two experts, one cache each, with their own state."""
    pipe = MiniPipe(tiny_flux(0), tiny_2=tiny_flux(1))
    x0 = pipe.tiny.latents(1)
    tf.apply_teacache(pipe, threshold=0.5)
    try:
        assert tf.is_cached(pipe.transformer) and tf.is_cached(pipe.transformer_2)
        out = pipe(x0, STEPS, boundary=STEPS // 2)
        st = tf.stats(pipe)
        assert sorted(st) == ["transformer", "transformer_2"]
        assert st["transformer"]["calls"] == STEPS // 2 and st["transformer_2"]["calls"] == STEPS // 2
    finally:
        tf.remove_teacache(pipe)
    assert not tf.is_cached(pipe.transformer) and not tf.is_cached(pipe.transformer_2)
    assert out.shape == x0.shape


def test_negative_polynomial_is_counted_and_warned(tiny):
    """A polynomial negative where the indicator lands shrinks the accumulator:
    stats count it and one warning per generation says so."""
    pipe = MiniPipe(tiny)
    x0 = tiny.latents(1)
    with tf.teacache(pipe, threshold=0.5, coefficients=[-1.0, 0.0]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe(x0, STEPS)
            pipe(x0, STEPS)
        st = tf.stats(pipe)["branches"][0]
    negative = [w for w in caught if "polynomial is negative" in str(w.message)]
    assert len(negative) == 2, [str(w.message) for w in caught]  # once per generation
    assert "max_consecutive_skips" in str(negative[0].message)
    assert st["negative_estimates"] >= STEPS - 2
    assert st["steps"][-1]  # the final step still computes (forced)


def test_two_pipelines_sharing_a_scheduler_remove_independently():
    """Removing A's cache keeps B's scheduler watch, and A's switched-off
    override keeps nothing of A alive (issue 15, item 5)."""
    import gc
    import weakref

    from teacache_fast.wrapper import CachedModel
    a, b = MiniPipe(tiny_flux(0)), MiniPipe(tiny_flux(1))
    b.scheduler = a.scheduler
    tf.apply_teacache(a, threshold=0.5)
    tf.apply_teacache(b, threshold=0.5)
    ref = weakref.ref(a.transformer.__dict__["_teacache_fast"])
    tf.remove_teacache(a)
    gc.collect()
    assert ref() is None or not isinstance(ref(), CachedModel), "A's cache is still referenced"
    x0 = b.tiny.latents(1)
    out = b(x0, STEPS)
    st = tf.stats(b)["branches"]
    assert tf.inspect(b).scheduler_watched and len(st[0]["steps"]) == STEPS and st[0]["steps"][-1]
    tf.remove_teacache(b)
    assert "set_timesteps" not in a.scheduler.__dict__ and "step" not in a.scheduler.__dict__
    expected, st_fresh = _fresh_run(type(a.scheduler), STEPS)
    # b's model is tiny_flux(1): compare patterns only against a fresh b
    fresh_b = MiniPipe(tiny_flux(1))
    with tf.teacache(fresh_b, threshold=0.5):
        assert torch.equal(fresh_b(x0, STEPS), out)
        assert tf.stats(fresh_b)["branches"] == st


@pytest.mark.parametrize("with_steps", [False, True])
def test_cache_context_names_keep_branches_apart(with_steps):
    """A pipeline that runs uncond before cond and stops uncond part-way: the
    cache_context names (and step_index when given) place every call, so each
    branch equals an independent cache on its own copy of the model."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    tiny, n, trunc, g = tiny_flux(0), STEPS, 5, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    x0 = tiny.latents(1)

    def generate(call_uncond, call_cond):
        sched.set_timesteps(n)
        x = x0.clone()
        for i, t in enumerate(sched.timesteps):
            ts = (t / 1000).expand(1)
            kw = dict(step_index=i, num_inference_steps=n) if with_steps else {}
            v = vu = None
            if i < trunc:
                vu = call_uncond(x, ts, kw)
            v = call_cond(x, ts, kw)
            if vu is not None:
                v = vu + g * (v - vu)
            x = sched.step(v, t, x, return_dict=False)[0]
        return x

    def in_context(model, name, branch, tiny_):
        def call(x, ts, kw):
            with model.cache_context(name, **kw):
                return tiny_.call(x, ts, branch)
        return call

    tf.apply_teacache(tiny.model, threshold=0.5, num_steps=n)
    try:
        out = generate(in_context(tiny.model, "uncond", 1, tiny), in_context(tiny.model, "cond", 0, tiny))
        st = tf.stats(tiny.model)["branches"]
    finally:
        tf.remove_teacache(tiny.model)
    copies = [tiny_flux(0), tiny_flux(0)]
    for c in copies:
        tf.apply_teacache(c.model, threshold=0.5, num_steps=n)
    expected = generate(lambda x, ts, kw: copies[1].call(x, ts, 1), lambda x, ts, kw: copies[0].call(x, ts, 0))
    ref = [tf.stats(c.model)["branches"][0]["steps"] for c in copies]
    # branch 0 is the first name seen ("uncond"), branch 1 "cond"
    assert [st[0]["steps"], st[1]["steps"]] == [ref[1], ref[0]]
    assert len(st[1]["steps"]) == n and st[1]["steps"][-1] and len(st[0]["steps"]) == trunc
    assert torch.equal(out, expected)
    for c in copies:
        tf.remove_teacache(c.model)
