"""Finishing a job (encode, upload, mark succeeded) while the worker runs the next one.

Once the last stage's pipeline call returns, the GPU has nothing more to do for the job:
encoding PNGs and uploading them and the manifest is CPU and network work. Run on the
task's thread it sits between two pipeline calls (most of easel's per-job overhead); run
here, it overlaps the next job's denoising.

What keeps this safe although the task returns (and Celery acks the message) before the
outputs are written:

- Before the task returns, the job is registered as *finishing* by this worker (a sorted
  set ``<prefix>:finishing`` plus a ``finishing`` field naming worker and segment; the
  reaper takes the queue from the job's plan).
- The finish runs under the same failure policy as the task (``guarded``: transient errors
  re-send the segment with backoff, permanent ones fail the job) and ends the delivery.
- A worker that dies with finishes pending stops its heartbeat; any worker's ``Reaper``
  then re-sends those jobs' segments. Outputs go to deterministic keys and terminal states
  are never overwritten, so a re-run gives the same single result; the delivery counter
  still counts the death (two deaths make it a poison job, as for a crash mid-stage).
- A finish waits for the next job's pipeline call to reach its first denoising step
  before it runs. Started at once it would compete for the GIL and the cores with
  Celery's ack and fetch and the next job's claim, which sit on the critical path;
  started with the call, with the call's prologue (image preprocessing, VAE encode: CPU
  tensor work and launches), which it slowed by ~45 ms on an H200 (``bench gpu
  --phases``: prologue 29-35 ms without a pending finish, 70-81 ms with one, compiled
  UNet); once the call is denoising, the GPU is busy for a while. With no next task
  started within ``wait_s`` it runs then, so a lone job's result is late by at most that;
  a next task that ends without denoising, or takes over ``prologue_cap_s`` to start,
  releases it too. A job whose queue held no message when it ended (read in the same
  round trip that registers the finish) is the last of its burst: nothing is coming to
  overlap with, so its finish runs at once instead of after ``wait_s``.
- At most ``max_pending_finishes`` finishes wait at once: when uploads fall behind, the
  next task waits for a slot instead of piling images up in memory.
- A warm shutdown (SIGTERM) drains pending finishes before the process exits.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import redis

from shared.celery_app import RUN_SEGMENT
from shared.metrics import priority_lists
from worker.heartbeat import worker_key
from worker.metrics import observe_finished

log = logging.getLogger("easel.worker.finisher")

Guard = Callable[[str, int, "str | None", Callable[[], str]], str]  # guarded(job_id, segment, queue, fn)


def finishing_key(prefix: str) -> str:
    return f"{prefix}:finishing"


class Finisher:
    def __init__(self, ctx, guard: Guard, max_pending: int = 2, wait_s: float = 0.03, prologue_cap_s: float = 2.0):
        self.ctx = ctx
        self.guard = guard
        self.wait_s = wait_s
        self.prologue_cap_s = prologue_cap_s  # a next job's call slower than this to denoise lets the finish go
        # Counters of this process, under ``_cv``: tasks started and ended (``task_started`` /
        # ``task_ended``), pipeline calls that reached denoising (``denoising_started``).
        self._tasks = self._ended = self._calls = 0
        self._cv = threading.Condition()
        # One thread: finishes run in the order their jobs ended, and ``drain`` relies on it.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="easel-finish")
        self._slots = threading.BoundedSemaphore(max_pending)

    def deferrer(self, job_id: str, segment: int, queue: str | None) -> Callable[[Callable[[], None]], str]:
        """For ``execute_segment``: hand it the job's finish, get "finishing" back."""
        def defer(finish: Callable[[], None]) -> str:
            self._slots.acquire()  # backpressure: wait while max_pending finishes are queued
            try:
                waiting = self._register(job_id, segment, queue)
                with self._cv:
                    mark = (self._tasks, self._calls)
                fut = self._pool.submit(self._run, job_id, segment, queue, finish, mark, waiting)
            except BaseException:
                self._slots.release()
                raise
            fut.add_done_callback(lambda _: self._slots.release())
            return "finishing"

        return defer

    def _register(self, job_id: str, segment: int, queue: str | None) -> int | None:
        """Register the pending finish; returns the messages waiting in ``queue`` (the one the
        job's message came from: all its priority lists), read in the same round trip, or None
        when the queue is not known."""
        store = self.ctx.store
        pipe = store.r.pipeline(transaction=True)
        pipe.zadd(finishing_key(store.prefix), {job_id: time.time()})
        pipe.hset(store.key(job_id), "finishing", json.dumps({"worker": self.ctx.hostname, "segment": segment}))
        for _, name in priority_lists(queue) if queue else ():
            pipe.llen(name)
        replies = pipe.execute()
        return sum(int(n) for n in replies[2:]) if queue else None

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

    def _run(self, job_id: str, segment: int, queue: str | None, finish: Callable[[], None],
             mark: tuple[int, int], waiting: int | None) -> None:
        self._wait_for_next_call(mark, waiting)

        def body() -> str:
            finish()
            return "succeeded"

        result = "error"
        try:
            result = self.guard(job_id, segment, queue, body)
        finally:
            observe_finished(self.ctx, job_id, segment, result)
            try:
                self.ctx.store.r.zrem(finishing_key(self.ctx.store.prefix), job_id)
            except redis.RedisError:
                log.warning("could not unregister finished job %s (the reaper will drop it)", job_id)

    def drain(self) -> None:
        """Wait for the finishes queued so far (warm shutdown): on the one finisher thread, a
        no-op queued now runs after all of them."""
        self._pool.submit(lambda: None).result()


class Reaper:
    """Re-sends the segments of jobs left finishing by a worker that died (no heartbeat).

    Every worker runs one; a re-send may happen twice when two reapers race, which the
    idempotent segment run absorbs. An entry older than ``stale_s`` is re-sent even if its
    worker still beats (a finish lost to a bug must not leave the job running forever).
    """

    def __init__(self, ctx, app, every_s: float, stale_s: float):
        self.ctx, self.app, self.every_s, self.stale_s = ctx, app, every_s, stale_s
        self._stop = threading.Event()

    def start(self) -> "Reaper":
        threading.Thread(target=self._loop, name="easel-reaper", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception:
                log.exception("reaper sweep failed; next one in %ss", self.every_s)

    def sweep(self) -> list[str]:
        """One pass; returns the job ids whose segments were re-sent."""
        store, prefix = self.ctx.store, self.ctx.store.prefix
        now = time.time()
        resent: list[str] = []
        for job_id, since in store.r.zrange(finishing_key(prefix), 0, -1, withscores=True):
            raw, state = store.r.hmget(store.key(job_id), "finishing", "state")
            if raw is None or state in (None, "succeeded", "failed", "cancelled"):
                store.r.zrem(finishing_key(prefix), job_id)
                continue
            info = json.loads(raw)
            if store.r.exists(worker_key(prefix, info["worker"])) and now - since < self.stale_s:
                continue
            if store.r.zscore(finishing_key(prefix), job_id) is None:
                continue  # finished meanwhile
            spec, plan = store.load(job_id)
            seg = int(info["segment"])
            log.warning("job %s was left finishing by %s (gone); re-sending segment %d", job_id, info["worker"], seg)
            self.app.send_task(RUN_SEGMENT, args=[job_id, seg], queue=plan.segments[seg].queue, priority=spec.priority)
            store.r.zrem(finishing_key(prefix), job_id)
            resent.append(job_id)
        return resent
