"""Model-based test of the call clock (issue 15): random call sequences on a
bare model, compared generation by generation with the official algorithm
run from a fresh state at that generation's start.

A hypothesis state machine draws generations (random length up to
``num_steps``, 1-3 CFG branches as separate calls, the uncond branches
truncated after a random step, interrupts at any call including the first
two steps, a batch change mid-run, an exception raised inside a call),
single warm-up calls (at the first timestep, or below it after a finished
generation: a one-step img2img), and resets. Each call's output and, after
each generation, every branch's compute/skip pattern must equal the
reference's (tests/reference_teacache.py: ReferenceTeaCacheBranch, one fresh
instance per branch and generation).

The sequences only contain what a bare model's calls make knowable (see the
rules table in teacache_fast/cache/clock.py): CFG branches of a step get the
same latents tensor, every generation starts at timestep 1.0, and a warm-up
below 1.0 follows a finished or abandoned generation.

The derandomized "ci" profile (tests/conftest.py) runs a fixed set;
HYPOTHESIS_PROFILE=explore with TEACACHE_MODEL_BASED_EXAMPLES=N searches anew.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import teacache_fast as tf
from teacache_fast.models import Adapter, Modulated

from reference_teacache import ReferenceTeaCacheBranch, reference_flux_call
from tiny_models import tiny_flux

COEFFS = [1.0, 0.0]
THRESHOLDS = (0.0, 0.05, 0.15, 0.3, 0.6)
TIE = 1e-4   # a reference decision this close to the threshold may round either way in fp32
EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
EXAMPLES = int(os.environ.get("TEACACHE_MODEL_BASED_EXAMPLES", "2000" if EXPLORE else "0"))


class Boom(Exception):
    """Raised inside a call (after the block stack) when the model is told to."""


class ToyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mod = nn.Linear(dim, 2 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x, emb):
        scale, shift = self.mod(emb).chunk(2, dim=-1)
        h = nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return x + self.mlp(h)


class Toy(nn.Module):
    """A DiT whose calls cost ~0.1 ms: embed, 2 blocks, project out."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.time = nn.Linear(1, dim)
        self.cond = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(2))
        self.out = nn.Linear(dim, 4)
        self.boom = False

    def preamble(self, hidden_states, timestep, cond):
        return self.embed(hidden_states), self.time(timestep[:, None]) + self.cond(cond)

    def forward(self, hidden_states, timestep, cond):
        h, emb = self.preamble(hidden_states, timestep, cond)
        for blk in self.blocks:
            h = blk(h, emb)
        out = self.out(h)
        if self.boom:
            raise Boom("raised inside the call")
        return out


def toy_adapter():
    def indicator(call):
        scale, shift = call.model.blocks[0].mod(call["emb"]).chunk(2, dim=-1)
        return Modulated(call["x"], scale, shift, norm="layer")
    return Adapter(name="toy", blocks=lambda m: list(m.blocks), indicator=indicator, stream="x")


def toy_reference_call(model: Toy, state: ReferenceTeaCacheBranch, hidden_states, timestep, cond):
    h, emb = model.preamble(hidden_states, timestep, cond)
    scale, shift = model.blocks[0].mod(emb).chunk(2, dim=-1)
    m = nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def run(x):
        for blk in model.blocks:
            x = blk(x, emb)
        return x
    out = model.out(state(m, h, run))
    if model.boom:
        raise Boom("raised inside the call")
    return out


class ToyHarness:
    """The cheap model: calls for the wrapped model and for the reference."""
    name = "toy"

    def __init__(self):
        torch.manual_seed(0)
        self.model = Toy().eval()
        for p in self.model.parameters():   # larger weights: outputs move between steps
            p.data.mul_(2.0)
        g = torch.Generator().manual_seed(1)
        self.conds = [torch.randn(1, 4, generator=g) for _ in range(3)]

    def apply(self, threshold, num_steps):
        tf.apply_teacache(self.model, adapter=toy_adapter(), coefficients=COEFFS,
                          threshold=threshold, num_steps=num_steps)

    def latents(self, batch, seed):
        return torch.randn(batch, 4, 4, generator=torch.Generator().manual_seed(seed))

    def call(self, x, t, branch):
        cond = self.conds[branch].expand(x.shape[0], -1)
        return self.model(hidden_states=x, timestep=torch.full((x.shape[0],), t), cond=cond)

    def reference(self, state, x, t, branch):
        cond = self.conds[branch].expand(x.shape[0], -1)
        return toy_reference_call(self.model, state, x, torch.full((x.shape[0],), t), cond)

    def set_boom(self, on):
        self.model.boom = on


