"""The public facade: apply_teacache / remove_teacache / reset / stats /
inspect / is_cached / teacache.

The model itself is never copied or re-implemented: TeaCache overrides the
``forward`` of the model and of every block of its stack (see
teacache_fast.wrapper), and removing it restores the original objects.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from .cache.config import TeaCacheConfig
from .cache.stats import cache_bytes
from .models.base import Adapter
from .preset_json import load_preset_json, looks_like_preset_path
from .wrapper import CachedModel

__all__ = ["apply_teacache", "remove_teacache", "reset", "stats", "inspect", "is_cached",
           "teacache", "CacheView", "BranchView"]

_ATTR = "_teacache_fast"


def _resolve_target(module: Any):
    """(model, scheduler): a diffusers pipeline gives its transformer and scheduler."""
    if isinstance(module, nn.Module):
        return module, None
    model = getattr(module, "transformer", None)
    if isinstance(model, nn.Module):
        return model, getattr(module, "scheduler", None)
    raise TypeError(f"apply_teacache needs a torch.nn.Module or a pipeline with a .transformer, "
                    f"got {type(module).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's activations will live: its first parameter's device."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _load_fitted(path: Any, model: nn.Module, has_threshold: bool) -> dict:
    """Read a ``teacache-fast calibrate`` JSON for ``preset=path`` and check it fits."""
    data = load_preset_json(path)
    if not has_threshold:
        rows = data.get("thresholds") or []
        table = ", ".join(f"{r.get('threshold')} -> {r.get('computed_steps')}" for r in rows
                          if isinstance(r, dict))
        hint = (f"; its 'thresholds' table (threshold -> expected computed steps): {table}"
                if table else "; it has no 'thresholds' table, see `teacache-fast calibrate`")
        raise ValueError(f"preset={os.fspath(path)!r} is a fitted polynomial with no default "
                         f"threshold: pass threshold={hint}")
    names = [c.__name__ for c in type(model).__mro__]
    if data["model_class"] not in names:
        warnings.warn(f"preset file {os.fspath(path)!r} was fitted on {data['model_class']}, "
                      f"not on {type(model).__name__}: its coefficients may not fit this model",
                      stacklevel=3)
    return data


def _cached(module: Any) -> CachedModel:
    model, _ = _resolve_target(module)
    w = model.__dict__.get(_ATTR)
    if w is None:
        raise ValueError(f"{type(model).__name__} has no TeaCache attached (call apply_teacache first)")
    return w


def is_cached(module: Any) -> bool:
    model, _ = _resolve_target(module)
    return _ATTR in model.__dict__


def _build_config(model: nn.Module, adapter: Adapter, config: Optional[TeaCacheConfig],
                  threshold: Optional[float], fitted: Optional[dict], overrides: dict):
    if config is not None and not isinstance(config, TeaCacheConfig):
        raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
    cfg = config if config is not None else TeaCacheConfig(
        threshold=adapter.threshold if adapter.threshold is not None else 0.0)
    cfg = cfg.replace(**overrides)
    if threshold is not None:
        cfg = cfg.replace(threshold=threshold)
    if cfg.sync_free and cfg.branches is None:
        cfg = cfg.replace(branches=1)  # sync-free calls go round robin: no timestep read
    if cfg.coefficients is None:
        cfg = cfg.replace(coefficients=fitted["coefficients"] if fitted else adapter.coefficients)
    return cfg.validate()


def apply_teacache(module: Any, config: Optional[TeaCacheConfig] = None, *,
                   threshold: Optional[float] = None, preset: Optional[str] = None,
                   variant: Optional[str] = None, adapter: Optional[Adapter] = None,
                   process_group: Any = None, **overrides) -> nn.Module:
    """Attach TeaCache to a transformer (or a diffusers pipeline's transformer).

    config: a TeaCacheConfig; ``overrides`` (any of its fields) replace its
    fields. threshold: the skip threshold (default: config's, else the
    preset's first published one). preset / variant: pick a preset by name
    instead of by model class, and one of its variants (e.g. Wan's
    "t2v-14b"). preset="path/to.json": the coefficients fitted by
    ``teacache-fast calibrate`` (unless coefficients= is given); threshold=
    is then required (pick one from the file's thresholds table), and the
    adapter still comes from the model's class (or adapter=). adapter: a
    custom :class:`~teacache_fast.models.Adapter` for models without a
    preset. sync_free=True (a TeaCacheConfig field): the skip is a torch.cond
    and the decision never reaches the host, so the model compiles with
    torch.compile(fullgraph=True). process_group: a torch.distributed group whose
    ranks each hold a token shard of the same call (sequence / context
    parallel): the indicator's partial sums are added over it before every
    decision, so all ranks take bitwise the same decision (see
    teacache_fast.distributed; NCCL groups for CUDA activations, gloo for
    CPU), and the ranks agree on the forced steps and check they are at the
    same step (a mismatch raises on every rank). None: the group of the
    model's diffusers context-parallel config when it has one (found at each
    call, so ``enable_parallelism`` may come before or after), else no
    communication; a given group must cover the same ranks as that config.
    False: no communication even then. Returns the transformer.
    """
    from .models import adapter_for
    model, scheduler = _resolve_target(module)
    if _ATTR in model.__dict__:
        raise RuntimeError(f"TeaCache is already attached to this {type(model).__name__}; "
                           "call remove_teacache first")
    fitted = None  # a calibrated JSON preset: its coefficients, the model's own adapter
    if looks_like_preset_path(preset):
        fitted = _load_fitted(preset, model, threshold is not None or config is not None)
        preset = None
    if adapter is None:
        adapter = adapter_for(model, preset=preset, variant=variant)
    elif preset is not None or variant is not None:
        raise ValueError("pass either adapter= or preset=/variant=, not both")
    cfg = _build_config(model, adapter, config, threshold, fitted, overrides)
    if cfg.num_steps is None and scheduler is None:
        raise ValueError("num_steps is required (transformer calls per branch in one generation), "
                         "unless apply_teacache is given the pipeline")
    from .distributed import check_process_group, group_source
    if process_group is not None and process_group is not False:
        check_process_group(process_group, _model_device(model))
    cached = CachedModel(model, adapter, cfg, scheduler=scheduler,
                         process_group=group_source(model, process_group))
    model.__dict__[_ATTR] = cached
    try:
        cached.install()
    except Exception:
        cached.uninstall()
        del model.__dict__[_ATTR]
        raise
    return model


def remove_teacache(module: Any) -> nn.Module:
    """Restore the original forwards and free every cached tensor."""
    cached = _cached(module)
    cached.uninstall()
    del cached.model.__dict__[_ATTR]
    return cached.model


def reset(module: Any) -> None:
    """Forget the cached state (as at the start of a new generation)."""
    _cached(module).restart()


def stats(module: Any) -> Dict[str, Any]:
    """Calls, steps computed / skipped per branch and per sample, indicator trace
    (the schema: teacache_fast.cache.stats).

    ``rel_l1`` is the relative L1 distance of every call (NaN or inf on a
    branch's first call).
    """
    return _cached(module).stats()


@dataclass(frozen=True)
class BranchView:
    """One branch's cache buffers, as held now (the tensors themselves: read them, do
    not write them). ``decision`` is ``[[acc, consecutive_skips], ...]`` per state."""
    prev: Optional[Tensor]
    residual: Optional[Tensor]
    decision: Optional[list]


@dataclass(frozen=True)
class CacheView:
    """What TeaCache holds for one model (see :func:`inspect`)."""
    config: TeaCacheConfig
    adapter: Adapter
    mode: str                        # "host" or "sync_free"
    num_steps: Optional[int]
    generations: int
    scheduler_watched: bool          # the clock counts the watched scheduler's steps
    branches: Dict[int, BranchView]
    cache_bytes: int


def inspect(module: Any) -> CacheView:
    """A read-only view of the cache attached to ``module`` (a model or a
    pipeline): its settings, mode, clock facts and per-branch buffers. Meant
    for debugging and tests; the tensors are the live buffers."""
    cached = _cached(module)
    runner = cached.runner
    if cached.config.sync_free:
        branches = {i: BranchView(br.prev, br.residual,
                                  None if br.state is None else [br.state.tolist()])
                    for i, br in enumerate(runner.branches)}
        num_steps, generations, watched = runner.num_steps, runner.generations, False
    else:
        st = runner.state
        branches = {i: BranchView(b.prev, b.residual,
                                  None if b.decision is None else b.decision.as_rows())
                    for i, b in sorted(st.branches.items())}
        num_steps, generations, watched = st.num_steps, st.generations, st.clock.stepped
    return CacheView(config=replace(cached.config), adapter=cached.adapter, mode=cached.mode,
                     num_steps=num_steps, generations=generations, scheduler_watched=watched,
                     branches=branches, cache_bytes=cache_bytes(cached.tensors()))


@contextlib.contextmanager
def teacache(module: Any, config: Optional[TeaCacheConfig] = None, **kwargs) -> Iterator[nn.Module]:
    """``with teacache(pipe, threshold=0.4): pipe(...)``: apply, then always remove."""
    model = apply_teacache(module, config, **kwargs)
    try:
        yield model
    finally:
        remove_teacache(model)
