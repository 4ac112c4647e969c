"""Signed job webhooks: terminal events delivered at least once with exponential backoff.

Each API key chooses its events (``ApiKey.webhook_events``): ``succeeded``, ``failed``,
``cancelled`` (the default; retried until delivered or out of attempts), and ``queued``,
``started``, ``progress`` (at most every ``webhook_progress_every_s`` a job): best effort,
one attempt each, since the next event supersedes them. Events may arrive out of order (a
short job's passing events are sent after its end): the body's job is the job as it is when
sent, so receivers read its state rather than ordering by ``webhook-timestamp``.

Why a Redis-driven dispatcher rather than a callback in the worker: delivery must survive
API restarts and must not hold a GPU worker while a receiver is slow. The API records a
job's ``webhook_url``; the state change that ends the job puts it on the due set, and any
dispatcher (one runs inside every ``easel api``) delivers it. So a backlog of waiting
jobs costs the dispatchers nothing until each ends. Only jobs whose key wants passing
events are on a watch set that dispatchers read, a page a sweep, until a sweep has seen
them end (a short job's passing events are sent, late, after it ended). Claims are leases in a
sorted set, so a dispatcher that dies mid-delivery is retried by another.

Signatures follow the Standard Webhooks spec (standardwebhooks.com), so any of its
verifiers checks them, given one ``whsec_`` secret::

    webhook-id: <job id>.<state>            (the same on every retry: receivers dedupe on it)
    webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<raw body>")> [v1,<...> ...]

A secret is ``whsec_<base64 key>`` (any other string is used as the key's bytes, which only
``verify_signature`` reads: the spec's libraries base64-decode every secret). Several
secrets separated by spaces each sign, so a receiver keeps verifying while secrets rotate:
add the new one before the old, let receivers switch, then drop the old one.
``verify_signature`` checks a delivery (constant time, timestamps within 5 minutes).

The POST goes to the address vetted when the URL was checked, never to a second DNS
answer (``shared.images.pin_url``).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from easel.shared.images import InputError, Unresolved, exchange
from easel.shared.jobstore import JobStore
from easel.shared.settings import Settings, secret_keys

log = logging.getLogger("easel.webhooks")

EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
TERMINAL_EVENTS = ("succeeded", "failed", "cancelled")

# Atomically take up to ARGV[2] due deliveries and lease them for ARGV[1] seconds. Returns
# flat (member, the job's owner or '') pairs: ARGV[3] is the job-record key prefix. Due
# deliveries of the owners named from ARGV[5] on (keys whose share of this dispatcher's
# threads is busy) are put ARGV[4] seconds back instead, without using up the take; at most
# ten times the take is looked at per call, so a busy key's backlog delays the other keys'
# deliveries by one call per that many of its own, once.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local want = tonumber(ARGV[2])
local busy = {}
for i = 5, #ARGV do busy[ARGV[i]] = true end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 10 * want)
local out = {}
for _, m in ipairs(due) do
  local job_id = string.match(m, '^[^|]+')
  local owner = redis.call('HGET', ARGV[3] .. job_id, 'owner') or ''
  if busy[owner] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), m)
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), m)
    table.insert(out, m)
    table.insert(out, owner)
    if #out >= 2 * want then break end
  end
end
return out
"""

# A delivery's next attempt is due ARGV[2] seconds from now, by Redis's clock (the claims'
# clock, so API hosts' clocks do not stretch or shorten the backoff).
_RETRY_IN = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2]), ARGV[1])
"""

# A finished job leaves the watch set and, if its key asked for its terminal event, joins the
# due set, in one step: a dispatcher that dies between the two cannot leave it in neither.
# Not where its delivery was made or decided already (the state change that ended it makes
# it due). KEYS: watch set, due set, job hash. Returns 1 for the replica that moved it.
_FINISHED = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local delivery = redis.call('HGET', KEYS[3], 'webhook_state')
if ARGV[2] == '1' and (not delivery or delivery == 'pending') then redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[1]) end
return 1
"""