class FluxHarness:
    """The tiny diffusers FLUX (1 + 1 blocks): branches 0-2 are three prompts."""
    name = "flux"

    def __init__(self):
        self.tiny = tiny_flux(0)
        self.model = self.tiny.model
        g = torch.Generator().manual_seed(7)
        self.text = [torch.randn(1, 3, 32, generator=g) for _ in range(3)]
        self.pooled = [torch.randn(1, 32, generator=g) for _ in range(3)]
        self.txt_ids = torch.zeros(3, 3)
        grid = torch.meshgrid(torch.zeros(1), torch.arange(4).float(), torch.arange(4).float(),
                              indexing="ij")
        self.img_ids = torch.stack(grid, -1).reshape(16, 3)
        self.boom = False
        self.model.proj_out.register_forward_hook(self._maybe_raise)   # inside the call

    def _maybe_raise(self, module, inputs, output):
        if self.boom and module is self.model.proj_out and not getattr(self, "_in_reference", False):
            raise Boom("raised inside the call")

    def apply(self, threshold, num_steps):
        tf.apply_teacache(self.model, coefficients=COEFFS, threshold=threshold, num_steps=num_steps)

    def latents(self, batch, seed):
        return self.tiny.latents(batch, seed)

    def _kwargs(self, x, t, branch):
        b = x.shape[0]
        return dict(hidden_states=x, encoder_hidden_states=self.text[branch].expand(b, -1, -1),
                    pooled_projections=self.pooled[branch].expand(b, -1),
                    timestep=torch.full((b,), t), img_ids=self.img_ids, txt_ids=self.txt_ids)

    def call(self, x, t, branch):
        return self.model(**self._kwargs(x, t, branch), return_dict=False)[0]

    def reference(self, state, x, t, branch):
        self._in_reference = True
        try:
            out = reference_flux_call(self.model, state, **self._kwargs(x, t, branch))
        finally:
            self._in_reference = False
        if self.boom:
            raise Boom("raised inside the call")
        return out

    def set_boom(self, on):
        self.boom = on


def _timesteps(n):
    return torch.linspace(1.0, 0.0, n + 1).tolist()[:n]


