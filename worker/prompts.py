"""Compel prompt weighting: the job carries the syntax, the worker computes the embeddings.

Embeddings are cached per (model, prompt, negative) because bulk jobs repeat prompts.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from shared.schema import Stage
from worker.pipelines import LoadedModel

_CACHE_SIZE = 256


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
        model.extras["compel_cache"] = OrderedDict()
    return c


def compel_kwargs(model: LoadedModel, stage: Stage, n: int) -> dict:
    c = _compel_for(model)
    cache: OrderedDict = model.extras["compel_cache"]
    key = (stage.prompt, stage.negative_prompt or "")
    if key not in cache:
        with torch.inference_mode():
            if model.spec.kind == "sdxl-refiner":
                pos, pooled = c(stage.prompt)
                neg, neg_pooled = c(stage.negative_prompt or "")
                pos, neg = c.pad_conditioning_tensors_to_same_length([pos, neg])
                cache[key] = {"prompt_embeds": pos, "negative_prompt_embeds": neg,
                              "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}
            elif model.spec.kind == "sd":
                out = c(stage.prompt, negative_prompt=stage.negative_prompt or "")
                cache[key] = {"prompt_embeds": out.embeds, "negative_prompt_embeds": out.negative_embeds}
            else:
                pos, neg = c(stage.prompt), c(stage.negative_prompt or "")
                pos, neg = c.pad_conditioning_tensors_to_same_length([pos, neg])
                cache[key] = {"prompt_embeds": pos, "negative_prompt_embeds": neg}
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in cache[key].items()}
