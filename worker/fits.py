"""How many images one pipeline call may hold, learned from running out of device memory.

A micro-batch that runs out of memory is run again in halves (``worker.engine.run_group``).
Without a memory of that, every later batch of the same shape would run out first, paying
for a failed call each time (when it is the VAE's decode that runs out: the whole denoise).
So the worker keeps, per call shape, the most images a call of it may hold. It keeps that
for ``HOLD_S`` only: memory held by other work, or fragmented, comes back, and a shape gets
its full batch again (at the cost of one more failed call, at most once per ``HOLD_S``).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Hashable

HOLD_S = 600.0


class CallFits:
    """Per call shape (model, task, image size, guidance: what a call's memory grows with
    besides its images), the most images a call may hold, while the memory of running out
    lasts. Used by the engine's thread only."""

    def __init__(self, hold_s: float = HOLD_S, clock: Callable[[], float] = time.monotonic):
        self.hold_s, self.clock = hold_s, clock
        self._most: dict[Hashable, tuple[int, float]] = {}  # shape -> (images, until)

    def most(self, shape: Hashable) -> int | None:
        """The most images a call of ``shape`` may hold; None: no limit known."""
        known = self._most.get(shape)
        if known is None:
            return None
        if self.clock() >= known[1]:
            del self._most[shape]
            return None
        return known[0]

    def ran_out(self, shape: Hashable, images: int, padded: int | None = None) -> int:
        """A call of ``images`` images (made with ``padded``, its size bucket, where a compiled
        model pads it) ran out of memory: calls of ``shape`` hold at most half the padded
        size from now on, and always fewer than ``images``, so a split makes progress.
        Returns that number."""
        most = max(1, min(math.ceil((padded or images) / 2), images - 1))
        known = self.most(shape)
        most = min(most, known) if known is not None else most
        self._most[shape] = (most, self.clock() + self.hold_s)
        return most
