"""Per-sample batch slicing, as pure functions: when only some samples of a
batch compute, every block runs on those samples alone and the last block's
other outputs get their full batch back."""
from __future__ import annotations

from typing import Any, Callable, Collection, Optional

import torch
from torch import Tensor

from ..models.base import signature_of

__all__ = ["select_arguments", "take_samples", "refill_outputs"]

IndexFor = Callable[[torch.device], Tensor]   # device -> the computing samples' indices


def take_samples(value: Any, batch: int, index_for: IndexFor) -> Any:
    """``value`` with every tensor whose first dimension is the batch sliced
    to the computing samples (through tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            return value.index_select(0, index_for(value.device))
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(take_samples(v, batch, index_for) for v in value)
    if isinstance(value, dict):
        return {k: take_samples(v, batch, index_for) for k, v in value.items()}
    return value


def select_arguments(forward: Callable, args: tuple, kwargs: dict, unbatched: Collection[str],
                     batch: int, index_for: IndexFor):
    """A block's (args, kwargs) sliced to the computing samples; arguments
    named in ``unbatched`` (rotary embeddings) are left alone."""
    sig = signature_of(forward)
    if sig is None:
        return args, {k: (v if k in unbatched else take_samples(v, batch, index_for))
                      for k, v in kwargs.items()}
    bound = sig.bind_partial(*args, **kwargs)
    for name, value in bound.arguments.items():
        if name not in unbatched:
            bound.arguments[name] = take_samples(value, batch, index_for)
    return bound.args, bound.kwargs


def refill_outputs(out: Any, full_outputs: Any, stream_index: Optional[int], batch: int,
                   computing: int, index_for: IndexFor) -> Any:
    """The last block's tuple outputs other than the stream, given their full
    batch back: the skipping samples keep their passthrough values
    (``full_outputs``), the computing ones get the block's."""
    if not isinstance(out, (tuple, list)):
        return out
    items = []
    for j, (o, full) in enumerate(zip(out, full_outputs)):
        if j != stream_index and isinstance(o, Tensor) and isinstance(full, Tensor) \
                and full.shape[0] == batch and o.shape[0] == computing:
            full = full.clone()
            full.index_copy_(0, index_for(full.device), o)
            o = full
        items.append(o)
    return type(out)(items) if isinstance(out, tuple) else items
