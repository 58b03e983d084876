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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from torch import Tensor, nn

from .cache.config import TeaCacheConfig
from .cache.stats import cache_bytes
from .models.base import Adapter, check_adapter
from .models.record import class_names
from .preset_json import load_preset_json, looks_like_preset_path
from .wrapper import CachedModel
from .wrapper.cached_model import DENOISERS, diffusers_cache_in_use
from .wrapper.device import model_device

__all__ = ["apply_teacache", "remove_teacache", "reset", "stats", "inspect", "is_cached",
           "teacache", "denoisers", "CacheView", "BranchView"]

_ATTR = "_teacache_fast"


def _unwrap(module: Any) -> Any:
    """The module itself for a torch.compile'd one (an OptimizedModule keeps it as _orig_mod)."""
    inner = getattr(module, "_orig_mod", None)
    if isinstance(module, nn.Module) and isinstance(inner, nn.Module):
        return inner
    return module


def _targets(module: Any) -> List[Tuple[Optional[str], nn.Module, Any]]:
    """(name, model, pipeline) for a model, or for every denoiser a pipeline holds."""
    module = _unwrap(module)
    if isinstance(module, nn.Module):
        return [(None, module, None)]
    found = [(name, _unwrap(getattr(module, name, None))) for name in DENOISERS]
    found = [(name, m, module) for name, m in found if isinstance(m, nn.Module)]
    if not found:
        raise TypeError(f"apply_teacache needs a torch.nn.Module or a pipeline with a .transformer, "
                        f"got {type(module).__name__}")
    return found


def denoisers(module: Any) -> Dict[Optional[str], nn.Module]:
    """What apply_teacache caches: {None: model} for a model, {name: model} for
    every denoiser of a pipeline (``transformer``, ``transformer_2``, ...)."""
    return {name: model for name, model, _ in _targets(module)}


def _resolve_target(module: Any):
    """(model, pipeline) of a model or of a pipeline's first denoiser."""
    _, model, pipeline = _targets(module)[0]
    return model, pipeline


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
    if data["model_class"] not in class_names(model):
        warnings.warn(f"preset file {os.fspath(path)!r} was fitted on {data['model_class']}, "
                      f"not on {type(model).__name__}: its coefficients may not fit this model",
                      stacklevel=3)
    return data


def _all_cached(module: Any) -> List[Tuple[Optional[str], CachedModel]]:
    """Every attached cache of a model or pipeline; an error when there is none."""
    found = [(name, m.__dict__[_ATTR]) for name, m, _ in _targets(module) if _ATTR in m.__dict__]
    if not found:
        model, _ = _resolve_target(module)
        raise ValueError(f"{type(model).__name__} has no TeaCache attached (call apply_teacache first)")
    return found


def _per_denoiser(module: Any, fn):
    """fn(cache) for one model; {denoiser name: fn(cache)} for a pipeline with several."""
    found = _all_cached(module)
    if len(found) == 1:
        return fn(found[0][1])
    return {name: fn(c) for name, c in found}


def is_cached(module: Any) -> bool:
    return any(_ATTR in m.__dict__ for _, m, _ in _targets(module))


def _build_config(model: nn.Module, adapter: Adapter, config: Optional[TeaCacheConfig],
                  threshold: Optional[float], fitted: Optional[dict], overrides: dict):
    if config is not None and not isinstance(config, TeaCacheConfig):
        raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
    cfg = config if config is not None else TeaCacheConfig(
        threshold=adapter.threshold if adapter.threshold is not None else 0.0,
        accumulate=adapter.accumulate, start=adapter.window[0], end=adapter.window[1])
    cfg = cfg.replace(**overrides)
    if threshold is not None:
        cfg = cfg.replace(threshold=threshold)
    if cfg.sync_free and cfg.branches is None:
        cfg = cfg.replace(branches=1)  # sync-free calls go round robin: no timestep read
    if cfg.coefficients is None:
        cfg = cfg.replace(coefficients=fitted["coefficients"] if fitted else adapter.coefficients)
        if fitted and fitted.get("fitted_range") and cfg.fitted_range is None:
            cfg = cfg.replace(fitted_range=tuple(fitted["fitted_range"]))
    if cfg.coefficients is None:
        raise no_coefficients_error(model, adapter)
    return cfg.validate()


