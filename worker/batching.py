"""Micro-batching: which claimed jobs may share one pipeline call.

Jobs are compatible when they would make the same-shaped call: same model and task, same
steps, strength, guidance, image size and images per job (prompts, negative prompts and
seeds may differ: each job's cached prompt embeddings are stacked into the batch). The
call runs with one generator per image, so each job gets the image it would get alone
(batched kernels may differ in the last bits). The engine (``worker.engine``) runs a
group exactly as it runs one job.

Size buckets: a compiled UNet (``optimizations.compile_unet``, CUDA graphs) captures one
graph per input shape, so its calls are padded up to one of ``batch_buckets`` (images per
call) by repeating the last image, whose extra outputs are dropped; a group larger than the
largest bucket is split into calls of that size. Each image has its own generator, so
padding changes no job's image. An eager model runs the group's own size: padding would
only waste compute there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from easel.shared.registry import ModelSpec
from easel.worker.context import WorkerContext

if TYPE_CHECKING:
    from easel.worker.engine import Job

# Pipeline kinds whose builder (``worker.runner.BUILDERS``) takes several jobs in one call.
BATCH_KINDS = ("sd", "sdxl-refiner", "sim")


def batch_key(ctx: WorkerContext, job: "Job") -> tuple | None:
    """None when the job must run alone (chains, ControlNet, Compel, kinds not in ``BATCH_KINDS``,
    and a job whose worker died running it before: if it kills the process again, only
    its own crash count reaches the poison limit, not its batch-mates')."""
    spec, plan = job.spec, job.plan
    if job.claim.crashed or job.delivery.segment != 0 or len(plan.segments) != 1 or len(spec.stages) != 1:
        return None
    st = spec.stages[0]
    if st.task not in ("img2img", "text2img") or st.prompt_syntax != "plain" or st.control_image:
        return None
    if ctx.registry.get(st.model).kind not in BATCH_KINDS:
        return None
    return (st.model, st.task, st.steps, st.strength, st.guidance_scale, st.width, st.height, spec.num_images,
            spec.input.image is not None)


def group_jobs(ctx: WorkerContext, jobs: list["Job"]) -> list[list["Job"]]:
    """The jobs in groups that each make one call per stage, in arrival order."""
    groups: dict[object, list[Job]] = {}
    for k, job in enumerate(jobs):
        try:
            key = batch_key(ctx, job)
        except Exception:  # an unknown model: run alone, where it fails with the reason
            key = None
        groups.setdefault(key if key is not None else ("alone", k), []).append(job)
    return [part for group in groups.values() for part in _split(ctx, group)]


def _split(ctx: WorkerContext, group: list["Job"]) -> list[list["Job"]]:
    """A group in calls of at most the worker's batch size in jobs, and for a compiled model
    of at most its largest bucket in images (whole jobs). A flush can hold more jobs than the
    batch size: celery-batches adds the retries whose countdowns came due meanwhile."""
    if len(group) == 1:
        return [group]
    most = ctx.cache.batch_cap()
    if ctx.registry.get(group[0].spec.stages[0].model).optimizations.compile_unet:
        most = min(most, max(ctx.settings.batch_buckets) // group[0].spec.num_images)
    most = max(1, most)
    return [group[k:k + most] for k in range(0, len(group), most)]


PAD_TASKS = ("img2img", "text2img")  # a ControlNet call runs one job: never padded


def padded_images(spec: ModelSpec, buckets: list[int], images: int, task: str) -> int:
    """How many images a call of ``images`` images is made with: for a compiled model of a
    batching kind, the smallest bucket that holds them; otherwise (or over the largest
    bucket) ``images``, the exact size."""
    if not spec.optimizations.compile_unet or spec.kind not in BATCH_KINDS or task not in PAD_TASKS:
        return images
    return next((b for b in sorted(buckets) if b >= images), images)


def by_input_size(jobs: list["Job"]) -> list[list["Job"]]:
    """Split a group whose inputs turned out to differ in size (known once loaded)."""
    groups: dict[object, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.carrier.size, []).append(job)
    return list(groups.values())
