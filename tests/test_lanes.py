"""teacache_fast.lanes: the cache's prepared op calls. A call whose argument
signature passed the checks once goes straight to the backend; anything that
differs (shape, dtype, contiguity, backend, grad mode, a dispatch mode) goes
through the checked op again, so a lane never lets bad input through."""
from __future__ import annotations

import pytest
import torch

from op_oracles import RecordOps

from teacache_fast import lanes, ops
from teacache_fast.backends import use_backend


@pytest.fixture
def counted(monkeypatch):
    """Counts of the checked op calls the lanes make, by op name."""
    counts = {}

    def wrap(name):
        real = getattr(ops, name)

        def checked(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(ops, name, checked)

    for name in ("modulated_rel_l1_", "rel_l1_partials", "residual_capture_", "residual_apply_"):
        wrap(name)
    return counts


def _indicator_inputs(B, R, C, dtype, param_shape):
    g = torch.Generator().manual_seed(B * 1000 + R * 10 + C)
    x = torch.randn(B, R, C, generator=g).to(dtype)
    scale = torch.randn(*param_shape(B, C), generator=g).to(dtype)
    shift = torch.randn(*param_shape(B, C), generator=g).to(dtype)
    return x, scale, shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,R,C", [(1, 1, 3), (2, 7, 96), (3, 5, 130)])
@pytest.mark.parametrize("param_shape", [lambda B, C: (B, C), lambda B, C: (B, 1, C), lambda B, C: (1, C)],
                         ids=["BC", "B1C", "1C"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_indicator_lane_matches_the_op_bitwise(counted, dtype, B, R, C, param_shape, per_sample):
    lane = lanes.IndicatorLane()
    prev_lane = torch.zeros(B, R, C, dtype=dtype)
    prev_op = prev_lane.clone()
    with torch.no_grad():
        for step in range(3):  # the first call is checked, the next two go direct
            x, scale, shift = _indicator_inputs(B, R + step * 0, C, dtype, param_shape)
            x = x + step
            got = lane(x, scale, shift, prev_lane, "layer", 1e-6, per_sample)
            want = ops.modulated_rel_l1_(x, scale, shift, prev_op, "layer", 1e-6, per_sample)
            assert torch.equal(got, want) and torch.equal(prev_lane, prev_op)
    # three op calls for the reference, one for the lane
    assert counted["modulated_rel_l1_"] == 4


def test_indicator_lane_rechecks_on_any_change(counted):
    lane = lanes.IndicatorLane()
    x, scale, shift = _indicator_inputs(2, 4, 8, torch.float32, lambda B, C: (B, C))
    prev = torch.zeros_like(x)
    with torch.no_grad():
        lane(x, scale, shift, prev, "layer", 1e-6, False)
        lane(x, scale, shift, prev, "layer", 1e-6, False)
        assert counted["modulated_rel_l1_"] == 1
        lane(x, scale, shift, prev, "rms", 1e-6, False)           # another norm
        lane(x, scale, None, prev, "rms", 1e-6, False)            # no shift
        lane(x[:, :3], scale, None, prev[:, :3].contiguous(), "rms", 1e-6, False)  # another shape
        with use_backend("torch"):                                # another backend
            lane(x, scale, shift, prev, "layer", 1e-6, False)
        assert counted["modulated_rel_l1_"] == 5
        # strided x: checked (and shaped by ops) every time, never armed
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        lane(xt, scale, shift, prev, "layer", 1e-6, False)
        lane(xt, scale, shift, prev, "layer", 1e-6, False)
        assert counted["modulated_rel_l1_"] == 7
    # grad mode on: checked
    lane(x, scale, shift, prev, "layer", 1e-6, False)
    assert counted["modulated_rel_l1_"] == 8


def _armed_lane():
    """An indicator lane after one checked call, and that call's arguments."""
    lane = lanes.IndicatorLane()
    x, scale, shift = _indicator_inputs(1, 4, 8, torch.float32, lambda B, C: (B, C))
    prev = torch.zeros_like(x)
    with torch.no_grad():
        lane(x, scale, shift, prev, "layer", 1e-6, False)
    return lane, x, scale, shift, prev


def test_an_armed_lane_still_rejects_bad_input():
    lane, x, scale, shift, prev = _armed_lane()
    with torch.no_grad():
        with pytest.raises(TypeError, match="prev must have the dtype of x"):
            lane(x, scale, shift, prev.to(torch.bfloat16), "layer", 1e-6, False)
        with pytest.raises(ValueError, match="eps must be a finite number"):
            lane(x, scale, shift, prev, "layer", float("nan"), False)
        with pytest.raises(ValueError, match="scale must have shape"):
            lane(x, scale[:, :4], shift, prev, "layer", 1e-6, False)
    w = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="x requires grad"):
        lane(w, scale, shift, prev, "layer", 1e-6, False)


def test_a_dispatch_mode_sees_the_registered_op():
    lane, x, scale, shift, prev = _armed_lane()
    with torch.no_grad():
        with RecordOps() as mode:
            lane(x, scale, shift, prev, "layer", 1e-6, False)
    assert "teacache_fast.modulated_rel_l1_.default" in mode.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_embedding_lane_matches_the_op(counted, dtype, per_sample):
    lane = lanes.EmbeddingLane()
    prev_lane = torch.zeros(3, 17, dtype=dtype)
    prev_op = prev_lane.clone()
    with torch.no_grad():
        for step in range(3):
            x = (torch.randn(3, 17, generator=torch.Generator().manual_seed(step)) + 1).to(dtype)
            got = lane(x, prev_lane, per_sample)
            want = ops.rel_l1_partials(x, prev_op, per_sample)
            prev_op.copy_(x)
            assert torch.equal(got, want) and torch.equal(prev_lane, prev_op)
    assert counted["rel_l1_partials"] == 4


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5, 33), (1, 4097)])
def test_capture_and_apply_lanes_match_the_ops(counted, dtype, cache_dtype, shape):
    capture, apply = lanes.CaptureLane(), lanes.ApplyLane()
    res_lane = torch.empty(shape, dtype=cache_dtype)
    res_op = torch.empty_like(res_lane)
    with torch.no_grad():
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            inp = torch.randn(shape, generator=g).to(dtype)
            out = torch.randn(shape, generator=g).to(dtype)
            capture(out, inp, res_lane)
            ops.residual_capture_(out, inp, res_op)
            assert torch.equal(res_lane, res_op)
            got = apply(inp, res_lane)
            want = torch.empty_like(inp)
            ops.residual_apply_(inp, res_op, out=want)
            assert torch.equal(got, want)
            assert got.data_ptr() not in (inp.data_ptr(), res_lane.data_ptr())
    assert counted["residual_capture_"] == 4 and counted["residual_apply_"] == 4


def test_capture_lane_rechecks_a_residual_of_another_shape():
    capture = lanes.CaptureLane()
    inp, out = torch.zeros(2, 8), torch.ones(2, 8)
    with torch.no_grad():
        capture(out, inp, torch.empty(2, 8))
        with pytest.raises(ValueError, match="residual must have the shape of out"):
            capture(out, inp, torch.empty(2, 4))
