"""The API's Prometheus registry: HTTP traffic, refusals, webhooks, plus Redis-read state.

A registry per app (not the process-global one) so several apps in one process, as in
tests, do not collide.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from easel.shared.metrics import RedisStateCollector

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    def __init__(self, redis_client, families, prefix: str = "easel"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("easel_api_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("easel_api_request_duration_seconds", "HTTP request time (SSE streams excluded)",
                                 ["method", "route"], buckets=HTTP_BUCKETS, registry=r)
        self.submitted = Counter("easel_api_jobs_submitted", "Jobs created through the API", ["key"], registry=r)
        self.refused = Counter("easel_api_refusals", "Requests refused, by reason", ["reason"], registry=r)
        self.webhooks = Counter("easel_webhook_deliveries", "Webhook delivery attempts by outcome",
                                ["outcome", "event"], registry=r)
        self.sse_streams = Gauge("easel_api_sse_streams", "Open server-sent-event streams", registry=r)
        r.register(RedisStateCollector(redis_client, families, prefix, jobs=True))


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
