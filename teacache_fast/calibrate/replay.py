"""Replay: the decisions a cached run would take on recorded indicators,
through the decision op itself (no model runs)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..models.base import first_and_last
from .recording import Recording

__all__ = ["ForcedRule", "forced_mask", "replay_decisions", "default_thresholds"]

ForcedRule = Callable[[int, int], bool]  # (step, num_steps) -> always compute?


def forced_mask(forced: ForcedRule, num_steps: int) -> np.ndarray:
    return np.array([bool(forced(i, num_steps)) for i in range(num_steps)])


def replay_decisions(recording: Recording, coefficients: Sequence[float], threshold: float, *,
                     forced: ForcedRule = first_and_last,
                     max_consecutive_skips: Optional[int] = None, accumulate: str = "sum",
                     device=None, backend: Optional[str] = None) -> np.ndarray:
    """Compute flags ``(num_runs, num_branches, num_steps)`` that a cached run would take.

    Runs ``ops.teacache_decide_`` itself on the recorded partial sums, one
    call per step for all runs and branches at once, so the accumulation
    rounds exactly as the cache's does. It runs on ``device`` (default: where
    the recording was made) with ``backend`` (default: the automatic choice),
    i.e. the same decision kernel as the cached run. ``forced`` is the
    forced-step rule (default: first and last step; ``calibrate`` passes the
    wrapper's own rule: the family's, ret_steps and the window); ``accumulate``
    as TeaCacheConfig's ("abs": the estimate adds |poly(rel)|). Exact for the same
    inputs; in a real sampling loop a skipped step changes later inputs a
    little, so later indicators (and rarely a decision) may differ.
    """
    if accumulate not in ("sum", "abs"):
        raise ValueError(f"accumulate must be 'sum' or 'abs', got {accumulate!r}")
    recording.check()
    n = recording.num_steps
    traces = recording.traces()
    p = np.stack([recording.partials[r][b] for r, b in traces]).astype(np.float32)  # (T, n, 2)
    # A step without a previous input: the cache sees prev = 0, which the op
    # treats as "not finite -> compute"; [0, 0] reproduces that.
    p[~np.isfinite(p).all(axis=-1)] = 0.0
    device = torch.device(device or recording.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")  # a GPU recording refitted elsewhere: same rule, torch kernels
    partials = torch.from_numpy(p).to(device)
    state = ops.new_decide_state((len(traces), 2), device)
    force_steps = torch.from_numpy(forced_mask(forced, n)).to(device)
    flags = torch.empty((len(traces), n), dtype=torch.bool, device=device)
    with ops.use_backend(backend) if backend else contextlib.nullcontext():
        for i in range(n):
            force = force_steps[i].expand(len(traces)).contiguous()
            flags[:, i] = ops.teacache_decide_(partials[:, i].contiguous(), state, coefficients,
                                               float(threshold), force=force,
                                               max_consecutive_skips=max_consecutive_skips,
                                               accumulate_abs=accumulate == "abs")
    return flags.cpu().numpy().reshape(recording.num_runs, len(recording.branches), n)


def default_thresholds(per_step_estimate: np.ndarray, num_steps: int, count: int = 8) -> List[float]:
    """A 1-2-3-5 grid from about one step's estimate up to about half a run's total."""
    est = per_step_estimate[np.isfinite(per_step_estimate) & (per_step_estimate > 0)]
    if est.size == 0:
        return [0.1, 0.2, 0.4, 0.8]
    lo = float(np.median(est)) * 0.5
    hi = max(float(np.median(est)) * num_steps * 0.5, lo * 10)
    grid = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 3, 5)]
    grid = [float(f"{g:.3g}") for g in grid if lo <= g <= hi]
    if len(grid) > count:  # keep the ends, thin the middle
        idx = np.unique(np.linspace(0, len(grid) - 1, count).round().astype(int))
        grid = [grid[i] for i in idx]
    return grid
