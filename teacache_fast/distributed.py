"""Sequence-parallel TeaCache: every rank must take the same skip decision.

When the tokens of the hidden state are sharded over ranks (xDiT / USP,
diffusers context parallel), each rank's ``modulated_rel_l1_`` sees only its
shard, so its partial sums ``[sum|m - prev|, sum|prev|]`` cover part of the
indicator. Ranks that decided on their own shard would diverge (different
outputs) or deadlock (one rank runs the blocks and waits in an attention
collective that the skipping rank never enters). So before
``teacache_decide_`` every rank sums the *partials* (never the ratio: a mean of
per-shard ratios is not the ratio of the sums) over the sequence-parallel
group::

    partials = ops.modulated_rel_l1_(x_shard, scale, shift, prev_shard)
    allreduce_partials_(partials, sp_group)          # now the whole sequence's sums
    compute = ops.teacache_decide_(partials, state, coefficients, threshold)

Reduction order (why this is an all-gather, not ``dist.all_reduce``): fp32
addition is not associative, and an all-reduce leaves the order to the
collective library (ring, tree, number of channels), so its bits may change
with the world size or the library version. Here every rank gathers all
ranks' partials and adds them in rank order, ``((p0 + p1) + p2) + ...``, in
fp32. Hence:

* every rank holds bitwise the same partials, so the same decision;
* the result is reproducible run to run and equals, bitwise,
  :func:`combine_rank_partials` of the per-shard partials computed in one
  process (the single-process oracle of the tests);
* against the partials of the *unsharded* tensor it agrees to fp32 rounding
  (a few ulps), not bitwise: the unsharded sum groups the additions
  differently. A decision can only differ if ``acc`` lands within those ulps
  of the threshold.

The payload is ``world_size x numel(partials)`` floats (8 bytes per state and
rank): latency-bound, the same cost as an all-reduce of the same tensor.

Agreement (:func:`agree_`, what the wrapper calls). The partials are not the
only per-rank input of a decision: the force flag (forced steps, a missing
residual) and the call's place in the schedule are decided on each rank, and
ranks that disagree on them decide differently, which with sharded attention
deadlocks. So the same all_gather carries, per rank, one float64 vector
``[branch, step, num_steps, generation, batch, rows, force, num_0, den_0]``.
An all_gather (not an all_reduce) because every rank then holds every
rank's vector: it checks them all the same way, so every rank reaches the
same verdict without a second round trip, and the error can name each
rank's values. Verdicts:

* branch, step, num_steps, batch or rows differ: RuntimeError on every rank,
  before any rank runs the blocks (a different ``num_steps``, a ``reset()``
  on one rank, different batch sizes are bugs of the caller's SPMD program;
  computing would hide them and go on with ranks at different steps);
* force differs: every rank computes (the OR). A force on one rank is a
  local fact (its ret_steps, a residual it lacks); computing is always
  safe, skipping is not where a rank has nothing to reuse;
* generation differs alone: accepted (it only names the ranks' state in the
  error: a ``reset()`` between two generations changes it harmlessly).

Per-sample partials of B rows send rows 1.. in a second all_gather, issued
only after the first agreed on B: an all_gather of mismatched sizes aborts
gloo (SIGABRT) and hangs NCCL, so the size of every collective is agreed
before it is issued. Without per_sample (the common case) the decision costs
one collective of 9 floats per rank. The sync-free mode gathers
``[step, force, num, den]`` on the device and never reads it on the host:
the agreed force is "any rank forced, or the ranks' steps differ".

Where the group comes from (:class:`GroupSource`). ``apply_teacache`` with
no ``process_group`` on a diffusers model looks at
``model._parallel_config.context_parallel_config._flattened_mesh`` at each
decision (a few attribute reads; the group is cached per config object), so
``enable_parallelism`` before or after ``apply_teacache`` both work; a given
group must cover the same ranks; ``process_group=False`` opts out.

Backends: on GPUs use NCCL, e.g. ``dist.init_process_group("nccl")`` or a
group made with ``dist.new_group(ranks, backend="nccl")``; the partials stay
on the device and the decision needs no host sync on the caller's side (NCCL
runs on the current stream; ``dist.all_gather`` itself is enqueued, not
waited on by the host). In host mode the gathered table is read once (the
call's one sync; the fact header is a small host-to-device copy); in
sync-free mode nothing is read. diffusers' context-parallel mesh is built on
the default process group's backend: with ``init_process_group("nccl")`` it
is NCCL and TeaCache uses it as is (untested here: no GPU). A gloo group also accepts CUDA tensors but stages
them through host memory, which costs a device->host sync per step. On CPU
use gloo. The collective runs eagerly: under ``torch.compile`` it is a graph
break (the wrapper's default mode has one at the decision read anyway).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["check_process_group", "allreduce_partials_", "combine_rank_partials", "agree_", "resolve_group",
           "GroupSource", "group_source", "model_cp_group", "FACTS", "CHECKED_FACTS"]

# Device types each known c10d backend can move tensors of. Backends not listed
# (custom or future ones) are trusted rather than rejected.
_BACKEND_DEVICES = {
    "gloo": ("cpu", "cuda"),
    "nccl": ("cuda",),
    "mpi": ("cpu", "cuda"),
    "ucc": ("cpu", "cuda"),
    "xccl": ("xpu",),
}


def _backend_for_device(backend: str, device_type: str) -> Optional[str]:
    """The backend name serving ``device_type`` in a c10d backend string.

    The string is either one name ("nccl") or a per-device map
    ("cpu:gloo,cuda:nccl"). None when the map has no entry for the device.
    """
    backend = backend.lower()
    if ":" not in backend:
        return backend
    for item in backend.split(","):
        dev, _, name = item.partition(":")
        if dev.strip() == device_type:
            return name.strip()
    return None


def check_process_group(process_group, device) -> "torch.distributed.ProcessGroup":
    """Validate ``process_group`` for tensors on ``device``; return the group.

    ``None`` means the default (WORLD) group, as in ``torch.distributed``.
    Raises RuntimeError when torch.distributed is unavailable or not
    initialized, TypeError when process_group is not a ProcessGroup,
    ValueError when this rank is not a member or the group's backend cannot
    carry tensors of ``device`` (e.g. an NCCL group with CPU partials).
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group(...) on every rank first")
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("process_group: this rank is not a member of the given group")
    device = torch.device(device)
    backend = str(dist.get_backend(group))
    name = _backend_for_device(backend, device.type)
    allowed = _BACKEND_DEVICES.get(name) if name is not None else ()
    if allowed is not None and device.type not in allowed:
        hint = {"cuda": "use an NCCL group for CUDA tensors",
                "cpu": "use a gloo group for CPU tensors"}.get(
                    device.type, f"use a group whose backend supports {device.type!r} tensors")
        raise ValueError(f"process_group has backend {backend!r}, which cannot carry tensors on "
                         f"{device}; {hint}")
    return group


