"""A skipped call leaves the model's block loops after block 0 (Adapter.block_lists):
only block 0 (the decision) and the block that ends the span run, the output is
the same as with every skipped block called, and removal gives the lists back."""
import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn

import teacache_fast as tf
from teacache_fast.models import adapter_for

from tiny_models import euler_sample, single_thread, tiny_flux, tiny_wan

STEPS = 8
pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def flux24():
    with single_thread():
        yield tiny_flux(0, num_layers=2, num_single_layers=4)


def _count_block_calls(model, blocks):
    counts = [0] * len(blocks)
    handles = [b.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(blocks)]
    return counts, handles


def _run(tiny, adapter, threshold):
    blocks = adapter.blocks(tiny.model)
    counts, handles = _count_block_calls(tiny.model, blocks)
    try:
        with tf.teacache(tiny.model, adapter=adapter, threshold=threshold, num_steps=STEPS):
            out = euler_sample(tiny, tiny.latents(1), STEPS)
            st = tf.stats(tiny.model)
    finally:
        for h in handles:
            h.remove()
    return out, st, counts


@pytest.mark.parametrize("make", [lambda: tiny_flux(0, num_layers=2, num_single_layers=4),
                                  lambda: tiny_wan(0)], ids=["flux", "wan"])
def test_skipped_calls_run_block_zero_and_the_span_end_only(make):
    tiny = make()
    gated = adapter_for(tiny.model, variant="t2v-1.3b" if tiny.name == "wan" else None)
    assert gated.block_lists is not None
    ungated = dataclasses.replace(gated, block_lists=None)
    out_gated, st, counts = _run(tiny, gated, 1e9)
    out_plain, st_plain, counts_plain = _run(tiny, ungated, 1e9)
    computed = st["branches"][0]["computed"]
    assert computed == st_plain["branches"][0]["computed"] and 2 <= computed < STEPS
    n = len(counts)
    # block 0 and the last block run on every call; the others only on computed ones
    assert counts[0] == counts[-1] == STEPS
    assert counts[1:-1] == [computed] * (n - 2)
    assert counts_plain == [STEPS] * n          # without the gate every block is called
    assert torch.equal(out_gated, out_plain)    # the same output either way


def test_threshold_zero_bitwise_and_removal_restores_the_lists(flux24):
    model = flux24.model
    x0 = flux24.latents(1)
    plain = euler_sample(flux24, x0, STEPS)
    kinds = [type(model.transformer_blocks), type(model.single_transformer_blocks)]
    tf.apply_teacache(model, threshold=0.0, num_steps=STEPS)
    assert type(model.transformer_blocks) is not nn.ModuleList
    assert isinstance(model.transformer_blocks, nn.ModuleList)
    assert len(list(model.single_transformer_blocks)) == 4   # outside a call: every block
    cached = euler_sample(flux24, x0, STEPS)
    with pytest.raises(TypeError, match="remove_teacache"):
        copy.deepcopy(model.transformer_blocks)
    with pytest.raises(TypeError, match="remove_teacache"):
        pickle.dumps(model.single_transformer_blocks)
    tf.remove_teacache(model)
    assert torch.equal(cached, plain)
    assert [type(model.transformer_blocks), type(model.single_transformer_blocks)] == kinds
    assert "_gate" not in model.transformer_blocks.__dict__
    assert torch.equal(euler_sample(flux24, x0, STEPS), plain)


def test_block_lists_that_do_not_hold_the_blocks_are_a_clear_error(flux24):
    adapter = dataclasses.replace(adapter_for(flux24.model),
                                  block_lists=lambda m: [m.transformer_blocks])
    with pytest.raises(ValueError, match="block_lists"):
        tf.apply_teacache(flux24.model, adapter=adapter, threshold=0.5, num_steps=STEPS)
    assert type(flux24.model.transformer_blocks) is nn.ModuleList   # nothing left behind
    assert not tf.is_cached(flux24.model)


def test_sync_free_mode_does_not_gate(flux24):
    tf.apply_teacache(flux24.model, threshold=0.5, num_steps=STEPS, sync_free=True)
    try:
        assert type(flux24.model.transformer_blocks) is nn.ModuleList
    finally:
        tf.remove_teacache(flux24.model)
