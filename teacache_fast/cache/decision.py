"""Steps 3-4 of the algorithm on the host, for the host-read mode.

The host-read wrapper reads the indicator's fp32 partials once per call
anyway, so the decision is made here instead of in a ``teacache_decide_``
launch: no extra op, no second read. The arithmetic is the decide kernel's,
in fp32, operation by operation (``rel = num / den``, Horner with each
coefficient rounded to fp32, ``acc + poly`` or ``acc + |poly|``, the
threshold compared in fp32),
so the flags and the state are bitwise those of ``ops.teacache_decide_``
(tests/test_cache_decision.py checks it against every backend it can run).
"""
from __future__ import annotations

import ctypes
import math
from typing import List, Optional, Sequence

__all__ = ["HostDecision", "f32", "estimate"]


def f32(v: float) -> float:
    """``v`` rounded to the nearest fp32 (ties to even; inf past the range).

    Each step below is one IEEE operation on fp32 values done in double and
    rounded once to fp32: for +, -, *, / that is exactly the fp32 result,
    since double has more than 2 x 24 + 2 significand bits.
    """
    return ctypes.c_float(v).value


def estimate(coefficients: Sequence[float], rel: float, accumulate_abs: bool = False) -> float:
    """poly(rel) as the decision evaluates it (fp32 Horner); |poly(rel)| with
    accumulate_abs (what the accumulator then gets)."""
    poly = 0.0
    for c in coefficients:
        poly = f32(f32(poly * rel) + f32(c))
    return abs(poly) if accumulate_abs else poly


class HostDecision:
    """``[acc, consecutive_skips]`` of S independent states, fp32 values on the host."""

    __slots__ = ("acc", "skips", "_coeffs", "_coeffs32", "negative_calls", "decreased", "rel")

    def __init__(self, size: int):
        self.acc: List[float] = [0.0] * size
        self.skips: List[float] = [0.0] * size
        # the polynomial's sign where the indicator lands (a published set is
        # often negative somewhere in [0, 0.5]; a negative estimate shrinks
        # the accumulator, and every later step may skip)
        self.negative_calls = 0        # calls with poly(rel) < 0 for some state
        self.decreased = False         # the last call made some accumulator smaller
        self.rel: List[float] = []     # the last call's relative L1 per state (NaN: none)
        self._coeffs: Optional[Sequence[float]] = None
        self._coeffs32: List[float] = []

    def __len__(self) -> int:
        return len(self.acc)

    def step(self, partials: Sequence[Sequence[float]], coefficients: Sequence[float],
             threshold: float, force: bool, max_skips: Optional[int],
             accumulate_abs: bool = False) -> List[bool]:
        """One call: ``partials`` is S rows of ``[num, den]`` (fp32 values read
        from the device); returns S compute flags and updates the state.
        accumulate_abs: ``acc += |poly(rel)|`` (|x| of an fp32 is exact)."""
        if coefficients is not self._coeffs:
            self._coeffs, self._coeffs32 = coefficients, [f32(c) for c in coefficients]
        coeffs = self._coeffs32
        thr = f32(threshold)
        never_skip = threshold <= 0.0
        isfinite, c_float = math.isfinite, ctypes.c_float   # c_float(v).value is f32(v), inlined
        flags, rels, negative, decreased = [], [], False, False
        for i, (num, den) in enumerate(partials):
            valid = isfinite(num) and isfinite(den) and den != 0
            rel = c_float(num / den).value if valid else 0.0
            if not isfinite(rel):
                valid, rel = False, 0.0
            poly = 0.0
            for c in coeffs:
                poly = c_float(c_float(poly * rel).value + c).value
            if accumulate_abs:
                poly = abs(poly)
            acc = c_float(self.acc[i] + poly).value
            rels.append(rel if valid else math.nan)
            negative = negative or (valid and poly < 0)
            compute = (force or never_skip or not valid or not isfinite(acc) or acc >= thr
                       or (max_skips is not None and self.skips[i] >= max_skips))
            if compute:
                self.acc[i], self.skips[i] = 0.0, 0.0
            else:
                decreased = decreased or poly < 0
                self.acc[i], self.skips[i] = acc, self.skips[i] + 1.0
            flags.append(compute)
        self.negative_calls += int(negative)
        self.decreased, self.rel = decreased, rels
        return flags

    def as_rows(self) -> List[List[float]]:
        """The state as ``[[acc, skips], ...]`` (inspection, tests)."""
        return [[a, s] for a, s in zip(self.acc, self.skips)]
