"""Sequence-parallel decisions: 2 gloo ranks, tokens sharded, one spawn.

Each rank runs modulated_rel_l1_ on its token shard, all-reduces the partials
(teacache_fast.distributed) and decides. Both ranks must hold bitwise the same
partials and take the same compute/skip sequence as one process on the
unsharded tensors; so must the wrapper (tiny per-token DiT, tokens sharded) and
the sync-free decision. The ranks also agree on the force flag and check the
call's facts in the same collective: a different num_steps, a reset() on one
rank, different per-sample batch sizes raise on every rank (never a hang or a
gloo abort); a force on one rank makes every rank compute. Each spawned rank
pays for importing torch, so one spawn does all the distributed work (a
module fixture) and the cheap checks run in the parent.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from teacache_fast import ops, sync_free
from teacache_fast.distributed import (agree_, allreduce_partials_, check_process_group,
                                       combine_rank_partials)

WORLD = 2
B, N, C = 2, 10, 12          # N tokens, split 5 + 5 across the ranks
COEFFS = [1.0, 0.0]          # poly(r) = r: acc is the plain sum of relative L1s
THRESHOLD = 0.12
# Per-step drift of the hidden state: small steps accumulate into skips,
# big ones force computes (checked below, so the run exercises both).
DRIFTS = [0.0, 0.03, 0.03, 0.03, 0.3, 0.02, 0.02, 0.05, 0.5, 0.01]


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g)
    xs = []
    for d in DRIFTS:
        x = x + d * torch.randn(B, N, C, generator=g)
        xs.append(x.clone())
    scale = 0.1 * torch.randn(B, C, generator=g)
    shift = 0.1 * torch.randn(B, C, generator=g)
    return xs, scale, shift


def _run(xs, scale, shift, per_sample, token_slice=slice(None), group=None, per_shard=None,
         agree=False):
    """The decision loop of one (possibly sharded) process.

    group: all-reduce over it (agree: with distributed.agree_, the wrapper's
    path, force and facts included). per_shard: a list of token slices to
    emulate the sharded arithmetic in one process (partials per shard,
    rank-order sum).
    """
    n = len(xs)
    shards = per_shard or [token_slice]
    prevs = [torch.zeros_like(xs[0][:, s]) for s in shards]
    lead = (B,) if per_sample else ()
    state = ops.new_decide_state(lead + (2,))
    partials_seq, flags_seq = [], []
    for i, x in enumerate(xs):
        parts = [ops.modulated_rel_l1_(x[:, s].contiguous(), scale, shift, p, per_sample=per_sample)
                 for s, p in zip(shards, prevs)]
        partials = combine_rank_partials(parts)
        force = i in (0, n - 1)
        if group is not None and agree:
            force = agree_(partials, group, force=force,
                           facts=dict(branch=0, step=i, num_steps=n, generation=1, batch=B))
        elif group is not None:
            allreduce_partials_(partials, group)
        flags = ops.teacache_decide_(partials, state, COEFFS, THRESHOLD, force=force)
        partials_seq.append(partials.clone())
        flags_seq.append(flags.clone())
    return torch.stack(partials_seq), torch.stack(flags_seq)


def _model_runs(tokens=slice(None), group=None):
    """The tiny DiT of test_compile (per-token blocks, so a token shard is
    exact) through the wrapper, with the partials crossing ranks
    (apply_teacache(..., process_group=group)).
    """
    from teacache_fast import apply_teacache, remove_teacache, stats
    from test_compile import ADAPTER, THRESHOLD as T, TinyDiT

    x = torch.randn(B, N, 4, generator=torch.Generator().manual_seed(5))[:, tokens].contiguous()
    model = TinyDiT()
    sig = torch.linspace(1.0, 0.0, len(DRIFTS) + 1).tolist()
    times = [torch.full((x.shape[0],), s) for s in sig[:-1]]
    with torch.no_grad():
        apply_teacache(model, adapter=ADAPTER, threshold=T, num_steps=len(times), process_group=group)
        outs = [model(x + 0.1 * i, t) for i, t in enumerate(times)]
        steps = stats(model)["branches"][0]["steps"]
        remove_teacache(model)
    return torch.stack(outs), steps


def _sync_free_flags(xs, scale, shift, tokens=slice(None), group=None):
    """The same decisions through sync_free.decide (its process_group path)."""
    prev = torch.zeros_like(xs[0][:, tokens])
    state = ops.new_decide_state()
    return torch.stack([sync_free.decide(x[:, tokens].contiguous(), prev, state, COEFFS, THRESHOLD,
                                         force=i in (0, len(xs) - 1), scale=scale, shift=shift,
                                         process_group=group)
                        for i, x in enumerate(xs)])


def _worker(rank, init_file, out_dir, xs, scale, shift):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        per = N // WORLD
        mine = slice(rank * per, (rank + 1) * per)
        result = {}
        for per_sample in (False, True):
            result[per_sample] = _run(xs, scale, shift, per_sample, token_slice=mine,
                                      group=dist.group.WORLD)
            result["agree", per_sample] = _run(xs, scale, shift, per_sample, token_slice=mine,
                                               group=dist.group.WORLD, agree=True)
        result["model"] = _model_runs(mine, dist.group.WORLD)
        result["sync_free"] = _sync_free_flags(xs, scale, shift, mine, dist.group.WORLD)
        # Errors that need an initialized group: a device gloo cannot carry.
        try:
            check_process_group(None, "meta")
            result["meta_error"] = None
        except ValueError as exc:
            result["meta_error"] = str(exc)
        # An NCCL group cannot carry CPU partials (faked: no GPU here).
        real_get_backend = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"
        try:
            check_process_group(None, "cpu")
            result["nccl_cpu_error"] = None
        except ValueError as exc:
            result["nccl_cpu_error"] = str(exc)
        finally:
            dist.get_backend = real_get_backend
        # A group of one rank: the partials come back unchanged.
        groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank makes every group
        p = torch.tensor([1.5, 2.5])
        allreduce_partials_(p, groups[rank])
        result["solo"] = p
        result["agree"] = _agreement_scenarios(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One spawn of WORLD gloo ranks for every distributed check of this module."""
    tmp = tmp_path_factory.mktemp("dist")
    xs, scale, shift = _inputs()
    spawn_or_fail(_worker, (str(tmp / "init"), str(tmp), xs, scale, shift), timeout=180)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_sharded_decisions_match_single_process(rank_results):
    xs, scale, shift = _inputs()
    results = rank_results
    per = N // WORLD
    shards = [slice(r * per, (r + 1) * per) for r in range(WORLD)]
    for per_sample in (False, True):
        (p0, f0), (p1, f1) = results[0][per_sample], results[1][per_sample]
        # Same bits on every rank, hence the same decisions.
        assert torch.equal(p0.view(torch.int32), p1.view(torch.int32))
        assert torch.equal(f0, f1)
        # Bitwise the single-process emulation of the sharded arithmetic.
        p_emul, f_emul = _run(xs, scale, shift, per_sample, per_shard=shards)
        assert torch.equal(p0.view(torch.int32), p_emul.view(torch.int32))
        assert torch.equal(f0, f_emul)
        # the wrapper's path (agree_: force and facts travel along; per sample,
        # rows 1.. in a second gather) gives the same bits on every rank
        for r in range(WORLD):
            pa, fa = results[r]["agree", per_sample]
            assert torch.equal(pa.view(torch.int32), p_emul.view(torch.int32))
            assert torch.equal(fa, f_emul)
        # The unsharded run: partials to fp32 rounding, decisions identical.
        p_full, f_full = _run(xs, scale, shift, per_sample)
        torch.testing.assert_close(p0, p_full, rtol=1e-6, atol=0)
        assert torch.equal(f0, f_full)
        # The run must exercise both branches or it proves little.
        assert f_full.any() and not f_full.all(), f_full
    # The wrapper and the sync-free decision: every rank decides as the
    # unsharded run did; the shards' outputs put together are the unsharded ones.
    full_out, full_steps = _model_runs()
    assert any(full_steps) and not all(full_steps), full_steps
    sync_free_flags = _sync_free_flags(xs, scale, shift)
    assert torch.equal(sync_free_flags, results[0][False][1])
    for r in range(WORLD):
        out, steps = results[r]["model"]
        assert steps == full_steps
        torch.testing.assert_close(out, full_out[:, :, shards[r]], rtol=1e-5, atol=1e-6)
        assert torch.equal(results[r]["sync_free"], sync_free_flags)
    for r in range(WORLD):
        assert results[r]["meta_error"] is not None and "process_group" in results[r]["meta_error"]
        assert torch.equal(results[r]["solo"], torch.tensor([1.5, 2.5]))
        assert "'nccl'" in results[r]["nccl_cpu_error"] and "gloo group for CPU" in results[r]["nccl_cpu_error"]


