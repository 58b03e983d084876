"""Issue 15 (reliability), the clock part: each item's regression test on the
tiny diffusers FLUX through the wrapper (the clock alone: test_clock.py; the
random sequences: test_model_based.py)."""
import threading
import warnings

import pytest
import torch

import teacache_fast as tf

from tiny_models import euler_sample, sigmas, single_thread, tiny_flux

STEPS = 10
THRESHOLD = 0.6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


pytestmark = pytest.mark.usefixtures("no_grad")


def _pattern(st):
    return {b: "".join("C" if f else "." for f in v["steps"]) for b, v in st["branches"].items()}


def _fresh(tiny, guidance=None, threshold=THRESHOLD, **kw):
    with tf.teacache(tiny.model, threshold=threshold, num_steps=STEPS, **kw):
        out = euler_sample(tiny, tiny.latents(1), STEPS, guidance=guidance)
        return out, _pattern(tf.stats(tiny.model))


class _RaiseOnce:
    """proj_out raises on its next call (an exception inside a transformer call)."""

    def __init__(self, model):
        self.model, self.armed = model, True
        self.handle = model.proj_out.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if self.armed:
            self.armed = False
            raise RuntimeError("boom")


def _one_call_before(tiny, kind):
    t1 = torch.ones(1)
    if kind == "warm-up":
        tiny.call(torch.zeros_like(tiny.latents(1)), t1, 0)
    elif kind == "stopped after its first step":
        tiny.call(tiny.latents(1), t1, 0)
    elif kind == "first call raised":
        hook = _RaiseOnce(tiny.model)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                tiny.call(tiny.latents(1), t1, 0)
        finally:
            hook.handle.remove()
    elif kind == "one-step img2img":
        tiny.call(tiny.latents(1, seed=5), torch.full((1,), 0.6), 0)


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("kind", ["warm-up", "stopped after its first step", "first call raised",
                                  "one-step img2img"])
def test_item1_one_call_before_a_generation_does_not_leak(tiny, kind, guidance):
    expected, want = _fresh(tiny, guidance)
    assert "." in "".join(want.values())
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS):
        _one_call_before(tiny, kind)
        out = euler_sample(tiny, tiny.latents(1), STEPS, guidance=guidance)
        st = tf.stats(tiny.model)
    assert _pattern(st) == want, (kind, st["restarts"])
    assert torch.equal(out, expected)


def test_item1_interrupted_runs_with_device_timesteps(tiny, monkeypatch):
    """A timestep that is costly to read (as on a GPU) is still read: an
    interrupted run does not leak into the next."""
    from teacache_fast.cache import clock
    real = clock.timestep_value
    monkeypatch.setattr(clock, "timestep_value",
                        lambda t, must_read: real(t, must_read) if must_read else None)
    expected, want = _fresh(tiny, 3.0)
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS):
        euler_sample(tiny, tiny.latents(1), 4, guidance=3.0)    # stopped after 4 of 10 steps
        out = euler_sample(tiny, tiny.latents(1), STEPS, guidance=3.0)
        st = tf.stats(tiny.model)
    assert _pattern(st) == want and torch.equal(out, expected)
    assert st["restarts"] == {"timestep went back": 1}


def test_item1_sync_free_counter_restarts_after_an_interrupted_run(tiny):
    expected, want = _fresh(tiny)
    for interrupted in (2, 4):
        with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, sync_free=True):
            euler_sample(tiny, tiny.latents(1), interrupted)
            out = euler_sample(tiny, tiny.latents(1), STEPS)
            st = tf.stats(tiny.model)
        assert torch.equal(out, expected), interrupted
        assert _pattern(st) == want, interrupted


def test_item1_sync_free_after_a_one_call_run_computes_in_full(tiny):
    """On the device, a run stopped after one call and a new one at the same
    timestep look like CFG without branches=2: computed in full, and a warning."""
    plain = euler_sample(tiny, tiny.latents(1), STEPS)
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, sync_free=True):
        euler_sample(tiny, tiny.latents(1), 1)
        out = euler_sample(tiny, tiny.latents(1), STEPS)
        with pytest.warns(RuntimeWarning, match="branches=2"):
            assert tf.stats(tiny.model)["skipped"] == 0
    assert torch.equal(out, plain)


def test_item1_sync_free_call_that_raised_restarts(tiny):
    expected, want = _fresh(tiny)
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, sync_free=True):
        hook = _RaiseOnce(tiny.model)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                tiny.call(tiny.latents(1), torch.full((1,), 0.5), 0)
        finally:
            hook.handle.remove()
        out = euler_sample(tiny, tiny.latents(1), STEPS)
        assert _pattern(tf.stats(tiny.model)) == want
    assert torch.equal(out, expected)


