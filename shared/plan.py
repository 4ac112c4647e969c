"""Turning a job's stages into segments and hand-offs, and refusing chains that cannot run.

The system, not the user, decides how stage i+1 receives stage i's output: a latent when
both share a latent space, stage i+1 accepts latents and asks for no size other than stage
i's output, a decoded image otherwise.
Consecutive stages on the same family form one segment: one task on one worker.
"""
from __future__ import annotations

from easel.shared.celery_app import queue_name
from easel.shared.registry import COMPEL_KINDS, LATENT_IN, LATENT_ONLY_AFTER_STAGE, LATENT_OUT, UPSCALE, Registry
from easel.shared.schema import STRENGTH_TASKS, Handoff, JobSpec, Plan, Segment, Stage


class PlanError(ValueError):
    """The chain cannot run; the message names the stage."""


def _label(i: int, task: str, model: str) -> str:
    return f"stage {i} ({task}, model {model!r})"


def output_size(st: Stage, kind: str, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """A stage's output size in pixels: its own width and height, else its input's (None where
    that is the job's input image, unknown until a worker reads it), times its upscale."""
    size = (st.width, st.height) if st.width is not None and st.height is not None else input_size
    factor = UPSCALE.get(kind, 1)
    return None if size is None else (size[0] * factor, size[1] * factor)


def denoising_steps(stage: Stage) -> int:
    """Denoising steps a stage runs (diffusers: ``int(steps * strength)`` where the input is
    partly noised)."""
    return int(stage.steps * stage.strength) if stage.task in STRENGTH_TASKS else stage.steps


def latent_area(kind: str, width: int, height: int, factor: int = 8) -> float:
    """Latent pixels the UNet denoises per image and step, for a stage whose input is
    ``width`` x ``height`` pixels: what a step costs, whatever the pixel sizes.

    The x4 upscaler denoises latents as large as its input image; the x2 latent upscaler
    latents twice the input's latent size; SD, SDXL and Kandinsky latents 1/``factor`` of
    the image per side (the autoencoder's: 8). A Kandinsky step counts twice: its prior runs
    a step of its own for each decoder step (up to 25)."""
    if kind == "sd-x4-upscaler":
        return float(width * height)
    side = 2 if kind == "sd-latent-upscaler" else 1
    passes = 2 if kind == "kandinsky22" else 1
    return passes * (side * width / factor) * (side * height / factor)


# A unit of work: the denoising of an SD 1.5 img2img job at easel's defaults, 24 steps
# (int(30 x 0.8)) under classifier-free guidance, two UNet passes a step, at 512 x 512.
UNIT_PASSES = 48
UNIT_AREA = latent_area("sd", 512, 512)
# A delivery's costs besides its UNet passes (its input's fetch, prompt encoding, the VAE,
# its images' encoding and upload), whatever the job, as a flat 4 UNet passes at 512 x 512:
# a default job is 52/48 units, and a tenant of many tiny jobs is not charged next to
# nothing for them.
DELIVERY_PASSES = 4
UNKNOWN_SIDE = 512  # what a size that follows an input image no one has read counts as


def size_before(spec: JobSpec, registry: Registry, stage: int) -> tuple[int, int] | None:
    """The pixel size stage ``stage`` receives where the job alone tells it (stages' width
    and height, and what the stages before make of them); None where it follows the input
    image."""
    size = None
    for st in spec.stages[:stage]:
        size = output_size(st, registry.get(st.model).kind, size)
    return size


def segment_work(spec: JobSpec, registry: Registry, stages: list[int],
                 entering: tuple[int, int] | None = None) -> float:
    """What one delivery of ``stages`` asks of a GPU, in units of work, which fair share
    charges its tenant: UNet passes (the steps a stage denoises, twice under classifier-free
    guidance, half again with a ControlNet beside the UNet) x ``num_images`` x the latent
    area they run at, plus the delivery's fixed costs. ``entering``: the pixel size of what
    the delivery's first stage receives, where someone has read it (the producer that
    uploaded the input image, the worker that hands a chain on or runs the delivery); else
    the sizes the job alone tells, and a size that follows an unread input image counts as
    512 x 512 (the worker that runs the delivery settles the difference:
    ``Scheduler.settle``)."""
    passes = float(DELIVERY_PASSES)
    size = entering if entering is not None else size_before(spec, registry, stages[0])
    for i in stages:
        st = spec.stages[i]
        kind = registry.get(st.model).kind
        at = (st.width, st.height) if st.width is not None and st.height is not None else size
        per_image = (denoising_steps(st) * (2 if st.guidance_scale > 1 else 1)
                     * (1.5 if st.task == "controlnet_img2img" else 1))
        area = latent_area(kind, *(at or (UNKNOWN_SIDE, UNKNOWN_SIDE)))
        passes += per_image * spec.num_images * area / UNIT_AREA
        size = output_size(st, kind, size)
    return passes / UNIT_PASSES


# The largest side each output format holds (Pillow's WebP and JPEG encoders refuse more).
FORMAT_MAX_SIDE = {"webp": 16383, "jpeg": 65500}


def oversized_output(spec: JobSpec, registry: Registry, input_size: tuple[int, int] | None) -> str | None:
    """Why the job's images would be too large for its output format, or None. Sizes the job
    alone does not tell (they follow an input image not yet read, ``input_size`` None) are
    not judged: the worker judges them once it has read the input."""
    limit = FORMAT_MAX_SIDE.get(spec.output.format)
    if limit is None:
        return None
    size, last = input_size, len(spec.stages) - 1
    for i, stage in enumerate(spec.stages):
        size = output_size(stage, registry.get(stage.model).kind, size)
        if size is not None and max(size) > limit and (i == last or spec.output.keep_intermediates):
            return (f"stage {i} would output {size[0]} x {size[1]} px, more than {spec.output.format} holds "
                    f"({limit} px a side): use a smaller input or width and height, or format png")
    return None


def plan_job(spec: JobSpec, registry: Registry, queue_prefix: str = "easel") -> Plan:
    handoffs: list[Handoff] = []
    specs = []
    sizes: list[tuple[int, int] | None] = []  # each stage's output size, where the job alone tells it
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
        sizes.append(output_size(st, m.kind, sizes[-1] if sizes else None))
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
        if st.width is not None and st.task in LATENT_ONLY_AFTER_STAGE:
            raise PlanError(f"{label}: width and height do not apply: it takes stage {i - 1}'s latents as they are")
        # A size is a resize of the stage's input image: latents cannot be resized, so a stage
        # that asks for a size other than what the stage before it outputs gets a decoded image.
        resized = st.width is not None and (st.width, st.height) != sizes[i - 1]
        latent = compatible and spec.handoff == "auto" and not resized
        handoffs.append("latent" if latent else "image")

    too_large = oversized_output(spec, registry, None)
    if too_large:
        raise PlanError(too_large)
    segments: list[Segment] = []
    for i, m in enumerate(specs):
        if segments and segments[-1].family == m.family:
            segments[-1].stages.append(i)
        else:
            segments.append(Segment(family=m.family, queue=queue_name(m.family, queue_prefix), stages=[i],
                                    handoff_in=handoffs[i]))
    return Plan(segments=segments, handoffs=handoffs)
