"""The Celery app both sides import: JSON only, late acks, one message at a time, one queue per family.

Why these settings (see docs/reliability.md):
- acks_late, without kombu's ack emulation: a message is acked in the worker's memory
  when its task ends, which paces prefetch; a worker that dies mid-stage is found by its
  expired heartbeat and its deliveries re-sent (``shared.liveness``), not by a broker-side
  redelivery an hour later.
- prefetch 1: a GPU runs one stage at a time; prefetching more would strand jobs behind a
  long stage on one worker while others sit idle.
- JSON only: a pickle payload from the broker would be remote code execution. Items on a
  queue that are not kombu messages at all are dropped with an error (SafeRedisTransport)
  instead of stopping the worker's consumer.
- rediss://: certificates are verified unless redis_ssl_cert_reqs says otherwise (kombu
  alone would default to CERT_NONE); the redis_ssl_* settings give the CA bundle and an
  optional client certificate.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import ssl
from collections.abc import Iterable
from queue import Empty

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from easel.shared import tracing
from easel.shared.jobstore import REPLY_WITHIN_S
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

    def _restore(self, message, leftmost=False):
        """A message handed back unacked goes where kombu's ack emulation would put it, which
        kombu's own restore without the emulation does not: one a worker prefetched and did
        not start (a warm shutdown) to the end of its priority list that BRPOP serves next,
        since it was the oldest there and newer jobs should not overtake it; one rejected
        with requeue (``leftmost``) behind the others, so it is not fetched again at once.
        A failure other than a lost connection is logged by kombu and the message dropped;
        the lost-message sweep (``shared.liveness``) sends its job again."""
        if self.ack_emulation:
            return super()._restore(message, leftmost)
        info = message.delivery_info
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            self._do_restore_message(message.serializable(), info["exchange"], info["routing_key"], pipe, leftmost)
            pipe.execute()


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
                 countdown: float | None = None, *, on_behalf: bool = False, kept_trace: dict | None = None,
                 retry: bool | None = None) -> None:
    """Queue one delivery of a job's segment: the only message easel sends. With tracing on,
    its headers carry the job's trace context (``shared.tracing``): this process's, or, for a
    job sent on its submitter's behalf (``on_behalf``: fair-share dispatch, a reaper's
    re-send), ``kept_trace``, the context its submitter kept in its record (None: the
    delivery starts a trace of its own, never the sender's). ``retry``: whether a publish
    rides out a broker outage (None: the app's ``task_publish_retry``)."""
    headers = tracing.headers_from(kept_trace) if on_behalf else tracing.headers(job_id)
    app.send_task(RUN_SEGMENT, args=[job_id, segment], queue=queue, priority=priority, countdown=countdown,
                  headers=headers, retry=retry)


def queued_deliveries(r, lists: list[str]) -> set[tuple[str, int]]:
    """Every (job id, segment) whose message waits in ``lists`` (a queue's priority lists), in
    one round trip."""
    pipe = r.pipeline(transaction=False)
    for name in lists:
        pipe.lrange(name, 0, -1)
    return {found for items in pipe.execute() for raw in items if (found := _delivery_of(raw))}


def _delivery_of(raw: bytes | str) -> tuple[str, int] | None:
    """(job id, segment) of a queued run_segment message; None for anything else."""
    try:
        payload = json.loads(raw)
        if payload.get("headers", {}).get("task") != RUN_SEGMENT:
            return None
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]), int(args[1])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def queue_name(family: str, prefix: str = "easel") -> str:
    return f"{prefix}.{family}"


def family_queues(families: Iterable[str], prefix: str = "easel") -> dict[str, str]:
    """Queue name -> family, for ``families``."""
    return {queue_name(family, prefix): family for family in families}


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
            # No broker-side bookkeeping of delivered messages (kombu's ack emulation: an
            # unacked hash and index, two MULTI/EXEC blocks per message, a visibility-timeout
            # restore): recovery is by liveness (shared/liveness.py), which re-sends what a
            # dead worker held within seconds, and a sweep that re-sends a waiting job whose
            # message is nowhere. Prefetch limits and the return of prefetched messages at a
            # warm shutdown still hold, kept in the worker's memory.
            "ack_emulation": False,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
            "socket_keepalive": True,
            # A broker connection gone silent (a Redis host that vanished without closing
            # it) is dropped instead of waited on: a publish's reply overdue by the job
            # store's REPLY_WITHIN_S is retried on a new connection, and kombu drops a BRPOP
            # not answered within its 1 s timeout plus this interval, checked this often, so
            # a worker consumes again within ~21 s (kombu's default 25 s: ~51 s). It also
            # PINGs a pool connection idle for this long before using it: a round trip per
            # publish after a quiet spell.
            "socket_timeout": REPLY_WITHIN_S,
            "health_check_interval": 10,
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
