"""The API's Prometheus registry: HTTP traffic, refusals, webhooks, plus Redis-read state.

A registry per app (not the process-global one) so several apps in one process, as in
tests, do not collide.

``easel api --workers N`` runs N server processes behind one port, and a scrape reaches
one of them; so, when ``PROMETHEUS_MULTIPROC_DIR`` is set (``easel api`` sets it when N > 1),
prometheus_client's multiprocess mode keeps each process's counts in files there and a
scrape sums every process's files (``MultiProcessCollector``). The Redis-read series are
the same in every process: the serving process adds its own, once, never summed.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from easel.shared.metrics import RedisStateCollector

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def multiprocess_dir() -> str | None:
    """The multiprocess-mode folder when this process runs in that mode, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(path: str) -> None:
    """Drop the live gauges (open SSE streams) of server processes that died without saying
    so (uvicorn restarts a crashed one); their counters and histograms stay in the sums."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for f in os.listdir(path) if (m := _LIVE_FILE.match(f))}
    for pid in pids:
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, path)


@contextmanager
def multiprocess_metrics(workers: int) -> Iterator[str | None]:
    """For ``easel api``, around the server's run: an operator's PROMETHEUS_MULTIPROC_DIR is
    used (made if missing, emptied of an earlier run's files); otherwise, with several
    workers, a fresh temporary folder is set and removed afterwards. One worker and no
    variable: plain in-process metrics (None)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for f in glob.glob(os.path.join(path, "*.db")):  # an earlier run's counts are not this one's
            os.remove(f)
        yield path
        return
    if workers <= 1:
        yield None
        return
    path = tempfile.mkdtemp(prefix="easel-api-metrics-")
    os.environ[MULTIPROC_ENV] = path  # the spawned server processes inherit it
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


class _LiveMultiProcessCollector:
    """MultiProcessCollector over ``path``, first forgetting the live gauges of dead processes."""

    def __init__(self, path: str):
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path, self.inner = path, MultiProcessCollector(None, path)

    def collect(self):
        forget_dead_processes(self.path)
        return self.inner.collect()


class ApiMetrics:
    def __init__(self, redis_client, families, prefix: str = "easel"):
        self.registry = CollectorRegistry()  # what /metrics serves
        self.multiprocess_dir = multiprocess_dir()
        # Multiprocess mode: the series live in the folder's files, read back (every process's,
        # summed) by one collector; registering them here as well would count this process twice.
        r = None if self.multiprocess_dir else self.registry
        self.requests = Counter("easel_api_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("easel_api_request_duration_seconds", "HTTP request time (SSE streams excluded)",
                                 ["method", "route"], buckets=HTTP_BUCKETS, registry=r)
        self.submitted = Counter("easel_api_jobs_submitted", "Jobs created through the API", ["key"], registry=r)
        self.refused = Counter("easel_api_refusals", "Requests refused, by reason", ["reason"], registry=r)
        self.webhooks = Counter("easel_webhook_deliveries", "Webhook delivery attempts by outcome",
                                ["outcome", "event"], registry=r)
        self.sse_streams = Gauge("easel_api_sse_streams", "Open server-sent-event streams", registry=r,
                                 multiprocess_mode="livesum")  # across the live server processes
        if self.multiprocess_dir:
            self.registry.register(_LiveMultiProcessCollector(self.multiprocess_dir))
        self.registry.register(RedisStateCollector(redis_client, families, prefix, jobs=True))


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.m = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.m.requests.labels(method, path, str(status["code"])).inc()
            if not path.endswith("/events"):
                self.m.latency.labels(method, path).observe(time.perf_counter() - t0)
