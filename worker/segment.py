"""Executing one segment of a job: consecutive stages on this worker's family.

Idempotent by construction: outputs go to deterministic keys, state changes never leave a
terminal state, and the next segment is enqueued at most once per job (``claim_once``).
A duplicate delivery of a finished job is a no-op.
"""
from __future__ import annotations

import functools
import logging
import time

import redis
from PIL import Image

from shared.celery_app import RUN_SEGMENT
from shared.images import decode_image, encode_image, fetch_url, parse_data_uri
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
    return decode_image(read_ref(ctx, ref, what), ctx.settings, what)


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
    return Carrier(images=[decode_image(ctx.storage.get(handoff_key(job_id, seg_index, i)), ctx.settings,
                                        "hand-off image") for i in range(n)])


def _save_handoff(ctx: WorkerContext, job_id: str, seg_index: int, carrier: Carrier, latent_space: str) -> None:
    if carrier.latents is not None:
        ctx.storage.put(handoff_key(job_id, seg_index), dump_latents(carrier.latents, latent_space))
    else:
        for i, img in enumerate(carrier.images or []):
            ctx.storage.put(handoff_key(job_id, seg_index, i), encode_image(img, "png"))


def start_delivery(ctx: WorkerContext, job_id: str, seg_index: int) -> tuple[JobSpec, Plan] | str:
    """Checks every delivery makes before work starts; a string means "nothing to run" (why)."""
    store = ctx.store
    try:
        status = store.status(job_id)
    except KeyError:
        log.warning("job %s is unknown (expired?); dropping its message", job_id)
        return "unknown"
    if status.state.terminal:
        return f"already {status.state.value}"
    store.unmark_queued(job_id)
    if store.cancel_requested(job_id):
        store.transition(job_id, JobState.cancelled, error="cancelled before it ran")
        return "cancelled"
    crashed = store.begin_delivery(job_id, seg_index)
    if crashed >= ctx.settings.max_crash_deliveries:
        store.transition(job_id, JobState.failed, error=(
            f"poison job: the worker died {crashed} times while running segment {seg_index} "
            f"(last at stage {status.progress.stage}); not retried"))
        return "poison"
    spec, plan = store.load(job_id)
    store.r.hsetnx(store.key(job_id), "started_at", time.time())
    store.incr_attempts(job_id)
    store.transition(job_id, JobState.running, worker=ctx.hostname, segment=seg_index)
    return spec, plan


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


def execute_segment(ctx: WorkerContext, app, job_id: str, seg_index: int) -> str:
    store = ctx.store
    started = start_delivery(ctx, job_id, seg_index)
    if isinstance(started, str):
        return started
    spec, plan = started
    seg = plan.segments[seg_index]

    t0 = time.perf_counter()
    carrier = _load_input(ctx, job_id, spec, plan, seg_index)
    input_s = time.perf_counter() - t0
    n, last_stage = spec.num_images, len(spec.stages) - 1

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
        try:
            carrier, timings = run_stage(model, stage, carrier, n=n, want_latent=want_latent, control_image=control,
                                         on_step=step_hook(store, job_id, i, deadline, limit))
        finally:
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
        record = make_record(ctx, i, spec, plan, model, carrier, timings, want_latent, intermediates)
        store.save_record(job_id, i, record.model_dump_json())

    if seg_index < len(plan.segments) - 1:
        t1 = time.perf_counter()
        space = ctx.registry.get(spec.stages[seg.stages[-1]].model).latent_space
        _save_handoff(ctx, job_id, seg_index + 1, carrier, space)
        nxt = plan.segments[seg_index + 1]
        if store.claim_once(job_id, f"enqueue:{seg_index + 1}"):
            store.mark_queued(job_id, nxt.queue, spec.priority)
            app.send_task(RUN_SEGMENT, args=[job_id, seg_index + 1], queue=nxt.queue, priority=spec.priority)
        store.transition(job_id, JobState.running, segment=seg_index + 1)
        log.info("job %s segment %d done in %.2fs, handed %s to %s", job_id, seg_index,
                 time.perf_counter() - t0, nxt.handoff_in, nxt.queue)
        return "handed-off"

    finish(ctx, job_id, spec, carrier, t0)
    return "succeeded"


def step_hook(store, job_id: str, stage_index: int, deadline: float, limit: float):
    """Per denoising step: publish progress, honour cancel, enforce the time limit.

    Progress is best effort: a broker hiccup must not fail a stage that is computing fine.
    """
    def on_step(step: int, total: int) -> bool:
        if time.monotonic() > deadline:
            raise StageTimeout(f"stage {stage_index} exceeded its time limit of {limit:.1f}s "
                               f"(base + per-megapixel-step allowance) at step {step}/{total}")
        try:
            return not store.progress(job_id, stage_index, step, total)
        except redis.RedisError:
            return True

    return on_step


def finish(ctx: WorkerContext, job_id: str, spec: JobSpec, carrier: Carrier, t0: float) -> None:
    t1 = time.perf_counter()
    fmt = spec.output.format
    outputs = [ctx.storage.put(f"{job_prefix(job_id)}output/{k}.{fmt}", encode_image(img, fmt, spec.output.quality))
               for k, img in enumerate(carrier.images or [])]
    upload_s = time.perf_counter() - t1
    records = [StageRecord.model_validate_json(r) for r in ctx.store.records(job_id, len(spec.stages)) if r]
    st = ctx.store.status(job_id)
    manifest = Manifest(
        job_id=job_id, spec=spec, stages=records, outputs=outputs, created_at=st.created_at,
        timings_s={"queued": (st.started_at or st.created_at) - st.created_at,
                   "stages": sum(sum(r.timings_s.values()) for r in records),
                   "output_upload": upload_s, "total": time.time() - st.created_at},
        easel_version=_version(), versions=_versions(),
    )
    key = ctx.storage.put(f"{job_prefix(job_id)}manifest.json", manifest.model_dump_json(indent=2).encode())
    ctx.store.transition(job_id, JobState.succeeded, outputs=outputs, manifest=key)
    log.info("job %s succeeded in %.2fs: %s", job_id, time.perf_counter() - t0, outputs)


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

