"""Prometheus metrics of one worker process, served on EASEL_METRICS_PORT (0 = off).

Observed from Celery's task_prerun/task_postrun signals and from the stage records the
segment already writes to Redis, so the hot path (segment, runner) carries no metrics
code: after each segment we read its stages' ``timings_s`` and feed the histograms.
Buckets run from 0.1 s to an hour: real stages take seconds to minutes.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from shared.metrics import STAGE_BUCKETS, RedisStateCollector

log = logging.getLogger("easel.worker.metrics")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# easel_batch_size: with micro-batching (EASEL_BATCH_SIZE > 1) the deliveries flushed into one
# task; without it, the images of one pipeline call (a job's num_images).
OUTCOMES = {"succeeded", "failed", "cancelled", "handed-off", "unknown"}


class GpuMemoryCollector(Collector):
    """torch's view of this process's GPU memory, read at scrape time (nothing when on CPU)."""

    def collect(self):
        g = GaugeMetricFamily("easel_gpu_memory_bytes", "GPU memory of this worker process (torch allocator)",
                              labels=["device", "kind"])
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    dev = f"cuda:{i}"
                    g.add_metric([dev, "allocated"], torch.cuda.memory_allocated(i))
                    g.add_metric([dev, "reserved"], torch.cuda.memory_reserved(i))
                    g.add_metric([dev, "max_allocated"], torch.cuda.max_memory_allocated(i))
                    free, total = torch.cuda.mem_get_info(i)
                    g.add_metric([dev, "device_free"], free)
                    g.add_metric([dev, "device_total"], total)
        except Exception:  # a wedged device must not break the scrape
            pass
        yield g


class WorkerMetrics:
    def __init__(self, family: str, hostname: str, device: str):
        self.family = family
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.info = Gauge("easel_worker_info", "This worker process", ["family", "hostname", "device"], registry=r)
        self.info.labels(family, hostname, device).set(1)
        self.load = Gauge("easel_pipeline_load_seconds", "Time to load a model's pipelines at worker start",
                          ["family", "model"], registry=r)
        self.warm = Gauge("easel_family_warm_seconds", "Time from start until the family's pipelines were warm",
                          ["family"], registry=r)
        self.busy = Gauge("easel_worker_busy", "1 while a segment runs", ["family"], registry=r)
        self.segments = Counter("easel_worker_segments", "Segments run, by outcome", ["family", "outcome"], registry=r)
        self.segment_s = Histogram("easel_segment_duration_seconds", "Wall time of one segment (task)",
                                   ["family", "outcome"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_s = Histogram("easel_stage_duration_seconds", "Stage phases from the job's stage records",
                                 ["family", "model", "task", "phase"], buckets=STAGE_BUCKETS, registry=r)
        self.batch = Histogram("easel_batch_size", "Images per pipeline call", ["family"], buckets=BATCH_BUCKETS,
                               registry=r)
        self.retries = Counter("easel_worker_retries", "Segments sent back for a transient error", ["family"],
                               registry=r)
        r.register(GpuMemoryCollector())
        self.explicit_batches = False
        self._started: dict[str, float] = {}
        self._finishing: dict[tuple[str, int], float | None] = {}  # task done, finish pending: its start
        self._ended_early: dict[tuple[str, int], str] = {}  # finish done before the task's postrun
        self._lock = threading.Lock()

    # -- signal handlers -------------------------------------------------------------------
    def on_prerun(self, task_id=None, **_kw) -> None:
        with self._lock:
            self._started[task_id] = time.perf_counter()
        self.busy.labels(self.family).set(1)

    def on_postrun(self, ctx, task_id=None, args=None, retval=None, state=None, **_kw) -> None:
        self.busy.labels(self.family).set(0)
        with self._lock:
            t0 = self._started.pop(task_id, None)
        if args and isinstance(args[0], (list, tuple)) and args[0] and hasattr(args[0][0], "args"):
            return self._on_batch(ctx, args[0], t0)
        if retval == "finishing" and args and len(args) >= 2:
            key = (str(args[0]), int(args[1]))
            with self._lock:  # counted when the finisher is done with it (``on_finished``)
                ended = self._ended_early.pop(key, None)
                if ended is None:
                    self._finishing[key] = t0
                    return
            return self._ended(ctx, key, ended, t0)
        if state == "RETRY":
            self.retries.labels(self.family).inc()
            outcome = "retry"
        elif isinstance(retval, str) and retval in OUTCOMES:
            outcome = retval
        elif isinstance(retval, str) and retval.startswith("already"):
            outcome = "duplicate"
        else:
            outcome = "error"
        self._count(ctx, outcome, t0, args)

    def on_finished(self, ctx, job_id: str, seg_index: int, retval: str) -> None:
        """A segment whose task returned "finishing" is done (worker/finisher.py): count it
        now, its duration running from the task's start to the end of its uploads."""
        key = (job_id, seg_index)
        with self._lock:
            if key not in self._finishing:  # it ended before the task's postrun ran
                self._ended_early[key] = retval
                return
            t0 = self._finishing.pop(key)
        self._ended(ctx, key, retval, t0)

    def _ended(self, ctx, key: tuple[str, int], retval: str, t0: float | None) -> None:
        if retval == "retrying":
            self.retries.labels(self.family).inc()
        self._count(ctx, retval if retval in OUTCOMES else "error", t0, key)

    def _count(self, ctx, outcome: str, t0: float | None, args) -> None:
        self.segments.labels(self.family, outcome).inc()
        if t0 is not None:
            self.segment_s.labels(self.family, outcome).observe(time.perf_counter() - t0)
        if outcome in ("succeeded", "handed-off") and args and len(args) >= 2:
            try:
                self.observe_stages(ctx, str(args[0]), int(args[1]))
            except Exception:  # metrics must never fail a worker
                log.debug("stage metrics for %s skipped", args, exc_info=True)

    def _on_batch(self, ctx, requests: list, t0: float | None) -> None:
        """A celery-batches flush: several deliveries in one task; each job's record says how it ended."""
        self.explicit_batches = True
        self.batch.labels(self.family).observe(len(requests))
        for req in requests:
            try:
                job_id, seg_index = str(req.args[0]), int(req.args[1])
                st = ctx.store.r.hget(ctx.store.key(job_id), "state")
                outcome = st if st in ("succeeded", "failed", "cancelled") else "handed-off"
                self.segments.labels(self.family, outcome).inc()
                if t0 is not None:
                    self.segment_s.labels(self.family, outcome).observe(time.perf_counter() - t0)
                if outcome in ("succeeded", "handed-off"):
                    self.observe_stages(ctx, job_id, seg_index)
            except Exception:
                log.debug("batch metrics for %r skipped", getattr(req, "args", None), exc_info=True)

    def observe_stages(self, ctx, job_id: str, seg_index: int) -> None:
        from shared.schema import StageRecord

        spec, plan = ctx.store.load(job_id)
        seg = plan.segments[seg_index]
        raw = ctx.store.records(job_id, len(spec.stages))
        for i in seg.stages:
            if not raw[i]:
                continue
            rec = StageRecord.model_validate_json(raw[i])
            for phase, secs in rec.timings_s.items():
                self.stage_s.labels(self.family, rec.model, rec.task, phase).observe(secs)
            self.stage_s.labels(self.family, rec.model, rec.task, "total").observe(sum(rec.timings_s.values()))
            if not self.explicit_batches:
                self.batch.labels(self.family).observe(len(rec.seeds))


