"""The host-read mode decides on the host (cache.decision.HostDecision): its
flags and state must be bitwise those of the decide op, call after call."""
from __future__ import annotations

import math
import random

import pytest
import torch

from teacache_fast import ops
from teacache_fast.cache.decision import HostDecision

COEFFS = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]  # FLUX
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-38, 3.4e38, 1e-45]


def _random_partials(rng: random.Random, rows: int):
    out = []
    for _ in range(rows):
        if rng.random() < 0.15:
            out.append([rng.choice(SPECIAL), rng.choice(SPECIAL + [1.0])])
        else:
            den = rng.uniform(0.5, 2.0)
            out.append([den * rng.uniform(0.0, 0.6), den])
    return out


def _f32_rows(rows):
    # what the host reads back from a device fp32 tensor
    return torch.tensor(rows, dtype=torch.float32).tolist()


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("threshold,max_skips,coeffs", [
    (0.3, None, COEFFS), (0.0, None, COEFFS), (0.6, 2, COEFFS),
    (1e-3, None, [1.0, 0.0]), (0.2, 0, [-1.0, 0.5]), (0.1 + 1e-9, None, [1.0 / 3.0, 1e-7]),
])
def test_host_decision_matches_the_decide_op_bitwise(backend, threshold, max_skips, coeffs):
    if backend != "torch" and ops.unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(ops.unavailable_reason(backend, torch.device("cpu")))
    rng = random.Random(hash((threshold, max_skips, len(coeffs))) & 0xFFFF)
    rows = 3
    host = HostDecision(rows)
    state = ops.new_decide_state((rows, 2))
    calls = 12 if backend == "triton" else 40
    for call in range(calls):
        p = _f32_rows(_random_partials(rng, rows))
        force = call % 7 == 0
        with ops.use_backend(backend):
            flags = ops.teacache_decide_(torch.tensor(p, dtype=torch.float32), state, coeffs,
                                         threshold, force=force, max_consecutive_skips=max_skips)
        host_flags = host.step(p, coeffs, threshold, force, max_skips)
        assert host_flags == flags.tolist(), (call, p)
        # the state, bit for bit (NaN never enters it: a non-finite step computes)
        assert torch.equal(torch.tensor(host.as_rows(), dtype=torch.float32), state), (call, p)


def test_host_decision_accumulates_and_resets():
    d = HostDecision(1)
    assert d.step([[0.1, 1.0]], [1.0, 0.0], 0.25, True, None) == [True]      # forced
    assert d.step([[0.1, 1.0]], [1.0, 0.0], 0.25, False, None) == [False]    # acc 0.1
    assert d.step([[0.1, 1.0]], [1.0, 0.0], 0.25, False, None) == [False]    # acc 0.2
    assert d.step([[0.1, 1.0]], [1.0, 0.0], 0.25, False, None) == [True]     # acc 0.3 >= 0.25
    assert d.as_rows() == [[0.0, 0.0]]
    assert d.step([[0.0, 0.0]], [1.0, 0.0], 0.25, False, None) == [True]     # 0/0: compute


# FLUX.1-Kontext's published set: negative for rel > 0.2407, so "sum" and "abs" part there
KONTEXT = [-1.04655119e+03, 3.12563399e+02, -1.69500694e+01, 4.10995971e-01, 3.74537863e-02]


def test_abs_accumulation_adds_the_magnitude_where_the_polynomial_is_negative():
    rel = 0.3
    assert HostDecision(1).step([[rel, 1.0]], KONTEXT, 10.0, True, None) == [True]
    plain, absolute = HostDecision(1), HostDecision(1)
    plain.step([[rel, 1.0]], KONTEXT, 10.0, False, None)
    absolute.step([[rel, 1.0]], KONTEXT, 10.0, False, None, accumulate_abs=True)
    poly = sum(c * rel ** (4 - k) for k, c in enumerate(KONTEXT))
    assert poly < -1.0
    assert plain.acc[0] == pytest.approx(poly, rel=1e-5)
    assert absolute.acc[0] == pytest.approx(-poly, rel=1e-5)
    # below the root both agree bit for bit
    low_a, low_b = HostDecision(1), HostDecision(1)
    low_a.step([[0.1, 1.0]], KONTEXT, 10.0, False, None)
    low_b.step([[0.1, 1.0]], KONTEXT, 10.0, False, None, accumulate_abs=True)
    assert low_a.acc == low_b.acc and low_a.acc[0] > 0
    # "abs" reaches the threshold where "sum" keeps skipping forever
    flags_sum = [plain.step([[rel, 1.0]], KONTEXT, 5.0, False, None) for _ in range(6)]
    flags_abs = [absolute.step([[rel, 1.0]], KONTEXT, 5.0, False, None, True) for _ in range(6)]
    assert not any(f[0] for f in flags_sum) and any(f[0] for f in flags_abs)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("coeffs", [KONTEXT, [-1.0, 0.5]])
def test_abs_host_decision_matches_the_decide_op_bitwise(backend, coeffs):
    if backend != "torch" and ops.unavailable_reason(backend, torch.device("cpu")):
        pytest.skip(ops.unavailable_reason(backend, torch.device("cpu")))
    rng = random.Random(len(coeffs))
    rows, host = 3, HostDecision(3)
    state = ops.new_decide_state((rows, 2))
    skipped = 0
    for call in range(10 if backend == "triton" else 30):
        p = _f32_rows(_random_partials(rng, rows))
        with ops.use_backend(backend):
            flags = ops.teacache_decide_(torch.tensor(p, dtype=torch.float32), state, coeffs, 0.4,
                                         force=call == 0, accumulate_abs=True)
        assert host.step(p, coeffs, 0.4, call == 0, None, accumulate_abs=True) == flags.tolist()
        assert torch.equal(torch.tensor(host.as_rows(), dtype=torch.float32), state), (call, p)
        assert bool((state[:, 0] >= 0).all()), "abs accumulation never goes below 0"
        skipped += int((~flags).sum())
    assert skipped > 0


def test_accumulate_is_checked_by_name():
    from teacache_fast.cache.config import TeaCacheConfig
    with pytest.raises(ValueError, match="accumulate"):
        TeaCacheConfig(coefficients=[1.0, 0.0], accumulate="max").validate()
    assert TeaCacheConfig(coefficients=[1.0, 0.0], accumulate="abs").validate().accumulate == "abs"
    with pytest.raises(TypeError, match="accumulate_abs"):
        ops.teacache_decide_(torch.zeros(2), ops.new_decide_state(), [1.0], 0.1, accumulate_abs=1)
