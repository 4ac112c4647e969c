"""Running one stage: the job's parameters turned into one diffusers pipeline call.

Hand-offs are decided by the plan; the runner only asks the pipeline for latents
(``output_type="latent"``) when the next stage takes them, and feeds latents back as
``image=`` (a 4-channel tensor makes the pipeline skip its VAE encode).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from shared.schema import Stage
from worker.pipelines import LoadedModel


class Cancelled(Exception):
    """The job was cancelled while this stage ran."""


@dataclass
class Carrier:
    """What flows between stages: decoded images, or latents still on the device."""

    images: list[Image.Image] | None = None
    latents: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        if self.images:
            return self.images[0].size
        return None


StepHook = Callable[[int, int], bool]  # (step, total) -> keep going?


def generators(seeds: list[int]) -> list[torch.Generator]:
    """CPU generators: the same seed gives the same noise on any device type."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _callback(on_step: StepHook):
    def cb(pipe, step: int, timestep, kwargs):
        total = getattr(pipe, "num_timesteps", None) or 0
        if not on_step(step + 1, int(total)):
            pipe._interrupt = True
        return kwargs

    return cb


def encode_prompts(model: LoadedModel, stage: Stage, n: int) -> dict:
    """Prompt kwargs for the pipeline; Compel syntax becomes prompt_embeds on this worker."""
    if stage.prompt_syntax == "compel":
        from worker.prompts import compel_embeds

        return compel_embeds(model, stage, n)
    kw: dict = {"prompt": [stage.prompt] * n}
    if stage.negative_prompt is not None:
        kw["negative_prompt"] = [stage.negative_prompt] * n
    return kw


def run_stage(model: LoadedModel, stage: Stage, carrier: Carrier, *, n: int, want_latent: bool,
              on_step: StepHook, control_image: Image.Image | None = None) -> tuple[Carrier, dict[str, float]]:
    seeds = [stage.seed + i for i in range(n)]
    kw = encode_prompts(model, stage, n)
    kw.update(generator=generators(seeds), num_inference_steps=stage.steps,
              output_type="latent" if want_latent else "pil",
              callback_on_step_end=_callback(on_step))
    task = stage.task
    if task == "text2img":
        pipe = model.pipes["text2img"]
        kw.update(guidance_scale=stage.guidance_scale, width=stage.width, height=stage.height)
    elif task in ("img2img", "controlnet_img2img"):
        key = task if task == "img2img" else f"controlnet_img2img:{stage.controlnet or next(iter(model.spec.controlnets))}"
        pipe = model.pipes[key]
        kw.update(image=_image_arg(carrier, stage, model), strength=stage.strength, guidance_scale=stage.guidance_scale)
        if task == "controlnet_img2img":
            size = pixel_size(model, carrier)
            kw.update(control_image=[control_image.resize(size)] * n,
                      controlnet_conditioning_scale=stage.controlnet_conditioning_scale)
    else:
        from worker.extra_stages import stage_kwargs

        pipe, extra = stage_kwargs(model, stage, carrier, n)
        kw.update(extra)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kw)
    if getattr(pipe, "_interrupt", False):
        pipe._interrupt = False
        raise Cancelled()
    timings = {"denoise": time.perf_counter() - t0}
    if want_latent:
        return Carrier(latents=out.images), timings
    return Carrier(images=list(out.images)), timings


def _image_arg(carrier: Carrier, stage: Stage, model: LoadedModel):
    if carrier.latents is not None:
        return carrier.latents.to(model.device, model.dtype)
    imgs = carrier.images or []
    if stage.width and stage.height:
        imgs = [im.resize((stage.width, stage.height), Image.LANCZOS) for im in imgs]
    return imgs


def pixel_size(model: LoadedModel, carrier: Carrier) -> tuple[int, int]:
    """(width, height) of what the carrier holds, in pixels, latents included."""
    if carrier.images:
        return carrier.images[0].size
    pipe = model.pipes.get("img2img") or next(iter(model.pipes.values()))
    f = getattr(pipe, "vae_scale_factor", 8)
    h, w = carrier.latents.shape[-2:]
    return int(w * f), int(h * f)


def decode_latents(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Decode a latent hand-off for keep_intermediates (the chain itself keeps the latents)."""
    pipe = model.pipes.get("img2img") or next(iter(model.pipes.values()))
    vae = pipe.vae
    with torch.inference_mode():
        x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(x, output_type="pil")
