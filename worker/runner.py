"""Running one stage: the job's parameters turned into one diffusers pipeline call.

Hand-offs are decided by the plan; the runner only asks a pipeline for latents
(``output_type="latent"``) when the next stage takes them, and feeds latents back as
``image=`` (a 4-channel tensor makes SD/SDXL img2img and the latent upscaler skip their
VAE encode). One builder per pipeline kind says which arguments that pipeline takes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from easel.shared.plan import denoising_steps, latent_area
from easel.shared.registry import UPSCALE
from easel.shared.schema import Stage
from easel.worker.adaptive import CALL_TIMES
from easel.worker.pipelines import LoadedModel, compiles, upcasts_vae
from easel.worker.prompts import prompt_kwargs, prompt_tokens


class Interrupted(Exception):
    """The step hook stopped the pipeline call (a job in it was cancelled or taken over)."""


@dataclass
class Carrier:
    """What flows between stages: decoded images, or latents still on the device. In a
    micro-batch the jobs' images sit side by side, ``n`` per job, in job order."""

    images: list[Image.Image] | None = None
    latents: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return self.images[0].size if self.images else None

    @property
    def empty(self) -> bool:
        return not self.images and self.latents is None

    @classmethod
    def join(cls, parts: list["Carrier"]) -> "Carrier":
        if len(parts) == 1:
            return parts[0]
        if parts[0].latents is not None:
            return cls(latents=torch.cat([p.latents for p in parts]))
        return cls(images=[im for p in parts for im in p.images or []] or None)

    def part(self, k: int, n: int) -> "Carrier":
        """Job ``k``'s ``n`` images (or latents) of a joined carrier."""
        if self.latents is not None:
            return Carrier(latents=self.latents[k * n:(k + 1) * n])
        return Carrier(images=list(self.images[k * n:(k + 1) * n]))


StepHook = Callable[[int, int], bool]  # (step, total) -> keep going?


def generators(seeds: list[int]) -> list[torch.Generator]:
    """CPU generators: the same seed gives the same noise on any device type."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _images(carrier: Carrier, stage: Stage) -> list[Image.Image]:
    imgs = carrier.images or []
    if stage.width and stage.height:
        imgs = [im.resize((stage.width, stage.height), Image.LANCZOS) for im in imgs]
    return imgs


def _image_or_latents(carrier: Carrier, stage: Stage, model: LoadedModel):
    if carrier.latents is not None:
        return carrier.latents.to(model.device, model.dtype)
    return _images(carrier, stage)


def _alone(stages: list[Stage]) -> Stage:
    if len(stages) != 1:
        raise ValueError("this pipeline kind runs one job per call")
    return stages[0]


# -- one builder per pipeline kind: (pipeline, kwargs) for the jobs' stages in one call ------
def build_sd(model: LoadedModel, stages: list[Stage], carrier: Carrier, n: int, control: Image.Image | None):
    stage = stages[0]  # micro-batched jobs share every argument but prompts and seeds
    kw = prompt_kwargs(model, stages, n)
    kw["guidance_scale"] = stage.guidance_scale
    if stage.task == "text2img":
        kw.update(width=stage.width, height=stage.height)
        return model.pipes["text2img"], kw
    kw.update(image=_image_or_latents(carrier, stage, model), strength=stage.strength)
    if stage.task == "img2img":
        return model.pipes["img2img"], kw
    stage = _alone(stages)
    name = controlnet_name(model, stage)
    kw.update(control_image=[control.resize(pixel_size(model, carrier, stage))] * n,
              controlnet_conditioning_scale=stage.controlnet_conditioning_scale)
    return model.pipes[f"controlnet_img2img:{name}"], kw


def controlnet_name(model: LoadedModel, stage: Stage) -> str:
    """The ControlNet a controlnet_img2img stage runs: the one it names, else the model's first."""
    return stage.controlnet or next(iter(model.spec.controlnets))


def build_sdxl_refiner(model: LoadedModel, stages: list[Stage], carrier: Carrier, n: int, control):
    """Micro-batches like SD: stacked prompt and pooled embeddings, one generator per image
    (the VAE encode samples each image with its own), and ``add_time_ids`` (size, crop,
    aesthetic score) that the pipeline repeats per image: the jobs share the image size."""
    stage = stages[0]  # micro-batched jobs share every argument but prompts and seeds
    kw = prompt_kwargs(model, stages, n)
    kw.update(image=_image_or_latents(carrier, stage, model), strength=stage.strength,
              guidance_scale=stage.guidance_scale)
    return model.pipes["img2img"], kw


