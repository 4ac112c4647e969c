"""The Celery app both sides import: JSON only, late acks, one message at a time, one queue per family.

Why these settings (see docs/reliability.md):
- acks_late + reject_on_worker_lost: a worker that dies mid-stage leaves the message
  unacked, so Redis hands it out again after ``visibility_timeout``.
- prefetch 1: a GPU runs one stage at a time; prefetching more would strand jobs behind a
  long stage on one worker while others sit idle.
- JSON only: a pickle payload from the broker would be remote code execution. Items on a
  queue that are not kombu messages at all are dropped with an error (SafeRedisTransport)
  instead of stopping the worker's consumer.
- rediss://: certificates are always verified (kombu alone would default to CERT_NONE);
  the redis_ssl_* settings give the CA bundle and an optional client certificate.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
import time
from datetime import datetime, timezone
from queue import Empty

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from easel.shared import tracing
from easel.shared.settings import Settings, get_settings

RUN_SEGMENT = "easel.run_segment"
log = logging.getLogger("easel.broker")


def _envelope_problem(message: object) -> str | None:
    """Why a raw Redis list item is not a kombu message, or None if it is one."""
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not an object"
    props = message.get("properties")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str):
        return "no properties.delivery_tag"
    if not isinstance(props.get("delivery_info", {}), dict) or not isinstance(message.get("headers") or {}, dict):
        return "malformed delivery_info or headers"
    body = message.get("body")
    if body is not None and not isinstance(body, str):
        return "body is not a string"
    if props.get("body_encoding") == "base64":
        try:
            base64.b64decode(body or "", validate=True)
        except (binascii.Error, ValueError):
            return "body is not valid base64"
    elif props.get("body_encoding") is not None:
        return f"unknown body_encoding {props.get('body_encoding')!r}"
    return None


class _Channel(kombu_redis.Channel):
    """A redis channel that drops list items that are not kombu messages instead of dying.

    kombu decodes each BRPOP'd item as JSON before Celery sees it; garbage pushed onto a
    queue (by a bug, or by anyone with write access to Redis) raised out of the worker's
    event loop as an "Unrecoverable error" and stopped consumption. BRPOP already removed
    the item, so dropping it (with an error in the log) loses nothing.
    """

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.error("dropped a broker message that is not JSON: %s", e)
            raise Empty() from None

    def _get(self, queue):
        try:
            return super()._get(queue)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.error("dropped a broker message on %s that is not JSON: %s", queue, e)
            raise Empty() from None


class SafeRedisTransport(kombu_redis.Transport):
    Channel = _Channel

    def _deliver(self, message, queue):
        problem = _envelope_problem(message)
        if problem:
            log.error("dropped a broker message on %s that is not a kombu message: %s", queue, problem)
            return
        return super()._deliver(message, queue)


# redis:// and rediss:// broker URLs resolve through this alias table; only replace kombu's own.
for _scheme in ("redis", "rediss"):
    if TRANSPORT_ALIASES.get(_scheme) == "kombu.transport.redis:Transport":
        TRANSPORT_ALIASES[_scheme] = "easel.shared.celery_app:SafeRedisTransport"


def send_segment(app: Celery, job_id: str, segment: int, queue: str, priority: int,
                 countdown: float | None = None, *, on_behalf: bool = False, kept_trace: dict | None = None) -> None:
    """Queue one delivery of a job's segment: the only message easel sends. With tracing on,
    its headers carry the job's trace context (``shared.tracing``): this process's, or, for a
    job sent on its submitter's behalf (``on_behalf``: fair-share dispatch), ``kept_trace``,
    the context its submitter kept in its record."""
    headers = tracing.headers_from(kept_trace) if on_behalf else tracing.headers(job_id)
    app.send_task(RUN_SEGMENT, args=[job_id, segment], queue=queue, priority=priority, countdown=countdown,
                  headers=headers)


class UnackedMessages:
    """kombu's delivered, not yet acked messages (Redis transport: the ``unacked`` hash and its
    ``unacked_index`` by delivery time), seen as deliveries, for the reaper.

    A worker that dies between fetching a message and claiming its job (or while a
    micro-batch fills) leaves the message there, held by no one; kombu itself restores it
    only after the visibility timeout.
    """

    def __init__(self, app: Celery):
        self.app = app

    def older_than(self, age_s: float, limit: int = 500) -> list[tuple[str, str, int]]:
        """(delivery tag, job id, segment) of easel messages delivered over ``age_s`` ago."""
        with self.app.connection_for_write() as conn:
            ch = conn.default_channel
            tags = ch.client.zrangebyscore(ch.unacked_index_key, "-inf", time.time() - age_s, start=0, num=limit)
            raw = ch.client.hmget(ch.unacked_key, tags) if tags else []
        out = []
        for tag, value in zip(tags, raw):
            found = _delivery_of(value) if value else None
            if found:
                out.append((tag.decode() if isinstance(tag, bytes) else tag, *found))
        return out

    def deliveries(self) -> set[tuple[str, int]]:
        """Every (job id, segment) that a worker holds unacked now."""
        with self.app.connection_for_write() as conn:
            ch = conn.default_channel
            raw = ch.client.hvals(ch.unacked_key)
        return {found for value in raw if (found := _delivery_of(value, include_waiting=True))}

    def restore(self, tag: str) -> None:
        """Back to the front of its queue (kombu's own restore, as the visibility timeout does)."""
        with self.app.connection_for_write() as conn:
            conn.default_channel.qos.restore_by_tag(tag, leftmost=False)

    def drop(self, tag: str) -> None:
        """Forget a message whose job has ended or moved on (what an ack does)."""
        with self.app.connection_for_write() as conn:
            conn.default_channel.qos.ack(tag)


def _delivery_of(value: bytes | str, include_waiting: bool = False) -> tuple[str, int] | None:
    """(job id, segment) of a stored run_segment message; None for anything else, and, unless
    ``include_waiting``, for a retry whose countdown has not run out (its worker holds it
    unacked until then)."""
    try:
        payload = json.loads(value)[0]
        headers = payload.get("headers", {})
        if headers.get("task") != RUN_SEGMENT:
            return None
        if not include_waiting and headers.get("eta") and \
                datetime.fromisoformat(headers["eta"]) > datetime.now(timezone.utc):
            return None
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]), int(args[1])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def unacked_keys(prefix: str) -> dict[str, str]:
    """kombu's unacked-message keys, under the deployment's prefix."""
    return {"unacked_key": f"{prefix}:unacked", "unacked_index_key": f"{prefix}:unacked_index",
            "unacked_mutex_key": f"{prefix}:unacked_mutex"}


