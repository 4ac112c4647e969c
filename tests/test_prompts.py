"""Prompt embeddings are computed once per prompt and give the image the strings would give."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from easel.shared.registry import load_registry
from easel.shared.schema import Stage
from easel.shared.settings import Settings
from easel.worker import prompts
from easel.worker.pipelines import load_model
from easel.worker.runner import Carrier, run_stage

# registry model, input side, stage parameters: one model per kind that takes embeddings
KINDS = {
    "sd15": (64, {"strength": 0.6, "steps": 4}),
    "sdxl-refiner": (64, {"strength": 0.6, "steps": 4}),
    "sd-x4-upscaler": (32, {"steps": 3, "noise_level": 20}),
    "sd-x2-latent-upscaler": (32, {"steps": 3}),
}


def _model(model_root, name: str):
    return load_model(load_registry().get(name), Settings(model_root=model_root), torch.device("cpu"))


def _run(model, name: str, px: int, n: int, seed: int = 3, prompt: str = "a lighthouse at dusk",
         **stage) -> list[np.ndarray]:
    st = Stage(model=name, prompt=prompt, negative_prompt=stage.pop("negative_prompt", None),
               seed=seed, **stage)
    image = Image.new("RGB", (px, px), (30, 120, 200))
    out, _ = run_stage(model, [st], Carrier(images=[image] * n), n=n, want_latent=False, on_step=lambda s, t: True)
    return [np.asarray(im, dtype=np.int16) for im in out.images]


@pytest.mark.parametrize("name", list(KINDS))
def test_embeddings_give_the_image_the_strings_give(model_root, monkeypatch, name):
    px, stage = KINDS[name]
    model = _model(model_root, name)
    assert model.spec.kind in prompts.PLAIN_ENCODERS
    for neg in (None, "blurry"):
        cached = _run(model, name, px, 1, negative_prompt=neg, **stage)
        with monkeypatch.context() as m:
            m.setattr(prompts, "cached_embeds", lambda model, stage: None)  # the pipeline encodes the strings
            strings = _run(model, name, px, 1, negative_prompt=neg, **stage)
        assert np.array_equal(cached[0], strings[0]), f"{name}, negative {neg!r}"
    # the prompt does steer these tiny models, so the equality above says something
    other = _run(model, name, px, 1, prompt="a red bicycle", **stage)
    assert not np.array_equal(other[0], cached[0])
    # two images from one job: the cached embeddings repeated per image
    two = _run(model, name, px, 2, **stage)
    with monkeypatch.context() as m:
        m.setattr(prompts, "cached_embeds", lambda model, stage: None)
        two_strings = _run(model, name, px, 2, **stage)
    assert [np.abs(a - b).max() for a, b in zip(two, two_strings)] <= [2, 2]  # batched text encoder: last bits


def test_a_repeated_prompt_runs_the_text_encoder_once(model_root):
    model = _model(model_root, "sd15")
    encoder = model.pipes["img2img"].text_encoder
    calls = []
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for seed in range(3):
            _run(model, "sd15", 64, 1, seed=seed, strength=0.6, steps=2)
        assert len(calls) == 2  # the prompt and the (empty) negative prompt, once
        _run(model, "sd15", 64, 1, negative_prompt="blurry", strength=0.6, steps=2)
        assert len(calls) == 4  # a new pair is encoded
        # every pipeline of the model shares the cache (text2img here)
        out, _ = run_stage(model, [Stage(model="sd15", task="text2img", prompt="a lighthouse at dusk", width=64,
                                         height=64, steps=2, seed=1)],
                           Carrier(), n=1, want_latent=False, on_step=lambda s, t: True)
        assert len(calls) == 4 and out.images[0].size == (64, 64)
    finally:
        handle.remove()


def test_the_cache_is_bounded(model_root, monkeypatch):
    monkeypatch.setattr(prompts, "CACHE_SIZE", 3)
    model = _model(model_root, "sd15")
    for i in range(5):
        prompts.cached_embeds(model, Stage(model="sd15", prompt=f"prompt {i}", seed=1))
    assert [k[1] for k in model.extras["prompt_cache"]] == ["prompt 2", "prompt 3", "prompt 4"]


def test_the_cache_is_bounded_in_bytes_too(model_root, monkeypatch):
    """Compel prompts are not cut at 77 tokens, so a pair can hold ten times a plain one's
    device memory: the cache keeps at most CACHE_BYTES of them (and always the newest)."""
    model = _model(model_root, "sd15")
    one = prompts._nbytes(prompts.cached_embeds(model, Stage(model="sd15", prompt="prompt 0", seed=1)))
    monkeypatch.setattr(prompts, "CACHE_BYTES", 2 * one)
    for i in range(1, 4):
        prompts.cached_embeds(model, Stage(model="sd15", prompt=f"prompt {i}", seed=1))
    assert [k[1] for k in model.extras["prompt_cache"]] == ["prompt 2", "prompt 3"]
    monkeypatch.setattr(prompts, "CACHE_BYTES", 1)
    prompts.cached_embeds(model, Stage(model="sd15", prompt="prompt 4", seed=1))
    assert [k[1] for k in model.extras["prompt_cache"]] == ["prompt 4"]


def test_a_compel_prompts_length_is_part_of_a_compiled_calls_key(model_root):
    """A compiled UNet compiles anew for an embedding length it has not seen, and a Compel
    prompt over 75 tokens makes a longer one: such a call's key differs, so it is given the
    compile allowance; a plain prompt's is always cut to the same length."""
    from easel.shared.registry import Registry
    from easel.worker.runner import call_key

    reg = Registry.model_validate({"models": {"m": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae",
                                                    "kind": "sd", "optimizations": {"compile_unet": True}}}})
    model = load_model(reg.get("m"), Settings(model_root=model_root), torch.device("cpu"))
    carrier = Carrier(images=[Image.new("RGB", (64, 64))])

    def key(prompt: str, syntax: str = "compel") -> tuple:
        return call_key(model, Stage(model="m", prompt=prompt, prompt_syntax=syntax, seed=1), carrier, 1, False)

    long = " ".join(["a lighthouse at dusk"] * 30)  # 120 words: two chunks of 75 tokens
    assert key("a lighthouse") == key("a (lighthouse)1.2 at dusk") != key(long)
    assert key("a lighthouse", "plain") == key(long, "plain")


