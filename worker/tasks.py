"""The Celery task a worker runs, and how its failures are classified.

Permanent errors (bad input, unknown model, a pipeline refusing its arguments) end the job
failed with a readable reason at once. Transient ones (lost connections, CUDA OOM) are
retried with exponential backoff up to a cap, then end failed. Either way the worker
returns to its queue: nothing a job does can take the process down with it.
"""
from __future__ import annotations

import functools
import logging
import time

import botocore.exceptions
import redis.exceptions
import torch

from shared.celery_app import RUN_SEGMENT, make_celery
from shared.images import InputError
from shared.schema import JobState
from shared.storage import NotFound
from worker.context import get_context
from worker.runner import Cancelled
from worker.segment import execute_segment, load_image_ref, settle_claim

log = logging.getLogger("easel.worker.tasks")

app = make_celery()
# A task that raised past our own handlers (only infrastructure failures get there) is
# not acked: its message comes back after the visibility timeout instead of being lost.
app.conf.task_acks_on_failure_or_timeout = False

TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
    ConnectionError,
    TimeoutError,
    torch.OutOfMemoryError,
)


def describe(exc: BaseException) -> str:
    """A one-line reason a user can act on."""
    if isinstance(exc, (InputError, NotFound)):
        return str(exc).strip("'\"")
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:2000]


def _fail(ctx, job_id: str, reason: str) -> str:
    ctx.store.transition(job_id, JobState.failed, error=reason)
    return "failed"


