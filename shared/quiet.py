"""When a quiet pub/sub connection is dead.

A subscribed connection carries nothing while nothing is published, so quiet alone says
nothing of it, and redis-py's own pub/sub health check sends a PING but never notices a
missing answer. A follower (the worker's stops listener, an SSE stream) asks for a word
after ``PING_AFTER_S`` of quiet and takes a connection that leaves that PING unanswered for
``REPLY_WITHIN_S`` as dead: a Redis host gone without closing it (a failover, a NAT or
firewall dropping the flow), on which it would otherwise wait for good. A silent
connection is found within about ``SILENT_S`` of its last word.
"""
from __future__ import annotations

import time
from typing import Literal

from easel.shared.jobstore import REPLY_WITHIN_S

PING_AFTER_S = 5.0
SILENT_S = PING_AFTER_S + REPLY_WITHIN_S


class QuietCheck:
    """Told after each read whether it brought anything, says what to do next."""

    def __init__(self) -> None:
        self.heard = self.pinged = time.monotonic()

    def after_read(self, got: bool) -> Literal["ping", "dead"] | None:
        """``"ping"``: send a PING now; ``"dead"``: the last PING went unanswered, replace
        the connection; None: read on. Any reply counts as a word, a PING's answer too."""
        now = time.monotonic()
        if got:
            self.heard = now
        elif self.pinged > self.heard and now - self.pinged >= REPLY_WITHIN_S:
            return "dead"
        elif now - max(self.heard, self.pinged) >= PING_AFTER_S:
            self.pinged = now
            return "ping"
        return None

    def silence_s(self) -> float:
        return time.monotonic() - self.heard
