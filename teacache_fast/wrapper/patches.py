"""Forward overrides on live modules, and their removal. Knows nothing about
TeaCache: an *event* ``event(original, args, kwargs)`` replaces a forward and
decides whether to call ``original``.

Two mechanisms, one semantics (removing them removes only what was added here,
whatever was installed after):

* diffusers' hook system, for the modules of a diffusers ``ModelMixin``: each
  override is a ``ModelHook`` registered in the module's ``HookRegistry``, so
  it orders and composes with group offloading, layerwise casting, context
  parallel and diffusers' caches, and ``remove_hook`` takes out exactly it.
  The model's hook is stateful: diffusers' ``cache_context(name, ...)`` sets
  its context (read with :meth:`Patches.context`) and a pipeline's
  ``maybe_free_model_hooks`` calls its reset.
* an instance attribute that shadows the class's ``forward`` (any other
  module, and scheduler methods). When somebody overrode the same attribute
  after us, ours cannot be taken out from under theirs: it is switched off (it
  calls straight through and drops its references), so their code keeps
  working and ours no longer runs or keeps the model alive.

A third, for a model's block loops: :meth:`Patches.gate_iteration` makes a
``ModuleList`` ask ``keep(i)`` before it yields block ``i`` (so a loop can end
early; None: this block and every later one, unasked); removing it gives the
list its class back.

A module with overrides cannot be deep-copied or pickled while they are
installed: the copy's forwards would still run the original's cache (a
silent alias), so both raise a clear error instead.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional

import torch
from torch import nn

__all__ = ["Patches", "uses_diffusers_hooks", "NOT_COPYABLE"]

_MISSING = object()
HOOK_NAME = "teacache_fast"
NOT_COPYABLE = ("this module has TeaCache attached: copying or pickling it would give a copy "
                "whose forwards still run the original's cache. Call "
                "teacache_fast.remove_teacache(model) first, copy or save it, then apply TeaCache "
                "to each copy (or save model.state_dict())")

Event = Callable[[Callable, tuple, dict], Any]


class _NotCopyable:
    def __deepcopy__(self, memo):
        raise TypeError(NOT_COPYABLE)

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_COPYABLE)


class _Override(_NotCopyable):
    """An instance attribute standing in for a method."""

    def __init__(self, event: Event, original: Callable):
        # name, doc, __wrapped__ (signature); not the __dict__: the original
        # may be another override, whose event is not ours
        functools.update_wrapper(self, original, updated=())
        self.event: Optional[Event] = event
        self.original = original

    def __call__(self, *args, **kwargs):
        event = self.event
        if event is None:  # switched off
            return self.original(*args, **kwargs)
        return event(self.original, args, kwargs)


class _Keep(_NotCopyable):
    """A gated list's question ``keep(i)``; None when switched off."""

    def __init__(self, keep: Callable[[int], Optional[bool]]):
        self.keep: Optional[Callable[[int], Optional[bool]]] = keep


def _gated_iter(self):
    keep = self.__dict__.get("_gate")
    keep = keep.keep if keep is not None else None
    if keep is None or torch.compiler.is_compiling():  # traced code sees the plain list
        return iter(self._modules.values())
    return _ask(self._modules.values(), keep)


def _ask(modules, keep: Callable[[int], Optional[bool]]):
    # asked lazily: keep(i) runs after block i-1 returned, so it can read
    # what that block decided; None: keep i and the rest without asking (a
    # computed call pays no question per block)
    it = iter(modules)
    for i, m in enumerate(it):
        k = keep(i)
        if k is None:
            yield m
            yield from it
            return
        if k:
            yield m


_GATED: dict = {}


def _gated_class(cls: type) -> type:
    """``cls`` with a gated ``__iter__`` (one subclass per container class)."""
    if cls not in _GATED:
        # copying or pickling refuses as every override does (not a lookup
        # error on this generated class)
        _GATED[cls] = type(f"Gated{cls.__name__}", (cls,), {
            "__iter__": _gated_iter, "__deepcopy__": _NotCopyable.__deepcopy__,
            "__reduce_ex__": _NotCopyable.__reduce_ex__})
    return _GATED[cls]


def uses_diffusers_hooks(module: nn.Module) -> bool:
    """Whether overrides on this model go through diffusers' HookRegistry."""
    try:
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:
        return False
    return isinstance(module, ModelMixin)


