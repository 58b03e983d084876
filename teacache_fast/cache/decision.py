"""Steps 3-4 of the algorithm on the host, for the host-read mode.

The host-read wrapper reads the indicator's fp32 partials once per call
anyway, so the decision is made here instead of in a ``teacache_decide_``
launch: no extra op, no second read. The arithmetic is the decide kernel's,
in fp32, operation by operation (``rel = num / den``, Horner with each
coefficient rounded to fp32, ``acc + poly``, the threshold compared in fp32),
so the flags and the state are bitwise those of ``ops.teacache_decide_``
(tests/test_cache_decision.py checks it against every backend it can run).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["HostDecision"]

_F32 = np.float32


class HostDecision:
    """``[acc, consecutive_skips]`` of S independent states, as fp32 on the host."""

    __slots__ = ("acc", "skips")

    def __init__(self, size: int):
        self.acc: List[np.float32] = [_F32(0.0)] * size
        self.skips: List[np.float32] = [_F32(0.0)] * size

    def __len__(self) -> int:
        return len(self.acc)

    def step(self, partials: Sequence[Sequence[float]], coefficients: Sequence[float],
             threshold: float, force: bool, max_skips: Optional[int]) -> List[bool]:
        """One call: ``partials`` is S rows of ``[num, den]`` (fp32 values read
        from the device); returns S compute flags and updates the state."""
        coeffs = [_F32(c) for c in coefficients]
        thr = _F32(threshold)
        never_skip = threshold <= 0.0
        flags = []
        with np.errstate(all="ignore"):
            for i, (num, den) in enumerate(partials):
                num, den = _F32(num), _F32(den)
                rel = num / den
                valid = (math.isfinite(num) and math.isfinite(den) and den != 0
                         and math.isfinite(rel))
                r = rel if valid else _F32(0.0)
                poly = _F32(0.0)
                for c in coeffs:
                    poly = poly * r + c
                acc = self.acc[i] + poly
                compute = (force or never_skip or not valid or not math.isfinite(acc)
                           or acc >= thr
                           or (max_skips is not None and self.skips[i] >= max_skips))
                if compute:
                    self.acc[i], self.skips[i] = _F32(0.0), _F32(0.0)
                else:
                    self.acc[i], self.skips[i] = acc, self.skips[i] + _F32(1.0)
                flags.append(bool(compute))
        return flags

    def as_rows(self) -> List[List[float]]:
        """The state as ``[[acc, skips], ...]`` Python floats (inspection, tests)."""
        return [[float(a), float(s)] for a, s in zip(self.acc, self.skips)]
