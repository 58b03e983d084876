"""record() and calibrate(): run generations in record mode through the cache
itself, then fit."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .recording import CalibrationError, ExpertRecorder, Recorder, Recording
from .result import CalibrationResult, fit_recording

__all__ = ["record", "record_experts", "calibrate"]


def _target_model(target):
    """The transformer of a model or a pipeline (what apply_teacache wraps)."""
    return target if isinstance(target, torch.nn.Module) else getattr(target, "transformer", target)


# num_steps given to the wrapper when the caller lets the recording find it:
# never reached, so the wrapper's step count never wraps in the middle of a run.
_UNBOUNDED_STEPS = 1 << 30


def _check_record_args(runs, num_steps, config: dict) -> None:
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise CalibrationError(f"runs must be an int >= 1, got {runs!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                  or num_steps < 2):
        raise CalibrationError(f"num_steps must be None or an int >= 2, got {num_steps!r}")
    for name in ("threshold", "observer", "coefficients"):
        if name in config:
            raise TypeError(f"record()/calibrate() set {name} themselves (record mode); do not pass it")
    if config.get("per_sample"):
        raise CalibrationError("per_sample=True is not supported: calibration fits and replays the "
                               "whole-batch indicator (calibrate with batch 1, or without per_sample)")


def _denoisers(target) -> List[Tuple[Optional[str], torch.nn.Module]]:
    """(name, model) of every denoiser of a pipeline; [(None, model)] for a model."""
    if isinstance(target, torch.nn.Module):
        return [(None, target)]
    from ..api import denoisers
    return list(denoisers(target).items())


def _progress(runs: int, num_steps: Optional[int]):
    """A tqdm bar, one tick per step of branch 0 (total unknown without num_steps)."""
    from tqdm.auto import tqdm
    return tqdm(total=runs * num_steps if num_steps else None, unit="step", desc="calibrate")


def record_experts(target, run_fn: Callable[[object, int], object], runs: int, *,
                   num_steps: Optional[int] = None, preset: Optional[str] = None,
                   variant: Optional[str] = None, adapter=None, progress: bool = False,
                   **config) -> Dict[Optional[str], Tuple[Recording, Callable[[int, int], bool]]]:
    """:func:`record` for every denoiser of ``target``: {name: (recording, forced rule)}.

    A pipeline with several denoisers (Wan2.2's ``transformer`` and
    ``transformer_2``) gets one recorder per denoiser, each attached to its
    model alone; an expert's pairs compare its own consecutive calls (it runs
    part of the steps). A model or a one-denoiser pipeline: {None: ...}.
    """
    from ..cache import TeaCacheConfig
    from ..api import apply_teacache, remove_teacache, reset
    from ..models import adapter_for

    _check_record_args(runs, num_steps, config)
    experts = _denoisers(target)
    several = len(experts) > 1
    bar = _progress(runs, num_steps) if progress else None
    setups = {}
    for name, model in experts:
        chosen = adapter if adapter is not None else adapter_for(model, preset=preset, variant=variant)
        recorder = (ExpertRecorder if several else Recorder)(type(model).__name__)
        if bar is not None:
            recorder.on_call = lambda branch, step: bar.update(1) if branch == 0 else None
        # Record mode: threshold 0 computes every step; the coefficients then never matter.
        cfg = TeaCacheConfig(threshold=0.0, coefficients=[1.0, 0.0], observer=recorder,
                             num_steps=num_steps or _UNBOUNDED_STEPS).replace(**config)
        setups[name if several else None] = (model if several else target, chosen, recorder, cfg)
    attached = []
    try:
        for where, chosen, _, cfg in setups.values():
            apply_teacache(where, cfg, adapter=chosen)
            attached.append(where)
        for r in range(runs):
            for where in attached:
                reset(where)
            run_fn(target, r)
            for _, _, recorder, _ in setups.values():
                recorder.finish_run()
    finally:
        for where in attached:
            remove_teacache(where)
        if bar is not None:
            bar.close()
    return {name: _checked(recorder, num_steps, cfg, chosen)
            for name, (_, chosen, recorder, cfg) in setups.items()}


def _checked(recorder: Recorder, num_steps, cfg, adapter):
    rec = recorder.recording
    rec.check()
    if num_steps is not None and rec.num_steps != num_steps and not isinstance(recorder, ExpertRecorder):
        raise CalibrationError(f"num_steps={num_steps} but each branch was called {rec.num_steps} "
                               "times per run")
    rule_cfg = cfg.replace(observer=None)

    def forced(step: int, n: int) -> bool:
        return rule_cfg.forced(step, n, adapter.forced)

    forced.__name__ = f"{adapter.name}:{getattr(adapter.forced, '__name__', 'rule')}"
    return rec, forced


def record(target, run_fn: Callable[[object, int], object], runs: int, **kwargs
           ) -> Tuple[Recording, Callable[[int, int], bool]]:
    """Run ``run_fn(target, r)`` for r in range(runs) with the cache in record mode.

    target: a transformer (or a pipeline) that ``apply_teacache`` accepts;
    run_fn: one whole generation (all steps, every CFG branch). The cache is
    attached with threshold 0 (never skips) and the recorder as its observer,
    and removed afterwards. Returns the recording and the forced-step rule the
    cache applies with these settings (for :func:`replay_decisions`).
    Keywords: num_steps, preset, variant, adapter, progress (a tqdm bar per
    step), and TeaCacheConfig fields that shape the decision (ret_steps,
    start, end, max_consecutive_skips, branches, per_sample, backend). A
    pipeline with several denoisers: use :func:`record_experts`.
    """
    found = record_experts(target, run_fn, runs, **kwargs)
    if len(found) != 1:
        raise CalibrationError(f"the pipeline has {len(found)} denoisers ({sorted(found)}): use "
                               "record_experts (one recording per denoiser)")
    return next(iter(found.values()))


def calibrate(model_or_factory, run_fn: Callable[[object, int], object], *, runs: int = 8,
              num_steps: Optional[int] = None, degree=4, step_range=None,
              convention: str = "all-pairs",
              preset: Optional[str] = None, variant: Optional[str] = None, adapter=None,
              progress: bool = False, **config):
    """Record ``runs`` generations without skipping, fit the polynomial, return the result.

    model_or_factory: a transformer or pipeline (anything ``apply_teacache``
    takes), or a zero-argument callable building one. run_fn(model, r): one
    whole generation for run r (e.g. prompt r % len(prompts), seed r); it must
    call the model once per step and CFG branch. num_steps: calls per branch
    per run (None: found from the first run). step_range: (start, end) of the
    steps whose pairs are fitted (default all). degree: an int or "auto"
    (chosen by held-out error). convention: "all-pairs" (default, as the
    official scripts) or "step-means". preset / variant / adapter: how
    the cache attaches (default: the preset of the model's class; a custom
    Adapter for other models). ``config``: TeaCacheConfig fields that shape
    the decision, used by the replay (ret_steps, start, end,
    max_consecutive_skips, ...).

    Returns a :class:`CalibrationResult`; for a pipeline with several
    denoisers (Wan2.2's experts) ``{name: CalibrationResult}``, one fit each.

    >>> result = calibrate(model, run_fn, runs=20, num_steps=28)
    >>> result.to_json("my_model.json"); result.plot("fit.png")
    >>> print(result.format_table())
    >>> apply_teacache(model, preset="my_model.json", threshold=0.3, num_steps=28)
    """
    target = model_or_factory
    if not isinstance(target, torch.nn.Module) and callable(target) \
            and not hasattr(target, "transformer"):
        target = target()
    found = record_experts(target, run_fn, runs, num_steps=num_steps, preset=preset,
                           variant=variant, adapter=adapter, progress=progress, **config)
    results = {name: fit_recording(recording, degree, step_range=step_range, variant=variant,
                                   forced=forced, max_consecutive_skips=config.get("max_consecutive_skips"),
                                   backend=config.get("backend"), convention=convention)
               for name, (recording, forced) in found.items()}
    return results[None] if list(results) == [None] else results