def no_coefficients_error(model: nn.Module, adapter: Adapter) -> ValueError:
    """The one error for a model whose preset has no trustworthy published
    coefficients (structure only) and no coefficients= from the user."""
    ways = ("pass coefficients=[...] (highest power first, e.g. fitted by `teacache-fast "
            "calibrate`) or coefficients=\"auto\" (calibrate on this model)")
    if adapter.variant is None:  # a custom adapter, not a preset
        return ValueError(f"coefficients are required for the custom adapter {adapter.name!r} "
                          f"({type(model).__name__}): {ways}")
    return ValueError(f"TeaCache preset {adapter.name} variant {adapter.variant!r} "
                      f"({type(model).__name__}) has no trustworthy published coefficients: {ways}")


def _denoiser_overrides(overrides: dict, name: Optional[str], names: List[Optional[str]]) -> dict:
    """``coefficients={"transformer": [...], "transformer_2": [...]}``: one set
    per denoiser of a pipeline (Wan2.2 A14B's two experts); this one's."""
    coefficients = overrides.get("coefficients")
    if not isinstance(coefficients, Mapping):
        return overrides
    if name is None or len(names) < 2:
        raise ValueError("coefficients= as a dict (denoiser name -> coefficients) needs a pipeline "
                         "with several denoisers (e.g. transformer and transformer_2); give a "
                         "list for one model")
    unknown = sorted(set(coefficients) - set(names))
    if unknown or name not in coefficients:
        raise ValueError(f"coefficients= per denoiser must have exactly the pipeline's denoisers "
                         f"{names} as keys; got {sorted(coefficients)}")
    return dict(overrides, coefficients=coefficients[name])