# The prior samples a negative prompt's embedding beside each image's: its rows get seeds
# of their own, this far from the image's.
KANDINSKY_NEGATIVE_SEED_OFFSET = 1 << 31


def build_kandinsky22(model: LoadedModel, stages: list[Stage], carrier: Carrier, n: int, control):
    """Prior (text -> image embeddings) then the decoder's img2img, as the combined pipeline
    does: without a negative prompt the prior's zero embedding is the negative one."""
    stage = _alone(stages)
    prior = model.pipes["prior"]
    seeds = _seeds(stages, n)
    negative = None
    if stage.negative_prompt is not None:  # the prior then runs 2n rows, each with a generator
        negative = [stage.negative_prompt] * n
        seeds += [s + KANDINSKY_NEGATIVE_SEED_OFFSET for s in seeds]
    with torch.inference_mode():
        emb = prior(prompt=[stage.prompt] * n, negative_prompt=negative,
                    # the prior's UnCLIP scheduler divides by steps - 1: it needs at least 2
                    num_inference_steps=max(2, min(stage.steps, 25)), generator=generators(seeds),
                    guidance_scale=4.0)
    imgs = _images(carrier, stage)
    w, h = imgs[0].size
    if model.extras.get("kandinsky_hw_swapped"):
        w, h = h, w  # diffusers passes (width, height) to preprocess(height, width) in this version
    kw = {"image": imgs, "image_embeds": emb.image_embeds, "negative_image_embeds": emb.negative_image_embeds,
          "height": h, "width": w, "strength": stage.strength, "guidance_scale": stage.guidance_scale}
    return model.pipes["img2img"], kw


def build_latent_upscaler(model: LoadedModel, stages: list[Stage], carrier: Carrier, n: int, control):
    stage = _alone(stages)
    kw = prompt_kwargs(model, stages, n)
    kw.update(image=_image_or_latents(carrier, stage, model), guidance_scale=stage.guidance_scale)
    return model.pipes["latent_upscale"], kw


def build_x4_upscaler(model: LoadedModel, stages: list[Stage], carrier: Carrier, n: int, control):
    stage = _alone(stages)
    kw = prompt_kwargs(model, stages, n)
    kw.update(image=_images(carrier, stage), guidance_scale=stage.guidance_scale, noise_level=stage.noise_level)
    return model.pipes["upscale"], kw


def build_sim(model: LoadedModel, stages: list[Stage], carrier: Carrier, n: int, control):
    stage = stages[0]
    kw: dict = {"prompt": [st.prompt for st in stages for _ in range(n)]}
    if stage.task == "text2img":
        kw.update(width=stage.width, height=stage.height)
    else:
        kw.update(image=_images(carrier, stage), strength=stage.strength)
    return model.pipes[stage.task], kw


BUILDERS = {
    "sd": build_sd,
    "sdxl-refiner": build_sdxl_refiner,
    "kandinsky22": build_kandinsky22,
    "sd-latent-upscaler": build_latent_upscaler,
    "sd-x4-upscaler": build_x4_upscaler,
    "sim": build_sim,
}


def _seeds(stages: list[Stage], n: int) -> list[int]:
    """Image ``i`` of each job uses its stage's ``seed + i``: a job gets the same noise alone or batched."""
    return [stage.seed + i for stage in stages for i in range(n)]


def pad(stages: list[Stage], carrier: Carrier, n: int, images: int) -> tuple[list[Stage], Carrier, int]:
    """The call's stages, inputs and images per stage with the last image repeated up to
    ``images`` (a compiled UNet's size bucket). Where the repeats are not whole jobs, each
    image becomes a stage of its own (``n`` = 1, with its own seed): the call is the same,
    since every image already has its own prompt row and generator. The real jobs' images
    are the ones they get without the repeats, whose outputs the caller drops."""
    extra = images - len(stages) * n
    if extra <= 0:
        return stages, carrier, n
    if extra % n:
        stages, n = [stage.model_copy(update={"seed": stage.seed + i}) for stage in stages for i in range(n)], 1
    repeats = extra // n
    if not carrier.empty:
        carrier = Carrier.join([carrier] + [carrier.part(len(stages) - 1, n)] * repeats)
    return stages + [stages[-1]] * repeats, carrier, n


