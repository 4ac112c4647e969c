"""Executing one segment of a job: consecutive stages on this worker's family.

Idempotent by construction: outputs go to deterministic keys, state changes never leave a
terminal state, and the next segment is enqueued at most once per job (``claim_once``).
A duplicate delivery of a finished job is a no-op.
"""
from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable

import redis
from PIL import Image

from shared.celery_app import RUN_SEGMENT
from shared.images import decode_image, encode_image, fetch_url, parse_data_uri
from shared.jobstore import Claim
from shared.latents import dump_latents, load_latents
from shared.schema import JobSpec, JobState, Manifest, Plan, StageRecord
from shared.storage import job_prefix
from worker.context import WorkerContext
from worker.runner import Carrier, decode_latents, pixel_size, run_stage
from worker.watchdog import StageTimeout, stage_limit_s

log = logging.getLogger("easel.worker.segment")


def read_ref(ctx: WorkerContext, ref: str, what: str) -> bytes:
    s = ctx.settings
    if ref.startswith("s3://"):
        return ctx.storage.get(ref, max_bytes=s.max_input_bytes)
    if ref.startswith(("https://", "http://")):
        return fetch_url(ref, s)
    if ref.startswith("data:"):
        return parse_data_uri(ref)
    raise ValueError(f"{what}: unsupported reference {ref[:80]!r}")


def load_image_ref(ctx: WorkerContext, ref: str, what: str) -> Image.Image:
    return ctx.inputs.get(ref, lambda: decode_image(read_ref(ctx, ref, what), ctx.settings, what))


def handoff_key(job_id: str, seg: int, i: int | None = None) -> str:
    if i is None:
        return f"{job_prefix(job_id)}handoff/seg-{seg}.safetensors"
    return f"{job_prefix(job_id)}handoff/seg-{seg}/{i}.png"


def _load_input(ctx: WorkerContext, job_id: str, spec: JobSpec, plan: Plan, seg_index: int) -> Carrier:
    seg = plan.segments[seg_index]
    n = spec.num_images
    if seg.handoff_in == "none":
        return Carrier()
    if seg_index == 0:
        img = load_image_ref(ctx, spec.input.image, "input image")
        return Carrier(images=[img] * n)
    if seg.handoff_in == "latent":
        space = ctx.registry.get(spec.stages[seg.stages[0]].model).latent_space
        return Carrier(latents=load_latents(ctx.storage.get(handoff_key(job_id, seg_index)), space))
    blobs = ctx.io.map(lambda i: ctx.storage.get(handoff_key(job_id, seg_index, i)), range(n))
    return Carrier(images=[decode_image(b, ctx.settings, "hand-off image") for b in blobs])


def _save_handoff(ctx: WorkerContext, job_id: str, seg_index: int, carrier: Carrier, latent_space: str) -> None:
    if carrier.latents is not None:
        ctx.storage.put(handoff_key(job_id, seg_index), dump_latents(carrier.latents, latent_space))
        return
    uploads = [ctx.io.submit(ctx.storage.put, handoff_key(job_id, seg_index, i), encode_image(img, "png"))
               for i, img in enumerate(carrier.images or [])]
    for u in uploads:
        u.result()


def start_delivery(ctx: WorkerContext, job_id: str, seg_index: int) -> Claim | str:
    """Checks every delivery makes before work starts (one Redis round trip, ``JobStore.claim``):
    the claim to run (spec, plan, timestamps), or a string saying why there is nothing to run."""
    return settle_claim(ctx, job_id, seg_index,
                        ctx.store.claim(job_id, seg_index, ctx.hostname, ctx.settings.max_crash_deliveries))


