"""Signed completion webhooks, delivered at least once with exponential backoff.

Why a Redis-driven dispatcher rather than a callback in the worker: delivery must survive
API restarts and must not hold a GPU worker while a receiver is slow. The API records a
job's ``webhook_url`` and adds the job to a watch set; any dispatcher (one runs inside
every ``easel api``) moves a finished job to the due set and delivers it. Claims are
leases in a sorted set, so a dispatcher that dies mid-delivery is retried by another.

Signature (Stripe-style, timestamped against replay)::

    Easel-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

Receivers recompute the HMAC over the raw body, compare in constant time and refuse
timestamps older than a few minutes (``verify_signature`` does all three).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from shared.images import InputError, check_public_url
from shared.jobstore import JobStore
from shared.settings import Settings

log = logging.getLogger("easel.webhooks")

SIGNATURE_HEADER = "Easel-Signature"
EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}

# Atomically take up to ARGV[2] due deliveries and lease them until ARGV[1] + lease.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), m) end
return due
"""


class SignatureError(ValueError):
    pass


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time() if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300.0,
                     now: float | None = None) -> int:
    """Check an ``Easel-Signature`` header; returns its timestamp or raises SignatureError."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
        got = parts["v1"]
    except (ValueError, KeyError):
        raise SignatureError("malformed signature header") from None
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        raise SignatureError("signature timestamp outside tolerance (replayed or clock skew)")
    want = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, got):
        raise SignatureError("signature does not match")
    return t


class WebhookDispatcher:
    """Watches jobs with a webhook, delivers each terminal event, retries with backoff.

    ``render(job_id)`` builds the job JSON (the API passes its own response model, so a
    webhook carries the same fields and presigned URLs as GET /v1/jobs/{id}).
    ``secret_for(owner)`` picks the signing secret (per key, else the server's).
    """

    LEASE_S = 120.0

    def __init__(self, settings: Settings, store: JobStore, render: Callable[[str], dict],
                 secret_for: Callable[[str | None], str | None], workers: int = 8):
        self.s, self.store, self.r = settings, store, store.r
        self.render, self.secret_for = render, secret_for
        self.watch_key = f"{store.prefix}:webhooks:watch"
        self.due_key = f"{store.prefix}:webhooks:due"
        self._claim = self.r.register_script(_CLAIM)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="easel-webhook")
        self._http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                  headers={"User-Agent": "easel-webhooks/1"})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self.on_result: Callable[[str, str], None] | None = None  # (outcome, event) for metrics

    # -- registration (API request path) ---------------------------------------------------
    def register(self, job_id: str, url: str) -> None:
        self.store.set_webhook(job_id, url)
        self.r.zadd(self.watch_key, {job_id: time.time()})

    # -- loop ----------------------------------------------------------------------------
    def start(self) -> "WebhookDispatcher":
        self._thread = threading.Thread(target=self._run, name="easel-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # Redis away: keep the API serving, try again next sweep
                log.exception("webhook sweep failed")
            self._stop.wait(self.s.webhook_sweep_s)

    def sweep(self) -> int:
        """Move finished watched jobs to the due set, then start due deliveries. Returns started."""
        watched = self.r.zrange(self.watch_key, 0, 999)
        if watched:
            for j, st in zip(watched, self.store.states_of(watched)):
                if st is None:
                    self.r.zrem(self.watch_key, j)  # expired record: nothing to say
                elif st in EVENT_TYPES and self.r.zrem(self.watch_key, j):
                    self.r.zadd(self.due_key, {j: 0}, nx=True)  # the replica that removed it schedules it
        started = 0
        for job_id in self._claim(keys=[self.due_key], args=[self.LEASE_S, 50]):
            with self._lock:
                if job_id in self._inflight:
                    continue
                self._inflight.add(job_id)
            self._pool.submit(self._deliver_guarded, job_id)
            started += 1
        return started

    def _deliver_guarded(self, job_id: str) -> None:
        try:
            self.deliver(job_id)
        except Exception:
            log.exception("webhook for job %s crashed; lease expiry retries it", job_id)
        finally:
            with self._lock:
                self._inflight.discard(job_id)

    # -- one attempt ---------------------------------------------------------------------
    def deliver(self, job_id: str) -> str:
        hook = self.store.webhook(job_id)
        url, owner, state = hook["webhook_url"], hook["owner"], hook["state"]
        if not url or state not in EVENT_TYPES:
            self.r.zrem(self.due_key, job_id)
            return "dropped"
        attempt = self.store.webhook_attempt(job_id)
        event = EVENT_TYPES[state]
        secret = self.secret_for(owner)
        error = None
        if not secret:
            error = "no webhook secret configured (EASEL_WEBHOOK_SECRET)"
            return self._give_up(job_id, event, error)
        try:
            check_public_url(url, self.s)
        except InputError as e:
            return self._give_up(job_id, event, f"refused URL: {e}")
        body = json.dumps({"id": f"{job_id}.{state}", "type": event, "attempt": attempt,
                           "created_at": time.time(), "job": self.render(job_id)},
                          separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body),
                   "Easel-Event": event, "Easel-Webhook-Id": f"{job_id}.{state}", "Easel-Attempt": str(attempt)}
        try:
            resp = self._http.post(url, content=body, headers=headers)
            if 200 <= resp.status_code < 300:
                self.store.webhook_state(job_id, "delivered")
                self.r.zrem(self.due_key, job_id)
                self._report("delivered", event)
                return "delivered"
            error = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"[:500]
        if attempt >= self.s.webhook_max_attempts:
            return self._give_up(job_id, event, f"gave up after {attempt} attempts; last: {error}")
        delay = min(self.s.webhook_backoff_max_s, self.s.webhook_backoff_s * 2 ** (attempt - 1))
        delay *= random.uniform(0.8, 1.2)  # spread retries of many jobs to one receiver
        self.store.webhook_state(job_id, "pending", error)
        self.r.zadd(self.due_key, {job_id: time.time() + delay})
        log.info("webhook for job %s attempt %d failed (%s); retry in %.1fs", job_id, attempt, error, delay)
        self._report("retry", event)
        return "retry"

    def _give_up(self, job_id: str, event: str, error: str) -> str:
        self.store.webhook_state(job_id, "failed", error)
        self.r.zrem(self.due_key, job_id)
        log.warning("webhook for job %s failed for good: %s", job_id, error)
        self._report("failed", event)
        return "failed"

    def _report(self, outcome: str, event: str) -> None:
        if self.on_result:
            self.on_result(outcome, event)
