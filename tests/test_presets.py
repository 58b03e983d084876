"""Every preset on its tiny diffusers model: exactness, skipping, restore, CFG,
per-sample; plus the registry's errors and the forced-step rules."""
import statistics

import pytest
import torch

import teacache_fast as tf
from teacache_fast import models
from teacache_fast.models import base, cogvideox, wan

from tiny_models import TINY, euler_sample, single_thread
from tiny_models_2026 import TINY_2026

STEPS = 8
LINEAR = [1.0, 0.0]  # poly(r) = r: the skip pattern then follows the measured rel L1
VARIANT = {"wan": "t2v-1.3b"}  # Wan's checkpoint is not visible from a tiny config
# the last step is not forced for these rules
LAST_FORCED = {"hidream": False}
# the indicator is a timestep embedding: every sample of a batch decides alike
TIME_EMBEDDING_INDICATOR = {"cogvideox", "hidream", "wan", "consisid"}
# the 2025-26 families too (structure-only ones get LINEAR coefficients)
ALL = dict(TINY, **TINY_2026)
# Latte's stream has batch * frames rows: per-sample decisions would be per frame
NO_PER_SAMPLE = {"latte"}
# Z-Image takes its latents as a list, so the clock cannot tell a second CFG
# call from a restart by the latents; its pipeline batches CFG in one call
# (one branch, per-sample below), so two-call CFG is not tested for it
NO_TWO_CALL_CFG = {"z_image"}


@pytest.fixture(scope="module", autouse=True)
def _setup():
    with single_thread(), torch.no_grad():
        yield


def _apply(tiny, name, **kw):
    if models.adapter_for(tiny.model, variant=VARIANT.get(name)).coefficients is None:
        kw.setdefault("coefficients", LINEAR)  # structure only: no published set
    return tf.apply_teacache(tiny.model, num_steps=STEPS, variant=VARIANT.get(name), **kw)


def _no_shadows(model):
    return not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.filterwarnings("ignore:In CPU autocast")
@pytest.mark.parametrize("name", sorted(TINY))
def test_preset_full_loop(name):
    tiny = TINY[name](0)
    model = tiny.model
    assert models.adapter_for(model, variant=VARIANT.get(name)).name == name
    keys = list(model.state_dict())
    x0 = tiny.latents(2)
    plain = euler_sample(tiny, x0, STEPS)

    # threshold 0: bitwise identical, every step computed
    _apply(tiny, name, threshold=0.0)
    assert list(model.state_dict()) == keys
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain)
    st = tf.stats(model)
    assert st["computed"] == STEPS and st["skipped"] == 0 and st["preset"] == name
    rel = [r for r in st["branches"][0]["rel_l1"][1:]]
    tf.remove_teacache(model)

    # a threshold of ~2.5 steps' worth of change: some steps skip, not all
    threshold = 2.5 * statistics.median(rel)
    _apply(tiny, name, threshold=threshold, coefficients=LINEAR)
    cached = euler_sample(tiny, x0, STEPS)
    b = tf.stats(model)["branches"][0]
    tf.remove_teacache(model)
    assert 2 <= b["computed"] < STEPS and b["computed"] + b["skipped"] == STEPS
    assert b["steps"][0]
    if LAST_FORCED.get(name, True):
        assert b["steps"][-1]
    assert b["sample_computed"] == [b["computed"]] * 2
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()

    # removed: the original model, bit for bit
    assert _no_shadows(model) and list(model.state_dict()) == keys
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain)


@pytest.mark.filterwarnings("ignore:In CPU autocast")
@pytest.mark.parametrize("name", sorted(ALL))
def test_preset_cfg_and_per_sample(name):
    tiny = ALL[name](0)
    x0 = tiny.latents(1)
    # CFG with two calls per step: two branches, each with its own schedule
    if name not in NO_TWO_CALL_CFG:
        _apply(tiny, name, threshold=0.0)
        euler_sample(tiny, x0, STEPS, guidance=2.0)
        st = tf.stats(tiny.model)
        tf.remove_teacache(tiny.model)
        assert sorted(st["branches"]) == [0, 1] and st["calls"] == 2 * STEPS
        assert all(b["computed"] == STEPS for b in st["branches"].values())
    if name in NO_PER_SAMPLE:
        return

    # per sample: samples that move at different speeds decide apart, and each
    # equals its own run alone
    xs = tiny.latents(2) * torch.tensor([1.0, 4.0]).view(2, *[1] * (x0.dim() - 1))
    _apply(tiny, name, threshold=0.0, per_sample=True)
    euler_sample(tiny, xs, STEPS)
    per_sample_rel = tf.stats(tiny.model)["branches"][0]["rel_l1"]
    tf.remove_teacache(tiny.model)
    forced = models.adapter_for(tiny.model, variant=VARIANT.get(name)).forced
    kw = dict(threshold=_disagreeing_threshold(per_sample_rel, forced), coefficients=LINEAR)
    _apply(tiny, name, per_sample=True, **kw)
    batched = euler_sample(tiny, xs, STEPS)
    b = tf.stats(tiny.model)["branches"][0]
    tf.remove_teacache(tiny.model)
    alone_counts = []
    for k in range(2):
        _apply(tiny, name, **kw)
        alone = euler_sample(tiny, xs[k:k + 1], STEPS)
        alone_counts.append(tf.stats(tiny.model)["computed"])
        tf.remove_teacache(tiny.model)
        torch.testing.assert_close(batched[k:k + 1], alone, rtol=1e-4, atol=1e-4)
    assert b["sample_computed"] == alone_counts
    if name not in TIME_EMBEDDING_INDICATOR:
        assert len(set(map(tuple, _patterns(per_sample_rel, kw["threshold"], forced)))) > 1