def _truncated_cfg(call_c, call_u, x0, trunc=6, g=3.0):
    s = sigmas(STEPS)
    x = x0.clone()
    for i in range(STEPS):
        t = torch.full((1,), s[i])
        v = call_c(x, t)
        if i < trunc:
            vu = call_u(x, t)
            v = vu + g * (v - vu)
        x = x + (s[i + 1] - s[i]) * v
    return x


def test_item2_cfg_truncation_without_a_pipeline(tiny):
    x0 = tiny.latents(1)
    copies = [tiny_flux(0), tiny_flux(0)]
    for c in copies:
        tf.apply_teacache(c.model, threshold=0.5, num_steps=STEPS)
    expected = _truncated_cfg(lambda x, t: copies[0].call(x, t, 0),
                              lambda x, t: copies[1].call(x, t, 1), x0)
    want = {b: _pattern(tf.stats(c.model))[0] for b, c in enumerate(copies)}
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS):
        out = _truncated_cfg(lambda x, t: tiny.call(x, t, 0), lambda x, t: tiny.call(x, t, 1), x0)
        st = tf.stats(tiny.model)
    assert _pattern(st) == want and len(want[0]) == STEPS and len(want[1]) == 6
    assert "." in want[0] and want[0][-1] == "C"
    assert torch.equal(out, expected)


def test_item2_branches_given_when_each_branch_gets_its_own_latents(tiny):
    """A loop that copies the latents for each branch: learning cannot tell its
    uncond call from a restart, branches=2 says it (round robin)."""
    x0 = tiny.latents(1)
    copies = [tiny_flux(0), tiny_flux(0)]
    for c in copies:
        tf.apply_teacache(c.model, threshold=0.5, num_steps=STEPS)
    expected = _truncated_cfg(lambda x, t: copies[0].call(x.clone(), t, 0),
                              lambda x, t: copies[1].call(x.clone(), t, 1), x0, trunc=STEPS)
    want = {b: _pattern(tf.stats(c.model))[0] for b, c in enumerate(copies)}
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS, branches=2):
        tiny.call(tiny.latents(1, seed=3), torch.ones(1), 0)   # a warm-up, then tf.reset
        tf.reset(tiny.model)
        out = _truncated_cfg(lambda x, t: tiny.call(x.clone(), t, 0),
                             lambda x, t: tiny.call(x.clone(), t, 1), x0, trunc=STEPS)
        st = tf.stats(tiny.model)
    assert _pattern(st) == want and "." in want[0]
    assert torch.equal(out, expected)


def test_item3_two_threads_get_a_clear_error_never_a_wrong_result(tiny):
    """The second concurrent call raises at once; the first is unaffected."""
    x, t = tiny.latents(1), torch.ones(1)
    plain = tiny.call(x, t, 0)
    inside, release = threading.Event(), threading.Event()

    def hold(module, inputs):
        inside.set()
        assert release.wait(10)
    tf.apply_teacache(tiny.model, threshold=0.0, num_steps=STEPS)
    handle = tiny.model.transformer_blocks[0].register_forward_pre_hook(hold)
    results = {}

    def first():
        with torch.no_grad():
            results["first"] = tiny.call(x, t, 0)
    try:
        th = threading.Thread(target=first)
        th.start()
        assert inside.wait(10)
        handle.remove()
        with pytest.raises(RuntimeError, match="already running a call.*one thread at a time"):
            tiny.call(x, t, 1)
        release.set()
        th.join(10)
        # the model works again once the first call is done
        again = tiny.call(x, t, 0)
    finally:
        release.set()
        tf.remove_teacache(tiny.model)
    assert torch.equal(results["first"], plain)
    assert again.shape == plain.shape


def test_item3_sync_free_two_threads_clear_error(tiny):
    x, t = tiny.latents(1), torch.ones(1)
    inside, release = threading.Event(), threading.Event()
    tf.apply_teacache(tiny.model, threshold=0.0, num_steps=STEPS, sync_free=True)
    handle = tiny.model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, i: (inside.set(), release.wait(10)) and None)
    try:
        th = threading.Thread(target=lambda: torch.no_grad()(tiny.call)(x, t, 0))
        th.start()
        assert inside.wait(10)
        handle.remove()
        with pytest.raises(RuntimeError, match="already running a call"):
            tiny.call(x, t, 1)
        release.set()
        th.join(10)
    finally:
        release.set()
        tf.remove_teacache(tiny.model)