def retry_later(ctx, app, job_id: str, seg: int, queue: str | None, exc: BaseException) -> str:
    """Re-send the segment with exponential backoff (1 s doubling, cap 30 s) up to max_retries."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    n = int(ctx.store.r.hincrby(ctx.store.key(job_id), f"retries:{seg}", 1))
    max_retries = ctx.settings.max_retries
    if n > max_retries:
        return _fail(ctx, job_id, f"gave up after {max_retries} retries: {describe(exc)}")
    countdown = min(30, 2 ** (n - 1))
    log.warning("job %s segment %d: transient %s; retry %d/%d in %ss", job_id, seg, describe(exc), n,
                max_retries, countdown)
    spec, _ = ctx.store.load(job_id)
    app.send_task(RUN_SEGMENT, args=[job_id, seg], queue=queue, countdown=countdown, priority=spec.priority)
    return "retrying"


def guarded(ctx, app, job_id: str, seg: int, queue: str | None, fn, end: bool = True):
    """Run ``fn`` for one job segment under the failure policy; the worker always survives."""
    try:
        result = fn()
        if result in ("succeeded", "handed-off", "finishing"):
            end = False  # the final state change records the end of this delivery
        return result
    except Cancelled:
        ctx.store.transition(job_id, JobState.cancelled, error="cancelled while running")
        return "cancelled"
    except redis.exceptions.AuthenticationError as exc:  # a revoked password is not a blip
        end = True
        log.exception("job %s segment %d: broker refused our credentials", job_id, seg)
        return _fail(ctx, job_id, describe(exc))
    except TRANSIENT as exc:
        end = True
        return retry_later(ctx, app, job_id, seg, queue, exc)
    except Exception as exc:  # permanent: fail the job, keep the worker
        end = True
        log.exception("job %s segment %d failed", job_id, seg)
        return _fail(ctx, job_id, describe(exc))
    finally:
        # Reached on every outcome except the process dying: that is what makes a crash count.
        if end:
            try:
                ctx.store.end_delivery(job_id, seg)
            except Exception:
                log.warning("could not record the end of job %s segment %d", job_id, seg)


def run_requests(ctx, app, requests: list[tuple[str, int, str | None]]) -> None:
    """A micro-batch of deliveries: compatible jobs share one pipeline call, the rest run alone.

    The batch's bookkeeping is pipelined: one round trip loads every job's spec (to see which
    can share a call), one claims every batchable delivery; the final states go out together
    too (``run_batch``). Jobs that must run alone take the one-job path first.
    """
    from worker.batching import Member, batch_key, run_batch

    try:
        loaded = ctx.store.load_many([job_id for job_id, _, _ in requests])
    except Exception:  # the one-job path classifies the failure per job
        log.exception("could not load a micro-batch's %d jobs; running them one by one", len(requests))
        loaded = [None] * len(requests)
    candidates: list[tuple[str, str | None, tuple]] = []
    for (job_id, seg, queue), got in zip(requests, loaded):
        key = None
        if got is not None and seg == 0:
            try:
                key = batch_key(ctx, *got)
            except Exception:  # an unknown model: the one-job path fails it with the reason
                key = None
        if key is None:
            guarded(ctx, app, job_id, seg, queue, lambda job_id=job_id, seg=seg: execute_segment(ctx, app, job_id, seg))
        else:
            candidates.append((job_id, queue, key))
    if not candidates:
        return
    try:
        claims = ctx.store.claim_many([(job_id, 0) for job_id, *_ in candidates], ctx.hostname,
                                      ctx.settings.max_crash_deliveries)
    except Exception as exc:  # transient: each job is re-sent with backoff; else each fails with the reason
        for job_id, queue, _ in candidates:
            guarded(ctx, app, job_id, 0, queue, functools.partial(_reraise, exc))
        return
    groups: dict[tuple, list[tuple[Member, str | None]]] = {}
    for (job_id, queue, key), claim in zip(candidates, claims):
        def prepare(job_id=job_id, key=key, claim=claim):
            settled = settle_claim(ctx, job_id, 0, claim)
            if isinstance(settled, str):
                return settled
            spec = settled.spec
            t0 = time.perf_counter()
            images = [load_image_ref(ctx, spec.input.image, "input image")] * spec.num_images \
                if spec.input.image else None
            return key + ((images[0].size if images else None),), Member(
                job_id, settled.spec, settled.plan, images, time.perf_counter() - t0, settled)

        prepared = guarded(ctx, app, job_id, 0, queue, prepare, end=False)
        if isinstance(prepared, tuple):
            groups.setdefault(prepared[0], []).append((prepared[1], queue))
    for members in groups.values():
        if len(members) == 1:
            (m, queue), = members
            guarded(ctx, app, m.job_id, 0, queue, lambda m=m: run_batch(ctx, [m]))
            continue
        try:
            run_batch(ctx, [m for m, _ in members])
        except Exception:
            log.exception("batch of %d failed; running its unfinished jobs one by one", len(members))
            ended = ctx.store.terminal_states([m.job_id for m, _ in members])
            for (m, queue), done in zip(members, ended):
                if not done:
                    guarded(ctx, app, m.job_id, 0, queue, lambda m=m: run_batch(ctx, [m]))


def _reraise(exc: BaseException):
    raise exc


def register_tasks(app, batch_size: int = 1, batch_wait_s: float = 0.05) -> None:
    """The one task, plain or micro-batched (celery-batches) per the worker's settings."""
    if batch_size > 1:
        from celery_batches import Batches

        @app.task(name=RUN_SEGMENT, base=Batches, flush_every=batch_size, flush_interval=batch_wait_s)
        def run_segment_batch(requests):
            ctx, _ = get_context()
            run_requests(ctx, app, [(r.args[0], r.args[1], (r.delivery_info or {}).get("routing_key"))
                                    for r in requests])
        return

    @app.task(name=RUN_SEGMENT, bind=True)
    def run_segment(self, job_id: str, seg_index: int) -> str:
        ctx, _ = get_context()
        queue = (self.request.delivery_info or {}).get("routing_key")
        fin = ctx.finisher
        if fin is None:
            return guarded(ctx, self.app, job_id, seg_index, queue,
                           lambda: execute_segment(ctx, self.app, job_id, seg_index))
        fin.task_started()  # a pending finish now waits for this task's denoising (worker/finisher.py)
        try:
            return guarded(ctx, self.app, job_id, seg_index, queue, lambda: execute_segment(
                ctx, self.app, job_id, seg_index, finish_later=fin.deferrer(job_id, seg_index, queue)))
        finally:
            fin.task_ended()
