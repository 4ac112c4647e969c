"""The Celery task a worker runs: its deliveries go through the one engine (``worker.engine``)."""
from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from easel.shared.celery_app import RUN_SEGMENT, make_celery
from easel.worker.context import get_context
from easel.worker.engine import run_deliveries
from easel.worker.policy import Delivery

if TYPE_CHECKING:
    from easel.worker.adaptive import FlushPolicy

log = logging.getLogger("easel.worker.tasks")

app = make_celery()
# A task that raised past the engine's own handlers (only infrastructure failures get
# there) is not acked. The broker keeps no copy of a delivered message (no ack emulation,
# shared/celery_app.py), so its jobs come back by easel's own recovery: the engine settles
# every delivery it claimed, and the lost-message sweep re-sends a job that waits with no
# message.
app.conf.task_acks_on_failure_or_timeout = False


def delivery(job_id, segment, queue: str | None, headers: dict | None = None) -> Delivery | None:
    """A message's arguments (and custom headers) as a delivery; None for arguments no
    producer of ours sends."""
    if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 64:
        return None
    if not isinstance(segment, int) or isinstance(segment, bool) or not 0 <= segment < 64:
        return None
    return Delivery(job_id, segment, queue, headers if isinstance(headers, dict) else None)


def run(requests: list[tuple]) -> list[str]:
    """Run a task's deliveries (one, or a micro-batch's), each given as (job id, segment,
    queue, custom headers), with the finisher told when the task starts and ends (a pending
    finish waits for the next call)."""
    ctx, _ = get_context()
    deliveries = [delivery(*r) for r in requests]
    valid = [d for d in deliveries if d is not None]
    if len(valid) < len(deliveries):
        log.error("dropped %d message(s) with malformed arguments", len(deliveries) - len(valid))
    if not valid:
        return ["invalid"] * len(deliveries)
    fin = ctx.finisher
    if fin is not None:
        fin.task_started()
    try:
        ended = iter(run_deliveries(ctx, app, valid))
    finally:
        if fin is not None:
            fin.task_ended()
    return [next(ended) if d is not None else "invalid" for d in deliveries]


def register_tasks(app, batch_size: int = 1, batch_wait_s: float = 0.05, *, buckets: list[int] | None = None,
                   latency_target_s: float | None = None, idle_s: float | None = None) -> None:
    """The one task, plain or micro-batched (up to ``batch_size`` jobs a call) per the worker's
    settings; a micro-batch's size adapts to the queue (``worker.adaptive``): it runs at the
    policy's target size, after ``idle_s`` without a new message, or after ``batch_wait_s``."""
    if batch_size > 1:
        from easel.worker.adaptive import FlushPolicy

        policy = FlushPolicy(buckets or [1, batch_size], batch_size, latency_target_s)

        @app.task(name=RUN_SEGMENT, base=_adaptive_batches(), flush_interval=batch_wait_s, policy=policy,
                  idle_s=idle_s)
        def run_segment_batch(requests):
            run([((r.args or [None, None])[0], (r.args or [None, None])[-1],
                  (r.delivery_info or {}).get("routing_key"), r.request_dict) for r in requests])
        return

    @app.task(name=RUN_SEGMENT, bind=True)
    def run_segment(self, job_id: str, seg_index: int) -> str:
        return run([(job_id, seg_index, (self.request.delivery_info or {}).get("routing_key"),
                     self.request.headers)])[0]


def _adaptive_batches() -> type:
    """celery-batches' task base with the adaptive flush; made on demand, so a worker that
    does not batch never imports celery-batches."""
    from celery_batches import Batches

    class AdaptiveBatches(Batches):
        """A batch runs as soon as the consumer holds the policy's target size, or once the queue
        went quiet: no message for ``idle_s`` (the consumer reads one per broker round trip, so
        a gap means nothing more is queued; ``idle_s`` None: no such flush). celery-batches'
        ``flush_interval`` timer stays as the longest a partial batch waits."""

        abstract = True
        flush_every = 1 << 30  # the handler below flushes by size, not celery-batches' counter
        policy: "FlushPolicy"
        idle_s: float | None = None

        def Strategy(self, task, app, consumer):
            buffer_message = super().Strategy(task, app, consumer)
            timer = consumer.timer
            quiet = None  # the pending flush for a queue gone quiet
            self._consumer, self._held = consumer, Counter()  # its qos is made after the strategies

            def on_message(message, *args, **kwargs) -> None:
                nonlocal quiet
                if _due_later(message):  # held until due: it must not take a fetch slot meanwhile,
                    self._held[message.headers.get("id")] += 1  # as Celery's own strategy ensures
                    consumer.qos.increment_eventually()
                buffer_message(message, *args, **kwargs)
                if quiet is not None:
                    quiet.cancel()
                    quiet = None
                if self.policy.flush_now(self._buffer.qsize()):
                    self._do_flush()
                elif self.idle_s is not None:
                    quiet = timer.call_after(self.idle_s, self._do_flush)

            return on_message

        def flush(self, requests):
            for request in requests:
                if self._held[request.id] > 0:
                    self._held[request.id] -= 1
                    self._consumer.qos.decrement_eventually()
            self._held = +self._held  # drop the ids counted down to nothing
            return super().flush(requests)

    return AdaptiveBatches


def _due_later(message) -> bool:
    """Whether a task message carries an ETA (a retry's countdown) still in the future."""
    from datetime import datetime, timezone

    eta = (message.headers or {}).get("eta")
    if not eta:
        return False
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return False
    return due > datetime.now(due.tzinfo or timezone.utc)
