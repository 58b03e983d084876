"""Workarounds for torch bugs, each naming the bug and the versions it hits."""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch

__all__ = ["host_only", "warm_processor_signatures"]


def host_only(fn: Callable) -> Callable:
    """``fn`` never traced by Dynamo (one graph break where it is called).

    Applied per wrapper, not at import: torch.compiler.disable imports Dynamo (~1 s).
    """
    return torch.compiler.disable(fn)


def warm_processor_signatures(modules: Iterable[torch.nn.Module]) -> None:
    """Dynamo bug (seen in torch 2.13): its inspect.signature cache is shared
    by all torch.cond subgraphs of a trace, but an entry made inside one
    subgraph loses its attributes after it ("'Signature' object has no
    attribute '_parameters'" at the next cond whose block asks for the same
    signature, as every diffusers attention module does). Made outside any
    cond, the entries are valid everywhere. Free: only traced, never run.
    """
    if not torch.compiler.is_compiling():
        return
    for mod in modules:
        inspect.signature(mod.processor.__call__)
