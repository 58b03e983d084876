"""teacache_fast: fused TeaCache kernels and a model-agnostic caching wrapper."""
from ._version import __version__
from . import ops
from .api import apply_teacache, inspect, is_cached, remove_teacache, reset, stats, teacache
from .cache import TeaCacheConfig

__all__ = ["__version__", "ops", "TeaCacheConfig", "apply_teacache", "remove_teacache", "reset",
           "stats", "inspect", "is_cached", "teacache"]
