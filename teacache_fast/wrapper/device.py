"""DeviceRunner: the ``sync_free=True`` mode. The decision never leaves the device.

Every block runs under ``torch.cond`` (teacache_fast.wrapper.cond) and the
span's end selects on the device (cache.device_state.finish_span_). No host
counter is read inside a call either (only the round-robin branch index), so
``torch.compile(fullgraph=True)`` gives one graph per branch for every step.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..cache.clock import scheduler_steps
from ..cache.config import TeaCacheConfig
from ..cache.device_state import SyncFreeBranch, decide_with_partials, finish_span_
from ..cache.stats import summary
from ..models.base import Adapter, BlockCall
from ._compat import warm_processor_signatures
from .cond import run_or_pass
from .host import _with_first_argument
from .indicator import indicator_of

__all__ = ["DeviceRunner"]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class DeviceRunner:
    """Routes one cached model's events in sync-free mode: one
    :class:`SyncFreeBranch` per branch, calls go round robin."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: TeaCacheConfig,
                 scheduler: Any = None, process_group: Any = None):
        self.model, self.adapter, self.config = model, adapter, config
        self.scheduler = scheduler
        self.process_group = process_group
        self.branches: List[SyncFreeBranch] = []
        self.next_branch = 0
        self.num_steps: Optional[int] = None
        self.generations = 0
        self.call: Optional[SyncFreeBranch] = None
        self.pending_restart = False
        # modules whose forward calls inspect.signature(self.processor.__call__)
        # (diffusers attention): see _compat.warm_processor_signatures
        self.processors = [mod for b in adapter.blocks(model) for mod in b.modules()
                           if getattr(mod, "processor", None) is not None]
        if config.num_steps is not None:
            self._build(config.num_steps)

    def _build(self, num_steps: int) -> None:
        """Fresh device state for generations of num_steps steps (host side, eager)."""
        forced = self.config.forced_table(num_steps, self.adapter.forced)
        device = _model_device(self.model)
        self.branches = [SyncFreeBranch(forced, device) for _ in range(self.config.branches)]
        self.next_branch = 0
        self.num_steps = num_steps

    # ------------------------------------------------------------ events

    def model_call(self, forward: Callable, args: tuple, kwargs: dict, context: Any = None) -> Any:
        if self.pending_restart:
            self.pending_restart = False
            self.restart()
        if not self.branches:
            raise RuntimeError("TeaCache sync_free=True needs num_steps: pass apply_teacache(..., "
                               "num_steps=N) or apply it to a pipeline and call its scheduler's "
                               "set_timesteps first")
        branch = self.next_branch
        self.next_branch = (branch + 1) % len(self.branches)
        self.call = self.branches[branch]
        self.call.captured = {}
        try:
            return forward(*args, **kwargs)
        finally:
            self.call = None

    def block(self, index: int, ends_span: bool, original: Callable, args: tuple, kwargs: dict):
        br = self.call
        if br is None:
            return original(*args, **kwargs)
        if index == 0:
            self._decide(br, original, args, kwargs)
        # built outside the cond: the skip branch closes over the inputs
        skipped = self.adapter.skip_output(BlockCall(original, args, kwargs, self.model))
        out = run_or_pass(br.compute, original, lambda *a, **k: skipped, *args, **kwargs)
        if ends_span:
            stream = finish_span_(br.compute, self.adapter.check_output(out, br.stream_in),
                                  br.stream_in, br.residual)
            out = self.adapter.with_stream(out, stream)
        return out

    def tail(self, original: Callable, args: tuple, kwargs: dict):
        br = self.call
        if br is None:
            return original(*args, **kwargs)
        first = args[0] if args else next(iter(kwargs.values()))
        return run_or_pass(br.compute, original, lambda *a, **k: first, *args, **kwargs)

    def end(self, original: Callable, args: tuple, kwargs: dict):
        br = self.call
        if br is not None:
            # a copy: x may be a tensor the model still holds
            args, kwargs = _with_first_argument(
                args, kwargs, lambda x: finish_span_(br.compute, x.clone(), br.stream_in, br.residual))
        return original(*args, **kwargs)

    def captured(self, name: str, output: Any) -> None:
        if self.call is not None:
            self.call.captured[name] = output

    def set_timesteps_done(self) -> None:
        n = scheduler_steps(self.scheduler)
        if n is not None and (not self.branches or self.branches[0].schedule.num_steps != n):
            self._build(n)
            self.generations += 1
        else:
            self.restart()

    def scheduler_step_done(self) -> None:
        pass  # the device schedule counts calls

    def generation_ended(self) -> None:
        self.pending_restart = True  # at the next call: the stats stay readable until then

    def watch_scheduler(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.set_timesteps_done()

    def restart(self) -> None:
        for br in self.branches:
            br.reset()
        self.next_branch = 0
        self.generations += 1

    def close(self) -> None:
        self.branches = []
        self.call = None

    # ------------------------------------------------------------ the decision

    def _decide(self, br: SyncFreeBranch, original: Callable, args: tuple, kwargs: dict) -> None:
        cfg = self.config
        first = BlockCall(original, args, kwargs, self.model, br.captured)
        stream = first[self.adapter.stream]
        x, how = indicator_of(self.adapter, first)
        warm_processor_signatures(self.processors)
        br.prepare(x, stream, cfg.cache_dtype)
        forced, step = br.schedule.next()
        compute, partials = decide_with_partials(
            x, br.prev, br.state, cfg.coefficients, cfg.threshold, force=forced,
            max_consecutive_skips=cfg.max_consecutive_skips, process_group=self.process_group,
            step=step, **how)
        br.record(step, compute, partials)
        br.compute, br.stream_in = compute, stream

    # ------------------------------------------------------------ inspection

    def stats(self) -> Dict[str, Any]:
        """The device counters and traces, read now."""
        branches, calls, wraps = {}, 0, 0
        for index, br in enumerate(self.branches):
            b = br.stats(self.config.coefficients)
            calls += b.pop("calls")
            wraps = max(wraps, b.pop("wraps"))
            if b["steps"]:
                branches[index] = b
        return summary(branches, calls=calls, num_steps=self.num_steps,
                       generations=self.generations + wraps)

    def tensors(self) -> List[Tensor]:
        return [t for br in self.branches for t in br.tensors()]
