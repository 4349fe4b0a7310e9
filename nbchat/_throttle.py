"""When a turn's display is worth sending again, as the reply streams in.

Jupyter's server drops IOPub messages past ~1,000/s and every update re-sends the whole
turn, so updates are at most ``max_per_second`` (15) and, as the reply grows, only after
it grew by a fraction of what was already shown: the bytes sent over a reply stay within
a constant factor of its final length. The cell renderer and the panel both ask it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Throttle"]


class Throttle:
    """Says when to push another display update.

    An update is due when at least ``1 / max_per_second`` seconds passed since the last
    one *and* the content grew by ``growth`` of what was last shown — or, so a slow
    stream never looks frozen, when ``max_interval`` seconds passed with anything new.
    """

    def __init__(
        self,
        max_per_second: float = 15.0,
        *,
        growth: float = 0.05,
        max_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_interval = 1.0 / max_per_second
        self.growth = growth
        self.max_interval = max_interval
        self.clock = clock
        self.last_at = -1e9
        self.last_size = 0
        self.updates = 0

    def due(self, size: int) -> bool:
        """Whether content of ``size`` characters should be shown now."""
        if size == self.last_size:
            return False
        waited = self.clock() - self.last_at
        if waited < self.min_interval:
            return False
        grown = size - self.last_size >= max(1, self.growth * self.last_size)
        return grown or waited >= self.max_interval

    def mark(self, size: int) -> None:
        """Record that content of ``size`` characters was just shown."""
        self.last_at = self.clock()
        self.last_size = size
        self.updates += 1
