"""The one execution engine: every delivery takes this path, alone or in a micro-batch.

A delivery is: claim -> inputs -> stages -> hand-off or finish.

- **claim**: one round trip for all the task's deliveries (``JobStore.claim_many``):
  stale, duplicate, cancelled, poison and unknown deliveries end here.
- **inputs**: each job's own (a bad input fails that job alone).
- **stages**: the segment's stages, one pipeline call per stage for the whole group. A
  group is one job, or compatible one-stage jobs micro-batched into one call
  (``worker.batching``): that is the only thing batching changes. One ``StepHook`` per
  call handles progress events, cancel, take-over and the time limit for every job in it.
  diffusers cannot drop one job from a running call, so a job cancelled mid-call stops
  the call at that step; the call is then made again for the jobs left (each job's
  generators make its images the same as in the first call).
- **hand-off or finish**: a segment before the last hands its result to the next one; the
  last writes outputs and manifest and ends the job, on this thread or overlapped with the
  next job (``worker.finisher``). The job stays held by this instance until that final
  state is written, so a worker that dies meanwhile has it re-run (``shared.liveness``).

Failures end in ``worker.policy``: a failed batch call re-runs its jobs one by one, so a
job that breaks the call fails alone.
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator

import redis

from easel.shared import tracing
from easel.shared.celery_app import send_segment
from easel.shared.images import encode_image
from easel.shared.jobstore import DEFAULT_TENANT, Claim
from easel.shared.scheduler import ADMITTED, CANCEL_ASKED, ROOM, Settlement
from easel.shared.schema import TERMINAL_STATES, JobSpec, JobState, Plan, Segment, StageRecord
from easel.shared.settings import Settings
from easel.shared.storage import job_prefix
from easel.worker.batching import by_input_size, group_jobs, padded_images
from easel.worker.context import WorkerContext
from easel.worker.inputs import drop_handoffs, load_image_ref, load_input, save_handoff
from easel.worker.metrics import observe_call, observe_delivery
from easel.worker.outputs import make_record, start_finish
from easel.worker.policy import (Delivery, cancelled, describe, device_lost, drain_finishes, end_of,
                                 free_device_memory, give_up, log_failed, out_of_memory, redis_away, refused,
                                 settle_error, succeed_later)
from easel.worker.runner import (Carrier, Interrupted, call_key, decode_latents, denoised_area, first_compile,
                                 pixel_size, run_stage)
from easel.worker.stops import READ_EVERY_S
from easel.worker.watchdog import StageBudget, StageTimeout, cost_limit_s

log = logging.getLogger("easel.worker.engine")


@dataclass
class Job:
    """A claimed delivery on its way through the engine."""

    delivery: Delivery
    claim: Claim
    t0: float = field(default_factory=time.perf_counter)
    carrier: Carrier = field(default_factory=Carrier)
    input_s: float = 0.0
    records: dict[int, StageRecord] = field(default_factory=dict)
    last_step: dict | None = None
    trace: object = tracing.NO_JOB_TRACE  # its spans (shared.tracing)
    stops_epoch: int = -1  # the stops listener's epoch at the claim; -1: it was not listening

    @property
    def job_id(self) -> str:
        return self.delivery.job_id

    @property
    def spec(self) -> JobSpec:
        return self.claim.spec

    @property
    def plan(self) -> Plan:
        return self.claim.plan

    @property
    def segment(self) -> Segment:
        return self.plan.segments[self.delivery.segment]


class Stopped(Exception):
    """A call stopped by its step hook: which jobs asked to stop."""

    def __init__(self, cancelled: set[str], superseded: set[str]):
        super().__init__(f"cancelled {sorted(cancelled)}, taken over {sorted(superseded)}")
        self.cancelled, self.superseded = cancelled, superseded


Outcomes = dict[Delivery, str]


def run_deliveries(ctx: WorkerContext, app, deliveries: list[Delivery]) -> list[str]:
    """Run the deliveries one task received; returns how each ended ("finishing" while its
    outputs are still being written). A second copy of a delivery in the same task is
    dropped; an error that escapes the engine (Redis away for longer than its retries)
    settles every claimed delivery still open, so none stays held by this live instance."""
    outcomes: Outcomes = {}
    unique = list(dict.fromkeys(deliveries))
    jobs = claim(ctx, app, unique, outcomes)
    try:
        groups = group_jobs(ctx, jobs)
        started = CrashCounts(ctx, groups, outcomes)
        for group in groups:
            prepared = [job for job in group if _guarded(ctx, app, job, outcomes, load_inputs, ctx, job)]
            settle_work(ctx, prepared)
            for same_size in by_input_size(prepared):
                for call in split_to_fit(ctx, same_size):
                    run_group(ctx, app, call, outcomes, started)
    except Exception as exc:
        log.exception("the engine failed; settling the deliveries it held")
        for job in jobs:
            if job.delivery not in outcomes:
                _ended(ctx, job.delivery, settle_error(ctx, app, job.delivery, exc), outcomes, job)
    seen: set[Delivery] = set()
    return [outcomes[d] if not (d in seen or seen.add(d)) else "duplicate" for d in deliveries]


class CrashCounts:
    """A claim counts each delivery it takes as started: one that never ends (the process
    died) is a crash, and a job that crashes its worker twice is poison. A task's calls run
    one after another, so only the jobs of the call that runs are counted: the deliveries
    of every group but the first get their counts back at once, the rest of a group's as
    its first call starts, and each gets its count again as its own call starts. A call
    that kills the process counts its own jobs (and earlier jobs whose outputs were still
    being written), never those of a later call."""

    def __init__(self, ctx: WorkerContext, groups: list[list[Job]], outcomes: Outcomes):
        self.ctx, self.outcomes = ctx, outcomes
        self.counted = {id(job): job for job in (groups[0] if groups else [])}  # as the claim left them
        self._set([job for group in groups[1:] for job in group], started=False)

    def call(self, jobs: list[Job]) -> None:
        ids = {id(job) for job in jobs}
        self._set([job for k, job in self.counted.items() if k not in ids and job.delivery not in self.outcomes],
                  started=False)
        self._set([job for job in jobs if id(job) not in self.counted], started=True)
        self.counted = {id(job): job for job in jobs}

    def _set(self, jobs: list[Job], started: bool) -> None:
        if jobs:
            self.ctx.store.set_crash_counts(self.ctx.instance, [
                (job.job_id, job.delivery.segment, job.claim.crashed + started) for job in jobs])


def claim(ctx: WorkerContext, app, deliveries: list[Delivery], outcomes: Outcomes) -> list[Job]:
    """Claim every delivery in one round trip; the ones with nothing to run end here."""
    t0 = tracing.clock()
    traces = [tracing.delivery(d.headers, d.job_id, d.segment, d.queue, ctx.hostname, t0) for d in deliveries]
    for tr in traces:
        tr.activate()  # a retry sent for it carries its trace
    epoch = ctx.stops.epoch if ctx.stops is not None and ctx.stops.connected else -1  # before the claim reads
    ctx.holding.add([(d.job_id, d.segment) for d in deliveries])  # before Redis can list them
    try:
        claims = ctx.store.claim_many([(d.job_id, d.segment, d.queue) for d in deliveries], ctx.hostname, ctx.instance,
                                      ctx.settings.max_crash_deliveries)
    except Exception as exc:
        for d, tr in zip(deliveries, traces):
            _ended(ctx, d, settle_error(ctx, app, d, exc), outcomes)
            tr.end(outcomes[d])
        return []
    t1 = tracing.clock()
    if ctx.on_claim is not None:
        ctx.on_claim()
    jobs = []
    for d, c, tr in zip(deliveries, claims, traces):
        tr.record("easel.claim", t0, t1, {"easel.claim": c.outcome, "easel.batch_size": len(deliveries)})
        if c.outcome == "run":
            jobs.append(Job(replace(d, attempt=c.attempts), c, trace=tr, stops_epoch=epoch))
            continue
        try:
            outcome = _settle_claim(ctx, d, c)
        except Exception as exc:
            outcome = settle_error(ctx, app, d, exc)
        _ended(ctx, d, outcome, outcomes)
        tr.end(outcomes[d])
    return jobs


def _settle_claim(ctx: WorkerContext, d: Delivery, c: Claim) -> str:
    """Why a claim has nothing to run, with the job ended where that is due."""
    if c.outcome == "unknown":
        log.warning("job %s is unknown (expired?); dropping its message", d.job_id)
    elif c.outcome == "duplicate":
        log.info("job %s segment %d runs on live instance %s; dropping this copy", d.job_id, d.segment, c.detail)
    elif c.outcome == "cancel":
        why = "cancelled while it waited in a queue" if c.detail else "cancelled before it ran"
        ctx.store.transition(d.job_id, JobState.cancelled, error=why)
        return "cancelled"
    elif c.outcome == "poison":
        why = (f"poison job: the worker died {c.crashed} times while running segment {d.segment} "
               f"(last at stage {c.stage}); not retried")
        log_failed(d.job_id, d.segment, why)
        ctx.store.transition(d.job_id, JobState.failed, error=why)
    elif c.outcome == "corrupt":
        return give_up(ctx, d, f"could not claim the job: {c.detail}")
    return {"terminal": f"already {c.detail}"}.get(c.outcome, c.outcome)


def load_inputs(ctx: WorkerContext, job: Job) -> None:
    t0 = time.perf_counter()
    with job.trace.span("easel.inputs"):
        job.carrier = load_input(ctx, job.job_id, job.spec, job.plan, job.delivery.segment)
    job.input_s = time.perf_counter() - t0


def entering_size(ctx: WorkerContext, job: Job, stage: int) -> tuple[int, int] | None:
    """The pixel size of what ``job.carrier`` holds, latents at the scale of stage ``stage``'s
    model (the one that made or reads them; None: it holds nothing)."""
    if job.carrier.images or job.carrier.latents is None:
        return job.carrier.size
    return pixel_size(ctx.cache.get(job.spec.stages[stage].model), job.carrier)


def settle_work(ctx: WorkerContext, jobs: list[Job]) -> None:
    """Charge each job's tenant what its delivery asks at the size it runs on, now that its
    input is read: its dispatch charged what the job alone told, an unread input image
    counted as 512 x 512 (``Scheduler.settle``). Best effort: one that fails leaves the
    estimate, and the jobs run."""
    charged = [job for job in jobs if job.claim.charged is not None]
    if not charged:
        return
    try:
        ctx.scheduler.settle([
            Settlement(job.job_id, job.delivery.segment, ctx.instance, job.spec.tenant or DEFAULT_TENANT,
                       job.segment.queue, job.claim.charged,
                       ctx.scheduler.work(job.spec, job.segment.stages, entering_size(ctx, job, job.segment.stages[0])))
            for job in charged])
    except Exception as e:
        log.warning("could not settle the work of jobs %s (%s); their tenants keep the estimate",
                    [job.job_id for job in charged], describe(e))


def call_shape(job: Job) -> tuple:
    """What a call's device memory grows with besides its images (``worker.fits``)."""
    stage = job.spec.stages[job.segment.stages[0]]
    if stage.width and stage.height:  # the size it runs at, whatever size its input came in
        size = (stage.width, stage.height)
    elif job.carrier.latents is not None:
        size = ("latents", *job.carrier.latents.shape[-2:])
    else:
        size = job.carrier.size
    return stage.model, stage.task, size, stage.guidance_scale > 1


