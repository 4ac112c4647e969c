"""How a delivery's failure ends: every error a job can raise is classified here.

Permanent errors (bad input, unknown model, a pipeline refusing its arguments, a time
limit) end the job failed with a readable reason at once. Transient ones (lost
connections, Redis refusing writes for now, S3 throttling or answering 5xx, an image URL's
server answering 5xx or 429, CUDA OOM: twice at most) re-send the segment
with exponential backoff and full jitter (so jobs do not retry in lock-step after an
outage) up to ``max_retries`` (counted in the job record), then end failed. Either way the
delivery ends and the worker returns to its queue: nothing a job does can take the process
down with it.

The one exception is a GPU that a CUDA error has left unusable (an illegal address, a
device-side assert, a launch failure): every later call in this process would fail too, so
the job is not to blame. The process exits with its deliveries still held; the launcher
starts a fresh one (a new CUDA context) and the reaper sends the jobs again, each with one
more worker death counted (``max_crash_deliveries``: a job that breaks the GPU every time it
runs ends as poison).
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import kombu.exceptions
import redis.exceptions
import torch

from easel.shared import logs, tracing
from easel.shared.celery_app import send_segment
from easel.shared.images import InputError, SourceUnavailable
from easel.shared.jobstore import DeliveryEnd, refusing_for_now, retry_fields
from easel.shared.schema import TERMINAL_STATES, JobState
from easel.shared.storage import NotFound, s3_not_now

log = logging.getLogger("easel.worker.policy")

# Redis unreachable, whether through redis-py (the job record) or through Celery's publish
# (a hand-off or a retry's message: kombu's OperationalError once its retries give up).
BROKER_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError)
TRANSIENT = (
    *BROKER_AWAY,
    SourceUnavailable,  # an image URL's server answering 5xx or 429, or not at all
    ConnectionError,
    TimeoutError,
)
BACKOFF_CAP_S = 30.0
# Out of GPU memory again after this many retries: the job itself is too large for the GPU
# (a retry helps when other work held the memory, or alone instead of in a micro-batch).
OOM_RETRIES = 2
DEVICE_LOST_EXIT_CODE = 76


# CUDA errors after which the process's context is unusable ("sticky" errors): every later
# kernel fails too. Others (an invalid launch configuration on a huge input, say) leave the
# GPU working: the job fails with its reason, like any error of the job's own.
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "illegal instruction", "uncorrectable ecc", "launch timed out", "hardware stack error",
           "unrecoverable", "device not ready", "gpu has fallen off the bus")
FINISH_GRACE_S = 30.0  # how long a lost GPU's process waits for its pending finishes (no GPU needed)


def device_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error that leaves the device unusable for this process (out
    of memory is not one: it has its own type and the next call may fit): a sticky error by
    its text, or any other CUDA error after which the device no longer answers."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    cuda = (accelerator_error is not None and isinstance(exc, accelerator_error)) or (
        isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error"))
    if not cuda or out_of_memory(exc):  # a probe would need memory too, and fail for want of it
        return False
    if any(sign in str(exc).lower() for sign in _STICKY):
        return True
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.zeros(1, device="cuda").add_(1).item()
        return False
    except Exception:
        return True


# The texts of errors that mean out of memory without saying so by their type: cuBLAS and
# cuDNN allocate their workspaces themselves, and their failures are not
# torch.OutOfMemoryError; torch's host allocator raises a plain RuntimeError.
_ALLOC_FAILED = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_MEMORY",
                 "DefaultCPUAllocator: can't allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    """Out of memory, the GPU's or the host's (a decoded image, a CPU tensor, numpy's arrays),
    whichever part of the stack ran out: a retry may fit where other work held the memory,
    alone instead of in a micro-batch."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _ALLOC_FAILED))


def transient(exc: BaseException) -> bool:
    """Whether a retry of the delivery may succeed where this one failed: an outage of Redis,
    S3 or an image's server, or memory held by other work."""
    return isinstance(exc, TRANSIENT) or s3_not_now(exc) or refusing_for_now(exc) or out_of_memory(exc)


def exit_device_lost(ctx, d: Delivery, exc: BaseException) -> None:
    """End the process, leaving its deliveries held for the reaper (see the module's note),
    once the finishes it has pending (encodes and uploads, no GPU) are written, within
    ``FINISH_GRACE_S``."""
    log.critical("job %s segment %d: the GPU failed (%s); exiting so the launcher starts a fresh process and "
                 "the job runs again", d.job_id, d.segment, describe(exc))
    drain_finishes(ctx)
    tracing.shutdown()
    logging.shutdown()
    os._exit(DEVICE_LOST_EXIT_CODE)


def drain_finishes(ctx) -> None:
    """Before the process ends itself: the finishes it has pending (encodes and uploads of
    jobs already denoised, no GPU) are written, within ``FINISH_GRACE_S``, so those jobs
    are not denoised again, nor counted as crashed towards the poison limit."""
    if ctx.finisher is not None:
        waiting = threading.Thread(target=ctx.finisher.drain, daemon=True)
        waiting.start()
        waiting.join(FINISH_GRACE_S)


@dataclass(frozen=True)
class Delivery:
    """One message: run ``segment`` of a job. ``queue`` is where it came from (None if unknown);
    ``headers`` are its custom headers (the trace context, ``shared.tracing``), not part of
    its identity; ``attempt``, once claimed, the claim's attempt number, which its end
    carries (``end_of``)."""

    job_id: str
    segment: int
    queue: str | None = None
    headers: dict | None = field(default=None, compare=False, hash=False, repr=False)
    attempt: int | None = field(default=None, compare=False, hash=False)


def describe(exc: BaseException) -> str:
    """A one-line reason a user can act on."""
    if isinstance(exc, (InputError, NotFound)):
        return str(exc).strip("'\"")
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:2000] if msg else type(exc).__name__


