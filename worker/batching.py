"""Micro-batching: compatible queued one-stage jobs run as one pipeline call.

Jobs are compatible when they would make the same-shaped call: same model and task, same
steps, strength, guidance, image size and images per job (prompts, negative prompts and
seeds may differ: each job's cached prompt embeddings are stacked into the batch).
The batch runs with one generator per image, so each job's result is the same image it
would get alone (per-sample noise; batched kernels may differ in the last bits). A batch
that fails falls back to running its jobs one by one, so one bad job fails alone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image

from shared.jobstore import Claim
from shared.schema import JobSpec, JobState, Plan
from worker.context import WorkerContext
from worker.prompts import prompt_kwargs
from worker.runner import Carrier, generators, progress_kwargs
from worker.segment import make_record, stage_limit, start_finish, succeeded_fields

log = logging.getLogger("easel.worker.batching")


@dataclass
class Member:
    job_id: str
    spec: JobSpec
    plan: Plan
    images: list[Image.Image] | None
    input_s: float
    claim: Claim


def batch_key(ctx: WorkerContext, spec: JobSpec, plan: Plan) -> tuple | None:
    """None when the job must run alone (chains, ControlNet, Compel, non-SD kinds)."""
    if len(plan.segments) != 1 or len(spec.stages) != 1:
        return None
    st = spec.stages[0]
    if st.task not in ("img2img", "text2img") or st.prompt_syntax != "plain" or st.control_image:
        return None
    if ctx.registry.get(st.model).kind != "sd":
        return None
    return (st.model, st.task, st.steps, st.strength, st.guidance_scale, st.width, st.height, spec.num_images)


def run_batch(ctx: WorkerContext, members: list[Member]) -> str:
    """One pipeline call for all members; results split back and finished per job. Returns
    "cancelled" for a lone member cancelled while it ran, else "succeeded" (for ``guarded``)."""
    first = members[0].spec.stages[0]
    model = ctx.cache.get(first.model)
    n = members[0].spec.num_images
    stages = [m.spec.stages[0] for m in members]
    per_job = [prompt_kwargs(model, s, n) for s in stages]  # cached embeddings: repeated prompts encode once
    kw: dict = {k: torch.cat([p[k] for p in per_job]) for k in per_job[0]}
    kw.update(generator=generators([s.seed + k for s in stages for k in range(n)]),
              num_inference_steps=first.steps, guidance_scale=first.guidance_scale, output_type="pil")
    if first.task == "text2img":
        pipe = model.pipes["text2img"]
        kw.update(width=first.width, height=first.height)
        size = (first.width or 512, first.height or 512)
    else:
        pipe = model.pipes["img2img"]
        imgs = [im for m in members for im in m.images]
        if first.width and first.height:
            imgs = [im.resize((first.width, first.height), Image.LANCZOS) for im in imgs]
        kw.update(image=imgs, strength=first.strength)
        size = imgs[0].size
    limit = stage_limit(ctx, first.steps, size, n * len(members))
    deadline = time.monotonic() + limit
    ids = [m.job_id for m in members]
    last_step = [0, 0]
    written_at = [float("-inf")]

    def on_step(step: int, total: int) -> bool:
        """Time limit every step; progress (best effort) on the first step and then at most
        every ``progress_interval_s``, like a lone job's; each job's final state carries its last step."""
        last_step[:] = [step, total]
        now = time.monotonic()
        if now > deadline:
            from worker.watchdog import StageTimeout

            raise StageTimeout(f"batched stage exceeded its time limit of {limit:.1f}s at step {step}/{total}")
        if now - written_at[0] < ctx.settings.progress_interval_s:
            return True
        written_at[0] = now
        try:
            pipe_r = ctx.store.r.pipeline(transaction=False)
            for j in ids:
                pipe_r.hset(ctx.store.key(j), mapping={"stage": 0, "step": step, "total_steps": total})
            pipe_r.execute()
        except Exception:
            pass
        return True

    kw.update(progress_kwargs(pipe, on_step, first.steps))
    if ctx.watchdog is not None:
        ctx.watchdog.arm(limit + ctx.settings.stage_stuck_grace_s,
                         f"batched stage made no progress within {limit + ctx.settings.stage_stuck_grace_s:.0f}s",
                         lambda reason: [ctx.store.transition(j, JobState.failed, error=reason) for j in ids])
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = pipe(**kw).images
    finally:
        if ctx.watchdog is not None:
            ctx.watchdog.disarm()
    t_write = time.perf_counter()
    denoise = t_write - t0
    # Every member's images and manifest start writing on the I/O pool at once, so a
    # batch's encodes and uploads run side by side instead of one job after another; once
    # they are written, every member's final state goes out in one round trip.
    changes: list[tuple[str, JobState, dict]] = []
    pending = []
    for k, (m, cancel) in enumerate(zip(members, ctx.store.cancels_requested(ids))):
        if cancel:
            changes.append((m.job_id, JobState.cancelled, {"error": "cancelled while running", "inflight:0": 0}))
            continue
        carrier = Carrier(images=list(out[k * n:(k + 1) * n]))
        timings = {"input": m.input_s, "denoise": denoise, "batch_size": float(len(members))}
        rec = make_record(ctx, 0, m.spec, m.plan, model, carrier, timings, False, [])
        pending.append(start_finish(ctx, m.job_id, m.spec, carrier, {0: rec}, created_at=m.claim.created_at,
                                    started_at=m.claim.started_at))
    last_progress = {"stage": 0, "step": last_step[0], "total_steps": last_step[1]}
    error: BaseException | None = None
    for p in pending:
        try:
            p.wait()
        except Exception as exc:  # this member stays running; the others still end
            error = error or exc
            continue
        changes.append((p.job_id, JobState.succeeded, succeeded_fields(p, last_progress, 0)))
    ctx.store.transition_many(changes)
    if error is not None:
        raise error
    log.info("batch of %d jobs: pipeline call %.3fs, outputs written in %.3fs", len(members), denoise,
             time.perf_counter() - t_write)
    return "cancelled" if len(members) == 1 and not pending else "succeeded"
