"""The call clock: which CFG branch and step a transformer call is, and when a
new generation starts. Host counters only; every reset rule lives here.

How a call is placed, best first:

* ``stepped`` (a pipeline's scheduler is watched): the scheduler's ``step()``
  ends a denoising step, so branch = calls since the last ``step()`` and step
  = ``step()`` calls so far. Exact even when the calls per step change (CFG
  truncation), and nothing is read.
* ``branches`` known: calls go round robin, branch = call % branches.
* otherwise the first step of each generation reads the timestep on the host
  (one small read per call of that step only) until it changes: the number of
  calls that shared it is the number of branches.

A new generation starts (the branches' buffers are dropped, the step count is
read again from the scheduler) when:

* the watched scheduler's ``set_timesteps()`` ran since the last call;
* the timestep moved against this generation's direction (most pipelines
  count down, Lumina's count up);
* a watched scheduler is never stepped (more than ``MAX_CALLS_PER_STEP``
  calls in one step): the clock stops watching it and places calls by the
  other two ways;
* the step count reached ``num_steps`` (the schedule wrapped);
* a branch is called with other shapes, dtypes or devices than before;
* :meth:`CallClock.restart` is called (``teacache_fast.reset``).
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, NamedTuple, Optional

from torch import Tensor

__all__ = ["CallClock", "Tick", "timestep_value", "scheduler_steps"]


class Tick(NamedTuple):
    """Where one call sits: its branch, its step, the generation's step count,
    and why a new generation started at this call (None: it did not)."""
    branch: int
    step: int
    num_steps: int
    restarted: Optional[str]


def timestep_value(t: Any, must_read: bool) -> Optional[float]:
    """The call's timestep on the host, when reading it is free (CPU) or needed.

    A CUDA timestep is read (a sync) only when needed (learning the branches);
    new generations are then spotted by the step count wrapping, set_timesteps
    and shape changes.
    """
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return float(t)
    if not isinstance(t, Tensor) or t.numel() == 0:
        return None
    if must_read or t.device.type == "cpu":
        return float(t.reshape(-1)[0])
    return None


def scheduler_steps(scheduler: Any) -> Optional[int]:
    """Transformer calls per branch in the generation the scheduler was set up for."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    n = len(timesteps) - int(begin)
    return n if n > 0 else None


class CallClock:
    """Maps transformer calls to :class:`Tick` s (see the module docstring)."""

    # more calls than this without a scheduler step: the loop does not use the
    # watched scheduler, fall back to the other two ways
    MAX_CALLS_PER_STEP = 8

    def __init__(self, branches: Optional[int], num_steps: Optional[int], scheduler: Any = None):
        self.fixed = branches
        self.configured_steps = num_steps
        self.num_steps = num_steps
        self.scheduler = scheduler
        self.stepped = scheduler is not None and callable(getattr(scheduler, "step", None))
        self.generations = 0
        self.pending = False   # set_timesteps ran: the next call starts a generation
        self._clear()

    # ------------------------------------------------------------ events

    def set_timesteps_done(self) -> None:
        """The watched scheduler was set up for a new generation."""
        self.pending = True

    def step_done(self) -> None:
        """The watched scheduler finished a denoising step."""
        if self.in_step:
            self.steps += 1
            self.in_step = 0

    def restart(self) -> None:
        """Start a new generation: counters cleared, the step count read again."""
        self._clear()
        self.generations += 1
        self.pending = False
        if self.scheduler is not None:
            self.num_steps = scheduler_steps(self.scheduler) or self.num_steps or self.configured_steps

    # ------------------------------------------------------------ the clock

    def next_call(self, timestep: Any, signature: Any) -> Tick:
        """Place the next call. ``timestep``: the model's timestep argument
        (read on the host only when needed); ``signature``: anything that
        changes when the call's shapes, dtypes or devices change."""
        reason = None
        if self.pending:
            reason = self._restart("set_timesteps")
        t = timestep_value(timestep, self.needs_timestep())
        if self._went_back(t):
            reason = self._restart("timestep went back")
        branch, step = self._tick(t)
        if self.stepped and branch >= self.MAX_CALLS_PER_STEP:
            self.stepped = False  # the loop never steps the watched scheduler
            reason = self._restart("scheduler not stepped")
            branch, step = self._tick(timestep_value(timestep, self.needs_timestep()))
        if self.num_steps is None and self.scheduler is not None:
            self.num_steps = scheduler_steps(self.scheduler)
        if self.num_steps is None:
            raise RuntimeError("TeaCache needs num_steps: pass apply_teacache(..., num_steps=N) "
                               "or apply it to a pipeline whose scheduler sets its timesteps")
        known = self.signatures.get(branch)
        if step >= self.num_steps or (known is not None and known != signature):
            reason = self._restart("schedule wrapped" if step >= self.num_steps else "shapes changed")
            branch, step = self._tick(timestep_value(timestep, self.needs_timestep()))
        self.signatures[branch] = signature
        return Tick(branch, step, self.num_steps, reason)

    def needs_timestep(self) -> bool:
        return not self.stepped and self.period is None

    # ------------------------------------------------------------ internals

    def _clear(self) -> None:
        self.period = self.fixed
        self.calls = 0
        self.in_step = 0      # stepped mode: calls since the last scheduler step
        self.steps = 0        # stepped mode: scheduler steps so far
        self.first_t: Optional[float] = None
        self.last_t: Optional[float] = None
        self.direction = 0    # +1 / -1 once two different timesteps were seen
        self.signatures: Dict[int, Any] = {}

    def _restart(self, reason: str) -> str:
        self.restart()
        return reason

    def _went_back(self, t: Optional[float]) -> bool:
        if self.stepped or t is None or self.last_t is None or t == self.last_t:
            return False
        return self.direction != 0 and (t > self.last_t) != (self.direction > 0)

    def _tick(self, t: Optional[float]):
        if self.stepped:
            branch, step = self.in_step, self.steps
            self.in_step += 1
        elif self.period is None:
            if self.calls == 0 or t is None:
                self.first_t = t
                branch, step = self.calls, 0
                if t is None:  # no timestep to learn from: a single branch
                    self.period = 1
                    branch = 0
            elif t == self.first_t:
                branch, step = self.calls, 0
            else:
                self.period = self.calls
                branch, step = 0, 1
        else:
            branch, step = self.calls % self.period, self.calls // self.period
        self.calls += 1
        if t is not None:
            if self.last_t is not None and t != self.last_t and self.direction == 0:
                self.direction = 1 if t > self.last_t else -1
            self.last_t = t
        return branch, step