@pytest.mark.parametrize("backend, device, expected", [
    ("gloo", "cpu", "gloo"), ("nccl", "cuda", "nccl"), ("cpu:gloo,cuda:nccl", "cuda", "nccl"),
    ("cpu:gloo,cuda:nccl", "cpu", "gloo"), ("cpu:gloo", "cuda", None),
])
def test_backend_string_per_device(backend, device, expected):
    from teacache_fast.distributed import _backend_for_device
    assert _backend_for_device(backend, device) == expected


def test_apply_teacache_checks_the_group():
    from teacache_fast import apply_teacache, is_cached
    from test_compile import ADAPTER, TinyDiT
    model = TinyDiT()
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialized"):
        apply_teacache(model, adapter=ADAPTER, num_steps=4, process_group=object())
    assert not is_cached(model)


def test_not_initialized_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialized"):
        allreduce_partials_(torch.zeros(2), None)


@pytest.mark.parametrize("partials, exc, match", [
    (torch.zeros(2, dtype=torch.float16), TypeError, "partials must be float32"),
    (torch.zeros(3), ValueError, r"partials must have shape \(\.\.\., 2\)"),
    ([0.0, 1.0], TypeError, "partials must be a torch.Tensor"),
])
def test_bad_partials(partials, exc, match):
    with pytest.raises(exc, match=match):
        allreduce_partials_(partials, None)


