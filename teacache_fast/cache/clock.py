"""The call clock: which CFG branch and step a transformer call is, and when a
new generation starts. Host counters only; every reset rule lives here.

When the clock cannot be sure where a call sits, it starts a new generation
(the call computes: a fresh branch has nothing to reuse) and counts the
restart under its reason in ``stats()["restarts"]``; it never places a call
on a guess that could make it skip. The final step of a generation always
computes (a forced step), also across an ambiguous restart.

How a call is placed, best first:

* ``context`` (a :class:`CallContext`: diffusers pipelines wrap each call in
  ``transformer.cache_context(name, ...)``): branch = a stable index per
  name (first name seen -> 0, next -> 1, ...), step = ``step_index`` (else
  a per-name count), ``num_steps`` = ``num_inference_steps`` when given.
* ``stepped`` (a pipeline's scheduler is watched): its ``step()`` ends a
  denoising step, so branch = calls since the last ``step()``, step =
  ``step()`` calls so far.
* otherwise from the timestep (read on the host every call; free on CPU,
  one small read for a device timestep): calls that share the timestep of
  the step's first call are its branches (``branches=N`` fixes their number;
  else it is learnt during the first step of each generation, never carried
  over from an earlier one).

Rules, in the order they are checked (reason = the key in ``restarts``;
"ambiguous" ones are guesses the clock resolves by computing):

====================================================  =========================================
what the clock sees                                    what it does
====================================================  =========================================
``set_timesteps()`` ran on the watched scheduler       new generation (``set_timesteps``), the
                                                       step count read from the scheduler
``teacache_fast.reset`` / ``restart()``                new generation (``reset``)
the previous call raised                               new generation (``call raised``)
the previous generation finished (its last branch      new generation (``finished``)
reached step ``num_steps - 1``)
context: ``step_index`` not after the name's last      new generation (``step index went back``)
one, or ``num_inference_steps`` changed                (``num_inference_steps changed``)
timestep moved against the generation's direction      new generation (``timestep went back``)
back to (or past) its first timestep
timestep moved against the direction, not as far as    ambiguous: new generation (``timestep
the first one (a wobble, or an img2img run)            rose``); the old count's forced steps
                                                       (its last step) stay forced
the generation's first step only, and the timestep     ambiguous: new generation (``timestep
rises (a one-step run or warm-up, then a run; or a     rose``); resolved at the next move: a
schedule counting up, as Lumina's)                     second rise adopts the rising direction
                                                       and the old count
a call at the first step's timestep with other         ambiguous: new generation (``first step
latents (first tensor argument) than the step's        repeated``): a warm-up or a run stopped
first call, or repeating one of its calls (every       after its first step (CFG branches of a
tensor argument the same object); with                 step get the same latents tensor; a loop
``branches=N``: after N calls at it, or a repeat       that gives each branch its own copy
                                                       needs ``branches=N`` or a cache_context)
a branch ``b > 0`` whose timestep differs from its     the step ended early (CFG truncation):
step's first call                                      branch 0 of the next step
the step count would reach ``num_steps``               new generation (``schedule wrapped``)
a branch's shapes, dtypes or devices changed           that branch starts afresh (it computes);
                                                       the step count goes on when the timestep
                                                       is known, else new generation (``shapes
                                                       changed``)
a watched scheduler never stepped                      stop watching it; the calls so far are
                                                       placed by the timestep (no restart), or,
                                                       without one, after ``MAX_CALLS_PER_STEP``
                                                       calls, new generation (``scheduler not
                                                       stepped``)
====================================================  =========================================

What is not knowable from a bare model's calls: a warm-up call at a timestep
*above* the next generation's first one looks like that generation's first
step (its count is then one ahead: the step after the real last one wraps
and computes). A pipeline's ``cache_context`` or scheduler removes every
guess.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from .schedule import scheduler_ready, scheduler_steps, timestep_value

__all__ = ["CallClock", "CallContext", "Tick"]

AMBIGUOUS = ("timestep rose", "first step repeated")


class CallContext(NamedTuple):
    """What a pipeline says about a call (diffusers' ``cache_context``)."""
    name: str
    step_index: Optional[int] = None
    num_inference_steps: Optional[int] = None


class Tick(NamedTuple):
    """Where one call sits: its branch, its step, the generation's step count,
    why a new generation started at this call (None: it did not), ``shadow``:
    the call's step in the generation an ambiguous restart may not have
    ended (its forced steps stay forced), ``fresh``: the branch's buffers
    must be dropped first (its shapes changed)."""
    branch: int
    step: int
    num_steps: int
    restarted: Optional[str]
    shadow: Optional[int] = None
    fresh: bool = False


def _same(ref: Optional[weakref.ref], t: Any) -> bool:
    return ref is not None and ref() is t


def _refs(inputs: Sequence[Any]) -> List[Optional[weakref.ref]]:
    out = []
    for v in inputs:
        try:
            out.append(weakref.ref(v))
        except TypeError:
            out.append(None)
    return out


class CallClock:
    """Maps transformer calls to :class:`Tick` s (the rules: the module docstring)."""

    # more calls than this without a scheduler step (and no timestep to see
    # the steps by): the loop does not use the watched scheduler
    MAX_CALLS_PER_STEP = 8

    def __init__(self, branches: Optional[int], num_steps: Optional[int], scheduler: Any = None):
        self.fixed = branches
        self.configured_steps = num_steps
        self.num_steps = num_steps
        self.scheduler = scheduler
        self.stepped = scheduler is not None and callable(getattr(scheduler, "step", None))
        self.generations = 0
        self.restarts: Dict[str, int] = {}
        self.pending = False             # set_timesteps ran: the next call starts a generation
        self.closed: Optional[str] = None  # the next call starts a generation, for this reason
        self.scheduler_set = False
        self.names: Dict[str, int] = {}  # cache_context name -> branch (stable)
        self._clear()

    # ------------------------------------------------------------ events

    def set_timesteps_done(self) -> None:
        """The watched scheduler was set up for a new generation."""
        self.pending = True
        self.scheduler_set = True

    def step_done(self) -> None:
        """The watched scheduler finished a denoising step."""
        if self.in_step:
            self.steps += 1
            self.in_step = 0

    def abandon(self, reason: str = "call raised") -> None:
        """The current generation ends here (e.g. a call raised): the next
        call starts a new one."""
        if self.closed is None:
            self.closed = reason

    def restart(self, reason: str = "reset") -> None:
        """Start a new generation: counters cleared, the step count read again."""
        self._clear()
        self.generations += 1
        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        self.pending = False
        self.closed = None
        if self.scheduler is not None and self._scheduler_usable():
            self.num_steps = scheduler_steps(self.scheduler) or self.num_steps or self.configured_steps

    # ------------------------------------------------------------ the clock

    def next_call(self, timestep: Any, signature: Any, context: Optional[CallContext] = None,
                  inputs: Sequence[Any] = ()) -> Tick:
        """Place the next call. ``timestep``: the model's timestep argument;
        ``signature``: anything that changes when the call's shapes, dtypes
        or devices change; ``context``: what the pipeline said about the call;
        ``inputs``: the call's tensor arguments, latents first (told apart
        by identity during a generation's first step)."""
        reason = None
        if self.pending:
            reason = self._restart("set_timesteps")
        elif self.closed is not None:
            reason = self._restart(self.closed)
        if context is not None:
            return self._place_context(context, signature, reason)
        t = timestep_value(timestep, self.needs_timestep())
        if reason is None and self.calls:
            reason = self._moved_back(t)
        if reason is None and self.calls and self.steps == 0 and not self.stepped \
                and t is not None and t == self.first_t and self._repeated_first_step(inputs):
            reason = self._restart("first step repeated")
        branch, step = self._tick(t, inputs)
        if self.stepped and self.scheduler_t is None and branch >= self.MAX_CALLS_PER_STEP:
            self.stepped = False  # the loop never steps the watched scheduler
            reason = self._restart("scheduler not stepped")
            branch, step = self._tick(t, inputs)
        self._resolve_num_steps()
        fresh = False
        known = self.signatures.get(branch)
        if step >= self.num_steps:
            reason = self._restart("schedule wrapped")
            branch, step = self._tick(t, inputs)
        elif known is not None and known != signature:
            if t is None or self.stepped:
                reason = self._restart("shapes changed")
                branch, step = self._tick(t, inputs)
            else:
                fresh = True   # new buffers for this branch; the step count goes on
        self.signatures[branch] = signature
        shadow = None
        if self.shadow_offset is not None and step + self.shadow_offset < self.num_steps:
            shadow = step + self.shadow_offset
        self._maybe_finished(branch, step)
        return Tick(branch, step, self.num_steps, reason, shadow, fresh)

    def needs_timestep(self) -> bool:
        """Whether a device timestep is read: always, except while a watched
        scheduler counts the steps and its timesteps tell the calls apart."""
        return True

    # ------------------------------------------------------------ internals

    def _clear(self) -> None:
        self.period = self.fixed
        self.calls = 0
        self.in_step = 0      # calls in the current step (stepped: since the last step())
        self.steps = 0        # stepped mode: scheduler steps so far; else the current step
        self.step_t: Optional[float] = None
        self.scheduler_t: Optional[float] = None
        self.first_t: Optional[float] = None
        self.last_t: Optional[float] = None
        self.direction = 0    # +1 / -1 once two different timesteps were seen
        self.signatures: Dict[int, Any] = {}
        self.step_inputs: List[List[Optional[weakref.ref]]] = []
        self.shadow_offset: Optional[int] = None
        self.maybe_rising: Optional[tuple] = None   # (first_t, offset) of a first-step rise
        self.ctx_last: Dict[int, int] = {}

    def _restart(self, reason: str) -> str:
        self.restart(reason)
        return reason

    def _scheduler_usable(self) -> bool:
        return self.scheduler_set or scheduler_ready(self.scheduler)

    def _resolve_num_steps(self) -> None:
        if self.num_steps is None and self.scheduler is not None and self._scheduler_usable():
            self.num_steps = scheduler_steps(self.scheduler)
        if self.num_steps is None:
            if self.scheduler is not None:
                raise RuntimeError(
                    "TeaCache needs num_steps: the pipeline's scheduler has no timesteps for a "
                    "generation yet (call scheduler.set_timesteps(n) first, as a pipeline's "
                    "__call__ does), or pass apply_teacache(..., num_steps=N)")
            raise RuntimeError("TeaCache needs num_steps: pass apply_teacache(..., num_steps=N) "
                               "or apply it to a pipeline whose scheduler sets its timesteps")

    def _moved_back(self, t: Optional[float]) -> Optional[str]:
        """A restart reason when the timestep says a new generation began."""
        if t is None or self.last_t is None or t == self.last_t:
            return None
        if self.maybe_rising is not None:
            first_t, offset = self.maybe_rising
            self.maybe_rising = None
            if t > self.last_t:   # a second rise: the schedule counts up, it was one generation
                self.generations -= 1
                self.restarts["timestep rose"] -= 1
                if not self.restarts["timestep rose"]:
                    del self.restarts["timestep rose"]
                self.first_t, self.direction = first_t, 1
                self.steps += offset
                self.shadow_offset = None
                return None
            self.shadow_offset = None   # it goes down: a new generation indeed
            return None
        if self.direction == 0:
            if self.period is None and t > self.last_t and not self.stepped:
                # only the first step was seen, and the timestep rises
                first_t, offset = self.first_t, self.steps + 1
                self._restart("timestep rose")
                self.shadow_offset, self.maybe_rising = offset, (first_t, offset)
                return "timestep rose"
            return None
        if (t > self.last_t) == (self.direction > 0):
            return None
        if (t - self.first_t) * self.direction <= 0:
            return self._restart("timestep went back")
        offset = self.steps + (1 if self.in_step else 0)
        self._restart("timestep rose")
        self.shadow_offset = offset
        return "timestep rose"

    def _repeated_first_step(self, inputs: Sequence[Any]) -> bool:
        """At the first step's timestep: other latents, or a call repeated."""
        if self.fixed is not None and self.in_step >= self.fixed:
            return True   # the first step is complete: a call at its timestep starts anew
        if not inputs or not self.step_inputs:
            return False
        if self.fixed is None and not _same(self.step_inputs[0][0], inputs[0]):
            return True   # with branches=N given, the calls of a step go round robin
        return any(len(refs) == len(inputs) and all(_same(r, v) for r, v in zip(refs, inputs))
                   for refs in self.step_inputs)

    def _tick(self, t: Optional[float], inputs: Sequence[Any] = ()):
        if self.stepped:
            if t is not None and self.in_step and self.scheduler_t is not None \
                    and t != self.scheduler_t:
                # a new timestep without a scheduler step: the loop does not step it;
                # the calls so far were one step, place by the timestep from here
                self.stepped = False
                self.period = self.fixed or self.in_step
                self.steps, self.step_t = 0, self.scheduler_t
                self.first_t = self.first_t if self.first_t is not None else self.scheduler_t
            else:
                branch, step = self.in_step, self.steps
                if self.in_step == 0:
                    self.scheduler_t = t
                self.in_step += 1
                self._seen(t)
                return branch, step
        if self.period is None:
            if t is None:  # no timestep to learn from: a single branch
                self.period, self.in_step, branch, step = 1, 1, 0, self.steps
                self.first_t = self.step_t = None
            elif self.calls == 0 or t == self.first_t:
                branch, step = self.calls, self.steps
                self.in_step = branch + 1
                self.first_t = self.step_t = t
                self.step_inputs.append(_refs(inputs))
            else:  # the first new timestep: the first step had this many branches
                self.period = self.calls
                self.steps += 1
                self.in_step, branch, step = 1, 0, self.steps
                self.step_t = t
        else:
            if self.in_step >= self.period or (
                    self.in_step and t is not None and self.step_t is not None and t != self.step_t):
                # the step is complete, or it ended early (fewer branches from here)
                self.steps += 1
                self.in_step = 0
            if self.in_step == 0:
                self.step_t = t
                if self.steps == 0 and self.first_t is None:
                    self.first_t = t
            branch, step = self.in_step, self.steps
            self.in_step += 1
            if step == 0:
                self.step_inputs.append(_refs(inputs))
        self._seen(t)
        return branch, step

    def _seen(self, t: Optional[float]) -> None:
        self.calls += 1
        if t is not None:
            if self.first_t is None:
                self.first_t = t
            if self.last_t is not None and t != self.last_t and self.direction == 0 \
                    and self.maybe_rising is None:
                self.direction = 1 if t > self.last_t else -1
            self.last_t = t

    def _maybe_finished(self, branch: int, step: int) -> None:
        if self.stepped or self.num_steps is None or step != self.num_steps - 1:
            return
        if self.period is not None and branch == self.period - 1:
            self.closed = "finished"

    def _place_context(self, ctx: CallContext, signature: Any, reason: Optional[str]) -> Tick:
        if ctx.num_inference_steps is not None and ctx.num_inference_steps != self.num_steps:
            if self.calls and reason is None:
                reason = self._restart("num_inference_steps changed")
            self.num_steps = ctx.num_inference_steps
        branch = self.names.setdefault(ctx.name, len(self.names))
        last = self.ctx_last.get(branch)
        step = ctx.step_index if ctx.step_index is not None else (0 if last is None else last + 1)
        if last is not None and step <= last:
            reason = self._restart("step index went back")
            step = ctx.step_index if ctx.step_index is not None else 0
        self._resolve_num_steps()
        if step >= self.num_steps:
            reason = self._restart("schedule wrapped")
            step = 0
        known = self.signatures.get(branch)
        fresh = known is not None and known != signature
        self.signatures[branch] = signature
        self.ctx_last[branch] = step
        self.calls += 1
        return Tick(branch, step, self.num_steps, reason, None, fresh)
