"""Which machine a benchmark ran on: its name, a file-name slug, and the
environment lines every results file starts with."""
from __future__ import annotations

import datetime
import os
import platform
import re
from typing import List, Optional


def device_name(device: str) -> str:
    """A human name: the GPU's name, or the CPU model and the cores torch uses."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} cores"


def device_slug(device: str) -> str:
    """File-name form of :func:`device_name`, e.g. ``cpu-amd-epyc-2-cores``."""
    name = device_name(device)
    prefix = "" if device.startswith("cuda") else "cpu-"
    return prefix + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment_lines(device: str, timing: Optional[str] = None) -> List[str]:
    """Markdown bullets: device, date, versions, timing method, thread env, load average (CPU)."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        triton_version = "not available"
    lines = [
        f"- device: {device_name(device)}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}",
    ]
    if timing:
        lines.append(f"- timing: {timing}")
    threads_env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ]
    if threads_env:
        lines.append("- environment: " + " ".join(threads_env))
    if not device.startswith("cuda") and hasattr(os, "getloadavg"):
        # Other jobs on the same cores slow every row; say how busy the machine was.
        lines.append("- load average (1/5/15 min) when written: "
                     + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores")
    return lines