def end_of(ctx, d: Delivery) -> DeliveryEnd:
    """What a state change that ends ``d`` names: the delivery, by its claim."""
    return DeliveryEnd(d.segment, ctx.instance, d.attempt)


def end_as(ctx, d: Delivery, state: JobState, **fields) -> bool:
    """The delivery's final state change, which also ends the delivery (one round trip);
    False if it was refused: the job ended, another delivery holds it or claimed it since,
    or it has moved past this segment (taken over, then handed on, while this instance was
    cut off)."""
    return ctx.store.transition(d.job_id, state, end=end_of(ctx, d), **fields)


def fail(ctx, d: Delivery, reason: str) -> str:
    return "failed" if end_as(ctx, d, JobState.failed, error=reason) else refused(ctx, d, JobState.failed)


def give_up(ctx, d: Delivery, reason: str) -> str:
    """``fail`` where no exception was logged on the way (retries spent, an unreadable
    claim): the worker's log says it."""
    log_failed(d.job_id, d.segment, reason)
    return fail(ctx, d, reason)


def log_failed(job_id: str, segment: int, reason: str) -> None:
    """A job's failure in the worker's log, with the job's fields whatever thread says it."""
    with logs.job_context(job_id, segment):
        log.error("job %s segment %d failed: %s", job_id, segment, reason)


def cancelled(ctx, d: Delivery) -> str:
    return ("cancelled" if end_as(ctx, d, JobState.cancelled, error="cancelled while running")
            else refused(ctx, d, JobState.cancelled))


def refused(ctx, d: Delivery, wanted: JobState) -> str:
    """The outcome of a delivery whose state change was refused: ``wanted`` itself when the
    job is in it with this instance as its last holder (the change was made, its reply lost
    and the script run again), else why it was refused."""
    state, holder = ctx.store.state_and_holder(d.job_id)
    if state == wanted.value and holder == ctx.instance:
        return wanted.value
    outcome, why = refusal(state)
    log.warning("job %s %s; this delivery's end is not its state", d.job_id, why)
    return outcome


def refusal(state: str | None) -> tuple[str, str]:
    """The outcome of a delivery whose state change was refused, from the job's state now,
    and why it was refused."""
    if state in TERMINAL_STATES:
        return f"already {state}", f"ended {state}"
    if state is None:
        return "unknown", "lost its record (expired)"
    return "superseded", "was taken over by another worker"


