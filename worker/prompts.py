"""Prompt embeddings, computed once per (model, prompt, negative prompt, syntax) and reused.

Bulk jobs repeat prompts (one prompt, many seeds), so the tokenizer and text encoder need
not run again for them: the pipeline gets ``prompt_embeds`` instead of the strings. Plain
prompts are encoded by the pipeline's own ``encode_prompt`` with the job's own arguments
(so the embeddings are the ones the pipeline would compute from the strings, empty
negative prompt included); Compel syntax is encoded by Compel. Kinds that take no
embeddings (Kandinsky's prior encodes the text itself) keep getting the strings.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from easel.shared.schema import Stage
from easel.worker.pipelines import LoadedModel

CACHE_SIZE = 256  # prompt pairs per model; SD 1.5 keeps ~240 kB per pair (fp16)
# and at most this many bytes of them (device memory): a Compel prompt is not cut at 77
# tokens, so one pair can hold ten times a plain one's.
CACHE_BYTES = 64 * 2**20

_SD_NAMES = ("prompt_embeds", "negative_prompt_embeds")
_POOLED_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def _encode_sd(pipe, dev: torch.device, pos: str, neg: str | None) -> tuple:
    """SD's ``encode_prompt`` (the x4 upscaler's has the same signature): one image, with guidance."""
    return pipe.encode_prompt(pos, dev, 1, True, negative_prompt=neg)


# kind -> (pipeline that encodes, how it is called, the names of what it returns)
Encoder = tuple[str, Callable[[object, torch.device, str, "str | None"], tuple], tuple[str, ...]]
PLAIN_ENCODERS: dict[str, Encoder] = {
    "sd": ("img2img", _encode_sd, _SD_NAMES),
    "sd-x4-upscaler": ("upscale", _encode_sd, _SD_NAMES),
    "sdxl-refiner": ("img2img", lambda p, dev, pos, neg: p.encode_prompt(
        pos, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=neg), _POOLED_NAMES),
    "sd-latent-upscaler": ("latent_upscale", lambda p, dev, pos, neg: p.encode_prompt(pos, dev, True, negative_prompt=neg),
                           _POOLED_NAMES),
}


def _cache(model: LoadedModel) -> OrderedDict:
    return model.extras.setdefault("prompt_cache", OrderedDict())


def cached_embeds(model: LoadedModel, stage: Stage) -> dict[str, torch.Tensor] | None:
    """One image's embeddings for this stage's prompts (from the cache when seen before), or
    None where the pipeline must get the strings."""
    syntax = stage.prompt_syntax
    if syntax != "compel" and model.spec.kind not in PLAIN_ENCODERS:
        return None
    if model.spec.kind == "sd-latent-upscaler" and stage.guidance_scale == 0:
        # the pipeline runs on the empty prompt then, but only where it encodes the strings
        stage = stage.model_copy(update={"prompt": ""})
    cache = _cache(model)
    key = (syntax, stage.prompt, stage.negative_prompt)
    if key not in cache:
        with torch.inference_mode():
            cache[key] = _compel_embeds(model, stage) if syntax == "compel" else _plain_embeds(model, stage)
        while len(cache) > 1 and (len(cache) > CACHE_SIZE or sum(map(_nbytes, cache.values())) > CACHE_BYTES):
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def _nbytes(embeds: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in embeds.values() if t is not None)


def prompt_tokens(model: LoadedModel, stage: Stage) -> int | None:
    """The length of the stage's prompt embeddings where it is not fixed: Compel's, which
    grow by 77 a chunk of 75 tokens (None for plain prompts, cut at 77). A compiled UNet
    compiles anew for a length it has not seen."""
    if stage.prompt_syntax != "compel":
        return None
    embeds = cached_embeds(model, stage)
    return None if embeds is None else int(embeds["prompt_embeds"].shape[1])


def _plain_embeds(model: LoadedModel, stage: Stage) -> dict[str, torch.Tensor]:
    pipe_name, encode, names = PLAIN_ENCODERS[model.spec.kind]
    out = encode(model.pipes[pipe_name], model.device, stage.prompt, stage.negative_prompt)
    return dict(zip(names, out))


def repeat(embeds: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The same embeddings for each of ``n`` images (batch dimension first)."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in embeds.items()}


def prompt_kwargs(model: LoadedModel, stages: list[Stage], n: int) -> dict:
    """The prompt arguments of one pipeline call for ``n`` images of each stage (one stage per
    job in the call: a micro-batch stacks its jobs' prompts in job order)."""
    parts = [_one_prompt_kwargs(model, stage, n) for stage in stages]
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(v, torch.Tensor) for v in parts[0].values()):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    kw: dict = {"prompt": [s for p in parts for s in p["prompt"]]}
    if any("negative_prompt" in p for p in parts):
        kw["negative_prompt"] = [s for p in parts for s in p.get("negative_prompt", [""] * n)]
    return kw


def _one_prompt_kwargs(model: LoadedModel, stage: Stage, n: int) -> dict:
    embeds = cached_embeds(model, stage)
    if embeds is not None:
        return repeat(embeds, n)
    kw: dict = {"prompt": [stage.prompt] * n}
    if stage.negative_prompt is not None:
        kw["negative_prompt"] = [stage.negative_prompt] * n
    return kw


def _compel_for(model: LoadedModel):
    c = model.extras.get("compel")
    if c is None:
        import compel

        pipe = model.pipes.get("img2img") or next(iter(model.pipes.values()))
        if model.spec.kind == "sd":
            c = compel.CompelForSD(pipe)
        elif model.spec.kind == "sdxl-refiner":
            c = compel.Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2,
                              returned_embeddings_type=compel.ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                              requires_pooled=True)
        elif model.spec.kind == "sd-x4-upscaler":
            c = compel.Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        else:
            raise ValueError(f"Compel prompt weighting is not supported for pipeline kind {model.spec.kind!r}")
        model.extras["compel"] = c
    return c


def _compel_embeds(model: LoadedModel, stage: Stage) -> dict[str, torch.Tensor]:
    c = _compel_for(model)
    if model.spec.kind == "sdxl-refiner":
        pos, pooled = c(stage.prompt)
        neg, neg_pooled = c(stage.negative_prompt or "")
        pos, neg = c.pad_conditioning_tensors_to_same_length([pos, neg])
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg,
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}
    if model.spec.kind == "sd":
        out = c(stage.prompt, negative_prompt=stage.negative_prompt or "")
        return {"prompt_embeds": out.embeds, "negative_prompt_embeds": out.negative_embeds}
    pos, neg = c(stage.prompt), c(stage.negative_prompt or "")
    pos, neg = c.pad_conditioning_tensors_to_same_length([pos, neg])
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg}
