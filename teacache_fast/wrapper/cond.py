"""``torch.cond`` around a block: the skip of the sync-free mode, no host read.

:func:`run_or_pass` runs one block under ``torch.cond(compute, block,
passthrough)``: on a skipped step the block's work is not done and its inputs
come back in its output's layout. Per block, so code that a model runs
between its blocks (concatenations, projections) keeps running as it is.
:func:`sync_free_step` is a whole cached call for a stack that is one
function of the hidden state.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..cache.device_state import finish_span_

__all__ = ["run_or_pass", "sync_free_step"]


def _clone_tensors(tree: Any) -> Any:
    # torch.cond branches may not return their inputs as they are, and both
    # branches must give the same strides (a block may return a slice, e.g.
    # FLUX's single blocks split the joint sequence): contiguous copies.
    return pytree.tree_map(lambda v: v.clone(memory_format=torch.contiguous_format)
                           if isinstance(v, Tensor) else v, tree)


def run_or_pass(compute: Tensor, block: Callable[..., Any], passthrough: Callable[..., Any],
                *args, **kwargs) -> Any:
    """``block(*args, **kwargs)`` when ``compute`` is set, else ``passthrough(...)``.

    passthrough returns what the block would, built from its inputs (same
    structure, shapes and dtypes: e.g. ``lambda hidden_states, **_: hidden_states``).
    Tensor arguments travel as ``torch.cond`` operands; everything else
    (ints, None, modules' settings) is closed over.
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    slots = [i for i, v in enumerate(flat) if isinstance(v, Tensor)]

    def rebuild(tensors):
        values = list(flat)
        for i, t in zip(slots, tensors):
            values[i] = t
        return pytree.tree_unflatten(values, spec)

    def on_compute(*tensors):
        a, kw = rebuild(tensors)
        return _clone_tensors(block(*a, **kw))

    def on_skip(*tensors):
        a, kw = rebuild(tensors)
        return _clone_tensors(passthrough(*a, **kw))

    return torch.cond(compute, on_compute, on_skip, tuple(flat[i] for i in slots))


def sync_free_step(compute: Tensor, hidden: Tensor, residual: Tensor,
                   run_blocks: Callable[..., Tensor], *operands) -> Tensor:
    """One cached call of a stack that is a function of the hidden state.

    ``run_blocks(hidden, *operands)`` runs the whole span (every block) and
    returns the new hidden state; it runs only when ``compute`` is set.
    Returns the span's output; ``residual`` is updated in place.
    """
    out = run_or_pass(compute, run_blocks, lambda h, *_: h, hidden, *operands)
    return finish_span_(compute, out, hidden, residual)