def test_kandinsky_runs_several_images_and_keeps_the_priors_zero_negative(model_root):
    """The prior doubles its rows for a negative prompt: each row gets a generator (a job of
    two images with a negative prompt failed with IndexError). Without a negative prompt the
    prior's zero embedding is the negative one, as in the combined pipeline; an empty
    negative prompt is a different embedding and a different image."""
    model = _model(model_root, "kandinsky-2-2")
    stage = {"strength": 0.6, "steps": 3}
    for neg in (None, "blurry"):
        two = _run(model, "kandinsky-2-2", 64, 2, negative_prompt=neg, **stage)
        one = _run(model, "kandinsky-2-2", 64, 1, negative_prompt=neg, **stage)
        assert len(two) == 2 and not np.array_equal(two[0], two[1]), neg
        assert np.abs(two[0] - one[0]).max() <= 2, neg  # image 0 of a job: seed + 0, however many it asks
    none = _run(model, "kandinsky-2-2", 64, 1, **stage)
    empty = _run(model, "kandinsky-2-2", 64, 1, negative_prompt="", **stage)
    assert not np.array_equal(none[0], empty[0])


def test_a_latent_upscale_at_guidance_0_is_unconditioned_as_with_strings(model_root, monkeypatch):
    """diffusers' latent upscaler drops the prompt at guidance 0, but only when it encodes the
    strings itself: the cached embeddings must be the empty prompt's there too."""
    name, stage = "sd-x2-latent-upscaler", {"steps": 3, "guidance_scale": 0}
    model = _model(model_root, name)
    cached = _run(model, name, 32, 1, **stage)
    with monkeypatch.context() as m:
        m.setattr(prompts, "cached_embeds", lambda model, stage: None)
        strings = _run(model, name, 32, 1, **stage)
    assert np.array_equal(cached[0], strings[0])
    assert np.array_equal(_run(model, name, 32, 1, prompt="a red bicycle", **stage)[0], cached[0])
