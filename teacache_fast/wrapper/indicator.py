"""The adapter's indicator, in the form the cache's indicator op takes."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import Tensor

from ..models.base import Adapter, BlockCall, Modulated

__all__ = ["indicator_of"]


def indicator_of(adapter: Adapter, first: BlockCall) -> Tuple[Tensor, Dict[str, Any]]:
    """(x, keywords of cache.state.indicator_partials_) from the first block's call."""
    indicator = adapter.indicator(first)
    if isinstance(indicator, Modulated):
        return indicator.x, dict(scale=indicator.scale, shift=indicator.shift,
                                 norm=indicator.norm, eps=indicator.eps)
    if isinstance(indicator, Tensor):
        return indicator, dict(norm=None)  # an embedding, compared as is
    raise TypeError(f"the indicator of adapter {adapter.name!r} must be a Modulated or "
                    f"a Tensor, got {type(indicator).__name__}")