_METRICS: WorkerMetrics | None = None


def observe_batch(n: int) -> None:
    """For code that batches several jobs into one pipeline call: report the real batch size
    (once called, per-job image counts are no longer reported as batches)."""
    if _METRICS is not None:
        _METRICS.explicit_batches = True
        _METRICS.batch.labels(_METRICS.family).observe(n)


def observe_finished(ctx, job_id: str, seg_index: int, retval: str) -> None:
    """Called by the finisher when a deferred finish ends (``retval``: how it ended)."""
    if _METRICS is not None:
        _METRICS.on_finished(ctx, job_id, seg_index, retval)


def metrics_port(base: int, visible_devices: str | None = None) -> int:
    """One process per GPU on a host: process for GPU k listens on base + k."""
    vis = (visible_devices if visible_devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "")).strip()
    return base + int(vis) if vis.isdigit() else base


def install(ctx, load_s: float, port: int | None = None) -> int | None:
    """Connect the signal handlers and start the HTTP server; returns the bound port or None."""
    global _METRICS
    from celery.signals import task_postrun, task_prerun

    base = ctx.settings.metrics_port if port is None else port
    if not base:
        return None
    m = WorkerMetrics(ctx.family, ctx.hostname, str(ctx.cache.device))
    for name, lm in ctx.cache.models.items():
        m.load.labels(ctx.family, name).set(lm.load_s)
    m.warm.labels(ctx.family).set(load_s)
    m.registry.register(RedisStateCollector(ctx.store.r, [ctx.family], ctx.settings.queue_prefix, jobs=False))
    task_prerun.connect(lambda **kw: m.on_prerun(**kw), weak=False)
    task_postrun.connect(lambda **kw: m.on_postrun(ctx, **kw), weak=False)
    _METRICS = m
    want = metrics_port(base)
    for p in range(want, want + 16):  # a neighbour took it: take the next one and say so
        try:
            start_http_server(p, addr=os.environ.get("EASEL_METRICS_ADDR", "0.0.0.0"), registry=m.registry)
            if p != want:
                log.warning("metrics port %d busy; serving on %d", want, p)
            log.info("metrics on :%d/metrics", p)
            return p
        except OSError:
            continue
    log.error("no free metrics port in %d..%d; metrics off", want, want + 15)
    return None
