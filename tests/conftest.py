"""Test setup: without a CUDA device, run Triton kernels under the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here at
the top of conftest, before anything imports teacache_fast's Triton backend.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI must not flake on a
# new random draw); HYPOTHESIS_PROFILE=explore searches afresh.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The tests run tiny tensors, for which intra-op threads only add overhead; on
# a loaded 2-core machine they made tiny-model tests 10-50x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """Tests choose their backend explicitly; a user's env var must not leak in."""
    monkeypatch.delenv("TEACACHE_FAST_BACKEND", raising=False)
    yield


@pytest.fixture(autouse=True)
def _calibration_home(monkeypatch, tmp_path_factory):
    """coefficients="auto" stores fits under $TEACACHE_FAST_HOME: never the user's home in tests."""
    monkeypatch.setenv("TEACACHE_FAST_HOME", str(tmp_path_factory.mktemp("teacache_home")))
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def tiny():
    """A tiny random FluxTransformer2DModel (1 + 1 blocks), shared by a module's tests."""
    from tiny_models import tiny_flux
    return tiny_flux(0)


@pytest.fixture
def no_grad():
    """Inference mode for the test (use with pytest.mark.usefixtures)."""
    with torch.no_grad():
        yield