def apply_teacache(module: Any, config: Optional[TeaCacheConfig] = None, *,
                   threshold: Optional[float] = None, preset: Optional[str] = None,
                   variant: Optional[str] = None, adapter: Optional[Adapter] = None,
                   process_group: Any = None, calibration_dir: Any = None,
                   calibration: Any = None, **overrides) -> nn.Module:
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
    False: no communication even then. coefficients= (a TeaCacheConfig
    field) may be a dict denoiser name -> coefficients for a pipeline with
    several denoisers (Wan2.2 A14B: ``{"transformer": [...], "transformer_2":
    [...]}``); such a pipeline's experts take their family's expert variant.
    A preset with no trustworthy published set (structure only) needs
    coefficients= or coefficients="auto".

    coefficients="auto" (self-calibration, teacache_fast.calibrate.auto): a
    fit stored for this model (class, config hash, variant; one per denoiser
    of a pipeline) under calibration_dir (default
    ``$TEACACHE_FAST_HOME/calibrations``, ``~/.cache/teacache_fast`` when
    unset) is loaded; else the first generation(s) run uncached and record,
    the fit is checked and stored, and the cache runs with it from the next
    generation on (a fit that fails its checks leaves the model uncached,
    with a warning). threshold= applies once calibrated; without it, the
    stored ``auto_threshold`` (the fit's table threshold predicting at most a
    1.5x block-stack speedup). calibration: a dict or
    :class:`~teacache_fast.calibrate.auto.AutoSettings` (runs, degree,
    convention, min_r2, min_pairs). Returns the transformer.
    """
    targets = _targets(module)
    names = [name for name, _, _ in targets]
    done: List[nn.Module] = []
    try:
        auto = _auto_request(config, overrides, calibration_dir, calibration)
        for name, model, pipeline in targets:
            _apply_one(model, pipeline, config, threshold, preset, variant, adapter, process_group,
                       _denoiser_overrides(overrides, name, names), experts=len(names) > 1,
                       auto_request=auto and dict(auto, denoiser=name))
            done.append(model)
    except Exception:
        for model in done:
            remove_teacache(model)
        raise
    return targets[0][1]


def _auto_request(config, overrides: dict, calibration_dir, calibration) -> Optional[dict]:
    """The coefficients="auto" settings (None: not asked for); pops it from overrides."""
    asked = overrides.get("coefficients") == "auto" or (
        config is not None and getattr(config, "coefficients", None) == "auto")
    if not asked:
        if calibration_dir is not None or calibration is not None:
            raise ValueError("calibration_dir= and calibration= apply to coefficients='auto' only")
        return None
    overrides.pop("coefficients", None)
    return {"calibration_dir": calibration_dir, "settings": calibration}


def _start_auto(model: nn.Module, adapter: Adapter, config, threshold, overrides: dict,
                request: dict):
    """(config, threshold, overrides, controller) for coefficients="auto"."""
    from .calibrate.auto import AutoCalibration
    if config is not None and config.coefficients == "auto":
        config = config.replace(coefficients=None)
    if threshold is None and config is not None:
        threshold = config.threshold
    rule = (config or TeaCacheConfig()).replace(**overrides)
    auto = AutoCalibration.start(
        model, variant=adapter.variant, denoiser=request["denoiser"],
        calibration_dir=request["calibration_dir"], settings=request["settings"],
        threshold=threshold, forced=lambda step, n: rule.forced(step, n, adapter.forced))
    if auto.recording and rule.per_sample:
        raise ValueError("coefficients='auto' cannot calibrate with per_sample=True (the fit uses "
                         "the whole-batch indicator); calibrate once without it")
    fields = auto.config_fields()
    return config, fields.pop("threshold"), dict(overrides, **fields), auto


def _apply_one(model: nn.Module, pipeline: Any, config, threshold, preset, variant, adapter,
               process_group, overrides, experts: bool = False,
               auto_request: Optional[dict] = None) -> None:
    from .models import adapter_for, family_for
    if _ATTR in model.__dict__:
        raise RuntimeError(f"TeaCache is already attached to this {type(model).__name__}; "
                           "call remove_teacache first")
    other = diffusers_cache_in_use(model)
    if other is not None:
        raise ValueError(f"diffusers' {other} is enabled on this {type(model).__name__}: two caches "
                         "cannot run together; call model.disable_cache() before apply_teacache")
    fitted = None  # a calibrated JSON preset: its coefficients, the model's own adapter
    if looks_like_preset_path(preset):
        fitted = _load_fitted(preset, model, threshold is not None or config is not None)
        preset = None
    if adapter is None:
        fam = family_for(model) if experts and preset is None and variant is None else None
        if fam is not None and fam.expert_variant is not None:
            variant = fam.expert_variant  # one of two experts (Wan2.2 A14B)
        adapter = adapter_for(model, preset=preset, variant=variant)
    elif preset is not None or variant is not None:
        raise ValueError("pass either adapter= or preset=/variant=, not both")
    else:
        check_adapter(adapter)
    auto = None
    if auto_request is not None:
        if fitted is not None:
            raise ValueError("pass either coefficients='auto' or preset='file.json', not both")
        config, threshold, overrides, auto = _start_auto(model, adapter, config, threshold,
                                                         overrides, auto_request)
    cfg = _build_config(model, adapter, config, threshold, fitted, overrides)
    if cfg.per_sample and not adapter.per_sample:
        raise ValueError(f"per_sample=True is not available for {adapter.name!r} "
                         f"({type(model).__name__}): its stream's batch dimension is not the "
                         "samples' (it would decide per frame or per token); leave per_sample off")
    if cfg.num_steps is None and pipeline is None:
        raise ValueError("num_steps is required (transformer calls per branch in one generation), "
                         "unless apply_teacache is given the pipeline")
    from .distributed import check_process_group, group_source
    if process_group is not None and process_group is not False:
        check_process_group(process_group, model_device(model))
    cached = CachedModel(model, adapter, cfg, pipeline=pipeline,
                         process_group=group_source(model, process_group), calibration=auto)
    model.__dict__[_ATTR] = cached
    try:
        cached.install()
    except Exception:
        cached.uninstall()
        del model.__dict__[_ATTR]
        raise


def remove_teacache(module: Any) -> nn.Module:
    """Restore the original forwards and free every cached tensor (of every
    denoiser, for a pipeline). Returns the (first) transformer."""
    for _, cached in _all_cached(module):
        cached.uninstall()
        del cached.model.__dict__[_ATTR]
    return _resolve_target(module)[0]


def reset(module: Any) -> None:
    """Forget the cached state (as at the start of a new generation)."""
    for _, cached in _all_cached(module):
        cached.restart()


def stats(module: Any) -> Dict[str, Any]:
    """Calls, steps computed / skipped per branch and per sample, indicator trace
    (the schema: teacache_fast.cache.stats); for a pipeline with several
    denoisers, ``{name: stats}``.

    ``rel_l1`` is the relative L1 distance of every call (NaN or inf on a
    branch's first call).
    """
    return _per_denoiser(module, CachedModel.stats)


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
    pipeline; ``{name: view}`` for a pipeline with several denoisers): its
    settings, mode, clock facts and per-branch buffers. Meant for debugging
    and tests; the tensors are the live buffers."""
    return _per_denoiser(module, _view)


def _view(cached: CachedModel) -> CacheView:
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
    """``with teacache(pipe, threshold=0.4): pipe(...)``: apply, then always remove.

    Leaving the block removes TeaCache unless the body removed it already, so
    an exception raised by the body is never replaced by a "no TeaCache
    attached" error from the exit."""
    model = apply_teacache(module, config, **kwargs)
    try:
        yield model
    finally:
        if _ATTR in model.__dict__:
            remove_teacache(model)
