"""Building blocks of the sync-free mode, for your own sampling loop.

``apply_teacache(..., sync_free=True)`` uses them; they are public so a
framework with its own block loop can skip without a host read:

* :class:`DeviceSchedule`: a branch's step counter and forced-step table on
  the device (no recompile per step);
* :func:`decide`: indicator + decision on the device, a 0-d bool flag;
* :func:`run_or_pass`: one block under ``torch.cond(compute, block, passthrough)``;
* :func:`finish_span_`: the span's end, ``out`` or ``in + residual`` selected
  on the device;
* :func:`sync_free_step`: all three for a stack that is one function of the
  hidden state.

With these a whole transformer call compiles with ``fullgraph=True`` into one
graph that serves every step and has no host read, so it can be captured in
a CUDA graph. Each CFG branch needs its own schedule and buffers.
"""
from .cache.device_state import (DeviceSchedule, SyncFreeBranch, decide, decide_with_partials,
                                 finish_span_)
from .wrapper.cond import run_or_pass, sync_free_step

__all__ = ["DeviceSchedule", "SyncFreeBranch", "decide", "decide_with_partials", "run_or_pass",
           "finish_span_", "sync_free_step"]