def queue_name(family: str, prefix: str = "easel") -> str:
    return f"{prefix}.{family}"


def broker_ssl_options(s: Settings) -> dict | None:
    """Celery ``broker_use_ssl`` for a rediss:// URL, from the redis_ssl_* settings.

    Always a dict for rediss://: given none, kombu falls back to CERT_NONE (TLS that accepts
    any certificate). ``ssl_*`` query parameters in the URL itself still take precedence.
    """
    kw = s.redis_ssl_kwargs()
    if not kw:
        return None
    reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    return {**kw, "ssl_cert_reqs": reqs[kw["ssl_cert_reqs"]]}


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("easel", broker=s.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        broker_use_ssl=broker_ssl_options(s),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=queue_name("default", s.queue_prefix),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": s.visibility_timeout_s,
            # How often a worker looks for messages past their visibility timeout. kombu
            # >= 5.7 sweeps every interval x throttle seconds (10 x 10 by default), which
            # would add up to 100 s to every redelivery; sweep every interval instead.
            "unacked_restore_interval": max(1, min(10, int(s.visibility_timeout_s // 4))),
            "unacked_restore_throttle": 1,
            # kombu's bookkeeping of delivered messages is global by default: two deployments
            # on one Redis database would restore each other's messages.
            **unacked_keys(s.queue_prefix),
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
            "socket_keepalive": True,
            "health_check_interval": 30,
            "retry_on_timeout": True,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_heartbeat=0,
        # A producer rides out a broker restart of a few seconds instead of failing the submit.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2.0},
    )
    return app
