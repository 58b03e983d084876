"""Backend registry: which implementation runs an op for a given tensor.

Order for CUDA tensors is cuda -> triton -> torch; CPU tensors use cpu (the
native C kernels, compiled on first use; see backends/cpu.py) -> torch.
``TEACACHE_FAST_BACKEND=auto|cuda|triton|cpu|torch`` (read on every call) or
:func:`use_backend` forces one. A forced backend that cannot run raises
:class:`BackendUnavailableError` with the reason; it never falls back silently.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from types import ModuleType
from typing import Iterator

# Imported as _torch: importing the submodule teacache_fast.backends.torch binds
# the name `torch` in this package's namespace and would shadow the library.
import torch as _torch

from .native import build as _native

BACKENDS = ("cuda", "triton", "cpu", "torch")
_CHOICES = ("auto",) + BACKENDS
_ENV = "TEACACHE_FAST_BACKEND"

_override = threading.local()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run on this machine or for this tensor."""


def _triton_reason(device: _torch.device) -> str | None:
    """None when the Triton backend can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported")
    return f"triton does not support device type {device.type!r}"


def _cpu_reason(device: _torch.device) -> str | None:
    """None when the native CPU kernels can run on ``device``, else why not."""
    if device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got a tensor on {device}"
    return _native.library()[1]


def _cuda_reason(device: _torch.device) -> str | None:
    """None when the compiled CUDA extension can run on ``device``, else why not."""
    try:
        importlib.import_module("teacache_fast._C")
    except ImportError as exc:
        return f"CUDA extension teacache_fast._C is not built ({exc})"
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got a tensor on {device}"
    return _cuda_device_error(device.index if device.index is not None else _torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device_error(index: int) -> str | None:
    """Ask _C once per GPU whether its kernels run there (driver new enough, arch
    compiled in), so an old driver falls back to triton instead of failing."""
    ext = importlib.import_module("teacache_fast._C")
    with _torch.cuda.device(index):
        err = ext.device_error()
    return f"CUDA extension cannot run on cuda:{index}: {err}" if err else None


def unavailable_reason(name: str, device: _torch.device | str) -> str | None:
    """None when backend ``name`` can run ops on ``device``, else a reason."""
    device = _torch.device(device)
    if name == "torch":
        return None
    if name == "triton":
        return _triton_reason(device)
    if name == "cuda":
        return _cuda_reason(device)
    if name == "cpu":
        return _cpu_reason(device)
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


# os.environ.get(_ENV) costs ~1.5 us when the variable is unset (Mapping.get
# catches a KeyError), and it runs on every op call of the cache: read the
# mapping's own dict instead (os.environ keeps it in step with every change
# made through os.environ), with the plain lookup where it has none.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
if isinstance(_ENVIRON_DATA, dict) and hasattr(os.environ, "encodekey"):
    _ENV_KEY = os.environ.encodekey(_ENV)

    def _env_value():
        raw = _ENVIRON_DATA.get(_ENV_KEY)
        return None if raw is None else os.environ.decodevalue(raw)
else:
    def _env_value():
        return os.environ.get(_ENV)


def requested_backend() -> str:
    """The forced backend ('auto' when none): use_backend() beats the env var."""
    name = getattr(_override, "name", None)
    if name:  # checked by use_backend
        return name
    raw = _env_value()
    if not raw:  # the common case, on every op call: no parsing
        return "auto"
    name = raw.strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"{_ENV}={name!r} is not a backend; expected one of {_CHOICES}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for the ops called inside the block (this thread only)."""
    if name not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def backend_for(tensor: _torch.Tensor) -> str:
    """Name of the backend that runs an op whose main input is ``tensor``."""
    device = tensor.device
    forced = requested_backend()
    if forced != "auto":
        reason = unavailable_reason(forced, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced (via {_ENV} or use_backend) but cannot run: {reason}")
        return forced
    if device.type == "cpu":  # built (or found unavailable) once per process
        return "torch" if _native.library()[0] is None else "cpu"
    if device.type != "cuda":
        return "torch"
    for name in BACKENDS:
        if unavailable_reason(name, device) is None:
            return name
    return "torch"


def get_backend(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    module = _MODULES.get(name)
    if module is None:  # imported on first use (triton's import alone takes seconds)
        module = _MODULES[name] = importlib.import_module(f"teacache_fast.backends.{name}")
    return module


_MODULES: dict = {}
