"""The Celery app both sides import: JSON only, late acks, one message at a time, one queue per family.

Why these settings (see docs/reliability.md):
- acks_late + reject_on_worker_lost: a worker that dies mid-stage leaves the message
  unacked, so Redis hands it out again after ``visibility_timeout``.
- prefetch 1: a GPU runs one stage at a time; prefetching more would strand jobs behind a
  long stage on one worker while others sit idle.
- JSON only: a pickle payload from the broker would be remote code execution.
"""
from __future__ import annotations

import ssl

from celery import Celery

from shared.settings import Settings, get_settings

RUN_SEGMENT = "easel.run_segment"


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