def split_to_fit(ctx: WorkerContext, jobs: list[Job]) -> Iterator[list[Job]]:
    """Jobs of one shape in calls of at most the images such a call held without running
    out of memory lately (all in one call when none ran out). Each call's size is read as
    it comes, so one that runs out shrinks the calls after it."""
    per_job, said = (jobs[0].spec.num_images if jobs else 1), False
    while jobs:
        most = ctx.fits.most(call_shape(jobs[0])) if len(jobs) > 1 else None
        step = len(jobs) if most is None else max(1, most // per_job)
        if step < len(jobs) and not said:
            log.info("a call of this shape ran out of memory lately: %d jobs run at most %d images a call",
                     len(jobs), most)
            said = True
        yield jobs[:step]
        jobs = jobs[step:]


def run_group(ctx: WorkerContext, app, jobs: list[Job], outcomes: Outcomes, started: CrashCounts) -> None:
    """The stages of a group of prepared jobs (one call per stage), then their hand-off or
    finish; after a failed call, its parts (``_parts_after``) the same way."""
    started.call(jobs)
    while jobs:
        parts: Iterable[list[Job]] | None = None
        try:
            run_stages(ctx, jobs)
            break
        except Stopped as stop:
            for job in jobs:  # each ends on its own: Redis failing one's end does not end the others
                _guarded(ctx, app, job, outcomes, _end_stopped, ctx, app, job, stop, outcomes)
            jobs = [job for job in jobs if job.delivery not in outcomes]
        except Exception as exc:
            parts = _parts_after(ctx, app, jobs, exc, outcomes)
            if parts is None:
                return
        if parts is not None:
            # Out of the except block: the error's traceback, which holds the failed call's
            # tensors (close to the batch's peak memory), is gone before the parts run.
            free_device_memory()
            for part in parts:
                run_group(ctx, app, part, outcomes, started)
            return
    if not jobs:
        return
    if jobs[0].delivery.segment < len(jobs[0].plan.segments) - 1:
        for job in jobs:
            if outcome := _guarded(ctx, app, job, outcomes, hand_off, ctx, app, job):
                _ended(ctx, job.delivery, outcome, outcomes, job)
        return
    if ctx.finisher is None:
        finish(ctx, app, jobs, outcomes)
        return
    ctx.finisher.defer(lambda: finish(ctx, app, jobs, {}), jobs[0].delivery.queue)
    log.info("job(s) %s denoised; outputs are written beside the next job", [job.job_id for job in jobs])
    for job in jobs:
        outcomes[job.delivery] = "finishing"


def _parts_after(ctx: WorkerContext, app, jobs: list[Job], exc: Exception,
                 outcomes: Outcomes) -> Iterable[list[Job]] | None:
    """How a group goes on after its call raised: None when its jobs ended (a lone job's
    error, a batch over its time, a lost GPU: ``settle_error``); in smaller calls when the
    batch ran out of memory (and later batches of its shape, ``worker.fits``); else each
    job alone, so that whichever broke the call fails alone."""
    if len(jobs) == 1 or isinstance(exc, StageTimeout) or device_lost(exc):
        for job in jobs:
            _ended(ctx, job.delivery, settle_error(ctx, app, job.delivery, exc), outcomes, job)
        return None
    if out_of_memory(exc):
        shape, images = call_shape(jobs[0]), len(jobs) * jobs[0].spec.num_images
        model, task = shape[:2]
        padded = padded_images(ctx.registry.get(model), ctx.settings.batch_buckets, images, task)
        most = ctx.fits.ran_out(shape, images, padded)
        log.warning("a call of %d images ran out of memory (%s); calls of its shape hold at most %d images "
                    "for %.0f s", padded, describe(exc), most, ctx.fits.hold_s)
        return split_to_fit(ctx, jobs)
    log.warning("batch of %d failed (%s); running its jobs one by one", len(jobs), describe(exc))
    return [[job] for job in jobs]


def run_stages(ctx: WorkerContext, jobs: list[Job]) -> None:
    """Every stage of the jobs' segment, one pipeline call per stage for the whole group."""
    first, n = jobs[0], jobs[0].spec.num_images
    last_stage = len(first.spec.stages) - 1
    for pos, i in enumerate(first.segment.stages):
        stages = [job.spec.stages[i] for job in jobs]
        model = ctx.cache.get(stages[0].model)
        want_latent = i < last_stage and first.plan.handoffs[i + 1] == "latent"
        stage = stages[0]
        control = load_image_ref(ctx, stage.control_image, f"stage {i} control image") if stage.control_image else None
        carrier = Carrier.join([job.carrier for job in jobs])
        size = padded_images(model.spec, ctx.settings.batch_buckets, n * len(jobs), stage.task)  # its bucket
        budget = stage_budget(ctx.settings, model, stage, carrier, size, want_latent)
        hook = StepHook(ctx, [job.job_id for job in jobs], i, budget,
                        rearm=lambda: _arm_watchdog(ctx, jobs, i, stage, budget),
                        stops_epoch=min(job.stops_epoch for job in jobs))
        hook.rearm()
        observe_call(n * len(jobs))
        try:
            with tracing.group([job.trace for job in jobs], "easel.stage", {
                    "easel.stage": i, "easel.task": stage.task, "easel.model": stage.model, "easel.steps": stage.steps,
                    "easel.batch_size": len(jobs), "easel.images": n * len(jobs)}):
                out, timings = run_stage(model, stages, carrier, n=n, want_latent=want_latent,
                                         control_image=control, on_step=hook, pad_to=size)
        except Interrupted:
            raise Stopped(hook.cancelled, hook.superseded) from None
        finally:
            hook.flush()  # on every outcome: no progress write may land after the state that follows
            if ctx.watchdog is not None:
                ctx.watchdog.disarm()
        for k, job in enumerate(jobs):
            job.carrier, job.last_step = out.part(k, n), hook.last
            own = {**timings, "input": job.input_s} if pos == 0 else dict(timings)
            kept = _keep_intermediates(ctx, job, i, model, own, budget) if i < last_stage else []
            job.records[i] = make_record(ctx, i, job.spec, job.plan, model, job.carrier, own, want_latent, kept,
                                         batch_size=len(jobs))


def stage_budget(s: Settings, model, stage, carrier: Carrier, images: int, want_latent: bool = False) -> StageBudget:
    """The stage's time limit (``worker.watchdog``): the cost model's, from the latent area
    its UNet denoises, until its first steps give its pace; with the compile allowance when
    the call will compile first (a compile can take minutes, before any step)."""
    w, h = pixel_size(model, carrier, stage) if not carrier.empty else (stage.width or 512, stage.height or 512)
    per = model.spec.timeout_per_mpx_step_s
    cost = cost_limit_s(s.stage_timeout_base_s, s.stage_timeout_per_mpx_step_s if per is None else per,
                        stage.steps, denoised_area(model, w, h), images)
    if first_compile(model, call_key(model, stage, carrier, images, want_latent)):
        cost += s.stage_compile_allowance_s
    return StageBudget(cost, s.stage_timeout_max_s, s.stage_timeout_slack, time.monotonic())


def _arm_watchdog(ctx: WorkerContext, jobs: list[Job], i: int, stage, budget: StageBudget) -> None:
    """A stage stuck where no step callback runs fails its jobs and restarts the process."""
    if ctx.watchdog is None:
        return
    grace = ctx.settings.stage_stuck_grace_s
    left = budget.deadline - time.monotonic() + grace
    ctx.watchdog.arm(left, f"stage {i} ({stage.task}, {stage.model}) made no progress within its time limit "
                           f"of {budget.allowed_s:.0f}s and {grace:.0f}s of grace; worker restarted",
                     _fail_all(ctx, jobs))


def _fail_all(ctx: WorkerContext, jobs: list[Job]) -> Callable[[str], None]:
    """What the watchdog does before it ends the process: fail ``jobs`` with its reason."""
    def fail_all(reason: str) -> None:
        # As the deliveries' own ends (end_as): a job a reaper took meanwhile (this process
        # froze past its heartbeat) is another delivery's now, and is left to it.
        ctx.store.transition_many([(job.job_id, JobState.failed, {"error": reason}) for job in jobs],
                                  ends=[end_of(ctx, job.delivery) for job in jobs])
        for job in jobs:
            log_failed(job.job_id, job.delivery.segment, reason)
            job.trace.end("failed")
        drain_finishes(ctx)
        tracing.shutdown()  # the process ends next: what its spans recorded is sent first
    return fail_all


@contextlib.contextmanager
def _watched(ctx: WorkerContext, jobs: list[Job], seconds: float, what: str) -> Iterator[None]:
    """Device work outside a pipeline call (an intermediate's decode), where no step callback
    runs, watched as a stage is: stuck past ``seconds``, it fails ``jobs`` and the process
    restarts (the heartbeat beats on, so nothing else would ever take the jobs back)."""
    if ctx.watchdog is None:
        yield
        return
    ctx.watchdog.arm(seconds, f"{what} made no progress within {seconds:.0f}s; worker restarted", _fail_all(ctx, jobs))
    try:
        yield
    finally:
        ctx.watchdog.disarm()


def _keep_intermediates(ctx: WorkerContext, job: Job, i: int, model, timings: dict[str, float],
                        budget: StageBudget) -> list[str]:
    """With ``keep_intermediates``, stage ``i``'s images (decoded from latents if need be,
    within the stage's own allowance: it decoded once already)."""
    if not job.spec.output.keep_intermediates:
        return []
    t0 = time.perf_counter()
    c = job.carrier
    if c.images is not None:
        imgs = c.images
    else:
        with _watched(ctx, [job], budget.allowed_s + ctx.settings.stage_stuck_grace_s, f"stage {i}'s intermediate"):
            imgs = decode_latents(model, c.latents)
    keys = [ctx.storage.put(f"{job_prefix(job.job_id)}stages/{i}/{k}.png", encode_image(img, "png"))
            for k, img in enumerate(imgs)]
    timings["intermediates"] = time.perf_counter() - t0
    return keys


def hand_off(ctx: WorkerContext, app, job: Job) -> str:
    """Store the result for the next segment (another family) and queue it there in its
    tenant's turn (``Scheduler.hand_off``: this delivery ends in the same script); its
    message carries this hand-off's trace context when it goes now. Returns the delivery's
    outcome."""
    store, seg_index, spec = ctx.store, job.delivery.segment, job.spec
    nxt = job.plan.segments[seg_index + 1]
    with job.trace.span("easel.hand_off", {"easel.handoff": nxt.handoff_in, "messaging.destination.name": nxt.queue}):
        # The records must be in Redis before the next segment can run (and read them).
        store.save_records(job.job_id, {i: r.model_dump_json() for i, r in job.records.items()})
        space = ctx.registry.get(spec.stages[job.segment.stages[-1]].model).latent_space
        save_handoff(ctx, job.job_id, seg_index + 1, job.carrier, space)
        # Queued from here on: its status says why it waits, and a cancel ends it at once. A
        # death before the script re-runs this segment; after it, the job waits in the next
        # queue (the lost-message sweep sends a message that never went) or in its tenant's
        # pending set (a dispatch sends it).
        done, answer = ctx.scheduler.hand_off(job.job_id, spec, job.claim.created_at, end_of(ctx, job.delivery),
                                              nxt, entering_size(ctx, job, job.segment.stages[-1]),
                                              trace=tracing.carrier())
        if answer == CANCEL_ASKED:  # asked after its last step: nothing in the step hook saw it
            log.info("job %s was cancelled as its segment %d ended; not handed on", job.job_id, seg_index)
            return cancelled(ctx, job.delivery)
        if not done:
            return refused(ctx, job.delivery, JobState.queued)
        try:
            if answer == ADMITTED:
                send_segment(app, job.job_id, seg_index + 1, nxt.queue, spec.priority)
            elif answer == ROOM:
                ctx.scheduler.feed({nxt.queue: nxt.family}, lambda *a, **kw: send_segment(app, *a, **kw))
        except Exception as e:  # handed off already: the lost-message sweep, or a later dispatch, sends it
            log.warning("job %s: could not send its next segment now (%s); it waits in %s for a resend",
                        job.job_id, describe(e), nxt.queue)
    log.info("job %s segment %d done in %.2fs, handed %s to %s", job.job_id, seg_index,
             time.perf_counter() - job.t0, nxt.handoff_in, nxt.queue)
    return "handed-off"


def finish(ctx: WorkerContext, app, jobs: list[Job], outcomes: Outcomes) -> None:
    """Write every job's outputs and manifest side by side, then end the jobs that were
    written as succeeded, in one round trip. A job whose writes fail ends alone."""
    jobs = _not_cancelled(ctx, app, jobs, outcomes)
    if not jobs:
        return
    t_write = time.perf_counter()
    with tracing.group([job.trace for job in jobs], "easel.finish", {
            "easel.batch_size": len(jobs), "easel.overlapped": ctx.finisher is not None}):
        pending = []
        for job in jobs:
            started = _guarded(ctx, app, job, outcomes, start_finish, ctx, job.job_id, job.spec, job.carrier,
                               job.records, created_at=job.claim.created_at, started_at=job.claim.started_at,
                               only_attempt=job.claim.attempt if job.claim.attempts == 1 else None)
            if started:
                pending.append((job, started))
        written = [(job, p) for job, p in pending if _guarded(ctx, app, job, outcomes, p.wait)]
        if not written:
            return
        changes = [(job.job_id, JobState.succeeded, p.final_fields(job.last_step)) for job, p in written]
        try:
            done = ctx.store.transition_many(changes, ends=[end_of(ctx, job.delivery) for job, _ in written])
        except Exception as exc:  # Redis away: the outputs are written, only the state is left to write
            for (job, _), (_, _, fields) in zip(written, changes):
                outcome = (succeed_later(ctx, job.delivery, fields, exc) if redis_away(exc)
                           else settle_error(ctx, app, job.delivery, exc))
                _ended(ctx, job.delivery, outcome, outcomes, job)
            return
    succeeded = [job for (job, _), ok in zip(written, done) if ok]
    for job in succeeded:
        _ended(ctx, job.delivery, "succeeded", outcomes, job)
    if succeeded:
        log.info("%d job(s) succeeded; outputs written in %.3fs: %s", len(succeeded), time.perf_counter() - t_write,
                 [job.job_id for job in succeeded])
    _refused(ctx, [job for (job, _), ok in zip(written, done) if not ok], outcomes)


def _not_cancelled(ctx: WorkerContext, app, jobs: list[Job], outcomes: Outcomes) -> list[Job]:
    """The jobs still to finish: one whose cancel was heard after its last step (during its
    decode, or while its finish waited beside the next job) ends cancelled, its outputs
    unwritten, as the hand-off of an earlier segment does. Heard means pushed to this
    worker's stops listener: looked up in memory, no command sent. A cancel that comes once
    the outputs are being written is too late; the job ends succeeded."""
    if ctx.stops is None:
        return jobs
    going = []
    for job in jobs:
        if ctx.stops.stop_for(job.job_id, ctx.instance) == "cancel":
            log.info("job %s was cancelled after its last step; its outputs are not written", job.job_id)
            if outcome := _guarded(ctx, app, job, outcomes, cancelled, ctx, job.delivery):
                _ended(ctx, job.delivery, outcome, outcomes, job)
        else:
            going.append(job)
    return going


def _refused(ctx: WorkerContext, jobs: list[Job], outcomes: Outcomes) -> None:
    """Jobs whose final state write was refused: another instance took them over while their
    outputs were written (this one had stalled past its TTL), they ended meanwhile, or the
    write was made and its reply lost (``policy.refused`` tells which)."""
    for job in jobs:
        try:
            outcome = refused(ctx, job.delivery, JobState.succeeded)
        except Exception:  # only the log and the outcome's label depend on it
            log.warning("could not read the state of job %s, whose final state was refused", job.job_id,
                        exc_info=True)
            outcome = "unknown"
        _ended(ctx, job.delivery, outcome, outcomes, job)


def _end_stopped(ctx: WorkerContext, app, job: Job, stop: Stopped, outcomes: Outcomes) -> None:
    """A job of a call that stopped: cancelled, dropped (taken over by another worker) or,
    when nothing on record says why the call stopped, failed; a job the stop was not for is
    left open, to run again in the call that follows."""
    if job.job_id in stop.cancelled:
        _ended(ctx, job.delivery, cancelled(ctx, job.delivery), outcomes, job)
    elif job.job_id in stop.superseded:
        log.warning("job %s was taken over by another worker; dropping this run", job.job_id)
        ctx.store.end_delivery(job.job_id, end_of(ctx, job.delivery))
        _ended(ctx, job.delivery, "superseded", outcomes, job)
    elif not (stop.cancelled or stop.superseded):  # a failure, not a cancel
        _ended(ctx, job.delivery, settle_error(ctx, app, job.delivery, RuntimeError(
            "the pipeline call was interrupted with no cancel on record")), outcomes, job)


def _guarded(ctx: WorkerContext, app, job: Job, outcomes: Outcomes, fn: Callable, *args, **kw):
    """``fn(*args)`` for one job; an error ends that job's delivery under the failure policy
    and returns False."""
    try:
        result = fn(*args, **kw)
        return True if result is None else result
    except Exception as exc:
        _ended(ctx, job.delivery, settle_error(ctx, app, job.delivery, exc), outcomes, job)
        return False


def _ended(ctx: WorkerContext, d: Delivery, outcome: str, outcomes: Outcomes, job: Job | None = None) -> None:
    outcomes[d] = outcome
    ctx.holding.release((d.job_id, d.segment))
    if job is not None:
        job.trace.end(outcome)
    # The job has ended (here, or before this delivery came: cancelled while it waited for its
    # next family): its hand-offs are garbage. drop_handoffs reads the final state first.
    ended = outcome in TERMINAL_STATES or outcome == "poison" or outcome.startswith("already ")
    if ended and (d.segment > 0 or (job and len(job.plan.segments) > 1)):
        ctx.io.submit(drop_handoffs, ctx, d.job_id)
    observe_delivery(ctx, d.job_id, d.segment, outcome, job.t0 if job else None,
                     job.records.values() if job else ())


class StepHook:
    """Per denoising step of one call: enforce the time limit (``StageBudget``); stop at the
    step after a cancel or take-over of one of its jobs was heard (``worker.stops``: pushed
    by pub/sub, looked up in memory at every step); publish progress for every job in the
    call once ``progress_interval_s`` has passed since the first step, then at most that
    often (a call shorter than that writes none: its claim said it runs, its final state says
    the rest); release a pending finish at the first step.

    The progress write runs on the I/O pool, off the denoising loop. It also reads the
    cancel flags and holders back while pushed stops could have been missed (no listener,
    one not connected, or one that reconnected since the claim) and every
    ``worker.stops.READ_EVERY_S`` anyway; a step looks only at the previous read's answer.
    ``flush`` waits for the last answer, so no progress write lands after the state that
    follows the stage. Progress is best effort: a broker hiccup must not fail a stage that
    computes fine.
    """

    def __init__(self, ctx: WorkerContext, job_ids: list[str], stage_index: int, budget: StageBudget,
                 rearm: Callable[[], None] = lambda: None, stops_epoch: int = -1):
        self.store, self.instance, self.pool, self.stops = ctx.store, ctx.instance, ctx.control, ctx.stops
        self._epoch, self._read_at = stops_epoch, time.monotonic()  # the claim read the flags
        self.job_ids, self.stage_index, self.budget = job_ids, stage_index, budget
        self.rearm = rearm  # the watchdog's deadline follows the budget's
        self.interval_s = ctx.settings.progress_interval_s
        self._on_first_step = ctx.finisher.denoising_started if ctx.finisher is not None else None
        self.last: dict | None = None  # the last step seen: the final state records it
        self.cancelled: set[str] = set()
        self.superseded: set[str] = set()
        self._sent_at: float | None = None
        self._pending: Future | None = None

    def _stop_asked(self, wait: bool) -> bool:
        fut = self._pending
        if fut is not None and (wait or fut.done()):
            self._pending = None
            try:
                for job_id, (cancel, superseded) in zip(self.job_ids, fut.result()):
                    if cancel:
                        self.cancelled.add(job_id)
                    elif superseded:
                        self.superseded.add(job_id)
            except redis.RedisError:
                pass
        return bool(self.cancelled or self.superseded)

    def _heard_stops(self) -> None:
        """A cancel stops its job at once (a cancel is never taken back). A take-over only
        makes the next progress write read the holders back: the take-over heard may be
        older than this instance's own claim of the job again."""
        for job_id in self.job_ids:
            stop = self.stops.stop_for(job_id, self.instance)
            if stop == "cancel":
                self.cancelled.add(job_id)
            elif stop == "taken":
                self._read_at = float("-inf")

    def _must_read(self, now: float) -> bool:
        """Read the flags back with this write? Yes unless every stop since the claim was heard
        and none asks for a read."""
        s = self.stops
        if s is None or not s.connected or s.epoch != self._epoch or now - self._read_at >= READ_EVERY_S:
            self._read_at, self._epoch = now, (s.epoch if s is not None and s.connected else -1)
            return True
        return False

    def __call__(self, step: int, total: int) -> bool:
        if self._on_first_step is not None:
            first, self._on_first_step = self._on_first_step, None
            first()
        self.last = {"stage": self.stage_index, "step": step, "total_steps": total}
        now = time.monotonic()
        if self.budget.step(now, total):
            self.rearm()
        if self.stops is not None:
            self._heard_stops()
        if self._stop_asked(wait=False):  # before the time limit: a cancelled job ends cancelled
            return False
        if now > self.budget.deadline:
            raise StageTimeout(self.budget.exceeded(f"stage {self.stage_index}", step, total, now))
        if self._sent_at is None and self.interval_s > 0:
            self._sent_at = now  # the first step: the interval starts here
        elif self._pending is None and (self._sent_at is None or now - self._sent_at >= self.interval_s):
            self._sent_at = now
            self._pending = self.pool.submit(self.store.progress_many, self.job_ids, self.stage_index, step, total,
                                             self.instance, self._must_read(now))
        return True

    def flush(self) -> None:
        self._stop_asked(wait=True)
        self._pending = None