class SignatureError(ValueError):
    pass


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secrets: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for one delivery, signed with every current secret."""
    t = int(time.time() if timestamp is None else timestamp)
    return {"webhook-id": msg_id, "webhook-timestamp": str(t),
            "webhook-signature": " ".join(signature(k, msg_id, t, body) for k in secret_keys(secrets))}


def verify_signature(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0,
                     now: float | None = None) -> int:
    """Check a delivery's Standard Webhooks headers; returns its timestamp or raises SignatureError."""
    try:
        msg_id, t = headers["webhook-id"], int(headers["webhook-timestamp"])
        sigs = headers["webhook-signature"].split()
    except (ValueError, KeyError):
        raise SignatureError("missing or malformed webhook-id / webhook-timestamp / webhook-signature") from None
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        raise SignatureError("signature timestamp outside tolerance (replayed or clock skew)")
    wanted = [signature(k, msg_id, t, body) for k in secret_keys(secret)]
    if not any(hmac.compare_digest(w, got) for w in wanted for got in sigs):
        raise SignatureError("signature does not match")
    return t


class WebhookDispatcher:
    """Watches jobs with a webhook, delivers each terminal event, retries with backoff.

    ``render(job_id)`` builds the job JSON (the API passes its own response model, so a
    webhook carries the same fields and presigned URLs as GET /v1/jobs/{id}).
    ``secret_for(owner)`` picks the signing secret (per key, else the server's).
    """

    WATCH_PAGE = 1000  # watched jobs read per sweep

    def __init__(self, settings: Settings, store: JobStore, render: Callable[[str], dict],
                 secret_for: Callable[[str | None], str | None], workers: int = 32):
        self.s, self.store, self.r = settings, store, store.r
        self.render, self.secret_for = render, secret_for
        self.watch_key = store.webhooks_watch_key()
        self.due_key = store.webhooks_due_key()
        self._claim = self.r.register_script(_CLAIM)
        self._retry_in = self.r.register_script(_RETRY_IN)
        self._finished = self.r.register_script(_FINISHED)
        self.workers = workers
        # A key's attempts at once: one whose receiver is slow or dead holds that many threads
        # for up to webhook_timeout_s each, and the other keys' deliveries keep the rest.
        self.per_key = max(1, workers // 4)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="easel-webhook")
        # A lease outlasts any attempt (each is cut off at webhook_timeout_s), so no other
        # replica takes a delivery while one is still trying it.
        self.lease_s = max(120.0, 4 * settings.webhook_timeout_s)
        # Built once, shared by every attempt's client (building one reads the CA bundle): the
        # CAs httpx trusts by default, as input downloads do.
        self._tls = httpx.create_ssl_context()
        self.transport: httpx.AsyncBaseTransport | None = None  # instead of the network (tests)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: set[str] = set()
        self._by_key: Counter[str] = Counter()  # attempts in flight per owner (API key name)
        self._lock = threading.Lock()
        self._watch_from = 0  # where the next sweep's page of watched jobs starts
        self.on_result: Callable[[str, str], None] | None = None  # (outcome, event) for metrics

    # -- registration (API request path) ---------------------------------------------------
    def register(self, job_id: str, url: str, events: list[str] = TERMINAL_EVENTS) -> None:
        """Deliver the ``events`` its key asked for: a terminal one once the job ends, passing
        ones as the dispatchers' sweeps see them."""
        self.store.set_webhook(job_id, url, list(events), passing=not set(events) <= set(TERMINAL_EVENTS))

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

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # Redis away: keep the API serving, try again next sweep
                log.exception("webhook sweep failed")
            self._stop.wait(self.s.webhook_sweep_s)

    def sweep(self) -> int:
        """Schedule the passing events of a page of the watched jobs (and the terminal one of
        a job registered by an earlier version, which watched every job), then start due
        deliveries.
        Returns started. Each sweep reads the next page, the first again after the last, so
        every watched job is looked at once per (watched / ``WATCH_PAGE``) sweeps, however
        many older jobs still run."""
        start = self._watch_from
        watched = self.r.zrange(self.watch_key, start, start + self.WATCH_PAGE - 1)
        self._watch_from = start + self.WATCH_PAGE if len(watched) == self.WATCH_PAGE else 0
        for job_id, view in zip(watched, self.store.webhook_watch(watched) if watched else []):
            self._schedule(job_id, view)
        with self._lock:  # no more than the pool can start now: the rest stay due for others
            room = self.workers - len(self._inflight)
            busy = [owner for owner, n in self._by_key.items() if n >= self.per_key]
        claimed = self._claim(keys=[self.due_key], args=[self.lease_s, room, self.store.key(""),
                                                         self.s.webhook_sweep_s, *busy]) if room > 0 else []
        started, later = 0, []
        for member, owner in zip(claimed[::2], claimed[1::2]):
            with self._lock:
                if member in self._inflight:
                    continue
                if self._by_key[owner] >= self.per_key:  # its key's share is busy: behind the others
                    later.append(member)
                    continue
                self._inflight.add(member)
                self._by_key[owner] += 1
            self._pool.submit(self._deliver_guarded, member, owner)
            started += 1
        for member in later:
            self._retry_in(keys=[self.due_key], args=[member, self.s.webhook_sweep_s])
        return started

    def _schedule(self, job_id: str, view: dict | None) -> None:
        """Put a job's new events on the due set: a terminal one under the job id (delivered
        with retries), the others as ``<job id>|<event>|<tag>`` (one attempt each). Each
        passing event is claimed once in the job record (``webhook_first``), progress at most
        once per throttle period (a lease), so API replicas never schedule one twice."""
        if view is None:
            self.r.zrem(self.watch_key, job_id)  # expired record: nothing to say
            return
        events = view["webhook_events"] if view["webhook_events"] is not None else TERMINAL_EVENTS
        state, due = view["state"], []
        if "queued" in events and self.store.webhook_first(job_id, "queued"):
            due.append(f"{job_id}|queued|queued")
        if "started" in events and view["started_at"] and self.store.webhook_first(job_id, "started"):
            due.append(f"{job_id}|started|started")
        tag = f"progress.{int(view['stage'] or 0)}.{int(view['step'] or 0)}"
        if ("progress" in events and state == "running" and int(view["step"] or 0)
                and self.store.lease(f"webhook-progress:{job_id}", self.s.webhook_progress_every_s)
                and self.store.webhook_first(job_id, tag)):
            due.append(f"{job_id}|progress|{tag}")
        if due:
            self.r.zadd(self.due_key, {m: 0 for m in due}, nx=True)
        if state in EVENT_TYPES and self._finished(keys=[self.watch_key, self.due_key, self.store.key(job_id)],
                                                   args=[job_id, int(state in events)]):
            if state not in events:
                self.store.webhook_state(job_id, "not requested")

    def _deliver_guarded(self, member: str, owner: str) -> None:
        try:
            self.deliver(member)
        except Exception:  # counted as an attempt: it cannot retry forever
            log.exception("webhook %s crashed; its lease's expiry retries it", member)
        finally:
            with self._lock:
                self._inflight.discard(member)
                self._by_key[owner] -= 1

    # -- one attempt ---------------------------------------------------------------------
    def deliver(self, member: str) -> str:
        """One attempt at a due delivery: a terminal event (retried) or a passing one."""
        if "|" in member:
            return self._deliver_passing(member)
        return self._deliver_terminal(member)

    def _post(self, url: str, secret: str, job_id: str, owner: str | None, msg_id: str, event: str,
              attempt: int) -> str | None:
        """One signed POST of the job's JSON to the pinned address (``exchange``: the whole
        exchange bounded by ``webhook_timeout_s``, the answer's body never read); None when
        the receiver took it (2xx), else why not. Raises InputError for a URL refused at the
        check; a name that does not resolve now is a failed attempt, retried like any other."""
        body = json.dumps({"id": msg_id, "type": event, "attempt": attempt, "created_at": time.time(),
                           "key": owner, "job": self.render(job_id)}, separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "easel-webhooks/1",
                   **signed_headers(secret, msg_id, body), "Easel-Event": event, "Easel-Attempt": str(attempt)}
        limit = self.s.webhook_timeout_s
        try:
            status, _ = exchange("POST", url, self.s, timeout_s=limit, content=body, headers=headers,
                                 verify=self._tls, transport=self.transport)
        except Unresolved as e:
            return str(e)[:500]
        except TimeoutError:
            return f"no answer within {limit:g}s (EASEL_WEBHOOK_TIMEOUT_S)"
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"[:500]
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _deliver_passing(self, member: str) -> str:
        """queued, started, progress: best effort, one attempt (the next event supersedes it)."""
        job_id, event, tag = member.split("|", 2)
        self.r.zrem(self.due_key, member)
        url, owner, _ = self.store.webhook_target(job_id)
        secret = self.secret_for(owner)
        if not url or not secret:
            return "dropped"
        try:  # the id: <job id>.started, <job id>.progress.<stage>.<step>, ...
            error = self._post(url, secret, job_id, owner, f"{job_id}.{tag}", f"job.{event}", 1)
        except InputError:
            return "dropped"
        outcome = "failed" if error else "delivered"
        self._report(outcome, f"job.{event}")
        return outcome

    def _deliver_terminal(self, job_id: str) -> str:
        url, owner, state = self.store.webhook_target(job_id)
        if not url or state not in EVENT_TYPES:
            self.r.zrem(self.due_key, job_id)
            return "dropped"
        attempt = self.store.webhook_attempt(job_id)
        event = EVENT_TYPES[state]
        if attempt > self.s.webhook_max_attempts:  # earlier attempts crashed before they could count
            return self._give_up(job_id, event, f"gave up after {attempt - 1} attempts that could not be made")
        secret = self.secret_for(owner)
        if not secret:
            return self._give_up(job_id, event, "no webhook secret configured (EASEL_WEBHOOK_SECRET)")
        try:
            error = self._post(url, secret, job_id, owner, f"{job_id}.{state}", event, attempt)
        except InputError as e:
            return self._give_up(job_id, event, f"refused URL: {e}")
        if error is None:
            self.store.webhook_state(job_id, "delivered")
            self.r.zrem(self.due_key, job_id)
            self._report("delivered", event)
            return "delivered"
        if attempt >= self.s.webhook_max_attempts:
            return self._give_up(job_id, event, f"gave up after {attempt} attempts; last: {error}")
        delay = min(self.s.webhook_backoff_max_s, self.s.webhook_backoff_s * 2 ** (attempt - 1))
        delay *= random.uniform(0.8, 1.2)  # spread retries of many jobs to one receiver
        self.store.webhook_state(job_id, "pending", error)
        self._retry_in(keys=[self.due_key], args=[job_id, delay])
        log.info("webhook for job %s attempt %d failed (%s); retry in %.1fs", job_id, attempt, error, delay,
                 extra={"job_id": job_id})
        self._report("retry", event)
        return "retry"

    def _give_up(self, job_id: str, event: str, error: str) -> str:
        self.store.webhook_state(job_id, "failed", error)
        self.r.zrem(self.due_key, job_id)
        log.warning("webhook for job %s failed for good: %s", job_id, error, extra={"job_id": job_id})
        self._report("failed", event)
        return "failed"

    def _report(self, outcome: str, event: str) -> None:
        if self.on_result:
            self.on_result(outcome, event)
