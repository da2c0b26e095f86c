"""Timings of the pipeline's phases through one context manager.

>>> timer = Timer()
>>> with timer("search"):
...     pass
>>> list(timer.totals)
['search']
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Lap:
    """One timed span; ``seconds`` is final once its ``with`` block has ended, running before."""

    start: float
    end: float | None = None

    @property
    def seconds(self) -> float:
        return (time.perf_counter() if self.end is None else self.end) - self.start


class Timer:
    """Seconds per phase, accumulated over ``with timer("phase"):`` blocks (None: timed, not accumulated).

    >>> timer = Timer()
    >>> with timer("search") as lap:
    ...     pass
    >>> list(timer.totals) == ["search"] and lap.seconds >= 0
    True
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str | None) -> Iterator[Lap]:
        lap = Lap(time.perf_counter())
        try:
            yield lap
        finally:
            lap.end = time.perf_counter()
            if phase is not None:
                self.totals[phase] = self.totals.get(phase, 0.0) + lap.seconds
