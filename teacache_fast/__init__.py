"""teacache_fast: fused TeaCache kernels and a model-agnostic caching wrapper."""
from ._version import __version__
from . import ops
from .cache import TeaCacheConfig
from .hooks import apply_teacache, remove_teacache, reset, stats, teacache

__all__ = ["__version__", "ops", "TeaCacheConfig", "apply_teacache", "remove_teacache", "reset",
           "stats", "teacache"]