def combine_rank_partials(per_rank: Sequence[Tensor]) -> Tensor:
    """Sum per-rank fp32 partials in rank order: ``((p0 + p1) + p2) + ...``.

    This is the exact arithmetic of :func:`allreduce_partials_`, usable in one
    process (tests, or a data-parallel rank that gathered shards itself).
    """
    if len(per_rank) == 0:
        raise ValueError("per_rank must hold at least one partials tensor")
    total = per_rank[0].clone()
    for p in per_rank[1:]:
        total.add_(p)
    return total


def allreduce_partials_(partials: Tensor, process_group=None) -> Tensor:
    """Replace ``partials`` in place by their sum over ``process_group``; return it.

    partials: the fp32 ``(..., 2)`` output of ``rel_l1_partials`` /
    ``modulated_rel_l1_`` for this rank's shard (same shape on every rank).
    Every rank ends with bitwise the same values, the rank-order sum (see the
    module docstring). A group of one rank leaves partials unchanged.
    """
    import torch.distributed as dist

    if not isinstance(partials, torch.Tensor):
        raise TypeError(f"partials must be a torch.Tensor, got {type(partials).__name__}")
    if partials.dtype != torch.float32:
        raise TypeError(f"partials must be float32 (the sums of rel_l1_partials), got {partials.dtype}")
    if partials.dim() < 1 or partials.shape[-1] != 2:
        raise ValueError(f"partials must have shape (..., 2), got {tuple(partials.shape)}")
    group = check_process_group(process_group, partials.device)
    world = dist.get_world_size(group)
    if world == 1:
        return partials
    mine = partials.contiguous()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    partials.copy_(combine_rank_partials(gathered))
    return partials


# ---------------------------------------------------------------- where the group comes from

def model_cp_group(model) -> Optional["torch.distributed.ProcessGroup"]:
    """The context-parallel group of a diffusers model, or None.

    diffusers' ``ModelMixin.enable_parallelism(config=ContextParallelConfig(...))``
    (or ``from_pretrained(..., parallel_config=...)``) records a
    ``ParallelConfig`` on ``model._parallel_config``; its context-parallel
    config holds the flattened ``("ring", "ulysses")`` mesh over which the
    sequence is sharded: every rank of it holds a token shard of the same
    call. Read by attribute only (diffusers is not imported); None for a model
    without one (no diffusers model, no parallelism, tensor parallel only).
    """
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()


