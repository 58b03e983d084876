"""The host-cost benchmark's replica of the official TeaCache FLUX script decides and
computes exactly what the test oracle (reference_teacache.py) does."""
import pytest
import torch

pytest.importorskip("diffusers")

from reference_teacache import ReferenceTeaCacheFlux  # noqa: E402

from teacache_fast.cli import flux_model, replica, sampling  # noqa: E402

STEPS = 8


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1e9])
def test_replica_matches_the_reference(threshold):
    model, inputs = flux_model.build(flux_model.SPECS["smoke"], seed=3)
    sigmas = sampling.flux_sigmas(STEPS, image_seq_len=inputs.latents.shape[1])
    coefficients = flux_model.flux_preset()[1]
    ref = ReferenceTeaCacheFlux(model, threshold, STEPS, coefficients)

    def ref_call(m, **kw):
        return ref(kw["hidden_states"], kw["encoder_hidden_states"], kw["pooled_projections"],
                   kw["timestep"], kw["img_ids"], kw["txt_ids"])

    expected = sampling.euler_sample(model, inputs, sigmas, call=ref_call)
    replica.patch(model, threshold=threshold, num_steps=STEPS, coefficients=coefficients)
    try:
        got = sampling.euler_sample(model, inputs, sigmas)
        decisions = replica.decisions(model)
    finally:
        replica.unpatch(model)
    assert decisions == ref.decisions
    assert torch.equal(got, expected)
    if threshold == 0.0:
        assert all(decisions)
    if threshold == 1e9:
        assert decisions == [True] + [False] * (STEPS - 2) + [True]
    assert "forward" not in model.__dict__ and not hasattr(model, "teacache_decisions")
    # unpatched: the plain forward again, and it equals the replica at threshold 0 bit for bit
    plain = sampling.euler_sample(model, inputs, sigmas)
    replica.patch(model, threshold=0.0, num_steps=STEPS, coefficients=coefficients)
    try:
        assert torch.equal(sampling.euler_sample(model, inputs, sigmas), plain)
    finally:
        replica.unpatch(model)


def test_replica_refuses_a_second_patch_and_controlnet():
    model, inputs = flux_model.build(flux_model.SPECS["smoke"])
    replica.patch(model, threshold=0.0, num_steps=2, coefficients=[1.0])
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            replica.patch(model, threshold=0.0, num_steps=2, coefficients=[1.0])
        kw = sampling.flux_call_kwargs(inputs, inputs.latents.float(), 1.0)
        with pytest.raises(NotImplementedError, match="ControlNet"):
            model(**kw, controlnet_block_samples=[inputs.latents])
    finally:
        replica.unpatch(model)