def _hook_class():
    """diffusers' ModelHook subclass (made on first use: diffusers is optional)."""
    global _HOOK
    if _HOOK is not None:
        return _HOOK
    from diffusers.hooks.hooks import ModelHook, StateManager

    class _NoState:
        def reset(self, *args, **kwargs):
            pass

    class TeaCacheHook(_NotCopyable, ModelHook):
        """TeaCache's forward in a diffusers HookRegistry."""

        def __init__(self, event: Event, on_reset: Optional[Callable[[], None]] = None):
            super().__init__()
            self.event = event
            self.on_reset = on_reset
            # stateful: cache_context() sets the context on our StateManager,
            # maybe_free_model_hooks() calls reset_state
            self._is_stateful = on_reset is not None
            self.state_manager = StateManager(_NoState) if self._is_stateful else None

        def new_forward(self, module, *args, **kwargs):
            return self.event(self.fn_ref.original_forward, args, kwargs)

        def reset_state(self, module):
            if self.on_reset is not None:
                self.on_reset()
            return module

        def context(self):
            return None if self.state_manager is None else self.state_manager._context

    _HOOK = TeaCacheHook
    return _HOOK


_HOOK = None


class Patches:
    """A set of overrides and forward hooks, removed together in reverse order."""

    def __init__(self):
        self._overrides: List[tuple] = []   # (obj, name, own, override)
        self._hooks: List[tuple] = []       # (registry, module)
        self._handles: List[Any] = []
        self._gates: List[tuple] = []       # (container, its class before us, keep)
        self.model_hook = None              # the stateful diffusers hook of the model, if any

    def wrap_forward(self, module: nn.Module, event: Event, *, diffusers: bool,
                     on_reset: Optional[Callable[[], None]] = None) -> None:
        """Replace ``module.forward`` by ``event(original, args, kwargs)``.

        diffusers: register a ModelHook in the module's HookRegistry (else an
        instance attribute). on_reset (diffusers only): the hook is stateful
        (cache_context reaches it; pipelines reset it after each call).
        """
        if not diffusers:
            self.override(module, "forward", event)
            return
        from diffusers.hooks.hooks import HookRegistry
        registry = HookRegistry.check_if_exists_or_initialize(module)
        hook = _hook_class()(event, on_reset)
        registry.register_hook(hook, HOOK_NAME)
        if on_reset is not None:
            self.model_hook = hook
        self._hooks.append((registry, module))

    def override(self, obj: Any, name: str, event: Event) -> None:
        """``obj.name`` replaced by ``event(original, args, kwargs)`` as an instance attribute."""
        own = obj.__dict__.get(name, _MISSING)
        override = _Override(event, getattr(obj, name))
        override.before = own
        obj.__dict__[name] = override
        self._overrides.append((obj, name, own, override))

    def gate_iteration(self, container: nn.ModuleList, keep: Callable[[int], Optional[bool]]) -> None:
        """Iterating ``container`` yields item ``i`` only when ``keep(i)`` is
        true (asked as the loop reaches it; None: item i and all later ones,
        without asking again); len() and indexing are unchanged.
        Traced code (torch.compile) iterates the plain list."""
        if not isinstance(container, nn.ModuleList):
            raise TypeError(f"gate_iteration needs an nn.ModuleList, got {type(container).__name__}")
        before = type(container)
        gate = _Keep(keep)
        container.__class__ = _gated_class(before)
        container.__dict__["_gate"] = gate
        self._gates.append((container, before, gate))

    def add_handle(self, handle: Any) -> None:
        """A ``torch.utils.hooks.RemovableHandle`` (e.g. a forward hook) to remove with the rest."""
        self._handles.append(handle)

    def context(self):
        """The diffusers CacheContext the pipeline set for the current call, or None."""
        return None if self.model_hook is None else self.model_hook.context()

    def restore(self) -> None:
        for obj, name, own, override in reversed(self._overrides):
            override.event = None          # off, and no reference to the cache kept
            if obj.__dict__.get(name) is not override:
                continue                   # overridden again after us: ours stays, switched off
            # what was there before us, past overrides switched off in the meantime
            while isinstance(own, _Override) and own.event is None:
                own = own.before
            if own is _MISSING:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = own
        for registry, module in reversed(self._hooks):
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not registry.hooks:        # leave the module as it was before us
                if module.__dict__.get("_diffusers_hook") is registry:
                    del module.__dict__["_diffusers_hook"]
                # remove_hook puts the class's forward back as an instance attribute
                fwd = module.__dict__.get("forward")
                if getattr(fwd, "__self__", None) is module and \
                        getattr(fwd, "__func__", None) is getattr(type(module), "forward", None):
                    del module.__dict__["forward"]
        if self._hooks:
            self._hooks[0][0].invalidate_child_registries_cache()
        for container, before, gate in reversed(self._gates):
            gate.keep = None                   # off, whatever happens below
            if container.__dict__.get("_gate") is gate:
                del container.__dict__["_gate"]
                if type(container) is _GATED.get(before):
                    container.__class__ = before
        for h in self._handles:
            h.remove()
        self._overrides, self._hooks, self._handles, self._gates = [], [], [], []
        self.model_hook = None