class ClockMachine(RuleBasedStateMachine):
    """Drives one wrapped model and the per-generation references side by side."""

    harness = None   # set per test (a module-level model: built once)

    def __init__(self):
        super().__init__()
        self.h = type(self).harness
        self.seed = 0
        self.applied = False
        self.closed = True       # the clock knows the next call starts a generation
        self.report = {"calls": 0, "generations": 0, "ties": 0}

    @initialize(threshold=st.sampled_from(THRESHOLDS), num_steps=st.integers(1, 8))
    def setup(self, threshold, num_steps):
        self.threshold, self.num_steps = threshold, num_steps
        self.h.apply(threshold, num_steps)
        self.applied = True

    def teardown(self):
        self.h.set_boom(False)
        if self.applied:
            tf.remove_teacache(self.h.model)
        STATS["sequences"] += 1
        STATS["calls"] += self.report["calls"]

    # ------------------------------------------------------------ one generation

    def _fresh_latents(self, batch):
        self.seed += 1
        return self.h.latents(batch, self.seed)

    def _run(self, calls):
        """calls: [(step, branch, batch, raises)], one generation. Every call is
        compared with the reference; at the end, the patterns. The branches
        of a step get the same latents tensor (as pipelines pass them).
        Returns whether every call ran."""
        refs, x, cur, last_out = {}, None, -1, None
        for step, branch, batch, boom in calls:
            if step != cur:
                x = self._fresh_latents(batch) if step == 0 else x + 0.1 * last_out
                if x.shape[0] != batch:   # a batch change mid-run
                    x = x[:1].clone() if batch == 1 else torch.cat([x, x + 0.01])
                cur = step
            t = self.t[step]
            ref_state = refs.setdefault(branch, ReferenceTeaCacheBranch(
                self.threshold, self.num_steps, COEFFS))
            self.h.set_boom(boom)
            try:
                if boom:
                    with pytest.raises(Boom):
                        self.h.reference(ref_state, x, t, branch)
                    with pytest.raises(Boom):
                        self.h.call(x, t, branch)
                    break
                expected = self.h.reference(ref_state, x, t, branch)
                got = self.h.call(x, t, branch)
            finally:
                self.h.set_boom(False)
            self.report["calls"] += 1
            if self._tie(refs):
                return False
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"call {(step, branch, batch)} of {calls}: {m}")
            if branch == 0:
                last_out = got
        if self._tie(refs):
            return False
        got = {b: v["steps"] for b, v in tf.stats(self.h.model)["branches"].items()}
        want = {b: r.decisions for b, r in refs.items()}
        assert got == want, (got, want, calls)
        self.report["generations"] += 1
        STATS["skips"] += sum(not f for r in refs.values() for f in r.decisions)
        return True

    def _tie(self, refs):
        if any(m < TIE for r in refs.values() for m in r.margins):
            self.report["ties"] += 1
            STATS["ties"] += 1
            return True
        return False

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def generation(self, data):
        n = self.num_steps
        self.t = _timesteps(n)
        branches = data.draw(st.integers(1, 3), label="branches")
        trunc = data.draw(st.integers(1, n), label="trunc") if branches > 1 else n
        batch = data.draw(st.integers(1, 2), label="batch")
        batch_at = data.draw(st.none() | st.integers(1, max(1, n - 1)), label="batch change at")
        calls = []
        for step in range(n):
            b_now = batch if batch_at is None or step < batch_at else 3 - batch
            for branch in range(branches if step < trunc else 1):
                calls.append((step, branch, b_now, False))
        # interrupted before a call (never at the very first: that is no generation),
        # or ended by a call that raises
        stop = data.draw(st.none() | st.integers(1, len(calls)), label="interrupt before call")
        boom = data.draw(st.booleans(), label="the last call raises") if stop else False
        if stop is not None:
            calls = calls[:stop]
            if boom:
                calls[-1] = calls[-1][:3] + (True,)
        ran = self._run(calls)
        self.closed = boom or (ran and stop is None and (branches == 1 or trunc == n))

    @precondition(lambda self: self.applied)
    @rule(branch=st.integers(0, 2), batch=st.integers(1, 2), low=st.booleans())
    def warm_up(self, branch, batch, low):
        """One call alone: at the first timestep, or (after a finished
        generation) below it, as a one-step img2img."""
        t = 0.5 if (low and self.closed) else 1.0
        self.t = [t]
        ref = ReferenceTeaCacheBranch(self.threshold, self.num_steps, COEFFS)
        x = self._fresh_latents(batch)
        expected = self.h.reference(ref, x, t, branch)
        got = self.h.call(x, t, branch)
        self.report["calls"] += 1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert {b: v["steps"] for b, v in tf.stats(self.h.model)["branches"].items()} == \
            {0: [True]}
        self.closed = False

    @precondition(lambda self: self.applied)
    @rule()
    def reset(self):
        tf.reset(self.h.model)
        self.closed = True
        assert tf.stats(self.h.model)["calls"] == 0

    @invariant()
    def threshold_zero_never_skips(self):
        if self.applied and self.threshold == 0.0:
            assert tf.stats(self.h.model)["skipped"] == 0


STATS = {"sequences": 0, "calls": 0, "ties": 0, "skips": 0}


def _machine_test(harness, examples, steps):
    machine = type(f"ClockMachine_{harness.name}", (ClockMachine,), {"harness": harness})
    machine.TestCase.settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck))
    STATS.update(sequences=0, calls=0, ties=0, skips=0)
    with torch.no_grad():
        machine.TestCase().runTest()
    print(f"model-based ({harness.name}): {STATS['sequences']} sequences, {STATS['calls']} calls, "
          f"{STATS['skips']} skipped steps, {STATS['ties']} generations not compared "
          "(a reference decision at the threshold)")
    # the machine ran calls, not only setups, and the cache skipped in them
    assert STATS["calls"] > examples and STATS["skips"] > 0


def test_model_based_cheap_model():
    _machine_test(ToyHarness(), EXAMPLES or 300, 8)


def test_model_based_tiny_flux():
    _machine_test(FluxHarness(), EXAMPLES // 10 if EXAMPLES else 40, 6)
