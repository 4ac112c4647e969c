"""Finishing a job (encode, upload, mark succeeded) while the worker runs the next one.

Once the last stage's pipeline call returns, the GPU has nothing more to do for the job:
encoding PNGs and uploading them and the manifest is CPU and network work. Run on the
task's thread it sits between two pipeline calls (most of easel's per-job overhead); run
here, it overlaps the next job's denoising.

What keeps this safe although the task returns (and Celery acks the message) before the
outputs are written: the job stays held by this worker instance until its final state is
written (``shared/jobstore.py``), and the finish runs under the same failure policy as
the task (``worker.engine.finish``). A worker that dies with finishes pending stops
beating, and a reaper re-sends those jobs (``shared/liveness.py``). Outputs go to
deterministic keys and terminal states are never overwritten, so a re-run gives the same
single result.

When a finish runs: it waits for the next job's pipeline call to reach its first
denoising step. Started at once it would compete for the GIL and the cores with Celery's
ack and fetch and the next job's claim, which sit on the critical path; started with the
call, with the call's prologue (image preprocessing, VAE encode); once the call is
denoising, the GPU is busy for a while. With no next task started within ``wait_s`` it
runs then, so a lone job's result is late by at most that; a next task that ends without
denoising, or takes over ``prologue_cap_s`` to start, releases it too. A job whose queue
held no message when it ended is the last of its burst: nothing is coming to overlap
with, so its finish runs at once.

At most ``max_pending`` finishes wait at once: when uploads fall behind, the next task
waits for a slot instead of piling images up in memory. A warm shutdown (SIGTERM) drains
pending finishes before the process exits.
"""
from __future__ import annotations

import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import redis

from easel.shared.metrics import priority_lists

log = logging.getLogger("easel.worker.finisher")


class Finisher:
    def __init__(self, store, max_pending: int = 2, wait_s: float = 0.03, prologue_cap_s: float = 2.0):
        self.store = store
        self.wait_s = wait_s
        self.prologue_cap_s = prologue_cap_s  # a next job's call slower than this to denoise lets the finish go
        # Counters of this process, under ``_cv``: tasks started and ended (``task_started`` /
        # ``task_ended``), pipeline calls that reached denoising (``denoising_started``).
        self._tasks = self._ended = self._calls = 0
        self._cv = threading.Condition()
        # One thread: finishes run in the order their jobs ended, and ``drain`` relies on it.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="easel-finish")
        self._slots = threading.BoundedSemaphore(max_pending)

    def defer(self, finish: Callable[[], None], queue: str | None) -> None:
        """Run ``finish`` (which settles its jobs itself) once the next call denoises or
        nothing is coming; ``queue`` is the one the job's message came from."""
        self._slots.acquire()  # backpressure: wait while max_pending finishes are queued
        try:
            waiting = self._waiting(queue)
            with self._cv:
                mark = (self._tasks, self._calls)
            # In the task's context: its log lines carry the job's fields (shared/logs.py).
            fut = self._pool.submit(contextvars.copy_context().run, self._run, finish, mark, waiting)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())

    def _waiting(self, queue: str | None) -> int | None:
        """Messages waiting in ``queue`` (all its priority lists); None when not known."""
        if not queue:
            return None
        try:
            return self.store.queue_depth(queue, [name for _, name in priority_lists(queue)])
        except redis.RedisError:
            return None

    def task_started(self) -> None:
        """A task (a job's segment) starts on this worker."""
        with self._cv:
            self._tasks += 1
            self._cv.notify_all()

    def task_ended(self) -> None:
        with self._cv:
            self._ended += 1
            self._cv.notify_all()

    def denoising_started(self) -> None:
        """A pipeline call of this worker reached its first denoising step: finishes waiting
        for that may run now."""
        with self._cv:
            self._calls += 1
            self._cv.notify_all()

    def _wait_for_next_call(self, mark: tuple[int, int], waiting: int | None) -> None:
        """Until a call started after the defer is denoising; or ``wait_s`` passes with no next
        task; or the next task ends without denoising (a duplicate, a failure, a hand-off);
        or ``prologue_cap_s`` passes. Not at all when the queue was empty as the job ended
        (with one message prefetched at a time, a next job would still be waiting there)."""
        if waiting == 0:
            return
        tasks, calls = mark
        with self._cv:
            if not self._cv.wait_for(lambda: self._tasks > tasks or self._calls > calls, timeout=self.wait_s):
                return  # no next job in sight
            self._cv.wait_for(lambda: self._calls > calls or self._ended >= self._tasks, timeout=self.prologue_cap_s)

    def _run(self, finish: Callable[[], None], mark: tuple[int, int], waiting: int | None) -> None:
        self._wait_for_next_call(mark, waiting)
        try:
            finish()
        except Exception:  # the finish settles its own jobs: reaching here is a bug
            log.exception("a deferred finish raised")

    def drain(self) -> None:
        """Wait for the finishes queued so far (warm shutdown): on the one finisher thread, a
        no-op queued now runs after all of them."""
        self._pool.submit(lambda: None).result()
