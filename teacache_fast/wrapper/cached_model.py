"""CachedModel: attaches one runner to a model and routes its events.

One install for both modes: the forward of the model and of every block of
the adapter's stack (plus the tail and end modules, capture hooks, and a
watched scheduler's ``set_timesteps`` / ``step``) are overridden
(teacache_fast.wrapper.patches: diffusers' HookRegistry for a diffusers
model, instance attributes otherwise), and each override hands its event to
the runner: :class:`~teacache_fast.wrapper.host.HostRunner` (the decision read
on the host once per call) or :class:`~teacache_fast.wrapper.device.DeviceRunner`
(``sync_free=True``: the decision stays on the device).

The pipeline is followed, not remembered: each call reads the scheduler of
the pipeline that makes it (``pipe.scheduler = ...`` and ``Pipe.from_pipe``
just work), and diffusers' ``cache_context`` reaches the runner with the call.
"""
from __future__ import annotations

import functools

import sys
from dataclasses import fields
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor, nn

from ..cache.config import TeaCacheConfig
from ..cache.stats import cache_bytes
from ..models.base import Adapter
from .device import DeviceRunner
from .host import HostRunner
from .patches import Patches, _NotCopyable, uses_diffusers_hooks

__all__ = ["CachedModel", "DENOISERS", "diffusers_cache_in_use"]

# attributes of a pipeline that hold a denoiser (Wan2.2: two experts)
DENOISERS = ("transformer", "transformer_2", "transformer_3")


def diffusers_cache_in_use(model: nn.Module) -> Optional[str]:
    """The diffusers cache enabled on (or hooked into) ``model``, or None."""
    config = getattr(model, "_cache_config", None)
    if config is not None:
        return type(config).__name__
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook in (registry.hooks.values() if registry is not None else ()):
            origin = type(hook).__module__
            if origin.startswith("diffusers.hooks.") and any(
                    k in origin for k in ("cache", "pyramid_attention_broadcast")):
                return type(hook).__name__
    return None


