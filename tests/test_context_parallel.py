"""diffusers context parallelism: TeaCache finds the context-parallel group itself.

2 gloo ranks on CPU, a tiny FluxTransformer2DModel with
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` (the
sequence is sharded over the ranks, attention is Ulysses all-to-all) and
``apply_teacache`` WITHOUT ``process_group``: the ranks must add their
indicator partials over the model's context-parallel mesh, take the compute /
skip pattern of the single-process run and end with its latents (within
1e-5). Before the fix the ranks decided on their own shards, disagreed and
deadlocked in the attention all-to-all (ring attention: aborted on a
collective size mismatch). TeaCache applied before and after
``enable_parallelism`` must both work. Ring attention is not run: diffusers'
ring path needs the attention's log-sum-exp, which only its CUDA backends
return (native raises "Native attention does not support return_lse=True");
the group lookup is the same flattened ("ring", "ulysses") mesh. One spawn
runs every scenario (each rank pays for importing torch and diffusers once);
the parent checks.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")

from test_distributed import WORLD, spawn_or_fail  # noqa: E402

STEPS = 8
THRESHOLD = 0.3    # tiny FLUX: a pattern with both computes and skips (checked below)
TEXT_LEN = 4       # the text tokens are sharded too: a multiple of the world size


def _tiny():
    from tiny_models import tiny_flux
    return tiny_flux(0, text_len=TEXT_LEN)


def _plain(t):
    """A plain tensor (diffusers' gather returns an AsyncCollectiveTensor, which torch.save
    writes but torch.load(weights_only=True) refuses)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _denoise(tiny):
    """A fixed Euler-like loop of STEPS transformer calls: the final latents."""
    lat = tiny.latents(1)
    with torch.no_grad():
        for t in torch.linspace(1.0, 0.05, STEPS):
            lat = lat - 0.1 * tiny.call(lat, t.reshape(1))
    return lat


def _enable_cp(model):
    from diffusers import ContextParallelConfig
    # diffusers 0.42.1's enable_parallelism computes `rank % torch.accelerator.device_count()`,
    # a ZeroDivisionError on a CPU-only machine: the TEST patches device_count to 1 for that
    # call only (the library itself never patches diffusers).
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    finally:
        torch.accelerator.device_count = real


def _cached_run(tiny, **kwargs):
    """(steps, rel_l1 trace, final latents) of one cached generation."""
    import teacache_fast as tf
    if not tf.is_cached(tiny.model):
        tf.apply_teacache(tiny.model, num_steps=STEPS, **{"threshold": THRESHOLD, **kwargs})
    lat = _denoise(tiny)
    b = tf.stats(tiny.model)["branches"][0]
    return b["steps"], b["rel_l1"], _plain(lat)