def settle_claim(ctx: WorkerContext, job_id: str, seg_index: int, claim: Claim) -> Claim | str:
    """A claim to run as it is; otherwise why not, with the job ended where that is due
    (cancelled before it ran, a poison job)."""
    store = ctx.store
    if claim.outcome == "run":
        return claim
    if claim.outcome == "unknown":
        log.warning("job %s is unknown (expired?); dropping its message", job_id)
        return "unknown"
    if claim.outcome == "terminal":
        return f"already {claim.state}"
    if claim.outcome == "cancel":
        store.transition(job_id, JobState.cancelled, error="cancelled before it ran")
        return "cancelled"
    store.transition(job_id, JobState.failed, error=(
        f"poison job: the worker died {claim.crashed} times while running segment {seg_index} "
        f"(last at stage {claim.stage}); not retried"))
    return "poison"


def stage_limit(ctx: WorkerContext, steps: int, size: tuple[int, int], n: int) -> float:
    return stage_limit_s(ctx.settings.stage_timeout_base_s, ctx.settings.stage_timeout_per_mpx_step_s,
                         steps, size[0], size[1], n)


def make_record(ctx: WorkerContext, i: int, spec: JobSpec, plan: Plan, model, carrier: Carrier,
                timings: dict[str, float], want_latent: bool, intermediates: list[str]) -> StageRecord:
    stage, last = spec.stages[i], len(spec.stages) - 1
    return StageRecord(
        index=i, task=stage.task, model=stage.model, model_source=model.source,
        model_revision=model.spec.revision, family=model.spec.family, handoff_in=plan.handoffs[i],
        handoff_out="latent" if want_latent else ("image" if i < last else "none"),
        params=stage.model_dump(exclude={"seed"}), seeds=[stage.seed + k for k in range(spec.num_images)],
        output_size=pixel_size(model, carrier), timings_s=timings, intermediates=intermediates,
        worker=ctx.hostname,
    )


def execute_segment(ctx: WorkerContext, app, job_id: str, seg_index: int,
                    finish_later: Callable[[Callable[[], None]], str] | None = None) -> str:
    """Run segment ``seg_index`` of a job: hand its result to the next segment, or finish the
    job (on this thread, or through ``finish_later``, which runs it while the next job runs)."""
    store = ctx.store
    claim = start_delivery(ctx, job_id, seg_index)
    if isinstance(claim, str):
        return claim
    spec, plan = claim.spec, claim.plan
    seg = plan.segments[seg_index]

    t0 = time.perf_counter()
    carrier = _load_input(ctx, job_id, spec, plan, seg_index)
    input_s = time.perf_counter() - t0
    n, last_stage = spec.num_images, len(spec.stages) - 1
    records: dict[int, StageRecord] = {}
    hook = None

    for pos, i in enumerate(seg.stages):
        stage = spec.stages[i]
        model = ctx.cache.get(stage.model)
        want_latent = i < last_stage and plan.handoffs[i + 1] == "latent"
        control = load_image_ref(ctx, stage.control_image, f"stage {i} control image") if stage.control_image else None
        has_input = bool(carrier.images) or carrier.latents is not None
        w, h = pixel_size(model, carrier, stage) if has_input else (stage.width or 512, stage.height or 512)
        limit = stage_limit(ctx, stage.steps, (w, h), n)
        deadline = time.monotonic() + limit
        if ctx.watchdog is not None:
            ctx.watchdog.arm(limit + ctx.settings.stage_stuck_grace_s,
                             f"stage {i} ({stage.task}, {stage.model}) made no progress within "
                             f"{limit + ctx.settings.stage_stuck_grace_s:.0f}s (limit {limit:.0f}s); worker restarted",
                             lambda reason: store.transition(job_id, JobState.failed, error=reason))
        # The previous job's finish (if one is pending) starts once this call is denoising.
        hook = StepHook(store, job_id, i, deadline, limit, ctx.settings.progress_interval_s, ctx.io,
                        on_first_step=ctx.finisher.denoising_started if ctx.finisher is not None else None)
        try:
            carrier, timings = run_stage(model, stage, carrier, n=n, want_latent=want_latent, control_image=control,
                                         on_step=hook)
        finally:
            hook.flush()
            if ctx.watchdog is not None:
                ctx.watchdog.disarm()
        if pos == 0:
            timings["input"] = input_s
        intermediates: list[str] = []
        if spec.output.keep_intermediates and i < last_stage:
            t1 = time.perf_counter()
            imgs = carrier.images if carrier.images is not None else decode_latents(model, carrier.latents)
            for k, img in enumerate(imgs):
                intermediates.append(ctx.storage.put(f"{job_prefix(job_id)}stages/{i}/{k}.png", encode_image(img, "png")))
            timings["intermediates"] = time.perf_counter() - t1
        records[i] = make_record(ctx, i, spec, plan, model, carrier, timings, want_latent, intermediates)

    if seg_index < len(plan.segments) - 1:
        # The records must be in Redis before the next segment can run (and read them).
        store.save_records(job_id, {i: r.model_dump_json() for i, r in records.items()})
        space = ctx.registry.get(spec.stages[seg.stages[-1]].model).latent_space
        _save_handoff(ctx, job_id, seg_index + 1, carrier, space)
        nxt = plan.segments[seg_index + 1]
        if store.claim_once(job_id, f"enqueue:{seg_index + 1}"):
            store.mark_queued(job_id, nxt.queue, spec.priority)
            app.send_task(RUN_SEGMENT, args=[job_id, seg_index + 1], queue=nxt.queue, priority=spec.priority)
        store.transition(job_id, JobState.running, segment=seg_index + 1, **{f"inflight:{seg_index}": 0})
        log.info("job %s segment %d done in %.2fs, handed %s to %s", job_id, seg_index,
                 time.perf_counter() - t0, nxt.handoff_in, nxt.queue)
        return "handed-off"

    done = functools.partial(finish, ctx, job_id, spec, carrier, t0, records, created_at=claim.created_at,
                             started_at=claim.started_at, last_progress=hook.last if hook else None,
                             segment=seg_index)
    if finish_later is not None:
        return finish_later(done)
    done()
    return "succeeded"


