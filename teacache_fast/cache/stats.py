"""The one stats schema (both modes) and what the cache holds in memory.

``stats(model)`` is::

    {"calls", "num_steps", "generations", "restarts", "computed", "skipped",
     "branches": {index: {"computed", "skipped", "steps", "sample_computed",
                          "sample_skipped", "rel_l1", "negative_estimates"}},
     "threshold", "preset", "variant", "mode", "cache_bytes"}

``restarts`` counts the new generations by reason (cache/clock.py's rules
table; ``timestep rose`` and ``first step repeated`` are the ambiguous ones,
where the clock computed instead of guessing).

``rel_l1`` has one entry per step up to the last one called: the relative L1
distance of that call's indicator (NaN for a step the branch was not called
at, NaN or inf on a branch's first call); a list per step when each sample
decides alone. ``negative_estimates`` counts the calls whose polynomial was
negative at the indicator (the accumulator shrinks there).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
from torch import Tensor

__all__ = ["branch_entry", "summary", "rel_l1_from_rows", "cache_bytes"]


def branch_entry(*, computed: int, skipped: int, steps: Sequence[bool],
                 sample_computed: Sequence[int], sample_skipped: Sequence[int],
                 rel_l1: List[Any], negative_estimates: int) -> Dict[str, Any]:
    return {"computed": int(computed), "skipped": int(skipped), "steps": list(steps),
            "sample_computed": list(sample_computed), "sample_skipped": list(sample_skipped),
            "rel_l1": rel_l1, "negative_estimates": int(negative_estimates)}


def summary(branches: Dict[int, Dict[str, Any]], *, calls: int, num_steps: Optional[int],
            generations: int, **extra: Any) -> Dict[str, Any]:
    """The common keys; ``extra`` (e.g. ``restarts``: reason -> count) is added as is."""
    out = {"calls": calls, "num_steps": num_steps, "generations": generations,
           "computed": sum(b["computed"] for b in branches.values()),
           "skipped": sum(b["skipped"] for b in branches.values()),
           "branches": dict(sorted(branches.items()))}
    out.update(extra)
    return out


def _ratio(num: float, den: float) -> float:
    # fp32, as the device computes it (0/0 -> nan, x/0 -> inf)
    with np.errstate(all="ignore"):
        return float(np.float32(num) / np.float32(den))


def rel_l1_from_rows(by_step: Dict[int, Sequence[Sequence[float]]]) -> List[Any]:
    """``step -> rows of [num, den]`` -> the ``rel_l1`` list of the schema."""
    if not by_step:
        return []
    width = len(next(iter(by_step.values())))
    out: List[Any] = []
    for step in range(max(by_step) + 1):
        rows = by_step.get(step)
        row = [_ratio(n, d) for n, d in rows] if rows is not None else [math.nan] * width
        out.append(row[0] if len(row) == 1 else row)
    return out


def cache_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the tensors the cache holds, each storage counted once: what
    TeaCache adds to memory."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
