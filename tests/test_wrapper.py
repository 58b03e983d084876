"""The caching wrapper on a tiny FLUX: exactness, skipping, state, restore."""
import numpy as np
import pytest
import torch

import teacache_fast as tf
from teacache_fast.models import flux

from reference_teacache import ReferenceTeaCacheFlux
from tiny_models import euler_sample, sigmas, single_thread, tiny_flux

STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield



pytestmark = pytest.mark.usefixtures("no_grad")


def _run(tiny, threshold, steps=STEPS, batch=1, seed=0, **kw):
    x0 = tiny.latents(batch, seed)
    with tf.teacache(tiny.model, threshold=threshold, num_steps=steps, **kw):
        out = euler_sample(tiny, x0, steps)
        st = tf.stats(tiny.model)
    return out, st


def test_threshold_zero_is_bitwise_identical_and_remove_restores(tiny):
    x0 = tiny.latents(1)
    sd = tiny.model.state_dict()
    params = [id(p) for p in tiny.model.parameters()]
    forwards = [type(b).forward for b in tiny.model.transformer_blocks]
    plain = euler_sample(tiny, x0, STEPS)
    tf.apply_teacache(tiny.model, threshold=0.0, num_steps=STEPS)
    assert list(tiny.model.state_dict()) == list(sd)
    assert [id(p) for p in tiny.model.parameters()] == params
    cached = euler_sample(tiny, x0, STEPS)
    st = tf.stats(tiny.model)
    tf.remove_teacache(tiny.model)
    assert torch.equal(cached, plain)
    assert st["branches"][0]["computed"] == STEPS and st["skipped"] == 0
    assert all("forward" not in b.__dict__ for b in tiny.model.transformer_blocks)
    assert "forward" not in tiny.model.__dict__
    assert [type(b).forward for b in tiny.model.transformer_blocks] == forwards
    after = tiny.model.state_dict()
    assert list(after) == list(sd) and all(torch.equal(after[k], sd[k]) for k in sd)
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain)


def test_positive_threshold_skips_with_first_and_last_computed(tiny):
    out, st = _run(tiny, 0.6)
    b = st["branches"][0]
    assert st["calls"] == STEPS and b["computed"] + b["skipped"] == STEPS
    assert 2 <= b["computed"] < STEPS
    assert b["steps"][0] and b["steps"][-1]
    assert b["steps"].count(True) == b["computed"] and b["sample_computed"] == [b["computed"]]
    assert len(b["rel_l1"]) == STEPS and all(0 < r < 1 for r in b["rel_l1"][1:])
    plain = euler_sample(tiny, tiny.latents(1), STEPS)
    assert not torch.equal(out, plain)
    assert torch.allclose(out, plain, atol=0.2)


@pytest.mark.parametrize("threshold", [0.25, 0.4, 0.6, 0.8])
def test_parity_with_reference(tiny, threshold):
    coeffs = list(flux.VARIANTS["dev"].coefficients)
    ref = ReferenceTeaCacheFlux(tiny.model, threshold, STEPS, coeffs)
    inner = tiny.call

    def ref_call(latents, t, branch=0):
        kwargs = {}

        def capture(**kw):
            kwargs.update(kw)
            return (None,)
        tiny.model.__dict__["forward"] = capture  # record the arguments tiny.call builds
        try:
            inner(latents, t, branch)
        finally:
            del tiny.model.__dict__["forward"]
        kwargs.pop("return_dict")
        return ref(**kwargs)

    x0 = tiny.latents(1)
    s = sigmas(STEPS)
    x = x0.clone()
    for i in range(STEPS):
        x = x + (s[i + 1] - s[i]) * ref_call(x, torch.full((1,), s[i]))
    out, st = _run(tiny, threshold)
    decisions = st["branches"][0]["steps"]
    assert decisions == ref.decisions
    assert 0 < decisions.count(False) < STEPS - 2, "the thresholds must skip some steps, not all"
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_cfg_two_calls_per_step_keep_separate_state(tiny):
    x0 = tiny.latents(1)
    # expected: one independent cache per branch, emulated with two wrappers on
    # two copies of the same model (a model instance holds one cache)
    copies = [tiny_flux(0), tiny_flux(0)]
    for c in copies:
        tf.apply_teacache(c.model, threshold=0.5, num_steps=STEPS)
    s = sigmas(STEPS)
    x = x0.clone()
    for i in range(STEPS):
        t = torch.full((1,), s[i])
        vc, vu = copies[0].call(x, t, 0), copies[1].call(x, t, 1)
        x = x + (s[i + 1] - s[i]) * (vu + 3.0 * (vc - vu))
    expected_steps = [tf.stats(c.model)["branches"][0]["steps"] for c in copies]
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS):
        out = euler_sample(tiny, x0, STEPS, guidance=3.0)
        st = tf.stats(tiny.model)
    assert sorted(st["branches"]) == [0, 1]
    assert [st["branches"][b]["steps"] for b in (0, 1)] == expected_steps
    assert any(not f for f in expected_steps[0] + expected_steps[1])
    assert torch.equal(out, x)


