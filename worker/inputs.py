"""Where a delivery's inputs come from: the job's image, control images, and the hand-off
an earlier segment left in storage (latents as safetensors, or PNGs)."""
from __future__ import annotations

import logging

from PIL import Image

from easel.shared.images import InputError, decode_image, decode_own, encode_image, fetch_url, parse_data_uri
from easel.shared.latents import dump_latents, load_latents
from easel.shared.plan import oversized_output
from easel.shared.schema import TERMINAL_STATES, JobSpec, Plan
from easel.shared.storage import handoff_prefix
from easel.worker.context import WorkerContext, wait_all
from easel.worker.runner import Carrier


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


log = logging.getLogger("easel.worker.inputs")


def handoff_key(job_id: str, seg: int, i: int | None = None) -> str:
    if i is None:
        return f"{handoff_prefix(job_id)}seg-{seg}.safetensors"
    return f"{handoff_prefix(job_id)}seg-{seg}/{i}.png"


def load_input(ctx: WorkerContext, job_id: str, spec: JobSpec, plan: Plan, seg_index: int) -> Carrier:
    """What the segment's first stage starts from."""
    seg = plan.segments[seg_index]
    n = spec.num_images
    if seg.handoff_in == "none":
        return Carrier()
    if seg_index == 0:
        img = load_image_ref(ctx, spec.input.image, "input image")
        check_output_sides(ctx, spec, img.size)
        return Carrier(images=[img] * n)
    if seg.handoff_in == "latent":
        space = ctx.registry.get(spec.stages[seg.stages[0]].model).latent_space
        return Carrier(latents=load_latents(ctx.storage.get(handoff_key(job_id, seg_index)), space))
    blobs = ctx.io.map(lambda i: ctx.storage.get(handoff_key(job_id, seg_index, i)), range(n))
    return Carrier(images=[decode_own(b) for b in blobs])


def check_output_sides(ctx: WorkerContext, spec: JobSpec, input_size: tuple[int, int]) -> None:
    """Refuse, before any denoising, a job whose images would be too large for its output
    format (an upscale of a large input): what submission could not judge without the input
    image, and otherwise found by the encoder after the whole run."""
    too_large = oversized_output(spec, ctx.registry, input_size)
    if too_large:
        raise InputError(too_large)


def save_handoff(ctx: WorkerContext, job_id: str, seg_index: int, carrier: Carrier, latent_space: str) -> None:
    """Write what segment ``seg_index`` starts from (it runs on another family's worker)."""
    if carrier.latents is not None:
        ctx.storage.put(handoff_key(job_id, seg_index), dump_latents(carrier.latents, latent_space))
        return
    encoded = [encode_image(img, "png") for img in carrier.images or []]  # all before any upload starts
    wait_all([ctx.io.submit(ctx.storage.put, handoff_key(job_id, seg_index, i), png) for i, png in enumerate(encoded)])


def drop_handoffs(ctx: WorkerContext, job_id: str) -> None:
    """Delete a job's hand-offs once it has ended: nothing reads them again. Only when the
    record says it ended: a delivery whose final state was refused (another instance took
    the job over) leaves them to the one that runs it. Best effort; the bucket's retention
    removes what a failure here leaves."""
    try:
        if ctx.store.states_of([job_id])[0] not in TERMINAL_STATES:
            return
        ctx.storage.delete_prefix(handoff_prefix(job_id))
    except Exception as e:
        log.warning("job %s: could not delete its hand-offs: %s", job_id, e)
