"""``teacache-fast info``: versions and which backends can run here, and why not."""
from __future__ import annotations

import argparse
import importlib
import os
import platform

HELP = "print versions and the backends available on this machine (and why the others are not)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def backend_report() -> dict[str, str]:
    """One line per backend: 'available on ...' or the reason it cannot run."""
    import torch

    from teacache_fast.ops import BACKENDS, unavailable_reason

    cuda_device = torch.cuda.is_available()
    report = {}
    for name in BACKENDS:
        if name == "cuda":
            try:
                ext = importlib.import_module("teacache_fast._C")
            except ImportError as exc:
                report[name] = f"not built ({exc}); see README 'CUDA extension'"
                continue
            archs = ", ".join(ext.CUDA_ARCHS)
            if not cuda_device:
                report[name] = f"built, no CUDA device (compiled for {archs})"
            else:
                reason = unavailable_reason("cuda", "cuda")
                report[name] = (f"built, available on {torch.cuda.get_device_name()} (compiled for {archs})"
                                if reason is None else f"built (compiled for {archs}), cannot run: {reason}")
            continue
        if name == "triton":
            reason_gpu = unavailable_reason("triton", "cuda")
            if reason_gpu is not None:
                report[name] = reason_gpu
            elif cuda_device:
                report[name] = f"available on {torch.cuda.get_device_name()}"
            elif unavailable_reason("triton", "cpu") is None:
                report[name] = "no CUDA device; CPU tensors run under TRITON_INTERPRET=1 (slow, for tests)"
            else:
                report[name] = "installed, no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)"
            continue
        if name == "cpu":
            reason = unavailable_reason("cpu", "cpu")
            if reason is None:
                report[name] = ("available on CPU tensors (native kernels, compiled on first use "
                                "into $TEACACHE_FAST_HOME/native)")
            else:
                report[name] = f"unavailable, CPU tensors use torch: {reason}"
            continue
        report[name] = "available (reference; CPU and any device)"
    return report


def run(args: argparse.Namespace) -> int:
    import torch

    import teacache_fast as tf

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report any import failure
        triton_version = f"not available ({exc.__class__.__name__})"
    print(f"teacache_fast {tf.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (CUDA runtime {torch.version.cuda or 'none'})")
    print(f"triton        {triton_version}")
    print(f"cuda device   {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"backend       {os.environ.get('TEACACHE_FAST_BACKEND') or 'auto'} (TEACACHE_FAST_BACKEND)")
    print("backends:")
    for name, line in backend_report().items():
        print(f"  {name:<7} {line}")
    return 0
