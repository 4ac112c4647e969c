"""A worker keeps its family's queue fed from the tenants' pending sets (``shared.scheduler``),
and drains when an operator asks.

Dispatch runs where a slot may have opened, while tenants wait: after a claim took jobs out
of the queue; after this worker wrote the final state of a job dispatched under its
tenant's cap (its slot frees then: ``JobStore.on_slot_freed``), in every family's queue
where that tenant waits, since a chain ends on its last family's worker; and on every
heartbeat,
which also catches what no claim follows (a worker that joins an idle farm with jobs
pending) and a notice that did not arrive. Whether tenants wait is known without
asking: each dispatch says whether some still do, and the first job to wait while none did
is announced on the backlog channel (``shared.keys.backlog_channel``), which the worker's
pushed-notice listener hears. With no backlog a job costs no dispatch and no read at all.
Each task's time also feeds this process's mean seconds per job, which its heartbeat
publishes for ETAs.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from celery.signals import task_postrun, task_prerun

from easel.shared.celery_app import family_queues, queue_name, send_segment

log = logging.getLogger("easel.worker.feeding")

EWMA_WEIGHT = 0.2  # of the newest task in the mean seconds per job
DRAINED_EXIT = 79  # a drained worker's exit status (not the watchdog's 75): its launcher leaves it stopped


def drain_key(prefix: str, hostname: str) -> str:
    return f"{prefix}:drain:{hostname}"


class Feeder:
    def __init__(self, ctx, app, family: str, presence: dict):
        self.scheduler = ctx.scheduler
        self.family, self.queue = family, queue_name(family, ctx.settings.queue_prefix)
        self.every_queue = family_queues(ctx.registry.families(), ctx.settings.queue_prefix)
        self.app, self.presence = app, presence  # the heartbeat's record: ``job_s`` goes there
        self._started: dict[str, float] = {}
        # Whether tenants may wait for room: until a dispatch says none do, and again from a
        # notice. ``_notices`` counts notices, so one heard during a dispatch is not undone by
        # that dispatch's answer.
        self._backlog = True
        self._notices = 0
        self._lock = threading.Lock()  # the listener thread's notices against a dispatch's answer
        try:
            self.scheduler.adopt_earlier_keys(self.queue)
        except Exception as e:  # Redis away at start: only matters right after an upgrade
            log.warning("could not adopt an earlier version's keys for %s: %s", self.queue, e)
        task_prerun.connect(self._prerun, weak=False)
        task_postrun.connect(self._postrun, weak=False)

    def feed(self, queues: dict[str, str] | None = None, tenants: set[str] = frozenset()) -> int:
        """Dispatch this worker's queue, or ``queues`` (queue -> family; ``tenants`` as
        ``Scheduler.dispatch`` takes them); returns how many jobs it sent."""
        notices = self._notices
        try:
            done = self.scheduler.feed(queues or {self.queue: self.family},
                                       lambda *a, **kw: send_segment(self.app, *a, **kw), tenants)
        except Exception as e:  # broker or Redis trouble: the next task end or heartbeat tries again
            log.warning("could not dispatch pending jobs of %s: %s", ", ".join(queues or [self.queue]), e)
            return 0
        with self._lock:
            if self.queue not in done.waiting and self._notices == notices:
                self._backlog = False
        return len(done.moved)

    def heard_backlog(self, queue: str | None) -> None:
        """A notice on the backlog channel (None: the listener (re)subscribed, notices may
        have been missed)."""
        if queue is None or queue == self.queue:
            with self._lock:
                self._notices += 1
                self._backlog = True

    def after_claim(self) -> None:
        """A claim took jobs out of the queue: room opened there."""
        if self._backlog:
            self.feed()

    def after_slot_freed(self, tenants: set[str], queues: set[str]) -> None:
        """Jobs dispatched under their tenants' caps ended: each tenant may send another, from
        whichever queue it waits in (a queue where none of them waits answers at once). A
        worker's own changes free no queue's room but by its claims, which dispatch anyway."""
        if tenants:
            self.feed(self.every_queue, tenants)

    def _prerun(self, task_id: str | None = None, **_kw) -> None:
        self._started[task_id] = time.perf_counter()

    def _postrun(self, task_id: str | None = None, args: tuple | None = None, **_kw) -> None:
        t0 = self._started.pop(task_id, None)
        if t0 is not None:
            # A micro-batch task gets its requests as one list: the slot did that many jobs.
            jobs = len(args[0]) if args and isinstance(args[0], list) else 1
            self._observe((time.perf_counter() - t0) / max(1, jobs))

    def _observe(self, seconds: float) -> None:
        mean = self.presence.get("job_s")
        mean = seconds if mean is None else (1 - EWMA_WEIGHT) * mean + EWMA_WEIGHT * seconds
        self.presence["job_s"] = round(mean, 4)


class Drain:
    """``easel drain HOSTNAME``: the worker finishes what it runs, takes nothing new, and exits
    with ``DRAINED_EXIT`` so its launcher does not restart it. The request is taken once (the
    worker deletes it as it acts), so a worker started again later serves normally."""

    def __init__(self, store, hostname: str, presence: dict):
        self.store, self.hostname, self.presence = store, hostname, presence
        self.asked = False

    def check(self) -> None:
        # Read, then delete: a DEL whose reply was lost is replayed and answers 0, which
        # would read as "not asked" and lose the request.
        key = drain_key(self.store.prefix, self.hostname)
        if self.asked or not self.store.r.exists(key):
            return
        self.store.r.delete(key)
        self.asked = True
        self.presence["draining"] = True
        log.warning("drain asked: finishing the running stage, then exiting")
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown
