"""Micro-batching: which claimed jobs may share one pipeline call.

Jobs are compatible when they would make the same-shaped call: same model and task, same
steps, strength, guidance, image size and images per job (prompts, negative prompts and
seeds may differ: each job's cached prompt embeddings are stacked into the batch). The
call runs with one generator per image, so each job gets the image it would get alone
(batched kernels may differ in the last bits). The engine (``worker.engine``) runs a
group exactly as it runs one job.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from easel.worker.context import WorkerContext

if TYPE_CHECKING:
    from easel.worker.engine import Job


def batch_key(ctx: WorkerContext, job: "Job") -> tuple | None:
    """None when the job must run alone (chains, ControlNet, Compel, kinds other than sd and sim)."""
    spec, plan = job.spec, job.plan
    if job.delivery.segment != 0 or len(plan.segments) != 1 or len(spec.stages) != 1:
        return None
    st = spec.stages[0]
    if st.task not in ("img2img", "text2img") or st.prompt_syntax != "plain" or st.control_image:
        return None
    if ctx.registry.get(st.model).kind not in ("sd", "sim"):
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
    return list(groups.values())


def by_input_size(jobs: list["Job"]) -> list[list["Job"]]:
    """Split a group whose inputs turned out to differ in size (known once loaded)."""
    groups: dict[object, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.carrier.size, []).append(job)
    return list(groups.values())
