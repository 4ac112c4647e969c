"""Prometheus metrics of one worker process, served on EASEL_METRICS_PORT (0 = off).

The engine reports how each delivery ended, with the stage records it wrote (their
``timings_s`` feed the histograms), and the images of each pipeline call; Celery's
task_prerun/task_postrun signals drive the busy gauge.
Buckets run from 0.1 s to an hour: real stages take seconds to minutes.
"""
from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from easel.shared.metrics import STAGE_BUCKETS, RedisStateCollector

log = logging.getLogger("easel.worker.metrics")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# easel_batch_size: the images of one pipeline call (all its jobs' num_images).
OUTCOMES = {"succeeded", "failed", "cancelled", "handed-off", "unknown", "poison", "superseded", "retrying"}


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


def peak_memory_bytes(device) -> int:
    """This process's peak memory on its device: torch's peak allocation on a GPU (what sizes
    how many workers fit on one), the process's peak resident set on the CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


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
        self.stage_s = Histogram("easel_stage_duration_seconds",
                                 "Stage phases from the job's stage records (phase: input, prepare, denoise, "
                                 "intermediates; total: their sum)",
                                 ["family", "model", "task", "phase"], buckets=STAGE_BUCKETS, registry=r)
        self.batch = Histogram("easel_batch_size", "Images per pipeline call", ["family"], buckets=BATCH_BUCKETS,
                               registry=r)
        self.retries = Counter("easel_worker_retries", "Segments sent back for a transient error", ["family"],
                               registry=r)
        r.register(GpuMemoryCollector())
        self.peak_memory = Gauge("easel_worker_peak_memory_bytes", "Peak memory of this worker process on its "
                                 "device: torch's peak allocation on a GPU, peak resident set on the CPU",
                                 ["family", "device"], registry=r)
        self.peak_memory.labels(family, device).set_function(lambda: peak_memory_bytes(_torch_device(device)))

    # -- observations -----------------------------------------------------------------------
    def on_prerun(self, **_kw) -> None:
        self.busy.labels(self.family).set(1)

    def on_postrun(self, **_kw) -> None:
        self.busy.labels(self.family).set(0)

    def on_delivery(self, outcome: str, t0: float | None, records) -> None:
        if outcome == "retrying":
            self.retries.labels(self.family).inc()
        outcome = outcome if outcome in OUTCOMES else ("duplicate" if outcome.startswith("already")
                                                       or outcome in ("duplicate", "stale") else "error")
        self.segments.labels(self.family, outcome).inc()
        if t0 is not None:
            self.segment_s.labels(self.family, outcome).observe(time.perf_counter() - t0)
        if outcome not in ("succeeded", "handed-off"):
            return
        for rec in records:
            for phase, secs in rec.timings_s.items():
                self.stage_s.labels(self.family, rec.model, rec.task, phase).observe(secs)
            self.stage_s.labels(self.family, rec.model, rec.task, "total").observe(sum(rec.timings_s.values()))


_METRICS: WorkerMetrics | None = None


def _torch_device(name: str):
    import torch

    return torch.device(name)


def observe_call(images: int) -> None:
    """Images in one pipeline call (several jobs' when micro-batched)."""
    if _METRICS is not None:
        _METRICS.batch.labels(_METRICS.family).observe(images)


def observe_delivery(ctx, job_id: str, segment: int, outcome: str, t0: float | None, records=()) -> None:
    """How a delivery ended (``records``: the stage records it wrote); called by the engine,
    for an overlapped finish once its outputs are written. Metrics never fail a worker."""
    if _METRICS is None:
        return
    try:
        _METRICS.on_delivery(outcome, t0, records)
    except Exception:
        log.debug("metrics for job %s segment %d skipped", job_id, segment, exc_info=True)


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
    task_postrun.connect(lambda **kw: m.on_postrun(**kw), weak=False)
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
