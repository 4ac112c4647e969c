"""Adaptive micro-batching: how many queued jobs a worker gathers before it runs them.

A GPU does more images per second in larger calls, but a job that waits for company is
late. The policy here needs no hand-set size:

- **cap**: ``batch_size`` ("auto": the largest of ``batch_buckets`` on a GPU, 1 on the CPU,
  where a larger call gains little and every job would pay for it).
- **target**: the cap's largest bucket; with ``batch_latency_target_s``, the largest bucket
  whose measured call time (an EWMA per bucket, ``CallTimes``) fits the target. A bucket
  not measured yet (or not for a minute) is tried once its next smaller one fits, so the
  size grows a bucket at a time and settles where the target stops it.
- **flush**: a batch runs as soon as the consumer holds ``target`` messages (a deep queue
  fills the bucket: the consumer reads one message per broker round trip, back to back),
  or once no further message arrived for ``batch_idle_s`` (the queue is empty: a lone job
  runs at once instead of waiting out ``batch_wait_s``, which stays as the longest a
  partial batch waits while messages trickle in). A hand-set ``batch_size`` keeps the
  fixed wait unless ``batch_idle_s`` is set too.

Queue depth is what the consumer already holds: no extra broker command per job. The
functions are pure; ``worker.tasks`` wires them into celery-batches' consumer strategy.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Literal

EWMA_WEIGHT = 0.3  # of the newest call in a bucket's mean call time
STALE_S = 60.0  # a bucket not called for this long is measured again
AUTO_IDLE_S = 0.005  # a few broker round trips: the consumer reads a queued message per round trip


def resolve_batch_size(setting: int | Literal["auto"], buckets: list[int], device_type: str,
                       batchable: bool = True) -> int:
    """The most jobs one call may take (the cap): a hand-set size as it is; "auto" is the
    largest bucket on a GPU serving a family with a model that batches (``batchable``), and 1
    (no batching) on the CPU and for families whose jobs always run alone (there a worker
    holding several messages would only strand them behind its running job)."""
    if setting != "auto":
        return int(setting)
    return max(buckets) if device_type == "cuda" and batchable else 1


def resolve_idle_s(setting: float | None, batch_size: int | Literal["auto"]) -> float | None:
    """How long the queue must be quiet before a partial batch runs (None: it waits out the
    flush interval): as set, else ``AUTO_IDLE_S`` with an automatic batch size; a hand-set
    size keeps its fixed wait, which an operator may have chosen to gather sparse arrivals."""
    if setting is not None:
        return setting
    return AUTO_IDLE_S if batch_size == "auto" else None


def target_size(buckets: list[int], cap: int, call_s: dict[int, float], latency_target_s: float | None) -> int:
    """How many jobs to gather before a call: ``cap``; with a latency target, the largest
    size among the buckets below ``cap`` and ``cap`` itself whose measured call time fits
    it (the smallest when none does), or the next size up while that one is unmeasured.
    ``call_s`` maps a size to its mean call time (s); sizes below the one in use go
    unmeasured as they go uncalled, and do not matter while a larger one fits."""
    sizes = sorted({b for b in buckets if b <= cap} | {cap})  # a hand-set cap between buckets counts too
    if latency_target_s is None:
        return sizes[-1]
    best = sizes[0]
    for k, size in enumerate(sizes):
        seconds = call_s.get(size)
        if seconds is None:
            if any(call_s.get(larger, latency_target_s + 1) <= latency_target_s for larger in sizes[k + 1:]):
                continue  # gone unmeasured below a size in use that fits
            return size  # unmeasured, and the bucket below fits: try it
        if seconds > latency_target_s:
            break
        best = size
    return best


def should_flush(held: int, target: int) -> bool:
    """Run the held messages now, without waiting for the queue to go quiet?"""
    return held >= target


class CallTimes:
    """Mean seconds per pipeline call, per call size in jobs (an EWMA, so the estimate follows
    a change of model, steps or image size within a few calls). A size not called for
    ``stale_s`` is forgotten: a slow call (a long job, a large image) must not keep the
    policy from trying that size again once the jobs have changed, at the cost of one call
    over the target per ``stale_s`` while they have not."""

    def __init__(self, weight: float = EWMA_WEIGHT, stale_s: float = STALE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.weight, self.stale_s, self.clock = weight, stale_s, clock
        self._mean: dict[int, tuple[float, float]] = {}  # size -> (mean seconds, when last called)
        self._lock = threading.Lock()

    def observe(self, size: int, seconds: float) -> None:
        with self._lock:
            now, old = self.clock(), self._mean.get(size)
            fresh = old is not None and now - old[1] <= self.stale_s
            self._mean[size] = ((1 - self.weight) * old[0] + self.weight * seconds if fresh else seconds, now)

    def snapshot(self) -> dict[int, float]:
        with self._lock:
            now = self.clock()
            return {size: mean for size, (mean, at) in self._mean.items() if now - at <= self.stale_s}

    def clear(self) -> None:
        with self._lock:
            self._mean.clear()


# This process's calls (``worker.runner.run_stage`` records each one; the consumer reads them).
CALL_TIMES = CallTimes()


class FlushPolicy:
    """The consumer's side: the target size from this process's call times, per message."""

    def __init__(self, buckets: list[int], cap: int, latency_target_s: float | None = None,
                 times: CallTimes = CALL_TIMES):
        self.buckets, self.cap, self.latency_target_s, self.times = sorted(buckets), cap, latency_target_s, times

    def target(self) -> int:
        return target_size(self.buckets, self.cap, self.times.snapshot(), self.latency_target_s)

    def flush_now(self, held: int) -> bool:
        return should_flush(held, self.target())