def _patterns(rel_rows, threshold, forced):
    """Each sample's compute pattern, simulated on the host from a rel L1 trace."""
    n, out = len(rel_rows), []
    for k in range(len(rel_rows[0])):
        acc, steps = 0.0, []
        for i, row in enumerate(rel_rows):
            acc = 0.0 if i == 0 else acc + row[k]
            compute = i == 0 or forced(i, n) or acc >= threshold
            acc = 0.0 if compute else acc
            steps.append(compute)
        out.append(steps)
    return out


def _disagreeing_threshold(rel_rows, forced):
    """A threshold at which the samples decide differently (when any does)."""
    median = statistics.median(r for row in rel_rows[1:] for r in row)
    for factor in (2.5, 2.0, 3.0, 1.5, 3.5, 1.8, 2.2, 2.8):
        if len(set(map(tuple, _patterns(rel_rows, factor * median, forced)))) > 1:
            return factor * median
    return 2.5 * median


def test_registry_errors_and_variants():
    tiny = TINY["wan"](0)
    with pytest.raises(ValueError, match=r"Wan needs variant=.*t2v-1\.3b.*t2v-14b"):
        models.adapter_for(tiny.model)
    with pytest.raises(ValueError, match=r"unknown Wan variant 't2v-2b'; known variants: .*i2v-480p"):
        tf.apply_teacache(tiny.model, num_steps=4, variant="t2v-2b")
    assert _no_shadows(tiny.model)
    with pytest.raises(ValueError, match="unknown preset 'sdxl'; known presets"):
        models.adapter_for(tiny.model, preset="sdxl")
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel.*adapter=teacache_fast.models.Adapter"):
        tf.apply_teacache(torch.nn.Conv2d(1, 1, 1), num_steps=4)
    ret = models.adapter_for(tiny.model, variant="t2v-14b-ret")
    assert ret.coefficients == list(wan.FAMILY.variants["t2v-14b-ret"].coefficients)
    assert ret.coefficients[0] == -3.03318725e+05 and ret.threshold == 0.10
    assert models.adapter_for(tiny.model, preset="wan", variant="i2v-720p").threshold == 0.20
    cog = TINY["cogvideox"](0)
    assert models.adapter_for(cog.model).variant == "5b"
    assert cogvideox.FAMILY.variants["2b"].coefficients[0] == -3.10658903e+01
    listed = models.presets()
    assert set(listed) == set(TINY) | set(TINY_2026)
    assert listed["flux"]["variants"]["dev"]["thresholds"] == (0.25, 0.4, 0.6, 0.8)


def test_forced_step_rules():
    n = 20
    assert [s for s in range(n) if base.first_and_last(s, n)] == [0, 19]
    assert [s for s in range(n) if base.first_n(5)(s, n)] == [0, 1, 2, 3, 4]
    assert [s for s in range(n) if base.first_fraction(0.1)(s, n)] == [0, 1]
    assert [s for s in range(7) if base.first_fraction(0.1)(s, 7)] == [0]
    cfg = tf.TeaCacheConfig(ret_steps=3, start=0.2, end=0.9)
    assert [s for s in range(n) if cfg.forced(s, n, base.first_only)] == [0, 1, 2, 3, 18, 19]


def test_wan_ret_variant_forces_the_first_five_steps():
    tiny = TINY["wan"](0)
    x0 = tiny.latents(1)
    tf.apply_teacache(tiny.model, num_steps=STEPS, variant="t2v-1.3b-ret", threshold=1e9, coefficients=LINEAR)
    euler_sample(tiny, x0, STEPS)
    steps = tf.stats(tiny.model)["branches"][0]["steps"]
    tf.remove_teacache(tiny.model)
    assert steps == [True] * 5 + [False] * (STEPS - 5)