def test_explicit_branches_match_learnt_ones(tiny):
    x0 = tiny.latents(1)
    outs = []
    for branches in (None, 2):
        with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS, branches=branches):
            outs.append(euler_sample(tiny, x0, STEPS, guidance=3.0))
            assert sorted(tf.stats(tiny.model)["branches"]) == [0, 1]
    assert torch.equal(outs[0], outs[1])


def test_branches_relearnt_when_timesteps_are_costly_to_read(tiny, monkeypatch):
    """As with GPU timesteps (issue 15 item 1 changed this test: reading only
    during the first step let any interrupted run leak into the next): the
    timestep is read on every call, the branches relearnt at every generation."""
    from teacache_fast.cache import clock
    real = clock.timestep_value
    reads = []

    def only_when_needed(t, must_read):
        reads.append(must_read)
        return real(t, must_read) if must_read else None
    monkeypatch.setattr(clock, "timestep_value", only_when_needed)
    x0 = tiny.latents(1)
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS):
        for _ in range(2):
            out = euler_sample(tiny, x0, STEPS, guidance=3.0)
            st = tf.stats(tiny.model)
            assert sorted(st["branches"]) == [0, 1] and st["calls"] == 2 * STEPS
    monkeypatch.undo()
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS):
        expected = euler_sample(tiny, x0, STEPS, guidance=3.0)
        assert tf.stats(tiny.model)["branches"] == st["branches"]
    assert torch.equal(out, expected)
    # read on every call (2 generations x 2 branches x STEPS), never skipped
    assert reads == [True] * (2 * 2 * STEPS)


def test_observer_sees_every_computed_step(tiny):
    seen = []

    def observer(branch, step, partials, stream_in, stream_out):
        seen.append((branch, step, partials.shape, stream_out.shape == stream_in.shape))
    _, st = _run(tiny, 0.0, observer=observer)
    assert [s[1] for s in seen] == list(range(STEPS))
    assert all(s[0] == 0 and s[2] == (2,) and s[3] for s in seen)


def test_reset_and_new_generation(tiny):
    x0 = tiny.latents(1)
    with tf.teacache(tiny.model, threshold=0.6, num_steps=STEPS):
        a = euler_sample(tiny, x0, STEPS)
        st1 = tf.stats(tiny.model)
        b = euler_sample(tiny, x0, STEPS)  # the count wrapped: a fresh generation
        st2 = tf.stats(tiny.model)
        tf.reset(tiny.model)
        assert tf.stats(tiny.model)["calls"] == 0
        c = euler_sample(tiny, x0, STEPS)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert st1["branches"][0]["steps"] == st2["branches"][0]["steps"]
    assert st2["generations"] == st1["generations"] + 1


def test_timestep_going_back_up_starts_a_new_generation(tiny):
    x0 = tiny.latents(1)
    with tf.teacache(tiny.model, threshold=0.6, num_steps=STEPS):
        euler_sample(tiny, x0, 4)  # an aborted generation: 4 of 10 steps
        a = euler_sample(tiny, x0, STEPS)
    b, _ = _run(tiny, 0.6)
    assert torch.equal(a, b)