def _one_call(tiny):
    """(output, tokens the first block saw): one transformer call."""
    seen = []
    hook = tiny.model.transformer_blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad():
            return _plain(tiny.call(tiny.latents(1), torch.tensor([0.7]))), seen
    finally:
        hook.remove()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    import teacache_fast as tf
    res = {}
    try:
        # apply AFTER enable_parallelism, no process_group
        after = _tiny()
        _enable_cp(after.model)
        res["after"] = _cached_run(after)
        # apply BEFORE enable_parallelism, no process_group
        before = _tiny()
        tf.apply_teacache(before.model, threshold=THRESHOLD, num_steps=STEPS)
        _enable_cp(before.model)
        res["before"] = _cached_run(before)
        # remove keeps diffusers' sharding (one call after remove_teacache)
        for name, tiny in (("after", after), ("before", before)):
            tf.remove_teacache(tiny.model)
            res[f"removed_{name}"] = _one_call(tiny)
        # sync_free=True (the decision stays on the device): the same, no host read
        res["sync_free"] = _cached_run(after, sync_free=True)
        tf.remove_teacache(after.model)
        # a given group that covers the same ranks is accepted
        res["explicit"] = _cached_run(after, process_group=dist.group.WORLD)
        tf.remove_teacache(after.model)
        # a group that is not the model's: a clear error at apply, nothing attached
        solo = [dist.new_group([r]) for r in range(WORLD)]   # every rank makes every group
        try:
            tf.apply_teacache(after.model, threshold=THRESHOLD, num_steps=STEPS,
                              process_group=solo[rank])
            res["wrong_group"] = None
        except ValueError as exc:
            res["wrong_group"] = str(exc)
        res["wrong_group_cached"] = tf.is_cached(after.model)
        # process_group=False opts out: each rank sees its own shard's indicator
        # (threshold 0: every step computes, so the ranks cannot deadlock)
        res["opt_out"] = _cached_run(after, process_group=False, threshold=0.0)
        tf.remove_teacache(after.model)
        res["auto_t0"] = _cached_run(after, threshold=0.0)
        tf.remove_teacache(after.model)
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    spawn_or_fail(_worker, (str(tmp / "init"), str(tmp)), timeout=240)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_cp_sync_free(ranks):
    tiny = _tiny()
    steps, rel_l1, latents = _cached_run(tiny, sync_free=True)
    assert any(steps) and not all(steps), steps
    for r in range(WORLD):
        got_steps, got_rel, got_lat = ranks[r]["sync_free"]
        assert got_steps == steps
        torch.testing.assert_close(torch.tensor(got_rel[1:]), torch.tensor(rel_l1[1:]),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(got_lat, latents, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def single():
    """The single-process run: cached (steps, rel_l1, latents), and the uncached call."""
    tiny = _tiny()
    cached = _cached_run(tiny)
    import teacache_fast as tf
    tf.remove_teacache(tiny.model)
    return cached, _one_call(tiny)


@pytest.mark.parametrize("order", ["after", "before"])
def test_cp_group_found_without_process_group(ranks, single, order):
    (steps, rel_l1, latents), _ = single
    assert any(steps) and not all(steps), steps      # both computes and skips
    for r in range(WORLD):
        got_steps, got_rel, got_lat = ranks[r][order]
        assert got_steps == steps, (r, got_steps, steps)
        # the whole sequence's indicator on every rank (fp32 rounding of the shard sums)
        torch.testing.assert_close(torch.tensor(got_rel[1:]), torch.tensor(rel_l1[1:]),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(got_lat, latents, rtol=0, atol=1e-5)
    # every rank holds bitwise the same indicator: the same decisions by construction
    assert ranks[0][order][1][1:] == ranks[1][order][1][1:]


def test_given_group_checked_against_the_model(ranks, single):
    (steps, _, _), _ = single
    for r in range(WORLD):
        assert ranks[r]["explicit"][0] == steps
        err = ranks[r]["wrong_group"]
        assert err is not None and f"process_group covers ranks [{r}]" in err, err
        assert "context-parallel mesh shards the sequence over ranks [0, 1]" in err
        assert ranks[r]["wrong_group_cached"] is False


def test_process_group_false_opts_out(ranks):
    # opted out: each rank's indicator is its own shard's, so the ranks differ;
    # found automatically: the ranks agree bitwise
    opt = [ranks[r]["opt_out"][1][1:] for r in range(WORLD)]
    auto = [ranks[r]["auto_t0"][1][1:] for r in range(WORLD)]
    assert opt[0] != opt[1]
    assert auto[0] == auto[1]
    assert all(ranks[r]["opt_out"][0] == [True] * STEPS for r in range(WORLD))


@pytest.mark.parametrize("order", ["after", "before"])
def test_remove_leaves_diffusers_sharding_intact(ranks, single, order):
    _, (uncached, tokens) = single
    for r in range(WORLD):
        out, seen = ranks[r][f"removed_{order}"]
        # still sharded: the blocks see half the tokens, the output is gathered whole
        assert seen == [tokens[0] // WORLD], (seen, tokens)
        torch.testing.assert_close(out, uncached, rtol=0, atol=1e-5)


def test_no_parallel_config_needs_no_distributed():
    """A diffusers model without context parallel: nothing to reduce over, and
    torch.distributed need not be initialized (the single-process case)."""
    from teacache_fast.distributed import GroupSource, group_source, model_cp_group
    assert not dist.is_initialized()
    tiny = _tiny()
    assert model_cp_group(tiny.model) is None
    assert group_source(tiny.model, False) is None
    src = group_source(tiny.model, None)   # looked up again at every call
    assert isinstance(src, GroupSource) and src.group() is None
    assert group_source(torch.nn.Linear(2, 2), None) is None   # not a diffusers model: never
    steps = _cached_run(tiny)[0]
    assert any(steps) and not all(steps)
