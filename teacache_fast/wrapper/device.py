"""DeviceRunner: the ``sync_free=True`` mode. The decision never leaves the device.

Every block runs under ``torch.cond`` (teacache_fast.wrapper.cond) and the
span's end selects on the device (cache.device_state.finish_span_). No host
counter is read inside a call either (only the round-robin branch index), so
``torch.compile(fullgraph=True)`` gives one graph per branch for every step.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..cache.schedule import scheduler_steps
from ..cache.config import TeaCacheConfig
from ..cache.device_state import SyncFreeBranch, decide_with_partials, finish_span_
from ..cache.stats import summary
from ..models.base import Adapter, BlockCall, signature_of
from ._compat import warm_processor_signatures
from .cond import run_or_pass
from .host import _with_first_argument, enter_call
from .indicator import indicator_of

__all__ = ["DeviceRunner", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's activations will live: its first parameter's device."""
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
        self.timestep: Optional[Tensor] = None   # the current call's, for the device clock
        self._busy = threading.Lock()
        self._warned = False
        self._t_index = _positional_index(model, adapter.timestep_arg)
        # modules whose forward calls inspect.signature(self.processor.__call__)
        # (diffusers attention): see _compat.warm_processor_signatures
        self.processors = [mod for b in adapter.blocks(model) for mod in b.modules()
                           if getattr(mod, "processor", None) is not None]
        if config.num_steps is not None:
            self._build(config.num_steps)

    def _build(self, num_steps: int) -> None:
        """Fresh device state for generations of num_steps steps (host side, eager)."""
        forced = self.config.forced_table(num_steps, self.adapter.forced)
        device = model_device(self.model)
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
        eager = not torch.compiler.is_compiling()
        if eager:
            enter_call(self._busy, self.model)
        try:
            branch = self.next_branch
            self.next_branch = (branch + 1) % len(self.branches)
            self.call = self.branches[branch]
            self.call.captured = {}
            self.timestep = self._timestep(args, kwargs)
            return forward(*args, **kwargs)
        except BaseException:
            if eager:  # an interrupted generation: the next call starts afresh
                self.restart()
            raise
        finally:
            self.call = None
            self.timestep = None
            if eager:
                self._busy.release()

    def _timestep(self, args: tuple, kwargs: dict) -> Optional[Tensor]:
        name = self.adapter.timestep_arg
        if not name:
            return None
        t = kwargs.get(name)
        if t is None and self._t_index is not None and self._t_index < len(args):
            t = args[self._t_index]
        return t if isinstance(t, Tensor) and t.numel() > 0 else None

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
        self._warn_if_two_calls_per_step()
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
        self._warn_if_two_calls_per_step()
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
        forced, step = br.schedule.next(self.timestep)
        compute, partials = decide_with_partials(
            x, br.prev, br.state, cfg.coefficients, cfg.threshold, force=forced,
            max_consecutive_skips=cfg.max_consecutive_skips, process_group=self.process_group,
            step=step, accumulate_abs=cfg.accumulate == "abs", **how)
        br.record(step, compute, partials)
        br.compute, br.stream_in = compute, stream

    # ------------------------------------------------------------ inspection

    def _warn_if_two_calls_per_step(self) -> None:
        """Host side, outside any call: a branch saw step 1 at step 0's timestep."""
        if self._warned or not self.branches:
            return
        if any(bool(br.schedule.repeat_seen) for br in self.branches):
            self._warned = True
            warnings.warn(
                f"TeaCache sync_free=True on {type(self.model).__name__}: a generation's second "
                f"call had its first call's timestep on one branch state (branches="
                f"{len(self.branches)}): CFG with separate cond/uncond calls needs "
                "apply_teacache(..., branches=2) (or it followed a run stopped after one call). "
                "That generation was computed in full (no skip)", RuntimeWarning, stacklevel=3)

    def stats(self) -> Dict[str, Any]:
        """The device counters and traces, read now."""
        self._warn_if_two_calls_per_step()
        branches, calls, wraps = {}, 0, 0
        for index, br in enumerate(self.branches):
            b = br.stats(self.config.coefficients, self.config.accumulate == "abs")
            calls += b.pop("calls")
            wraps = max(wraps, b.pop("wraps"))
            if b["steps"]:
                branches[index] = b
        return summary(branches, calls=calls, num_steps=self.num_steps,
                       generations=self.generations + wraps)

    def tensors(self) -> List[Tensor]:
        return [t for br in self.branches for t in br.tensors()]


def _positional_index(model: nn.Module, name: Optional[str]) -> Optional[int]:
    """Where ``name`` sits among the model's positional parameters (None: absent)."""
    sig = signature_of(model.forward)
    if sig is None or not name:
        return None
    for i, p in enumerate(sig.parameters.values()):
        if p.name == name:
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
    return None
