"""Prometheus series read from Redis at scrape time: queue depth, jobs by state, live workers.

Read on scrape rather than counted on the way, so every API replica and worker reports the
same numbers and nothing drifts when a process restarts. kombu keeps priority ``p > 0``
messages of queue ``q`` in list ``q:p`` (``q`` itself holds priority 0), so depth is
reported per priority and ``sum by (family)`` is what waits for a family's pool.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from easel.shared.celery_app import queue_name, unacked_keys
from easel.shared.jobstore import JobStore
from easel.shared.schema import JobState

PRIORITIES = range(10)
# Minute-long stages: fine buckets up to a minute, then coarse ones up to an hour.
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 1800, 3600)


def priority_lists(queue: str) -> list[tuple[int, str]]:
    """(priority, Redis list) pairs holding one Celery queue's messages."""
    return [(p, queue if p == 0 else f"{queue}:{p}") for p in PRIORITIES]


def queue_depths(r: redis.Redis, families: Iterable[str], prefix: str = "easel") -> dict[str, dict[int, int]]:
    """family -> priority -> waiting messages, in one round trip."""
    fams = sorted(set(families))
    pipe = r.pipeline(transaction=False)
    for fam in fams:
        for _, name in priority_lists(queue_name(fam, prefix)):
            pipe.llen(name)
    counts = pipe.execute()
    out: dict[str, dict[int, int]] = {}
    for i, fam in enumerate(fams):
        out[fam] = {p: int(counts[i * len(PRIORITIES) + p]) for p in PRIORITIES}
    return out


def job_state_counts(r: redis.Redis, prefix: str = "easel", max_jobs: int = 200_000) -> tuple[dict[str, int], bool]:
    """Jobs by state over the job records still in Redis (they expire after job_ttl_s).

    Returns (counts, truncated). SCAN + pipelined HGET: O(jobs) per call, so callers cache.
    """
    counts = {s.value: 0 for s in JobState}
    seen, truncated = 0, False
    batch: list[str] = []

    def flush() -> None:
        pipe = r.pipeline(transaction=False)
        for k in batch:
            pipe.hget(k, "state")
        for st in pipe.execute():
            if st is not None:
                st = st.decode() if isinstance(st, bytes) else st
                counts[st] = counts.get(st, 0) + 1
        batch.clear()

    for key in r.scan_iter(f"{prefix}:job:*", count=1000):
        batch.append(key)
        seen += 1
        if len(batch) >= 1000:
            flush()
        if seen >= max_jobs:
            truncated = True
            break
    if batch:
        flush()
    return counts, truncated


def live_workers_by_family(r: redis.Redis, prefix: str = "easel") -> dict[str, int]:
    out: dict[str, int] = {}
    for presence in JobStore(r, prefix).presences():
        fam = presence.get("family", "unknown")
        out[fam] = out.get(fam, 0) + 1
    return out


class RedisStateCollector(Collector):
    """Queue depth per family and priority, unacked messages, jobs by state, live workers.

    ``jobs=False`` skips the job scan (workers report only their own family's queue; the
    API reports the whole picture). Results are cached ``cache_s`` so parallel scrapers
    (Prometheus HA pairs, KEDA) cost one scan.
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
        unacked = GaugeMetricFamily("easel_unacked_messages",
                                    "Messages delivered to a worker and not yet acknowledged (running stages)")
        workers = GaugeMetricFamily("easel_workers", "Live worker processes by family (heartbeat keys)",
                                    labels=["family"])
        out = [up, depth, unacked, workers]
        try:
            for fam, by_p in queue_depths(self.r, self.families, self.prefix).items():
                for p, n in by_p.items():
                    depth.add_metric([fam, queue_name(fam, self.prefix), str(p)], n)
            unacked.add_metric([], int(self.r.hlen(unacked_keys(self.prefix)["unacked_key"])))
            live = live_workers_by_family(self.r, self.prefix)
            for fam in sorted(set(self.families) | set(live)):
                workers.add_metric([fam], live.get(fam, 0))
            if self.jobs:
                counts, truncated = job_state_counts(self.r, self.prefix)
                jobs = GaugeMetricFamily("easel_jobs", "Job records in Redis by state", labels=["state"])
                for st, n in sorted(counts.items()):
                    jobs.add_metric([st], n)
                trunc = GaugeMetricFamily("easel_jobs_scan_truncated", "1 if the job scan hit its cap")
                trunc.add_metric([], int(truncated))
                out += [jobs, trunc]
            up.add_metric([], 1)
        except redis.RedisError:
            up.add_metric([], 0)
        return out
