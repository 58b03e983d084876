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

Backends: on GPUs use NCCL, e.g. ``dist.init_process_group("nccl")`` or a
group made with ``dist.new_group(ranks, backend="nccl")``; the partials stay
on the device and the decision needs no host sync on the caller's side (NCCL
runs on the current stream; ``dist.all_gather`` itself is enqueued, not
waited on by the host). A gloo group also accepts CUDA tensors but stages
them through host memory, which costs a device->host sync per step. On CPU
use gloo. The collective runs eagerly: under ``torch.compile`` it is a graph
break (the wrapper's default mode has one at the decision read anyway).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["check_process_group", "allreduce_partials_", "combine_rank_partials"]

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
