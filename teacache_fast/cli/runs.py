"""One timed sampling run with or without TeaCache, and its comparison to the
uncached run: what the demo and the end-to-end benchmark both report."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class RunResult:
    """One sampling run: its threshold (None = no cache) and what came out."""
    threshold: Optional[float]
    computed: int
    total: int
    seconds: float
    speedup: float = 1.0
    ideal_speedup: float = 1.0
    psnr_db: float = math.inf
    max_abs_err: float = 0.0
    cache_bytes: int = 0        # tensors the cache held at the end (stats()["cache_bytes"])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(model, inputs, sigmas, threshold: Optional[float], on_step: Optional[Callable] = None,
              num_steps: Optional[int] = None):
    """Sample once (with TeaCache at ``threshold`` unless None); return (latent, RunResult)."""
    import teacache_fast as tf

    from .sampling import euler_sample

    steps = len(sigmas) - 1
    if threshold is not None:
        tf.apply_teacache(model, threshold=threshold, num_steps=num_steps or steps)
    try:
        device = inputs.latents.device
        _sync(device)
        start = time.perf_counter()
        latent = euler_sample(model, inputs, sigmas, on_step=on_step)
        _sync(device)
        seconds = time.perf_counter() - start
        st = tf.stats(model) if threshold is not None else {"computed": steps, "cache_bytes": 0}
    finally:
        if threshold is not None:
            tf.remove_teacache(model)
    return latent, RunResult(threshold, st["computed"], steps, seconds, cache_bytes=st["cache_bytes"])


def compare(result: RunResult, latent, base: RunResult, base_latent) -> RunResult:
    """Fill in the speedups and errors of ``result`` against the uncached run."""
    from .sampling import psnr

    result.speedup = base.seconds / result.seconds
    result.ideal_speedup = result.total / max(1, result.computed)
    result.psnr_db = psnr(latent, base_latent)
    result.max_abs_err = (latent - base_latent).abs().max().item()
    return result
