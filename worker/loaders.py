"""One loader per pipeline kind: which diffusers classes to build, from which folders."""
from __future__ import annotations

from shared.registry import ModelSpec
from shared.settings import Settings


def _resolve(src: str, settings: Settings) -> str:
    return ModelSpec.resolve(src, settings.model_root)


def load_sd(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, ControlNetModel

    img2img = AutoPipelineForImage2Image.from_pretrained(source, **kw)
    pipes: dict = {"img2img": img2img, "text2img": AutoPipelineForText2Image.from_pipe(img2img)}
    extras: dict = {}
    for name, cn_source in spec.controlnets.items():
        cn = ControlNetModel.from_pretrained(_resolve(cn_source, settings), **kw)
        pipes[f"controlnet_img2img:{name}"] = AutoPipelineForImage2Image.from_pipe(img2img, controlnet=cn)
    return pipes, extras


LOADERS = {"sd": load_sd}


def load(spec: ModelSpec, source: str, kw: dict, settings: Settings) -> tuple[dict, dict]:
    try:
        loader = LOADERS[spec.kind]
    except KeyError:
        raise ValueError(f"no loader for pipeline kind {spec.kind!r}") from None
    return loader(spec, source, kw, settings)