class StepHook:
    """Per denoising step: enforce the time limit; publish progress and read the cancel flag
    on the first step, then at most every ``interval_s``.

    The Redis round trip runs on the I/O pool, off the denoising loop: a step only looks at
    the previous round trip's answer, so a cancel lands within ``interval_s`` plus a step or
    two, and a step costs microseconds instead of a round trip (most of easel's per-job
    overhead on fast stages). ``flush`` waits for the last write, so no progress write can
    land after the state that follows the stage. Progress is best effort: a broker hiccup
    must not fail a stage that is computing fine. ``on_first_step`` runs once, at the first
    step (the worker releases the previous job's pending finish there).
    """

    def __init__(self, store, job_id: str, stage_index: int, deadline: float, limit: float, interval_s: float,
                 pool: Executor, on_first_step: Callable[[], None] | None = None):
        self.store, self.job_id, self.stage_index = store, job_id, stage_index
        self.deadline, self.limit, self.interval_s, self.pool = deadline, limit, interval_s, pool
        self._on_first_step = on_first_step
        self.last: dict | None = None  # the last step seen: the final state records it
        self._sent_at: float | None = None
        self._pending: Future | None = None

    def _cancel_asked(self, wait: bool) -> bool:
        fut = self._pending
        if fut is None or not (wait or fut.done()):
            return False
        self._pending = None
        try:
            return bool(fut.result())
        except redis.RedisError:
            return False

    def __call__(self, step: int, total: int) -> bool:
        if self._on_first_step is not None:
            first, self._on_first_step = self._on_first_step, None
            first()
        self.last = {"stage": self.stage_index, "step": step, "total_steps": total}
        now = time.monotonic()
        if now > self.deadline:
            raise StageTimeout(f"stage {self.stage_index} exceeded its time limit of {self.limit:.1f}s "
                               f"(base + per-megapixel-step allowance) at step {step}/{total}")
        if self._cancel_asked(wait=False):
            return False
        if self._pending is None and (self._sent_at is None or now - self._sent_at >= self.interval_s):
            self._sent_at = now
            self._pending = self.pool.submit(self.store.progress, self.job_id, self.stage_index, step, total)
        return True

    def flush(self) -> None:
        self._cancel_asked(wait=True)


