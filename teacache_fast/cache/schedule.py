"""What a call and a diffusers scheduler say about the generation: the
call's timestep on the host, whether the scheduler was set up for a
generation, and how many transformer calls per branch that generation has."""
from __future__ import annotations

import numbers
from typing import Any, Optional

from torch import Tensor

__all__ = ["timestep_value", "scheduler_ready", "scheduler_steps"]


def timestep_value(t: Any, must_read: bool) -> Optional[float]:
    """The call's timestep on the host; a device tensor is read (a small
    sync) only when ``must_read``."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return float(t)
    if not isinstance(t, Tensor) or t.numel() == 0:
        return None
    if must_read or t.device.type == "cpu":
        return float(t.reshape(-1)[0])
    return None


def scheduler_ready(scheduler: Any) -> bool:
    """Whether the scheduler's timesteps were set for a generation (not the
    training schedule it starts with, e.g. 1000 steps)."""
    n = getattr(scheduler, "num_inference_steps", None)
    if n is None:
        return False
    train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return n != train


def scheduler_steps(scheduler: Any) -> Optional[int]:
    """Transformer calls per branch in the generation the scheduler was set up for."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    n = len(timesteps) - int(begin)
    return n if n > 0 else None
