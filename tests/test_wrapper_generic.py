"""A model without a preset: the caller describes it with an Adapter."""
import pytest
import torch

import teacache_fast as tf
from teacache_fast.models import Adapter

from toy_models import Block, ToyDiT, toy_adapter
from toy_models import sample as toy_sample

STEPS = 8


def sample(model, x):
    return toy_sample(model, x, STEPS)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyDiT().eval()


@torch.no_grad()
def test_custom_adapter_exact_at_zero_and_skips_above(toy):
    x0 = torch.randn(2, 6, 4)
    plain = sample(toy, x0)
    kw = dict(adapter=toy_adapter(), coefficients=[1.0, 0.0], num_steps=STEPS)
    with tf.teacache(toy, threshold=0.0, **kw):
        assert torch.equal(sample(toy, x0), plain)
    with tf.teacache(toy, threshold=0.3, **kw):
        cached = sample(toy, x0)
        st = tf.stats(toy)
    assert st["preset"] == "toy" and 2 <= st["computed"] < STEPS
    assert not torch.equal(cached, plain)
    assert torch.equal(sample(toy, x0), plain)


@torch.no_grad()
def test_custom_adapter_with_an_embedding_indicator(toy):
    """The indicator may be any tensor, e.g. the time embedding (as for Wan)."""
    adapter = Adapter(name="toy-emb", blocks=lambda m: list(m.blocks), stream="x",
                      indicator=lambda call: call["emb"])
    with tf.teacache(toy, adapter=adapter, threshold=0.5, coefficients=[1.0, 0.0], num_steps=STEPS):
        sample(toy, torch.randn(1, 6, 4))
        st = tf.stats(toy)["branches"][0]
    assert st["steps"][0] and st["steps"][-1] and st["skipped"] > 0


def test_custom_adapter_errors(toy):
    with pytest.raises(ValueError, match="coefficients are required"):
        tf.apply_teacache(toy, adapter=toy_adapter(), num_steps=STEPS)
    with pytest.raises(ValueError, match="either adapter= or preset="):
        tf.apply_teacache(toy, adapter=toy_adapter(), preset="flux", coefficients=[1.0], num_steps=4)
    with pytest.raises(ValueError, match="passthrough is required"):
        Adapter(name="bad", blocks=lambda m: [], indicator=lambda c: None, output_index=1)
    empty = Adapter(name="empty", blocks=lambda m: [], indicator=lambda c: None)
    with pytest.raises(ValueError, match="found no blocks"):
        tf.apply_teacache(toy, adapter=empty, coefficients=[1.0], num_steps=4)
    with pytest.raises(TypeError, match="nn.Module or a pipeline"):
        tf.apply_teacache(object(), num_steps=4)
    assert not any("forward" in m.__dict__ for m in toy.modules())


@pytest.mark.parametrize("layout", ["extra_at_end", "extra_at_start", "reversed"])
def test_adapter_listing_blocks_the_model_does_not_run_is_a_clear_error(toy, layout):
    """Issue 15, item 6: a listed block that never runs (or the wrong order)
    must not silently pass the stack's input through, nor crash deep inside."""
    unused = Block(16)

    def blocks(m):
        run = list(m.blocks) + list(m.late_blocks)
        return {"extra_at_end": run + [unused], "extra_at_start": [unused] + run,
                "reversed": run[::-1]}[layout]
    adapter = Adapter(name="wrong", blocks=blocks, indicator=toy_adapter().indicator, stream="x")
    x = torch.randn(1, 5, 4)
    tf.apply_teacache(toy, adapter=adapter, threshold=0.5, num_steps=STEPS, coefficients=[1.0, 0.0])
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="Adapter.blocks must return exactly"):
            toy(x, torch.tensor([0.9]))
    finally:
        tf.remove_teacache(toy)