def _ranks(group) -> List[int]:
    import torch.distributed as dist
    return list(dist.get_process_group_ranks(group))


class GroupSource:
    """The sequence-parallel group of one cached model, resolved at each decision.

    given: the ``process_group=`` of ``apply_teacache`` (None: none given).
    When the model carries a diffusers context-parallel config, its group is
    used (looked up again whenever the config object changes, so applying
    TeaCache before or after ``enable_parallelism`` both work); a given group
    must then cover the same ranks, else ValueError. Without such a config the
    given group (or None: no communication) is used.
    """

    __slots__ = ("model", "given", "_config", "_group", "_checked")

    def __init__(self, model, given=None):
        self.model, self.given = model, given
        self._config = None      # the context-parallel config the cached group came from
        self._group = given
        self._checked = set()    # device types check_process_group passed for

    def group(self) -> Optional["torch.distributed.ProcessGroup"]:
        config = getattr(self.model, "_parallel_config", None)
        cp = getattr(config, "context_parallel_config", None)
        if cp is self._config:
            return self._group
        found = model_cp_group(self.model)
        if found is not None and self.given is not None and _ranks(self.given) != _ranks(found):
            raise ValueError(
                f"process_group covers ranks {_ranks(self.given)}, but {type(self.model).__name__}'s "
                f"diffusers context-parallel mesh shards the sequence over ranks {_ranks(found)}: "
                "pass its group, or nothing (TeaCache takes it from the model), or "
                "process_group=False to decide on each rank's own shard")
        self._config, self._checked = cp, set()
        self._group = found if found is not None else self.given
        return self._group

    def checked(self, device: torch.device) -> Optional["torch.distributed.ProcessGroup"]:
        """:meth:`group`, validated for tensors on ``device`` (once per group and device type)."""
        group = self.group()
        if group is not None and device.type not in self._checked:
            check_process_group(group, device)
            self._checked.add(device.type)
        return group


def group_source(model, process_group=None) -> Optional[GroupSource]:
    """What ``apply_teacache(model, process_group=...)`` reduces over.

    False: nothing (opt out, even with a diffusers context-parallel config).
    None: the model's diffusers context-parallel group, found at each
    decision; None is returned for a model that cannot have one (no
    ``_parallel_config`` attribute), so those pay nothing. A group: that
    group, checked against the model's context-parallel group if it has one.
    Raises as :meth:`GroupSource.group` at install when the model already
    has a context-parallel config.
    """
    if process_group is False:
        return None
    if process_group is None and not hasattr(model, "_parallel_config"):
        return None
    source = GroupSource(model, process_group)
    source.group()
    return source


# ---------------------------------------------------------------- agreement

# The facts of a call that travel with its partials, in this order (host mode).
# Every fact but "generation" must be equal on every rank: they say which call
# of which schedule this is, and the shapes of the partials. The generation
# count only names the ranks' states in the error (a reset() on one rank
# between two generations changes it and is harmless; one inside a generation
# moves that rank's step, which is checked).
FACTS = ("branch", "step", "num_steps", "generation", "batch", "rows")
CHECKED_FACTS = tuple(f for f in FACTS if f != "generation")
_FORCE = len(FACTS)          # message slot of the force flag; the first partials row follows
_HEADER = len(FACTS) + 1


def resolve_group(process_group, device):
    """The ProcessGroup that ``process_group`` (None, a group, or a
    :class:`GroupSource`) stands for now, checked for tensors on ``device``; None: none."""
    if isinstance(process_group, GroupSource):
        return process_group.checked(device)
    return check_process_group(process_group, device)


