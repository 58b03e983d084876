"""per_sample=True: every sample of a batch decides alone."""
import dataclasses

import pytest
import torch

import teacache_fast as tf
from teacache_fast.models import flux

from tiny_models import euler_sample, sigmas, single_thread

STEPS = 10
# poly(r) = r: the plain accumulated relative L1, so samples that move at
# different speeds reach the threshold at different steps
LINEAR = [1.0, 0.0]


@pytest.fixture(scope="module", autouse=True)
def _setup():
    with single_thread(), torch.no_grad():
        yield



def _latents(tiny):
    # three samples with different amplitudes move at different relative speeds
    return tiny.latents(3) * torch.tensor([1.0, 0.3, 3.0]).view(3, 1, 1)


@pytest.mark.parametrize("subset", [True, False], ids=["sliced-batch", "full-batch"])
def test_differing_decisions_equal_each_sample_alone(tiny, subset):
    x0 = _latents(tiny)
    adapter = dataclasses.replace(flux.adapter(tiny.model), subset=subset)
    batches = []  # batch sizes the blocks' insides really ran on
    hook = tiny.model.single_transformer_blocks[0].norm.register_forward_pre_hook(
        lambda mod, args: batches.append(args[0].shape[0]))
    try:
        with tf.teacache(tiny.model, adapter=adapter, threshold=0.15, coefficients=LINEAR,
                         num_steps=STEPS, per_sample=True):
            out = euler_sample(tiny, x0, STEPS)
            st = tf.stats(tiny.model)["branches"][0]
    finally:
        hook.remove()
    assert (min(batches) < 3) == subset
    alone_steps = []
    for k in range(3):
        with tf.teacache(tiny.model, threshold=0.15, coefficients=LINEAR, num_steps=STEPS):
            alone = euler_sample(tiny, x0[k:k + 1], STEPS)
            alone_steps.append(tf.stats(tiny.model)["branches"][0]["steps"])
        torch.testing.assert_close(out[k:k + 1], alone, rtol=1e-5, atol=1e-5)
    counts = [s.count(True) for s in alone_steps]
    assert st["sample_computed"] == counts
    assert st["sample_skipped"] == [STEPS - c for c in counts]
    assert len(set(counts)) > 1, "the samples must disagree, or the test proves nothing"
    # a step is counted as computed when any sample computed
    assert st["steps"] == [any(s[i] for s in alone_steps) for i in range(STEPS)]
    assert len(st["rel_l1"][1]) == 3


def test_batch_concatenated_cfg_equals_two_calls(tiny):
    """[cond, uncond] in one batch with per_sample == separate branches of two calls."""
    x0 = tiny.latents(1)
    g = 3.0
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS):
        two_calls = euler_sample(tiny, x0, STEPS, guidance=g)
        st2 = tf.stats(tiny.model)["branches"]
    s = sigmas(STEPS)
    x = x0.clone()
    with tf.teacache(tiny.model, threshold=0.5, num_steps=STEPS, per_sample=True):
        for i in range(STEPS):
            v = tiny.call(torch.cat([x, x]), torch.full((2,), s[i]), [0, 1])
            x = x + (s[i + 1] - s[i]) * (v[1:] + g * (v[:1] - v[1:]))
        st = tf.stats(tiny.model)["branches"]
    assert list(st) == [0]
    assert st[0]["sample_computed"] == [st2[0]["computed"], st2[1]["computed"]]
    assert st2[0]["skipped"] > 0
    torch.testing.assert_close(x, two_calls, rtol=1e-5, atol=1e-5)


def test_per_sample_threshold_zero_is_bitwise_identical(tiny):
    x0 = _latents(tiny)
    plain = euler_sample(tiny, x0, STEPS)
    with tf.teacache(tiny.model, threshold=0.0, num_steps=STEPS, per_sample=True):
        out = euler_sample(tiny, x0, STEPS)
    assert torch.equal(out, plain)


def test_per_sample_with_cpu_cache_in_float32(tiny):
    x0 = _latents(tiny)
    kw = dict(threshold=0.15, coefficients=LINEAR, num_steps=STEPS, per_sample=True)
    with tf.teacache(tiny.model, **kw):
        ref = euler_sample(tiny, x0, STEPS)
    with tf.teacache(tiny.model, cache_device="cpu", cache_dtype=torch.float16, **kw):
        half = euler_sample(tiny, x0, STEPS)
    assert not torch.equal(half, ref)
    torch.testing.assert_close(half, ref, rtol=0.02, atol=0.02)
