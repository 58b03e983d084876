"""The op benchmark's ``launches`` column: device work per op call, counted
from one call under the torch profiler.

* CUDA: the device operations the profiler records for the call (kernels,
  memsets, copies): what the call launches.
* CPU: the kernels the call runs: each outermost aten op that touches data
  (views, reshapes, allocations and scalar reads are none, and an op's own
  inner ops are not counted again), each native kernel
  call of the ``cpu`` backend (recorded as ``teacache_fast::cpu::<kernel>``)
  and each C++ kernel of a torch.compile graph (inductor records them by name
  when its kernel profiling is on: :func:`enable_compiled_kernel_events`,
  before anything compiles).
"""
from __future__ import annotations

from typing import Callable

__all__ = ["count_launches", "enable_compiled_kernel_events", "NOT_KERNELS"]

# aten ops that only make or describe tensors, or read a scalar back: no kernel
NOT_KERNELS = frozenset(f"aten::{name}" for name in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "reshape",
    "_reshape_alias", "_unsafe_view", "as_strided", "unsqueeze", "squeeze", "expand", "slice",
    "select", "narrow", "t", "transpose", "permute", "detach", "alias", "resize_", "lift_fresh",
    "_local_scalar_dense", "item", "result_type", "resolve_conj", "resolve_neg", "chunk", "split",
    "unbind", "view_as", "flatten", "unflatten", "contiguous", "to", "_to_copy", "is_nonzero",
    "set_", "split_with_sizes", "unsafe_split", "lift_fresh_copy"))
NATIVE_PREFIX = "teacache_fast::cpu::"


def enable_compiled_kernel_events() -> None:
    """Make inductor's CPU kernels show up in the profiler (they are counted
    as launches). Affects graphs compiled after the call."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def _cpu_kernels(event) -> int:
    """Kernels under one profiler event: a data-touching aten op is one
    (whatever it calls inside: ``mean`` is one reduction), a metadata op is
    none but what it wraps (``to`` -> ``copy_``), other events (a custom op, a
    compiled region) are the sum of their children."""
    name = event.name
    if name.startswith(NATIVE_PREFIX) or "cpp_fused" in name:
        return 1
    if name.startswith("aten::") and name not in NOT_KERNELS:
        return 1
    return sum(_cpu_kernels(child) for child in event.cpu_children)


def count_launches(fn: Callable[[], object], device: str) -> int:
    """Device operations (CUDA) or kernels (CPU) of one ``fn()`` call."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return sum(_cpu_kernels(e) for e in events if e.cpu_parent is None)
