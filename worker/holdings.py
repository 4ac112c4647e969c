"""What this process holds, checked against what Redis records it as running.

A claim lists the delivery in the instance's running set, and the delivery's end (its final
state, hand-off or retry) takes it out in the same script. Redis may lose its last writes
(``appendfsync everysec`` and a crash of its host, or a failover to a replica that had not
received them): a job whose end was lost then reads ``running`` under an instance that is
alive and beating, so no reaper takes it, and the lost-message sweep skips held jobs. The
worker itself is the one that can tell: it knows which deliveries it holds.

``Holdings`` is that knowledge: a delivery enters it before its claim is sent (so Redis
never lists a delivery the process has not taken yet) and leaves it once its end is
recorded; an end that could not be recorded keeps it (``pin``) until the heartbeat settles
it. ``OrphanCheck`` compares the two every ``2 x heartbeat_ttl_s`` and sends again what
Redis lists and the process has not held over two checks in a row.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

from easel.shared import logs
from easel.shared.jobstore import JobStore

log = logging.getLogger("easel.worker.holdings")
Key = tuple[str, int]  # (job id, segment)
ORPHAN_WHY = "no longer held the job, though Redis said it ran there (its end was lost: a Redis restart or failover)"


class Holdings:
    """The deliveries this process has claimed, or is claiming, and not yet seen ended,
    counted: a copy of a delivery claimed in another task (dropped as a duplicate) ends
    there without ending the one that runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: Counter[Key] = Counter()

    def add(self, keys: list[Key]) -> None:
        with self._lock:
            self._held.update(keys)

    def release(self, key: Key) -> None:
        """A claim of it ended (``worker.engine._ended``), its end recorded or not ours."""
        with self._lock:
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]

    def pin(self, key: Key) -> None:
        """Its end could not be recorded: held, past its ``release``, until ``unpin``."""
        self.add([key])

    def unpin(self, key: Key) -> None:
        """Being settled again (``pin`` again if that fails too)."""
        self.release(key)

    def snapshot(self) -> set[Key]:
        with self._lock:
            return set(self._held)


class OrphanCheck:
    """Called after each heartbeat; checks every ``every_s``."""

    def __init__(self, store: JobStore, instance: str, holdings: Holdings, every_s: float,
                 requeue: Callable[..., bool]):
        self.store, self.instance, self.holdings, self.every_s = store, instance, holdings, every_s
        self.requeue = requeue  # ``Reaper.requeue``: position, the record's change, the message
        self._next = time.monotonic() + every_s
        self._suspects: set[Key] = set()

    def __call__(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        orphans = self.store.held_by(self.instance) - self.holdings.snapshot()
        again, self._suspects = orphans & self._suspects, orphans
        for job_id, segment in sorted(again):
            with logs.job_context(job_id, segment):  # the requeue's log line says what was done
                try:
                    self.requeue(self.instance, job_id, segment, ORPHAN_WHY, live=True)
                except Exception:  # each alone; a later check finds it again
                    log.exception("could not send job %s segment %d again", job_id, segment)
                    continue
            self._suspects.discard((job_id, segment))
