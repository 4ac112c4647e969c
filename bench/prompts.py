"""``python -m bench prompts``: what a repeated prompt costs a job, encoded vs cached.

Bulk jobs repeat prompts (one prompt, many seeds). easel's worker keeps each model's
prompt embeddings by (prompt, negative prompt, syntax) (``worker/prompts.py``), so a
repeated prompt skips the tokenizer and the text encoder. This measures, in one process
and interleaved, the prompt work of one job both ways with the pipeline's own
``encode_prompt`` (prompt + empty negative prompt, as classifier-free guidance needs):

- ``tiny``: the tiny ``sd15`` checkpoint the CPU benchmarks run;
- ``sd15``: SD 1.5's text encoder at full size (CLIP ViT-L/14, 123 M parameters, the
  published configuration from ``bench/sd15_arch.py``, random weights, built in memory,
  fp16 on a GPU, fp32 on the CPU) with easel's offline CLIP tokenizer.

Headlines: ``prompt_encode_ms_<model>`` (median, uncached), ``prompt_cached_ms_<model>``
(median, cache hit) and ``prompt_cache_speedup_<model>``.
"""
from __future__ import annotations

import argparse
import time

from bench.common import cuda_sync, headline, log, median

NEEDS_S3 = False


def _measure(model, reps: int) -> tuple[float, float]:
    from easel.shared.schema import Stage
    from easel.worker import prompts

    def encode(i: int) -> None:
        prompts._plain_embeds(model, Stage(model="m", prompt=f"astronaut in a jungle, take {i}", seed=1))

    def cached(i: int) -> None:
        prompts.prompt_kwargs(model, [Stage(model="m", prompt="astronaut in a jungle", seed=1)], 1)

    cached(0)
    encode(0)
    times: dict[str, list[float]] = {"encode": [], "cached": []}
    for r in range(reps):
        for name, fn in (("encode", encode), ("cached", cached)) if r % 2 == 0 else (("cached", cached), ("encode", encode)):
            cuda_sync(model.device)
            t0 = time.perf_counter()
            fn(r)
            cuda_sync(model.device)
            times[name].append(time.perf_counter() - t0)
    return median(times["encode"]) * 1000, median(times["cached"]) * 1000


def run(env, reps: int, device: str) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.sd15_arch import TEXT
    from easel.shared.registry import load_registry
    from easel.shared.settings import Settings
    from easel.worker.pipelines import load_model

    dev = torch.device(device)
    model = load_model(load_registry().get("sd15"), Settings(model_root=env.models["tiny-sd15"].parent), dev)
    out: dict[str, str] = {}
    results = {}
    enc, hit = _measure(model, reps)
    results["tiny"] = (enc, hit)
    pipe = model.pipes["img2img"]
    tok = pipe.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with dev:
        text = CLIPTextModel(CLIPTextConfig(**TEXT, **ids)).to(torch.float16 if dev.type == "cuda" else torch.float32)
    text.eval()
    for p in {id(p): p for p in model.pipes.values()}.values():
        p.text_encoder = text  # only encode_prompt runs here: the tiny UNet never sees these embeddings
    model.extras.pop("prompt_cache", None)
    results["sd15"] = _measure(model, reps)
    for name, (enc, hit) in results.items():
        log(f"{name}: encode_prompt (prompt + negative) p50 {enc:.2f} ms, cache hit p50 {hit:.3f} ms on {dev}")
        out[f"prompt_encode_ms_{name}"] = f"{enc:.2f}"
        out[f"prompt_cached_ms_{name}"] = f"{hit:.3f}"
        out[f"prompt_cache_speedup_{name}"] = f"{enc / hit:.0f}"
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {k: {"encode_ms": e, "cached_ms": h} for k, (e, h) in results.items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")


def main(env, args) -> dict:
    return run(env, args.reps, args.device)