def agree_(partials: Tensor, process_group=None, *, force=False, facts=None, step=None,
           sync_free: bool = False):
    """Sum ``partials`` over the group in rank order (in place) and agree on the
    force flag; returns the agreed force.

    Host mode (``force`` a Python bool): one ``all_gather`` of one small
    float64 vector per rank, ``[*facts, force, num_0, den_0]`` (``facts``: a
    dict over :data:`FACTS`; float64 carries both the integers and the fp32
    partials exactly). Every rank then holds every rank's message and checks
    it the same way, so a disagreement raises the same RuntimeError on every
    rank (naming each rank's values) before any rank enters the blocks: no
    hang and no collective of mismatched sizes. The agreed force is the OR
    of the ranks' flags (a force on one rank only, e.g. a rank without a
    residual of this shape, makes every rank compute: the safe choice, never
    a skip that some rank cannot do). Partials of more than one row (per
    sample) send their remaining rows in a second ``all_gather``, issued only
    once the first agreed on the row count (a batch mismatch raises instead
    of a gloo abort or an NCCL hang).

    Sync-free mode (``sync_free=True``; ``force`` a bool or a 0-d bool
    tensor, ``step`` the call's device step or None): the
    message ``[step, force, num, den]`` is built and gathered on the device,
    nothing is read on the host; the agreed force is a 0-d bool tensor,
    true when any rank forced or the ranks' steps differ (a mismatch cannot
    raise without a host read, so every rank computes instead).

    Either way the partials end as the rank-order sum
    (:func:`combine_rank_partials`) of every rank's partials: the same bits
    on every rank.
    """
    if not isinstance(partials, torch.Tensor):
        raise TypeError(f"partials must be a torch.Tensor, got {type(partials).__name__}")
    group = resolve_group(process_group, partials.device)
    if group is None:  # e.g. a diffusers model without context parallel: nothing to agree on
        return force
    if partials.dtype != torch.float32 or partials.dim() < 1 or partials.shape[-1] != 2:
        raise ValueError("partials must be a float32 (..., 2) tensor (the sums of rel_l1_partials)")
    import torch.distributed as dist
    world = dist.get_world_size(group)
    if sync_free:
        return _agree_device(partials, group, world, force, step)
    if world == 1:
        return force
    rows = partials.reshape(-1, 2)
    values = dict(facts or {})
    values.setdefault("rows", rows.shape[0])
    head = [float(values.get(f, -1)) for f in FACTS] + [float(bool(force))]
    msg = torch.cat([torch.tensor(head, dtype=torch.float64, device=partials.device),
                     rows[0].to(torch.float64)])
    gathered = [torch.empty_like(msg) for _ in range(world)]
    dist.all_gather(gathered, msg, group=group)
    table = torch.stack(gathered).cpu()
    _check_agreement(table[:, :_HEADER].tolist(), dist.get_rank(group))
    agreed = bool(table[:, _FORCE].any())
    firsts = [g[_HEADER:].to(torch.float32) for g in gathered]
    if rows.shape[0] == 1:
        per_rank = firsts
    else:  # sizes agreed by the first message
        rest = rows[1:].contiguous()
        more = [torch.empty_like(rest) for _ in range(world)]
        dist.all_gather(more, rest, group=group)
        per_rank = [torch.cat([f.reshape(1, 2), m]) for f, m in zip(firsts, more)]
    partials.copy_(combine_rank_partials(per_rank).reshape(partials.shape))
    return agreed


def _check_agreement(headers: List[List[float]], me: int) -> None:
    """Raise (on every rank alike) when the ranks' facts differ."""
    bad = [i for i, f in enumerate(FACTS) if f in CHECKED_FACTS
           and len({h[i] for h in headers}) > 1]
    if not bad:
        return
    def table(i):
        return ", ".join(f"rank {r}: {int(h[i])}" for r, h in enumerate(headers))
    what = "; ".join(f"{FACTS[i]} ({table(i)})" for i in bad)
    gen = FACTS.index("generation")
    raise RuntimeError(
        f"TeaCache sequence parallel: the ranks of the process group disagree on {what} "
        f"(generation: {table(gen)}; this is rank {me} of the group; ranks are group ranks). "
        "Every rank must make the same transformer calls with the same schedule: the same "
        "num_steps, reset() on every rank or none, the same batch size, the same per_sample. "
        "No rank ran the blocks for this call")


def _agree_device(partials: Tensor, group, world: int, force, step) -> Tensor:
    """Sync-free agreement: everything stays on the device (see :func:`agree_`)."""
    import torch.distributed as dist

    dev = partials.device
    if not isinstance(force, torch.Tensor):
        force = torch.full((), bool(force), dtype=torch.bool, device=dev)
    if world == 1:
        return force
    if partials.numel() != 2:
        raise ValueError(f"sync-free partials must have shape (2,), got {tuple(partials.shape)}")
    s = (step.reshape(1).to(torch.float32) if isinstance(step, torch.Tensor)
         else torch.full((1,), -1.0 if step is None else float(step), device=dev))
    msg = torch.cat([s.to(dev), force.reshape(1).to(device=dev, dtype=torch.float32),
                     partials.reshape(2)])
    gathered = [torch.empty_like(msg) for _ in range(world)]
    dist.all_gather(gathered, msg, group=group)
    partials.copy_(combine_rank_partials([g[2:] for g in gathered]).reshape(partials.shape))
    table = torch.stack(gathered)
    steps = table[:, 0]
    return (table[:, 1].amax() > 0) | (steps.amax() != steps.amin())
