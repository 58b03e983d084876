"""CachedModel: attaches one runner to a model and routes its events.

One install for both modes: the model's ``forward`` and the ``forward`` of
every block of the adapter's stack (plus the tail and end modules, capture
hooks, and a watched scheduler's ``set_timesteps`` / ``step``) are overridden
(teacache_fast.wrapper.patches), and each override hands its event to the
runner: :class:`~teacache_fast.wrapper.host.HostRunner` (the decision read on
the host once per call) or :class:`~teacache_fast.wrapper.device.DeviceRunner`
(``sync_free=True``: the decision stays on the device).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from torch import Tensor, nn

from ..cache.config import TeaCacheConfig
from ..cache.stats import cache_bytes
from ..models.base import Adapter
from .device import DeviceRunner
from .host import HostRunner
from .patches import Patches

__all__ = ["CachedModel"]


class CachedModel:
    """Everything TeaCache attached to one model."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: TeaCacheConfig,
                 scheduler: Any = None, process_group: Any = None):
        blocks = list(adapter.blocks(model))
        if not blocks:
            raise ValueError(f"adapter {adapter.name!r} found no blocks in {type(model).__name__}")
        self.model, self.adapter, self.config = model, adapter, config
        self.blocks = blocks
        self.scheduler = scheduler
        self.process_group = process_group
        runner_type = DeviceRunner if config.sync_free else HostRunner
        self.runner = runner_type(model, adapter, config, scheduler=scheduler,
                                  process_group=process_group)
        self.patches = Patches()

    @property
    def mode(self) -> str:
        return "sync_free" if self.config.sync_free else "host"

    # ------------------------------------------------------------ install

    def install(self) -> None:
        a, m, r, p = self.adapter, self.model, self.runner, self.patches
        p.override(m, "forward", self._model_forward(m.forward))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            p.override(block, "forward", _block_event(r, i, i == last and a.end is None, block.forward))
        for module in (a.tail(m) if a.tail is not None else ()):
            p.override(module, "forward", _tail_event(r, module.forward))
        if a.end is not None:
            end = a.end(m)
            p.override(end, "forward", _end_event(r, end.forward))
        for name, get in a.capture.items():
            p.add_handle(get(m).register_forward_hook(_capture_event(r, name)))
        sched = self.scheduler
        if sched is not None and hasattr(sched, "set_timesteps"):
            p.override(sched, "set_timesteps", _after(sched.set_timesteps, r.set_timesteps_done))
        if sched is not None and callable(getattr(sched, "step", None)) and not self.config.sync_free:
            p.override(sched, "step", _after(sched.step, r.scheduler_step_done))

    def uninstall(self) -> None:
        self.patches.restore()
        self.runner.close()

    def _model_forward(self, forward: Callable) -> Callable:
        runner, config = self.runner, self.config

        def model_forward(*args, **kwargs):
            if config.backend:
                with config.backend_scope():
                    return runner.model_call(forward, args, kwargs)
            return runner.model_call(forward, args, kwargs)
        return model_forward

    # ------------------------------------------------------------ inspection

    def restart(self) -> None:
        self.runner.restart()

    def stats(self) -> Dict[str, Any]:
        out = self.runner.stats()
        out.update(threshold=self.config.threshold, preset=self.adapter.name,
                   variant=self.adapter.variant, mode=self.mode,
                   cache_bytes=cache_bytes(self.runner.tensors()))
        return out

    def tensors(self) -> List[Tensor]:
        return self.runner.tensors()


# Each event closes over the runner and the original method only: a call
# costs one Python frame on top of the runner's own work.

def _block_event(runner, index: int, ends_span: bool, original: Callable) -> Callable:
    def forward(*args, **kwargs):
        return runner.block(index, ends_span, original, args, kwargs)
    return forward


def _tail_event(runner, original: Callable) -> Callable:
    def forward(*args, **kwargs):
        return runner.tail(original, args, kwargs)
    return forward


def _end_event(runner, original: Callable) -> Callable:
    def forward(x, *args, **kwargs):
        return runner.end(original, x, args, kwargs)
    return forward


def _capture_event(runner, name: str) -> Callable:
    def hook(module, inputs, output):
        runner.captured(name, output)
    return hook


def _after(original: Callable, then: Callable[[], None]) -> Callable:
    def method(*args, **kwargs):
        out = original(*args, **kwargs)
        then()
        return out
    return method

