"""Turning a job's stages into segments and hand-offs, and refusing chains that cannot run.

The system, not the user, decides how stage i+1 receives stage i's output: a latent when
both share a latent space, stage i+1 accepts latents and asks for no other size, a decoded
image otherwise.
Consecutive stages on the same family form one segment: one task on one worker.
"""
from __future__ import annotations

from easel.shared.celery_app import queue_name
from easel.shared.registry import COMPEL_KINDS, LATENT_IN, LATENT_ONLY_AFTER_STAGE, LATENT_OUT, Registry
from easel.shared.schema import Handoff, JobSpec, Plan, Segment


class PlanError(ValueError):
    """The chain cannot run; the message names the stage."""


def _label(i: int, task: str, model: str) -> str:
    return f"stage {i} ({task}, model {model!r})"


def plan_job(spec: JobSpec, registry: Registry, queue_prefix: str = "easel") -> Plan:
    handoffs: list[Handoff] = []
    specs = []
    for i, st in enumerate(spec.stages):
        label = _label(i, st.task, st.model)
        try:
            m = registry.get(st.model)
        except KeyError as e:
            raise PlanError(f"{label}: {e.args[0]}") from None
        if not m.supports(st.task):
            raise PlanError(f"{label}: model kind {m.kind!r} cannot run task {st.task!r}")
        if st.prompt_syntax == "compel" and m.kind not in COMPEL_KINDS:
            raise PlanError(f"{label}: Compel prompt weighting is not available for model kind {m.kind!r} "
                            f"(available for: {', '.join(sorted(COMPEL_KINDS))})")
        if st.task == "controlnet_img2img" and st.controlnet and st.controlnet not in m.controlnets:
            raise PlanError(f"{label}: no ControlNet {st.controlnet!r} registered for this model "
                            f"(registered: {', '.join(m.controlnets) or 'none'})")
        if st.task == "controlnet_img2img" and not m.controlnets:
            raise PlanError(f"{label}: no ControlNet registered for this model")
        specs.append(m)
        if i == 0:
            if st.task == "text2img":
                if spec.input.image:
                    raise PlanError(f"{label}: text2img takes no input image; drop input.image or use img2img")
                handoffs.append("none")
            elif not spec.input.image:
                raise PlanError(f"{label}: needs an input image and the job has none (input.image)")
            else:
                handoffs.append("image")
            continue
        if st.task == "text2img":
            raise PlanError(f"{label}: text2img can only be the first stage")
        prev, prev_st = specs[i - 1], spec.stages[i - 1]
        compatible = (prev.latent_space == m.latent_space and (m.kind, st.task) in LATENT_IN
                      and (prev.kind, prev_st.task) in LATENT_OUT)
        if st.task in LATENT_ONLY_AFTER_STAGE and not compatible:
            raise PlanError(f"{label}: takes latents in latent space {m.latent_space!r}, but stage {i - 1} "
                            f"(model {prev_st.model!r}) produces {prev.latent_space!r} and cannot hand off latents")
        resized = st.width is not None and (st.width, st.height) != (prev_st.width, prev_st.height)
        if resized and st.task in LATENT_ONLY_AFTER_STAGE:
            raise PlanError(f"{label}: width and height do not apply: it takes stage {i - 1}'s latents as they are")
        # A size is a resize of the stage's input image: latents cannot be resized, so a stage
        # that asks for another size than its predecessor's gets a decoded image.
        latent = compatible and spec.handoff == "auto" and not resized
        handoffs.append("latent" if latent else "image")

    segments: list[Segment] = []
    for i, m in enumerate(specs):
        if segments and segments[-1].family == m.family:
            segments[-1].stages.append(i)
        else:
            segments.append(Segment(family=m.family, queue=queue_name(m.family, queue_prefix), stages=[i],
                                    handoff_in=handoffs[i]))
    return Plan(segments=segments, handoffs=handoffs)