@dataclass
class PendingFinish:
    """A job's objects being written (on the I/O pool) and what its final state will say."""

    job_id: str
    outputs: list[str]
    manifest: str
    uploads: list[Future]
    own: dict[int, StageRecord]

    def wait(self) -> None:
        """Until every object is written; an upload error (transient or not) surfaces here,
        before the job can be marked done."""
        for u in self.uploads:
            u.result()


def start_finish(ctx: WorkerContext, job_id: str, spec: JobSpec, carrier: Carrier, own: dict[int, StageRecord], *,
                 created_at: float, started_at: float) -> PendingFinish:
    """Start writing a job's outputs and manifest: each image is encoded and uploaded on the
    I/O pool (PNG encoding releases the GIL) while this thread builds the manifest and
    hands its upload to the pool too (output keys are deterministic, so it need not wait
    for them). ``own`` holds this segment's stage records; earlier segments' records are
    read back in one HMGET."""
    fmt, prefix = spec.output.format, job_prefix(job_id)
    keys = [f"{prefix}output/{k}.{fmt}" for k in range(len(carrier.images or []))]

    def encode_and_put(key: str, img: Image.Image) -> str:
        return ctx.storage.put(key, encode_image(img, fmt, spec.output.quality))

    uploads = [ctx.io.submit(encode_and_put, key, img) for key, img in zip(keys, carrier.images or [])]
    outputs = [ctx.storage.uri(key) for key in keys]
    earlier = [i for i in range(len(spec.stages)) if i not in own]
    records = sorted([*own.values(), *(StageRecord.model_validate_json(r)
                                       for r in ctx.store.records_at(job_id, earlier) if r)], key=lambda r: r.index)
    manifest = Manifest(
        job_id=job_id, spec=spec, stages=records, outputs=outputs, created_at=created_at,
        timings_s={"queued": started_at - created_at, "stages": sum(sum(r.timings_s.values()) for r in records),
                   "total": time.time() - created_at},
        easel_version=_version(), versions=_versions(),
    )
    manifest_key = f"{prefix}manifest.json"
    uploads.append(ctx.io.submit(ctx.storage.put, manifest_key, manifest.model_dump_json(indent=2).encode()))
    return PendingFinish(job_id, outputs, ctx.storage.uri(manifest_key), uploads, own)


def succeeded_fields(pending: PendingFinish, last_progress: dict | None, segment: int) -> dict:
    """What a job's final state carries: the outputs, this segment's stage records, the last
    step (progress writes are throttled) and the end of this delivery."""
    return {"outputs": pending.outputs, "manifest": pending.manifest, **(last_progress or {}),
            **{f"record:{i}": r.model_dump_json() for i, r in pending.own.items()}, f"inflight:{segment}": 0}


def finish(ctx: WorkerContext, job_id: str, spec: JobSpec, carrier: Carrier, t0: float,
           own: dict[int, StageRecord], *, created_at: float, started_at: float,
           last_progress: dict | None = None, segment: int = 0) -> None:
    """Write the outputs and the manifest side by side, then end the job succeeded, in one
    round trip (marked only once every object is written)."""
    pending = start_finish(ctx, job_id, spec, carrier, own, created_at=created_at, started_at=started_at)
    pending.wait()
    ctx.store.transition(job_id, JobState.succeeded, **succeeded_fields(pending, last_progress, segment))
    log.info("job %s succeeded in %.2fs: %s", job_id, time.perf_counter() - t0, pending.outputs)


@functools.lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easel")
    except PackageNotFoundError:
        return "dev"


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"diffusers": diffusers.__version__, "torch": torch.__version__, "transformers": transformers.__version__}