def free_device_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, so that a retry (or a failed
    batch's jobs run alone) can have them; nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def retry_later(ctx, app, d: Delivery, exc: BaseException) -> str:
    """Re-send the segment after a full-jitter backoff (cap 1 s doubling, at most 30 s)."""
    free_device_memory()
    n, oom = ctx.store.retries_of(d.job_id, d.segment)
    memory = out_of_memory(exc)
    n, oom = n + 1, oom + memory
    if memory and oom > OOM_RETRIES:
        return give_up(ctx, d, f"out of memory again after {OOM_RETRIES} retries ({describe(exc)}): use a "
                               "smaller image or fewer images per job, or turn on vae_tiling for the model")
    if n > ctx.settings.max_retries:
        return give_up(ctx, d, f"gave up after {ctx.settings.max_retries} retries: {describe(exc)}")
    countdown = random.uniform(0, min(BACKOFF_CAP_S, 2.0 ** (n - 1)))
    log.warning("job %s segment %d: transient %s; retry %d/%d in %.1fs", d.job_id, d.segment, describe(exc), n,
                ctx.settings.max_retries, countdown)
    spec, plan = ctx.store.load(d.job_id)
    queue = d.queue or plan.segments[d.segment].queue
    # Queued while it waits out the backoff: its status says why, and a cancel ends it at
    # once. It holds no room in its queue meanwhile (``HELD_BACK``): other jobs are sent in
    # its place. In its queue's position set first, so that from the moment the delivery
    # ends a reaper sends a retry whose message is lost again; the delivery ends before the send,
    # so a claim of the re-sent message does not find it still held. The record's queue,
    # the message's due time (the lost-message sweep counts the wait from then) and the
    # count are written with the state change: a job that ended, was taken over or moved
    # on meanwhile keeps where it waits, is not sent again and counts no retry.
    ctx.store.mark_position(d.job_id, queue, spec.priority, held_back=True)
    note = f"retry {n} of {ctx.settings.max_retries} after {describe(exc)}, sent again in {countdown:.1f}s"
    if not end_as(ctx, d, JobState.queued, note=note, queue=queue, due_at=time.time() + countdown,
                  **retry_fields(d.segment, n, oom)):
        ctx.store.drop_position(d.job_id, queue)
        return refused(ctx, d, JobState.queued)
    # A late delivery's drop_position may have met it.
    ctx.store.mark_position(d.job_id, queue, spec.priority, held_back=True)
    send_segment(app, d.job_id, d.segment, queue, spec.priority, countdown=countdown)
    return "retrying"


def settle_error(ctx, app, d: Delivery, exc: BaseException) -> str:
    """End a delivery that raised: retried when transient, else failed with the reason; a
    lost GPU ends the process instead."""
    if device_lost(exc):
        exit_device_lost(ctx, d, exc)
    try:
        if isinstance(exc, redis.exceptions.AuthenticationError):  # a revoked password is not a blip
            log.error("job %s segment %d: broker refused our credentials", d.job_id, d.segment)
            return fail(ctx, d, describe(exc))
        if transient(exc):
            return retry_later(ctx, app, d, exc)
        log.error("job %s segment %d failed", d.job_id, d.segment, exc_info=exc)
        return fail(ctx, d, describe(exc))
    except (redis.exceptions.RedisError, kombu.exceptions.OperationalError):  # settled again from the heartbeat
        log.exception("could not record how job %s segment %d ended; will try again", d.job_id, d.segment)
        ctx.holding.pin((d.job_id, d.segment))
        ctx.unsettled.put((d, _without_frames(exc), None))
        return "error"
    except Exception as e:
        if device_lost(e):  # retry_later's empty_cache on a GPU already lost
            exit_device_lost(ctx, d, e)
        log.exception("could not record how job %s segment %d ended", d.job_id, d.segment)
        return "error"


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` (and the errors chained to it) without tracebacks: kept until Redis answers
    again, a traceback would keep the failed call's frames, and their GPU tensors, alive."""
    seen, chained = exc, 0
    while seen is not None and chained < 16:
        seen.__traceback__ = None
        seen, chained = seen.__cause__ or seen.__context__, chained + 1
    return exc


def redis_away(exc: BaseException) -> bool:
    """Redis out of reach, or refusing commands for now (a failover's demoted primary, full
    under noeviction, loading): a write may go through later as it is."""
    return isinstance(exc, BROKER_AWAY) or refusing_for_now(exc)


def succeed_later(ctx, d: Delivery, fields: dict, exc: BaseException) -> str:
    """A job whose outputs are written and whose final state could not be (Redis away for
    longer than its client's retries, as in a managed Redis's failover): the heartbeat
    writes that state once Redis answers (``settle_later``), where a retry would denoise
    the segment again."""
    log.warning("job %s segment %d: outputs written, final state not (%s); written once Redis answers",
                d.job_id, d.segment, describe(exc))
    ctx.holding.pin((d.job_id, d.segment))
    ctx.unsettled.put((d, _without_frames(exc), fields))
    return "error"


def settle_later(ctx, app) -> None:
    """Settle the deliveries whose end could not be recorded before: while this instance
    lives it holds them, so nobody else would. One whose outputs are written ends succeeded;
    the others end as their error says (``settle_error``)."""
    for _ in range(ctx.unsettled.qsize()):
        try:
            d, exc, succeeded_with = ctx.unsettled.get_nowait()
        except queue.Empty:
            return
        ctx.holding.unpin((d.job_id, d.segment))
        with logs.job_context(d.job_id, d.segment):  # (on the heartbeat's thread: no task's fields)
            if succeeded_with is None:
                settle_error(ctx, app, d, exc)
                continue
            try:
                if not ctx.store.transition_many([(d.job_id, JobState.succeeded, succeeded_with)],
                                                 ends=[end_of(ctx, d)])[0]:
                    refused(ctx, d, JobState.succeeded)
                elif d.segment > 0:  # a chain's last segment: its hand-offs are garbage now
                    from easel.worker.inputs import drop_handoffs
                    ctx.io.submit(drop_handoffs, ctx, d.job_id)
            except Exception as again:
                if redis_away(again):
                    succeed_later(ctx, d, succeeded_with, again)
                else:  # still listed as running here: the orphan check sends it again
                    log.exception("could not write job %s's final state", d.job_id)
