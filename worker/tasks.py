"""The Celery task a worker runs, and how its failures are classified.

Permanent errors (bad input, unknown model, a pipeline refusing its arguments) end the job
failed with a readable reason at once. Transient ones (lost connections, CUDA OOM) are
retried with exponential backoff up to a cap, then end failed. Either way the worker
returns to its queue: nothing a job does can take the process down with it.
"""
from __future__ import annotations

import logging

import botocore.exceptions
import redis.exceptions
import torch

from shared.celery_app import RUN_SEGMENT, make_celery
from shared.images import InputError
from shared.schema import JobState
from shared.storage import NotFound
from worker.context import get_context
from worker.runner import Cancelled
from worker.segment import execute_segment

log = logging.getLogger("easel.worker.tasks")

app = make_celery()

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


@app.task(name=RUN_SEGMENT, bind=True, max_retries=None)
def run_segment(self, job_id: str, seg_index: int) -> str:
    ctx, _ = get_context()
    max_retries = ctx.settings.max_retries
    try:
        return execute_segment(ctx, self.app, job_id, seg_index)
    except Cancelled:
        ctx.store.transition(job_id, JobState.cancelled, error="cancelled while running")
        return "cancelled"
    except TRANSIENT as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.request.retries >= max_retries:
            ctx.store.transition(job_id, JobState.failed,
                                 error=f"gave up after {max_retries} retries: {describe(exc)}")
            return "failed"
        countdown = min(30, 2 ** self.request.retries)
        log.warning("job %s segment %d: transient %s; retry %d/%d in %ss", job_id, seg_index, describe(exc),
                    self.request.retries + 1, max_retries, countdown)
        raise self.retry(exc=exc, countdown=countdown, queue=(self.request.delivery_info or {}).get("routing_key"))
    except Exception as exc:  # permanent: fail the job, keep the worker
        log.exception("job %s segment %d failed", job_id, seg_index)
        ctx.store.transition(job_id, JobState.failed, error=describe(exc))
        return "failed"
    finally:
        # Reached on every outcome except the process dying: that is what makes a crash count.
        try:
            ctx.store.end_delivery(job_id, seg_index)
        except Exception:
            log.warning("could not record the end of job %s segment %d", job_id, seg_index)
