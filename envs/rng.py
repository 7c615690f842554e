"""A fast, exact stand-in for the few ``numpy.random.Generator`` methods an episode draws from.

``Generator.integers`` costs several microseconds a call in argument handling, and an episode makes about
fifty scalar draws, which made seeding a world the slowest part of ``reset``. ``EpisodeRandom`` pulls the
PCG64 bit generator's raw 64-bit outputs in batches and turns them into values with numpy's own scalar
algorithms (Lemire's bounded integers on the 32-bit stream, 53-bit doubles), so every draw equals the one
``np.random.default_rng(seed)`` would give for the same calls in the same order, and worlds and transcripts
are unchanged. Written by hand because numpy has no cheaper scalar path; it covers exactly what an
episode uses: ``integers(low[, high])`` (int64 results) and ``random()``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from functools import cache
from typing import Any, Protocol

import numpy as np

_CHUNK = 64  # raw outputs fetched per call into numpy: an episode needs roughly this many
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_INT64_END = 1 << 63  # integers() draws int64: low >= -2**63 and high <= 2**63
_TO_DOUBLE = 1.0 / 9007199254740992.0  # 2**-53, as numpy's next_double


class Draws(Protocol):
    """What scenario sampling and the simulated customer draw from: a numpy Generator or ``EpisodeRandom``."""

    def integers(self, low: int, high: int | None = None) -> Any: ...

    def random(self) -> float: ...


class EpisodeRandom:
    """Same draws as ``np.random.default_rng(seed)`` for ``integers`` and ``random``."""

    __slots__ = ("_bitgen", "_raw", "_pos", "_half")

    def __init__(self, seed: Sequence[int]) -> None:
        """``seed``: non-negative ints, as given to ``np.random.default_rng``."""
        # default_rng(seed) wraps PCG64(SeedSequence(seed)), and SeedSequence splits each int into 32-bit
        # words, low word first; handing it the words as an array skips its slower per-int conversion.
        words: list[int] = []
        for value in seed:
            if value < 0:
                raise ValueError(f"seed values must be non-negative, got {value}")
            words.append(value & _MASK32)
            while value := value >> 32:
                words.append(value & _MASK32)
        self._bitgen = np.random.PCG64(np.random.SeedSequence(np.array(words, dtype=np.uint32)))
        self._raw: list[int] = []
        self._pos = 0
        self._half: int | None = None  # PCG64 hands out 64-bit outputs as two 32-bit halves, low half first

    def _next64(self) -> int:
        pos = self._pos
        if pos == len(self._raw):
            self._raw, pos = self._bitgen.random_raw(_CHUNK).tolist(), 0
        self._pos = pos + 1
        return self._raw[pos]

    def _next32(self) -> int:
        half = self._half
        if half is not None:
            self._half = None
            return half
        value = self._next64()
        self._half = value >> 32
        return value & _MASK32

    def _wide(self, low: int, high: int) -> int:
        """numpy's other cases: errors, one value (no draw), 2**32 values (a raw 32-bit draw), 64-bit Lemire."""
        if low < -_INT64_END or high > _INT64_END:
            raise ValueError(f"integers({low}, {high}): out of bounds for int64")
        bound = high - low
        if bound < 1:
            raise ValueError("high <= low")
        if bound == 1:
            return 0
        if bound == 1 << 32:
            return self._next32()
        if bound == 1 << 64:
            return self._next64()
        product = self._next64() * bound
        leftover = product & _MASK64
        if leftover < bound:
            threshold = (_MASK64 - bound + 1) % bound
            while leftover < threshold:
                product = self._next64() * bound
                leftover = product & _MASK64
        return product >> 64

    def random(self) -> float:
        """A float in [0, 1), as ``Generator.random()``."""
        return (self._next64() >> 11) * _TO_DOUBLE

    def integers(self, low: int, high: int | None = None) -> int:
        """An int in [low, high) (or [0, low)), as ``Generator.integers`` with the default int64 dtype."""
        if high is None:
            low, high = 0, low
        bound = high - low
        if not (1 < bound <= _MASK32 and -_INT64_END <= low and high <= _INT64_END):
            return low + self._wide(low, high)
        half = self._half  # _next32 and _next64 inlined: this is the hottest call of a reset
        if half is None:
            pos = self._pos
            if pos == len(self._raw):
                self._raw, pos = self._bitgen.random_raw(_CHUNK).tolist(), 0
            self._pos, value = pos + 1, self._raw[pos]
            self._half, half = value >> 32, value & _MASK32
        else:
            self._half = None
        product = half * bound
        leftover = product & _MASK32
        if leftover < bound:  # Lemire's rejection step (rare): drop draws that would bias the result
            threshold = (_MASK32 - bound + 1) % bound
            while leftover < threshold:
                product = self._next32() * bound
                leftover = product & _MASK32
        return low + (product >> 32)


@cache
def _cdf(weights: tuple[float, ...]) -> tuple[float, ...]:
    p = np.asarray(weights, dtype=float)
    p = p / p.sum()
    np.random.default_rng(0).choice(len(p), p=p)  # numpy's own checks: the same ValueError on bad weights
    cdf = p.cumsum()  # as Generator.choice: cumulative sum, renormalised, searched with one random()
    cdf /= cdf[-1]
    return tuple(cdf.tolist())


def weighted_index(rng: Draws, weights: tuple[float, ...]) -> int:
    """Index drawn with probability proportional to ``weights``: ``rng.choice(len(w), p=w / w.sum())``."""
    return bisect_right(_cdf(weights), rng.random())