@functools.lru_cache(maxsize=None)
def call_params(pipe_cls: type) -> frozenset[str]:
    """The argument names a pipeline class's ``__call__`` takes (``inspect.signature`` costs ~0.5 ms)."""
    return frozenset(inspect.signature(pipe_cls.__call__).parameters)


def progress_kwargs(pipe, on_step: StepHook, total_hint: int) -> dict:
    """New-style ``callback_on_step_end`` or the old ``callback``. A stop raises from the
    callback, so the call ends there, with no decode of a result nobody wants (a pipeline's
    own ``interrupt`` flag would still decode, and Kandinsky 2.2's loop never reads it)."""
    params = call_params(type(pipe))
    if "callback_on_step_end" in params:
        def cb(p, step: int, timestep, kwargs):
            if not on_step(step + 1, int(getattr(p, "num_timesteps", 0) or total_hint)):
                raise Interrupted()
            return kwargs

        return {"callback_on_step_end": cb}
    if "callback" in params:
        def old_cb(step: int, timestep, latents):
            if not on_step(step + 1, total_hint):
                raise Interrupted()

        return {"callback": old_cb, "callback_steps": 1}
    return {}


def run_stage(model: LoadedModel, stages: list[Stage], carrier: Carrier, *, n: int, want_latent: bool,
              on_step: StepHook, control_image: Image.Image | None = None,
              pad_to: int | None = None) -> tuple[Carrier, dict[str, float]]:
    """One pipeline call for one stage of each job in ``stages`` (``n`` images per job), with
    ``carrier`` holding the jobs' inputs side by side; raises ``Interrupted`` when ``on_step``
    stopped it. With ``pad_to`` images (``worker.batching.padded_images``) the call is made
    at that size and returns the real jobs' outputs only. Its time feeds the adaptive batch
    size (``worker.adaptive.CALL_TIMES``)."""
    t0 = time.perf_counter()
    real, per_job = len(stages) * n, n
    key = call_key(model, stages[0], carrier, pad_to or real, want_latent)
    compiling = first_compile(model, key)
    stages, carrier, n = pad(stages, carrier, n, pad_to or real)
    pipe, kw = BUILDERS[model.spec.kind](model, stages, carrier, n, control_image)
    kw.update(generator=generators(_seeds(stages, n)), num_inference_steps=stages[0].steps,
              output_type="latent" if want_latent else "pil")
    kw.update(progress_kwargs(pipe, on_step, stages[0].steps))
    t1 = time.perf_counter()
    vae = getattr(pipe, "vae", None)
    with torch.inference_mode(), vae_tiling_for(model, vae, lambda: output_pixels(model, stages[0], carrier)), \
            vae_dtype_kept(vae):
        out = pipe(**kw)
        # Latents stay on the device: its queued work ends here, inside the stage's watch,
        # not in a hand-off's copy to the host, where no watchdog looks.
        if want_latent and isinstance(out.images, torch.Tensor) and out.images.is_cuda:
            torch.cuda.synchronize(out.images.device)
    t2 = time.perf_counter()
    if compiling:  # a compiling call says nothing of a call's time
        model.calls_made.add(key)
    else:  # under the most jobs a call padded to this size holds: the policy counts jobs
        CALL_TIMES.observe(len(stages) * n // per_job, t2 - t0)
    timings = {"prepare": t1 - t0, "denoise": t2 - t1}
    if want_latent:
        return Carrier(latents=out.images[:real]), timings
    return Carrier(images=list(out.images[:real])), timings


def call_key(model: LoadedModel, stage: Stage, carrier: Carrier, images: int, want_latent: bool) -> tuple:
    """What a compiled model's graphs are made for, as far as a call can tell: task, input
    size, images per call, ControlNet, guidance on (it doubles the UNet's batch), whether
    the VAE decodes, whether it reaches a step cache's cached pass (a graph of its own,
    from a call's second pass on) and a Compel prompt's embedding length. A key this process
    has not called yet may compile."""
    size = (stage.width, stage.height) if carrier.empty else pixel_size(model, carrier, stage)
    cache = model.spec.optimizations.step_cache
    cached = cache is not None and cache.interval > 1 and denoising_steps(stage) > 1
    tokens = prompt_tokens(model, stage) if compiles(model.spec) else None
    return stage.task, size, images, stage.controlnet, stage.guidance_scale > 1, want_latent, cached, tokens


def first_compile(model: LoadedModel, key: tuple) -> bool:
    """Will the call of this ``call_key`` compile before its first step? (A compiled model, a
    key not called yet.)"""
    return compiles(model.spec) and key not in model.calls_made


def output_pixels(model: LoadedModel, stage: Stage, carrier: Carrier) -> int:
    """Pixels of each image the call decodes (text2img: its size; upscalers: input x factor)."""
    if carrier.empty:
        return (stage.width or 0) * (stage.height or 0)
    w, h = pixel_size(model, carrier, stage)
    f = UPSCALE.get(model.spec.kind, 1)
    return w * f * h * f


@contextlib.contextmanager
def vae_tiling_for(model: LoadedModel, vae, pixels: Callable[[], int]):
    """VAE tiling for this call alone when each image it outputs has more pixels
    (``pixels()``) than ``vae_tiling_above_px``: the VAE's full-image activations (and its mid-block
    self-attention over every latent pixel) grow with the image, and a large upscale would
    run the device out of memory; smaller images keep the faster, seam-free untiled VAE."""
    limit = model.vae_tiling_above_px
    if (not limit or vae is None or not hasattr(vae, "enable_tiling") or getattr(vae, "use_tiling", False)
            or pixels() <= limit):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


@contextlib.contextmanager
def vae_dtype_kept(vae):
    """The VAE in the dtype it had before the call, even when the call failed: pipelines that
    decode an fp16 VAE in fp32 (``force_upcast``: SDXL's) move it to fp32 and back with no
    ``finally``, so a decode that ran out of memory would leave the shared VAE in fp32 and
    the model's later calls given latents would fail on the dtype mismatch."""
    dtype = getattr(vae, "dtype", None)
    try:
        yield
    finally:
        if dtype is not None and vae.dtype != dtype:
            vae.to(dtype)


def scale_factor(model: LoadedModel) -> int:
    """Pixels per latent pixel of the model's autoencoder (SD's VAE and Kandinsky's MoVQ: 8)."""
    for pipe in model.pipes.values():
        factor = getattr(getattr(getattr(pipe, "image_processor", None), "config", None), "vae_scale_factor", None)
        if factor:  # a VaeImageProcessor (Kandinsky's prior has a CLIP one)
            return int(factor)
    return 8


def denoised_area(model: LoadedModel, width: int, height: int) -> float:
    """``shared.plan.latent_area`` with the loaded autoencoder's scale factor."""
    return latent_area(model.spec.kind, width, height, scale_factor(model))


def pixel_size(model: LoadedModel, carrier: Carrier, stage: Stage | None = None) -> tuple[int, int]:
    """(width, height) of what the carrier holds, in pixels, latents included."""
    if stage is not None and stage.width and stage.height:
        return stage.width, stage.height
    if carrier.images:
        return carrier.images[0].size
    pipe = next(iter(model.pipes.values()))
    f = getattr(pipe, "vae_scale_factor", 8)
    h, w = carrier.latents.shape[-2:]
    return int(w * f), int(h * f)


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Decode a latent hand-off for keep_intermediates (the chain itself keeps the latents)."""
    pipe = next(p for p in model.pipes.values() if hasattr(p, "vae") and hasattr(p, "image_processor"))
    vae = pipe.vae
    # An fp16 VAE that overflows in fp16 (SDXL's: force_upcast) decodes in fp32 where its
    # pipelines do; else the intermediate would come out black.
    upcast = upcasts_vae(model.spec.kind, vae)
    w, h = pixel_size(model, Carrier(latents=latents))
    with vae_dtype_kept(vae), vae_tiling_for(model, vae, lambda: w * h):
        if upcast:
            vae.to(torch.float32)
        with torch.inference_mode():
            x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(x, output_type="pil")
