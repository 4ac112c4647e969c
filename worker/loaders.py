"""One loader per pipeline kind: which diffusers classes to build, from which folders.

Each returns ``{task: pipeline}``; pipelines for several tasks of one checkpoint are made
with ``from_pipe`` so they share modules (one copy of the weights). The kind names the
diffusers classes, so they are imported directly: ``AutoPipelineFor*`` would import about
200 pipeline modules to look them up (~0.5 s of every worker's cold start).
"""
from __future__ import annotations

import inspect

from easel.shared.registry import ModelSpec
from easel.shared.settings import Settings


def _resolve(src: str, settings: Settings) -> str:
    return ModelSpec.resolve(src, settings.model_root)


def _for_another_repo(kw: dict) -> dict:
    """The load arguments that hold for another repository (a ControlNet, a prior): all but
    the model's ``variant`` and ``revision``, which name files and commits of its own."""
    return {k: v for k, v in kw.items() if k not in ("variant", "revision")}


def load_sd(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline)

    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(source, **kw)
    # from_pipe casts the shared modules to its dtype argument (float32 when absent): pass ours.
    same = {k: v for k, v in kw.items() if k in ("dtype", "torch_dtype")}
    pipes: dict = {"img2img": img2img, "text2img": StableDiffusionPipeline.from_pipe(img2img, **same)}
    for name, cn_source in spec.controlnets.items():
        cn = ControlNetModel.from_pretrained(_resolve(cn_source, settings), **_for_another_repo(kw))
        pipes[f"controlnet_img2img:{name}"] = StableDiffusionControlNetImg2ImgPipeline.from_pipe(
            img2img, controlnet=cn, **same)
    return pipes, {}


def load_sdxl_refiner(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return {"img2img": StableDiffusionXLImg2ImgPipeline.from_pretrained(source, **kw)}, {}


def load_kandinsky22(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    """Prior and decoder loaded separately (the hub's combined pipeline needs the prior repo online)."""
    from diffusers import KandinskyV22Img2ImgPipeline, KandinskyV22PriorPipeline

    if not spec.prior:
        raise ValueError(f"model {spec.name}: kind kandinsky22 needs `prior:` (the prior checkpoint)")
    prior = KandinskyV22PriorPipeline.from_pretrained(_resolve(spec.prior, settings), **_for_another_repo(kw))
    decoder = KandinskyV22Img2ImgPipeline.from_pretrained(source, **kw)
    src = inspect.getsource(KandinskyV22Img2ImgPipeline.__call__)
    swapped = "preprocess(i, width, height)" in src
    return {"prior": prior, "img2img": decoder}, {"kandinsky_hw_swapped": swapped}


def load_latent_upscaler(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    from diffusers import StableDiffusionLatentUpscalePipeline

    return {"latent_upscale": StableDiffusionLatentUpscalePipeline.from_pretrained(source, **kw)}, {}


def load_x4_upscaler(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    from diffusers import StableDiffusionUpscalePipeline

    return {"upscale": StableDiffusionUpscalePipeline.from_pretrained(source, **kw)}, {}


from easel.worker.sim import load_sim  # noqa: E402  (PIL only: no diffusers import)

LOADERS = {
    "sd": load_sd,
    "sdxl-refiner": load_sdxl_refiner,
    "kandinsky22": load_kandinsky22,
    "sd-latent-upscaler": load_latent_upscaler,
    "sd-x4-upscaler": load_x4_upscaler,
    "sim": load_sim,
}


def load(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    try:
        loader = LOADERS[spec.kind]
    except KeyError:
        raise ValueError(f"no loader for pipeline kind {spec.kind!r}") from None
    return loader(spec, source, kw, settings)