class CachedModel(_NotCopyable):
    """Everything TeaCache attached to one model."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: TeaCacheConfig,
                 pipeline: Any = None, process_group: Any = None, calibration: Any = None):
        blocks = list(adapter.blocks(model))
        if not blocks:
            raise ValueError(f"adapter {adapter.name!r} found no blocks in {type(model).__name__}")
        self.model, self.adapter, self.config = model, adapter, config
        self.blocks = blocks
        self.pipeline = pipeline
        self.scheduler = getattr(pipeline, "scheduler", None)
        self.process_group = process_group
        self.diffusers = uses_diffusers_hooks(model)
        runner_type = DeviceRunner if config.sync_free else HostRunner
        self.runner = runner_type(model, adapter, config, scheduler=self.scheduler,
                                  process_group=process_group)
        self.patches = Patches()
        self.scheduler_patches = Patches()
        # coefficients="auto" (teacache_fast.calibrate.auto): told of calls and
        # generation ends, retunes this cache, adds stats()["calibration"]
        self.calibration = calibration
        if calibration is not None:
            if config.sync_free and calibration.recording:
                raise ValueError("coefficients='auto' records on the host: it cannot calibrate "
                                 "with sync_free=True (calibrate once without it; the stored fit "
                                 "then loads with sync_free=True)")
            self.runner.calibration = calibration
            calibration.bind(self.retune)

    @property
    def mode(self) -> str:
        return "sync_free" if self.config.sync_free else "host"

    # ------------------------------------------------------------ install

    def install(self) -> None:
        a, m, r, p, d = self.adapter, self.model, self.runner, self.patches, self.diffusers
        p.wrap_forward(m, self._model_event, diffusers=d, on_reset=r.generation_ended if d else None)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            p.wrap_forward(block, _block_event(r, i, i == last and a.end is None), diffusers=d)
        for module in (a.tail(m) if a.tail is not None else ()):
            p.wrap_forward(module, r.tail, diffusers=d)
        if a.end is not None:
            p.wrap_forward(a.end(m), r.end, diffusers=d)
        for name, get in a.capture.items():
            p.add_handle(get(m).register_forward_hook(_capture_event(r, name)))
        if a.block_lists is not None and isinstance(r, HostRunner):
            self._gate_loops(last if a.end is None else None)
        self._watch(self.scheduler)

    def _gate_loops(self, span_end: Optional[int]) -> None:
        """A skipped call leaves the model's block loops after block 0: each
        list asks the runner before it yields a block (Adapter.block_lists)."""
        lists = list(self.adapter.block_lists(self.model))
        flat = [b for blocks in lists if isinstance(blocks, nn.ModuleList) for b in blocks]
        if len(flat) != len(self.blocks) or any(x is not y for x, y in zip(flat, self.blocks)):
            raise ValueError(
                f"Adapter {self.adapter.name!r}: block_lists(model) must return the ModuleLists "
                "whose items, in order, are exactly blocks(model); got "
                f"{[type(b).__name__ for b in lists]} holding {len(flat)} of the "
                f"{len(self.blocks)} blocks")
        offset = 0
        for blocks in lists:
            self.patches.gate_iteration(blocks, self.runner.loop_gate(offset, span_end))
            offset += len(blocks)

    def _watch(self, scheduler: Any) -> None:
        self.scheduler_patches.restore()
        self.scheduler = scheduler
        r = self.runner
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            self.scheduler_patches.override(scheduler, "set_timesteps", _after(r.set_timesteps_done))
        if scheduler is not None and callable(getattr(scheduler, "step", None)) \
                and not self.config.sync_free:
            self.scheduler_patches.override(scheduler, "step", _after(r.scheduler_step_done))

    def uninstall(self) -> None:
        self.scheduler_patches.restore()
        self.patches.restore()
        self.runner.close()

    # ------------------------------------------------------------ the model's call

    def _model_event(self, forward: Callable, args: tuple, kwargs: dict):
        if self.diffusers:
            conflict = getattr(self.model, "_cache_config", None)
            if conflict is not None:
                raise RuntimeError(
                    f"diffusers' {type(conflict).__name__} was enabled on this "
                    f"{type(self.model).__name__} after TeaCache: two caches cannot run together. "
                    "Call model.disable_cache() or teacache_fast.remove_teacache(model)")
        if self.pipeline is not None:
            self._follow_scheduler()
        context = self.patches.context()
        if self.config.backend:
            with self.config.backend_scope():
                return self.runner.model_call(forward, args, kwargs, context)
        return self.runner.model_call(forward, args, kwargs, context)

    def _follow_scheduler(self) -> None:
        """Watch the scheduler of the pipeline making this call (it may have
        been swapped, or the call comes from a ``from_pipe`` copy)."""
        pipe = self._calling_pipeline()
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and scheduler is not self.scheduler:
            self._watch(scheduler)
            self.runner.watch_scheduler(scheduler)

    def _calling_pipeline(self) -> Any:
        # the nearest pipeline __call__ frame that holds this model (reading a
        # frame's locals costs well under a microsecond)
        frame = sys._getframe(2)
        for _ in range(16):
            if frame is None:
                break
            if frame.f_code.co_name == "__call__":
                owner = frame.f_locals.get("self")
                if owner is not None and any(getattr(owner, n, None) is self.model for n in DENOISERS):
                    return owner
            frame = frame.f_back
        return self.pipeline

    # ------------------------------------------------------------ inspection

    def restart(self) -> None:
        self.runner.restart()

    def retune(self, **changes: Any) -> None:
        """Change config fields (threshold, coefficients, observer, fitted_range)
        in place: the runner and its state hold this same config object, so the
        next decision uses them."""
        new = self.config.replace(**changes).validate()
        for f in fields(new):
            setattr(self.config, f.name, getattr(new, f.name))

    def stats(self) -> Dict[str, Any]:
        out = self.runner.stats()
        out.update(threshold=self.config.threshold, preset=self.adapter.name,
                   variant=self.adapter.variant, mode=self.mode,
                   cache_bytes=cache_bytes(self.runner.tensors()))
        if self.calibration is not None:
            out["calibration"] = self.calibration.stats()
        return out

    def tensors(self) -> List[Tensor]:
        return self.runner.tensors()


# Each event closes over the runner and its place only: a call costs one
# Python frame on top of the runner's own work.

def _block_event(runner, index: int, ends_span: bool) -> Callable:
    # a partial is called from C: no Python frame of its own on every block call
    return functools.partial(runner.block, index, ends_span)


def _capture_event(runner, name: str) -> Callable:
    def hook(module, inputs, output):
        runner.captured(name, output)
    return hook


def _after(then: Callable[[], None]) -> Callable:
    def method(original, args, kwargs):
        out = original(*args, **kwargs)
        then()
        return out
    return method