def test_combine_rank_partials_order():
    # 1 + 2**-24 + 2**-24 in fp32: left-to-right loses both small terms,
    # so the documented rank order is observable.
    a, b, c = (torch.tensor([v, 1.0]) for v in (1.0, 2.0 ** -24, 2.0 ** -24))
    assert combine_rank_partials([a, b, c])[0].item() == 1.0
    assert combine_rank_partials([b, c, a])[0].item() == 1.0 + 2.0 ** -23
    with pytest.raises(ValueError, match="per_rank"):
        combine_rank_partials([])


# ---------------------------------------------------------------- agreement across ranks
# The ranks agree on the force flag and check the call's facts (branch, step,
# num_steps, batch, rows) in the same all_gather as the partials. A mismatch
# raises on every rank, never a hang or a gloo abort; a force on one rank only
# makes every rank compute.

STEPS = len(DRIFTS)


def spawn_or_fail(fn, args, timeout):
    """mp.spawn of WORLD ranks that fails the test (killing the ranks) instead
    of hanging when they are not done within ``timeout`` seconds."""
    import time
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the ranks did not finish within {timeout} s (a hang)")


def _wrapper_run(tokens, group, batch=B, num_steps=STEPS, calls=STEPS, reset_at=None, **cfg):
    """TinyDiT through apply_teacache(process_group=group): (outputs, steps, error)."""
    from teacache_fast import apply_teacache, remove_teacache, reset, stats
    from test_compile import ADAPTER, THRESHOLD as T, TinyDiT

    x = torch.randn(3, N, 4, generator=torch.Generator().manual_seed(5))[:batch, tokens].contiguous()
    model = TinyDiT()
    sig = torch.linspace(1.0, 0.0, STEPS + 1).tolist()
    outs, error = [], None
    with torch.no_grad():
        apply_teacache(model, adapter=ADAPTER, threshold=T, num_steps=num_steps,
                       process_group=group, **cfg)
        try:
            for i in range(calls):
                if i == reset_at:
                    reset(model)
                outs.append(model(x + 0.1 * i, torch.full((batch,), sig[i % STEPS])))
        except RuntimeError as exc:
            error = str(exc)
        steps = stats(model)["branches"].get(0, {}).get("steps")
        remove_teacache(model)
    return (torch.stack(outs) if outs else None), steps, error


