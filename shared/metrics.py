"""Prometheus series read from Redis at scrape time: queue depth, jobs by state, live workers.

Read on scrape rather than counted on the way, so every API replica and worker reports the
same numbers and nothing drifts when a process restarts. A family's jobs wait in two places:
a few messages in the broker queue (kombu keeps priority ``p > 0`` messages of queue ``q`` in
list ``q:p``), and, while every worker is busy, the rest pending their tenant's turn (the
scheduler's backlog). Both are reported; the family's backlog is their sum.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from easel.shared.celery_app import queue_name
from easel.shared.jobstore import JobStore
from easel.shared.keys import backlog_key

PRIORITIES = range(10)
# Minute-long stages: fine buckets up to a minute, then coarse ones up to an hour.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600)


def priority_lists(queue: str) -> list[tuple[int, str]]:
    """(priority, Redis list) pairs holding one Celery queue's messages."""
    return [(p, queue if p == 0 else f"{queue}:{p}") for p in PRIORITIES]


@dataclass(frozen=True)
class QueueDepth:
    """What waits for one family's pool."""

    by_priority: dict[int, int]  # messages in the broker queue, per priority sub-list
    pending: int  # jobs pending their tenant's turn, not yet sent to the broker

    @property
    def messages(self) -> int:
        return sum(self.by_priority.values())


def queue_depths(r: redis.Redis, families: Iterable[str], prefix: str = "easel") -> dict[str, QueueDepth]:
    """family -> what waits for its pool, in one round trip."""
    fams = sorted(set(families))
    pipe = r.pipeline(transaction=False)
    for fam in fams:
        queue = queue_name(fam, prefix)
        for _, name in priority_lists(queue):
            pipe.llen(name)
        pipe.llen(backlog_key(prefix, queue))
    counts = iter(pipe.execute())
    return {fam: QueueDepth({p: int(next(counts)) for p in PRIORITIES}, int(next(counts))) for fam in fams}


class RedisStateCollector(Collector):
    """Queue depth per family and priority, jobs by state, live workers.

    ``jobs=False`` skips the job counts (workers report only their own family's queue; the
    API reports the whole picture). Every read is O(families + worker processes), never
    O(jobs); results are cached ``cache_s`` so parallel scrapers (Prometheus HA pairs,
    KEDA) cost one read.
    """

    def __init__(self, r: redis.Redis, families: Iterable[str], prefix: str = "easel", jobs: bool = True,
                 cache_s: float = 5.0):
        self.r, self.families, self.prefix, self.jobs, self.cache_s = r, list(families), prefix, jobs, cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list] | None = None

    def collect(self):
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_s:
                self._cached = (now, self._read())
            return list(self._cached[1])

    def _read(self) -> list:
        up = GaugeMetricFamily("easel_redis_up", "1 if the last scrape could read Redis")
        depth = GaugeMetricFamily("easel_queue_messages",
                                  "Messages waiting in a family queue, per priority sub-list (0 runs first)",
                                  labels=["family", "queue", "priority"])
        pending = GaugeMetricFamily("easel_queue_pending",
                                    "Jobs of a family pending their tenant's turn, not yet in its broker queue",
                                    labels=["family", "queue"])
        workers = GaugeMetricFamily("easel_workers", "Live worker processes by family (their heartbeats)",
                                    labels=["family"])
        out = [up, depth, pending, workers]
        try:
            for fam, waiting in queue_depths(self.r, self.families, self.prefix).items():
                queue = queue_name(fam, self.prefix)
                for p, n in waiting.by_priority.items():
                    depth.add_metric([fam, queue, str(p)], n)
                pending.add_metric([fam, queue], waiting.pending)
            for fam, n in sorted(JobStore(self.r, self.prefix).live_instances(self.families).items()):
                workers.add_metric([fam], n)
            if self.jobs:
                out += self._job_counts()
            up.add_metric([], 1)
        except redis.RedisError:
            up.add_metric([], 0)
        return out

    def _job_counts(self) -> list:
        counts = JobStore(self.r, self.prefix).state_counts([queue_name(f, self.prefix) for f in self.families])
        jobs = GaugeMetricFamily("easel_jobs", "Jobs waiting for a worker (queued, or between stages) and running",
                                 labels=["state"])
        finished = CounterMetricFamily("easel_jobs_finished", "Jobs that ended, by final state", labels=["state"])
        for state, n in counts.items():
            (jobs if state in ("queued", "running") else finished).add_metric([state], n)
        return [jobs, finished]