def test_rising_timesteps_lumina_style(tiny):
    """Pipelines whose timestep counts up (Lumina: 1 - t) restart only when it goes back down."""
    def loop(n):
        s = sigmas(n)
        x = tiny.latents(1)
        for i in range(n):
            x = x + (s[i + 1] - s[i]) * tiny.call(x, torch.full((1,), 1.0 - s[i]))
        return x
    with tf.teacache(tiny.model, threshold=0.6, num_steps=STEPS):
        loop(4)  # aborted
        a = loop(STEPS)
        st = tf.stats(tiny.model)
    with tf.teacache(tiny.model, threshold=0.6, num_steps=STEPS):
        b = loop(STEPS)
        st_alone = tf.stats(tiny.model)
    assert torch.equal(a, b) and st["branches"] == st_alone["branches"]
    assert 0 < st["skipped"] and st["generations"] == st_alone["generations"] + 1


def test_shape_change_and_varying_sizes_reset_state(tiny):
    """10 runs in a row through one cached model, each as if it ran alone."""
    sizes = [(1, 4, 4), (2, 4, 4), (1, 4, 6), (1, 2, 4), (3, 4, 4), (1, 4, 4), (2, 2, 2), (1, 6, 4),
             (2, 4, 4), (1, 4, 4)]
    outs = []
    with tf.teacache(tiny.model, threshold=0.6, num_steps=6):
        for batch, h, w in sizes:
            t = tiny_flux(0, height=h, width=w, model=tiny.model)
            outs.append(euler_sample(t, t.latents(batch), 6))
            assert tf.stats(tiny.model)["calls"] == 6
    for (batch, h, w), out in zip(sizes, outs):
        t = tiny_flux(0, height=h, width=w, model=tiny.model)
        with tf.teacache(tiny.model, threshold=0.6, num_steps=6):
            expected = euler_sample(t, t.latents(batch), 6)
        assert torch.equal(out, expected), (batch, h, w)


def test_shape_change_mid_generation_restarts(tiny):
    small = tiny_flux(0, height=2, width=2, model=tiny.model)
    with tf.teacache(tiny.model, threshold=0.6, num_steps=STEPS):
        euler_sample(small, small.latents(1), 3)  # aborted after 3 of 10 steps
        out = euler_sample(tiny, tiny.latents(1), STEPS)
    assert torch.equal(out, _run(tiny, 0.6)[0])


def test_cache_device_and_dtype(tiny):
    ref, st_ref = _run(tiny, 0.6)
    out, st = _run(tiny, 0.6, cache_device="cpu")
    assert torch.equal(out, ref) and st["branches"] == st_ref["branches"]
    half, st_half = _run(tiny, 0.6, cache_dtype=torch.bfloat16)
    assert st_half["branches"][0]["steps"] == st_ref["branches"][0]["steps"]
    assert not torch.equal(half, ref)
    torch.testing.assert_close(half, ref, rtol=0.05, atol=0.05)


def test_pipeline_gives_num_steps_from_its_scheduler(tiny):
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    pipe = _pipe(tiny)
    x0 = tiny.latents(1)

    def generate(n):
        # as FluxPipeline does: retrieve_timesteps inspects set_timesteps' signature
        retrieve_timesteps(pipe.scheduler, n, sigmas=np.linspace(1.0, 1 / n, n).tolist())
        x = x0.clone()
        for t in pipe.scheduler.timesteps:
            v = tiny.call(x, (t / 1000).expand(1))
            x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
        return x

    with tf.teacache(pipe, threshold=0.6):
        generate(8)
        st8 = tf.stats(pipe)
        generate(5)
        st5 = tf.stats(pipe)
    assert st8["num_steps"] == 8 and st8["calls"] == 8 and st8["branches"][0]["steps"][-1]
    assert st5["num_steps"] == 5 and st5["calls"] == 5 and st5["branches"][0]["steps"][-1]
    assert st8["skipped"] > 0
    assert "set_timesteps" not in pipe.scheduler.__dict__  # restored


