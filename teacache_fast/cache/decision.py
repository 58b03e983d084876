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

import ctypes
import math
from typing import List, Optional, Sequence

__all__ = ["HostDecision", "f32"]


def f32(v: float) -> float:
    """``v`` rounded to the nearest fp32 (ties to even; inf past the range).

    Each step below is one IEEE operation on fp32 values done in double and
    rounded once to fp32: for +, -, *, / that is exactly the fp32 result,
    since double has more than 2 x 24 + 2 significand bits.
    """
    return ctypes.c_float(v).value


class HostDecision:
    """``[acc, consecutive_skips]`` of S independent states, fp32 values on the host."""

    __slots__ = ("acc", "skips", "_coeffs", "_coeffs32")

    def __init__(self, size: int):
        self.acc: List[float] = [0.0] * size
        self.skips: List[float] = [0.0] * size
        self._coeffs: Optional[Sequence[float]] = None
        self._coeffs32: List[float] = []

    def __len__(self) -> int:
        return len(self.acc)

    def step(self, partials: Sequence[Sequence[float]], coefficients: Sequence[float],
             threshold: float, force: bool, max_skips: Optional[int]) -> List[bool]:
        """One call: ``partials`` is S rows of ``[num, den]`` (fp32 values read
        from the device); returns S compute flags and updates the state."""
        if coefficients is not self._coeffs:
            self._coeffs, self._coeffs32 = coefficients, [f32(c) for c in coefficients]
        coeffs = self._coeffs32
        thr = f32(threshold)
        never_skip = threshold <= 0.0
        isfinite = math.isfinite
        flags = []
        for i, (num, den) in enumerate(partials):
            valid = isfinite(num) and isfinite(den) and den != 0
            rel = f32(num / den) if valid else 0.0
            if not isfinite(rel):
                valid, rel = False, 0.0
            poly = 0.0
            for c in coeffs:
                poly = f32(f32(poly * rel) + c)
            acc = f32(self.acc[i] + poly)
            compute = (force or never_skip or not valid or not isfinite(acc) or acc >= thr
                       or (max_skips is not None and self.skips[i] >= max_skips))
            if compute:
                self.acc[i], self.skips[i] = 0.0, 0.0
            else:
                self.acc[i], self.skips[i] = acc, self.skips[i] + 1.0
            flags.append(compute)
        return flags

    def as_rows(self) -> List[List[float]]:
        """The state as ``[[acc, skips], ...]`` (inspection, tests)."""
        return [[a, s] for a, s in zip(self.acc, self.skips)]
