"""Eager op calls run the implementation directly (no torch.library dispatch);
anything that traces or intercepts (a dispatch mode, Dynamo) sees the
registered op as one node."""
from __future__ import annotations

import torch

from op_oracles import RecordOps as _Record

from teacache_fast import ops


def _inputs():
    x = torch.randn(2, 5, 7)
    return x, torch.randn(2, 7), torch.randn(2, 7), torch.zeros(2, 5, 7)


def test_eager_calls_skip_dispatch(monkeypatch):
    calls = []
    real = ops._modulated_rel_l1_impl

    def counting(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(ops, "_modulated_rel_l1_impl", counting)
    x, scale, shift, prev = _inputs()
    ops.modulated_rel_l1_(x, scale, shift, prev)
    assert calls == [1]
    with _Record() as mode:
        ops.modulated_rel_l1_(x, scale, shift, prev)
    assert calls == [1], "under a dispatch mode the registered op must run, not the implementation"
    assert "teacache_fast.modulated_rel_l1_.default" in mode.names


def test_direct_and_dispatched_calls_agree_bitwise():
    x, scale, shift, prev = _inputs()
    prev2 = prev.clone()
    direct = ops.modulated_rel_l1_(x, scale, shift, prev)
    dispatched = torch.ops.teacache_fast.modulated_rel_l1_(x, scale, shift, prev2, "layer", 1e-6, False)
    assert torch.equal(direct, dispatched) and torch.equal(prev, prev2)


def test_compiled_graph_holds_each_op_as_one_node():
    x, scale, shift, prev = _inputs()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def f(x, scale, shift, prev):
        return ops.modulated_rel_l1_(x, scale, shift, prev)

    f(x, scale, shift, prev)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "teacache_fast.modulated_rel_l1_.default" in targets, targets


def test_profiled_calls_are_recorded_under_the_op_name():
    x, scale, shift, prev = _inputs()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.modulated_rel_l1_(x, scale, shift, prev)
    names = {e.key for e in prof.key_averages()}
    assert "teacache_fast::modulated_rel_l1_" in names, sorted(names)
