"""teacache_fast: fused TeaCache kernels and a model-agnostic caching wrapper."""
from ._version import __version__
from . import ops

__all__ = ["__version__", "ops"]