def _agreement_scenarios(rank):
    """Run in the spawned ranks (see _worker): each scenario's result per rank."""
    mine = slice(rank * (N // WORLD), (rank + 1) * (N // WORLD))
    world = dist.group.WORLD
    res = {}
    # a different num_steps on one rank: raises at the first call, on both
    res["num_steps"] = _wrapper_run(mine, world, num_steps=STEPS - 2 * rank)
    # reset() on one rank only, mid-generation: its step goes back to 0
    res["reset"] = _wrapper_run(mine, world, reset_at=4 if rank == 1 else None)
    # per_sample with another batch size on each rank: a message, not SIGABRT
    res["batch"] = _wrapper_run(mine, world, batch=2 + rank, per_sample=True)
    # per_sample, same batch: the rows after the first travel in a second gather
    res["per_sample"] = _wrapper_run(mine, world, per_sample=True)
    # a force on one rank only (ret_steps=3 there): every rank computes
    res["ret_steps"] = _wrapper_run(mine, world, ret_steps=3 if rank == 1 else 0)
    # sync-free: force and step agreed on the device
    xs, scale, shift = _inputs()
    res["sf_force"] = _sync_free_agreement(xs, scale, shift, mine, rank, world, "force")
    res["sf_step"] = _sync_free_agreement(xs, scale, shift, mine, rank, world, "step")
    # after the errors the group still works: nobody is stuck in a collective
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=world)
    res["after"] = t.item()
    return res


def _sync_free_agreement(xs, scale, shift, tokens, rank, group, what):
    """decide_with_partials with one rank forcing every step ("force") or with
    the ranks one step apart ("step"): the flags every rank gets."""
    from teacache_fast.cache.device_state import decide_with_partials
    prev = torch.zeros_like(xs[0][:, tokens])
    state = ops.new_decide_state()
    flags = []
    for i, x in enumerate(xs):
        force = torch.tensor(i in (0, len(xs) - 1) or (what == "force" and rank == 1))
        step = torch.tensor(i + (rank if what == "step" else 0))
        f, _ = decide_with_partials(x[:, tokens].contiguous(), prev, state, COEFFS, THRESHOLD,
                                    force=force, scale=scale, shift=shift, process_group=group,
                                    step=step)
        flags.append(bool(f))
    return flags


def test_ranks_agree_or_raise(rank_results):
    res = [r["agree"] for r in rank_results]
    for r in range(WORLD):
        # num_steps: no call got through on any rank; the message names both ranks' values
        out, steps, err = res[r]["num_steps"]
        assert out is None and not steps, (out, steps)
        assert f"num_steps (rank 0: {STEPS}, rank 1: {STEPS - 2})" in err, err
        assert "No rank ran the blocks" in err
        # reset on rank 1 at call 4: calls 0-3 ran alike, call 4 raised on both
        out, steps, err = res[r]["reset"]
        assert out.shape[0] == 4, out.shape
        assert "step (rank 0: 4, rank 1: 0)" in err, err
        # different batch sizes, per_sample: a clear error on both ranks, no abort
        out, steps, err = res[r]["batch"]
        assert out is None and "batch (rank 0: 2, rank 1: 3)" in err and "rows" in err, err
        assert res[r]["after"] == 3.0
    # per_sample with agreed batches: both ranks as the unsharded run
    full_out, full_steps, err = _wrapper_run(slice(None), None, per_sample=True)
    assert err is None and any(full_steps) and not all(full_steps), full_steps
    per = N // WORLD
    for r in range(WORLD):
        out, steps, err = res[r]["per_sample"]
        assert err is None and steps == full_steps
        torch.testing.assert_close(out, full_out[:, :, r * per:(r + 1) * per], rtol=1e-5, atol=1e-6)
    # a force on rank 1 only: both ranks compute as the unsharded run with ret_steps=3 does
    forced_out, forced_steps, _ = _wrapper_run(slice(None), None, ret_steps=3)
    plain_steps = _wrapper_run(slice(None), None)[1]
    assert forced_steps != plain_steps, "ret_steps=3 must change the pattern for this test"
    for r in range(WORLD):
        out, steps, err = res[r]["ret_steps"]
        assert err is None and steps == forced_steps, (steps, forced_steps)
    # sync-free: one rank forcing makes both compute every step; ranks one step
    # apart compute every step too (no host read to raise with)
    xs, scale, shift = _inputs()
    base = _sync_free_flags(xs, scale, shift).tolist()
    assert not all(base)
    for r in range(WORLD):
        assert res[r]["sf_force"] == [True] * len(xs)
        assert res[r]["sf_step"] == [True] * len(xs)