def _pipe(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    class Pipe:  # the two attributes apply_teacache reads from a diffusers pipeline
        transformer = tiny.model
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    return Pipe()


def test_pipeline_cfg_truncation_keeps_branches_apart(tiny):
    """Lumina2's cfg_trunc_ratio: the uncond call stops part-way. The watched
    scheduler.step() marks steps, so the cond calls stay branch 0."""
    pipe, x0, g, n, trunc = _pipe(tiny), tiny.latents(1), 3.0, STEPS, 6

    def generate(vc_fn, vu_fn, step_fn):
        pipe.scheduler.set_timesteps(n)
        x = x0.clone()
        for i, t in enumerate(pipe.scheduler.timesteps):
            ts = (t / 1000).expand(1)
            v = vc_fn(x, ts)
            if i < trunc:
                vu = vu_fn(x, ts)
                v = vu + g * (v - vu)
            x = step_fn(v, t, x)
        return x

    with tf.teacache(pipe, threshold=0.5):
        out = generate(lambda x, t: tiny.call(x, t, 0), lambda x, t: tiny.call(x, t, 1),
                       lambda v, t, x: pipe.scheduler.step(v, t, x, return_dict=False)[0])
        st = tf.stats(pipe)
    assert "step" not in pipe.scheduler.__dict__
    # expected: one independent cache per branch, on two copies of the model
    copies = [tiny_flux(0), tiny_flux(0)]
    for c in copies:
        tf.apply_teacache(c.model, threshold=0.5, num_steps=n)
    expected = generate(lambda x, t: copies[0].call(x, t, 0), lambda x, t: copies[1].call(x, t, 1),
                        lambda v, t, x: pipe.scheduler.step(v, t, x, return_dict=False)[0])
    assert [st["branches"][b]["steps"] for b in (0, 1)] == \
        [tf.stats(c.model)["branches"][0]["steps"] for c in copies]
    assert len(st["branches"][0]["steps"]) == n and len(st["branches"][1]["steps"]) == trunc
    assert st["branches"][0]["steps"][-1] and st["skipped"] > 0
    assert torch.equal(out, expected)


def test_pipeline_loop_without_scheduler_step_falls_back(tiny):
    pipe, x0 = _pipe(tiny), tiny.latents(1)
    with tf.teacache(pipe, threshold=0.5):
        pipe.scheduler.set_timesteps(STEPS)
        out = euler_sample(tiny, x0, STEPS, guidance=3.0)  # its own Euler steps
        st = tf.stats(pipe)
        assert not tf.inspect(tiny.model).scheduler_watched
    assert sorted(st["branches"]) == [0, 1] and st["skipped"] > 0
    torch.testing.assert_close(out, euler_sample(tiny, x0, STEPS, guidance=3.0), atol=0.3, rtol=0)


def test_bad_config_errors(tiny):
    m = tiny.model
    with pytest.raises(ValueError, match="threshold"):
        tf.apply_teacache(m, threshold=-1, num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        tf.apply_teacache(m, threshold=0.2)
    with pytest.raises(ValueError, match="num_steps"):
        tf.apply_teacache(m, threshold=0.2, num_steps=0)
    with pytest.raises(ValueError, match="start"):
        tf.apply_teacache(m, num_steps=4, start=0.8, end=0.5)
    with pytest.raises(ValueError, match="coefficients"):
        tf.apply_teacache(m, num_steps=4, coefficients=[1.0, float("nan")])
    with pytest.raises(ValueError, match="cache_dtype"):
        tf.apply_teacache(m, num_steps=4, cache_dtype=torch.int8)
    with pytest.raises(ValueError, match="backend"):
        tf.apply_teacache(m, num_steps=4, backend="opencl")
    with pytest.raises(TypeError, match="unknown TeaCacheConfig field"):
        tf.apply_teacache(m, num_steps=4, treshold=0.3)
    with pytest.raises(ValueError, match="unknown FLUX variant 'schnell'.*dev"):
        tf.apply_teacache(m, num_steps=4, variant="schnell")
    with pytest.raises(ValueError, match="no TeaCache preset for Linear.*FluxTransformer2DModel.*adapter"):
        tf.apply_teacache(torch.nn.Linear(2, 2), num_steps=4)
    with pytest.raises(ValueError, match="no TeaCache attached"):
        tf.remove_teacache(m)
    assert "forward" not in m.__dict__  # failed applies left nothing behind
    tf.apply_teacache(m, num_steps=4)
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            tf.apply_teacache(m, num_steps=4)
    finally:
        tf.remove_teacache(m)


READS = ("tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _count_host_reads(monkeypatch, fn):
    """How often each tensor-to-host method ran during fn()."""
    counts = dict.fromkeys(READS, 0)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            counts[_name] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return counts


def test_one_host_read_of_the_flags_per_call(tiny, monkeypatch):
    x0 = tiny.latents(2)
    plain = _count_host_reads(monkeypatch, lambda: euler_sample(tiny, x0, STEPS))
    for per_sample in (False, True):
        tf.apply_teacache(tiny.model, threshold=0.6, num_steps=STEPS, per_sample=per_sample)
        try:
            cached = _count_host_reads(monkeypatch, lambda: euler_sample(tiny, x0, STEPS))
        finally:
            tf.remove_teacache(tiny.model)
        extra = {k: cached[k] - plain[k] for k in READS}
        # the flags, once per call; the timestep, read because it is on the CPU
        # (on a GPU it is read only during a generation's first step)
        assert extra == dict(dict.fromkeys(READS, 0), tolist=STEPS, __float__=STEPS), extra


@pytest.mark.parametrize("per_sample", [False, True])
def test_triton_backend_through_the_wrapper(tiny, per_sample):
    """The wrapper's ops on the Triton kernels (interpreted on CPU) decide and
    cache like the torch backend."""
    pytest.importorskip("triton")
    x0 = tiny.latents(2) * torch.tensor([1.0, 0.3]).view(2, 1, 1)
    kw = dict(threshold=0.15, coefficients=[1.0, 0.0], num_steps=6, per_sample=per_sample)
    with tf.teacache(tiny.model, backend="torch", **kw):
        ref = euler_sample(tiny, x0, 6)
        st_ref = tf.stats(tiny.model)["branches"]
    with tf.teacache(tiny.model, backend="triton", **kw):
        out = euler_sample(tiny, x0, 6)
        st = tf.stats(tiny.model)["branches"]
    assert [b["steps"] for b in st.values()] == [b["steps"] for b in st_ref.values()]
    assert [b["sample_computed"] for b in st.values()] == [b["sample_computed"] for b in st_ref.values()]
    assert sum(st[0]["sample_skipped"]) > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_model_with_a_float32_cache():
    bf = tiny_flux(0)
    bf.model.to(torch.bfloat16)
    x0 = bf.latents(1).to(torch.bfloat16)
    plain = euler_sample(bf, x0, STEPS)
    with tf.teacache(bf.model, threshold=0.0, num_steps=STEPS):
        assert torch.equal(euler_sample(bf, x0, STEPS), plain)
    outs = {}
    for dtype in (None, torch.float32):
        with tf.teacache(bf.model, threshold=0.6, num_steps=STEPS, cache_dtype=dtype):
            outs[dtype] = euler_sample(bf, x0, STEPS)
            st = tf.stats(bf.model)["branches"][0]
            residual = tf.inspect(bf.model).branches[0].residual
            assert residual.dtype == (dtype or torch.bfloat16)
        assert st["skipped"] > 0 and outs[dtype].dtype == torch.bfloat16
    torch.testing.assert_close(outs[None], outs[torch.float32], rtol=0.05, atol=0.05)


def test_grad_mode_call_gets_a_clear_error():
    tiny = tiny_flux(0)
    tf.apply_teacache(tiny.model, threshold=0.4, num_steps=STEPS)
    try:
        with torch.enable_grad(), pytest.raises(RuntimeError, match="inference-only.*torch.no_grad"):
            tiny.call(tiny.latents(1), torch.full((1,), 1.0), 0)
        with torch.no_grad():  # the same model works once grad mode is off
            assert tiny.call(tiny.latents(1), torch.full((1,), 1.0), 0).shape[0] == 1
    finally:
        tf.remove_teacache(tiny.model)


def test_stats_report_the_bytes_the_cache_holds():
    tiny = tiny_flux(0)
    with tf.teacache(tiny.model, threshold=0.4, num_steps=STEPS):
        assert tf.stats(tiny.model)["cache_bytes"] == 0
        x = tiny.latents(1)
        euler_sample(tiny, x, STEPS)
        held = tf.stats(tiny.model)["cache_bytes"]
    # at least the previous modulated input and the residual, both shaped like the image stream
    assert held >= 2 * x.numel() * x.element_size()