def _never_skips_the_last_step(st):
    return all(v["steps"][-1] for v in st["branches"].values())


def test_item4_batch_change_mid_run_keeps_the_final_step(tiny):
    """Batched CFG (batch 2) dropped after step 6: the final step computes."""
    s = sigmas(STEPS)
    with tf.teacache(tiny.model, threshold=50.0, num_steps=STEPS):
        x = tiny.latents(1)
        for i in range(STEPS):
            if i < 6:
                xx = torch.cat([x, x])
                v = tiny.call(xx, torch.full((2,), s[i]), [0, 1])
                v = v[1:] + 3.0 * (v[:1] - v[1:])
            else:
                v = tiny.call(x, torch.full((1,), s[i]), 0)
            x = x + (s[i + 1] - s[i]) * v
        st = tf.stats(tiny.model)
    assert _pattern(st) == {0: "C.....C..C"}, _pattern(st)
    assert st["restarts"] == {}


def test_item4_timestep_rising_once_mid_run_keeps_the_final_step(tiny):
    ts = [1.0, 0.9, 0.8, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    with tf.teacache(tiny.model, threshold=50.0, num_steps=STEPS):
        x = tiny.latents(1)
        for t in ts:
            x = x + 0.1 * tiny.call(x, torch.full((1,), t), 0)
        st = tf.stats(tiny.model)
    assert st["restarts"] == {"timestep rose": 1}
    assert _never_skips_the_last_step(st), _pattern(st)


def test_item4_pipeline_loop_without_scheduler_step_keeps_the_final_step(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Pipe:
        transformer = tiny.model
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = Pipe()
    with tf.teacache(pipe, threshold=50.0):
        pipe.scheduler.set_timesteps(STEPS)
        euler_sample(tiny, tiny.latents(1), STEPS, guidance=3.0)   # its own Euler steps
        st = tf.stats(pipe)
    assert _pattern(st) == {0: "C........C", 1: "C........C"}, _pattern(st)
    assert st["restarts"] == {"set_timesteps": 1}


def test_item10_sync_free_cfg_without_branches_warns_and_is_exact(tiny):
    plain = euler_sample(tiny, tiny.latents(1), STEPS, guidance=3.0)
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, sync_free=True):
        out = euler_sample(tiny, tiny.latents(1), STEPS, guidance=3.0)
        with pytest.warns(RuntimeWarning, match="branches=2"):
            st = tf.stats(tiny.model)
    assert torch.equal(out, plain)   # every call computed: never the other branch's state
    assert st["skipped"] == 0
    # with branches=2 it caches, and no warning
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, sync_free=True, branches=2):
        euler_sample(tiny, tiny.latents(1), STEPS, guidance=3.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tf.stats(tiny.model)["skipped"] > 0


def test_item10_sync_free_after_inference_mode_works_under_no_grad(tiny):
    expected, want = _fresh(tiny)
    with tf.teacache(tiny.model, threshold=THRESHOLD, num_steps=STEPS, sync_free=True):
        with torch.inference_mode():
            first = euler_sample(tiny, tiny.latents(1), STEPS)
        with torch.no_grad():
            second = euler_sample(tiny, tiny.latents(1), STEPS)
        assert _pattern(tf.stats(tiny.model)) == want
    assert torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.parametrize("sync_free", [False, True])
def test_item12_pipeline_called_before_set_timesteps_is_an_error(tiny, sync_free):
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Pipe:
        transformer = tiny.model
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    with tf.teacache(Pipe(), threshold=THRESHOLD, sync_free=sync_free):
        with pytest.raises(RuntimeError, match="set_timesteps"):
            tiny.call(tiny.latents(1), torch.ones(1), 0)
        assert tf.stats(tiny.model)["num_steps"] is None


def test_threshold_zero_stays_bitwise_identical_over_irregular_sequences(tiny):
    x = tiny.latents(1)
    s = sigmas(STEPS)
    seq = ([(1.0, 0)] + [(s[i], b) for i in range(3) for b in (0, 1)]
           + [(s[i], b) for i in range(STEPS) for b in ((0, 1) if i < 4 else (0,))])
    plain = [tiny.call(x, torch.full((1,), t), b) for t, b in seq]
    with tf.teacache(tiny.model, threshold=0.0, num_steps=STEPS):
        cached = [tiny.call(x, torch.full((1,), t), b) for t, b in seq]
        assert tf.stats(tiny.model)["skipped"] == 0
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))
