"""Method overrides on live objects, and their removal. Knows nothing about
TeaCache.

An override is an instance attribute that shadows the class's method (so the
object is not copied and its parameters, buffers and ``state_dict`` keys stay
as they were). Removal restores exactly what was there before. When somebody
else overrode the same method after us, our override cannot be taken out from
under theirs: it is switched off instead (it calls straight through to what
it wrapped), so their code keeps working and ours no longer runs.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Tuple

__all__ = ["Patches"]

_MISSING = object()


class Patches:
    """A set of overrides and forward hooks, removed together in reverse order."""

    def __init__(self):
        self._overrides: List[Tuple[Any, str, Any, Callable, list]] = []
        self._handles: List[Any] = []

    def override(self, obj: Any, name: str, fn: Callable) -> Callable:
        """``obj.name = fn`` as an instance attribute; returns the original.

        The override takes the original's name, doc and signature
        (functools.wraps): callers inspect them, e.g. diffusers'
        retrieve_timesteps checks which arguments set_timesteps accepts.
        """
        original = getattr(obj, name)
        own = obj.__dict__.get(name, _MISSING)
        live = [True]

        @functools.wraps(original)
        def override(*args, **kwargs):
            if live[0]:
                return fn(*args, **kwargs)
            return original(*args, **kwargs)

        obj.__dict__[name] = override
        self._overrides.append((obj, name, own, override, live))
        return original

    def add_handle(self, handle: Any) -> None:
        """A ``torch.utils.hooks.RemovableHandle`` (e.g. a forward hook) to remove with the rest."""
        self._handles.append(handle)

    def restore(self) -> None:
        for obj, name, own, override, live in reversed(self._overrides):
            live[0] = False
            if obj.__dict__.get(name) is not override:
                continue  # overridden again after us: ours stays, switched off
            if own is _MISSING:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = own
        for h in self._handles:
            h.remove()
        self._overrides, self._handles = [], []
