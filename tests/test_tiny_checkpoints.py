"""Tiny random-weight checkpoints: each is written, loaded back through ``from_pretrained``
from its local folder (as a worker loads a hub checkpoint) and run for one real call."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoPipelineForImage2Image,
    ControlNetModel,
    DiffusionPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22PriorPipeline,
)

from easel.worker.pipelines import dtype_kwarg  # noqa: E402
from easel.worker.tiny import TINY_MAKERS, make_tiny_checkpoints  # noqa: E402
from easel.worker.tiny.kandinsky import combined_img2img_kwargs, make_kandinsky22_decoder  # noqa: E402

NEW = [
    "tiny-sd15-controlnet",
    "tiny-sdxl-refiner",
    "tiny-kandinsky22-prior",
    "tiny-kandinsky22-decoder",
    "tiny-sd-x2-latent-upscaler",
    "tiny-sd-x4-upscaler",
]
LOAD = {dtype_kwarg(): torch.float32, "use_safetensors": True}
W, H = 96, 64  # non-square on purpose: catches swapped height/width


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), ["tiny-sd15", *NEW])


@pytest.fixture(scope="module")
def sd15(ckpts):
    return AutoPipelineForImage2Image.from_pretrained(ckpts["tiny-sd15"], **LOAD)


def _img(w: int = W, h: int = H) -> Image.Image:
    return Image.new("RGB", (w, h), (120, 60, 30))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registered_and_saved_as_safetensors(ckpts):
    for name in NEW:
        assert name in TINY_MAKERS
        folder = ckpts[name]
        assert (folder / "model_index.json").exists() or (folder / "config.json").exists()
        assert list(folder.rglob("*.safetensors")), name
        assert not list(folder.rglob("*.bin")), name


def test_controlnet_img2img(ckpts):
    cn = ControlNetModel.from_pretrained(ckpts["tiny-sd15-controlnet"], **LOAD)
    pipe = AutoPipelineForImage2Image.from_pretrained(ckpts["tiny-sd15"], controlnet=cn, **LOAD)
    assert type(pipe).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    kw = dict(prompt="a cat", image=_img(), num_inference_steps=4, strength=0.75)
    out = pipe(**kw, control_image=_img(), generator=_gen()).images[0]
    assert out.size == (W, H)
    a = pipe(**kw, control_image=Image.new("RGB", (W, H), "white"), generator=_gen(), output_type="latent").images
    b = pipe(**kw, control_image=Image.new("RGB", (W, H), "black"), generator=_gen(), output_type="latent").images
    assert a.shape == (1, 4, H // 8, W // 8)
    assert (a - b).abs().max() > 1e-3  # the control branch is live, not zero-initialised


def test_sdxl_refiner(ckpts, sd15):
    pipe = AutoPipelineForImage2Image.from_pretrained(ckpts["tiny-sdxl-refiner"], **LOAD)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.text_encoder_2 is not None
    assert pipe.config.requires_aesthetics_score
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025) and pipe.vae_scale_factor == 8
    out = pipe("a cat", image=_img(), num_inference_steps=4, strength=0.5, aesthetic_score=6.0,
               generator=_gen()).images[0]
    assert out.size == (W, H)
    # A 4-channel tensor is taken as (already scaled) init latents, the base -> refiner hand-off.
    lat = sd15("a cat", image=_img(), num_inference_steps=4, strength=0.75, output_type="latent").images
    out = pipe("a cat", image=lat, num_inference_steps=4, strength=0.3, generator=_gen()).images[0]
    assert out.size == (W, H)


def test_kandinsky22_prior_then_decoder(ckpts):
    prior = KandinskyV22PriorPipeline.from_pretrained(ckpts["tiny-kandinsky22-prior"], **LOAD)
    emb = prior("a cat", num_inference_steps=3, generator=_gen())
    assert emb.image_embeds.shape == emb.negative_image_embeds.shape == (1, 32)
    other = prior("a dog", num_inference_steps=3, generator=_gen()).image_embeds
    assert not torch.allclose(emb.image_embeds, other)

    dec = KandinskyV22Img2ImgPipeline.from_pretrained(ckpts["tiny-kandinsky22-decoder"], **LOAD)
    # diffusers' Kandinsky 2.2 img2img calls image_processor.preprocess(image, width, height),
    # i.e. swapped, so height= must carry the width and width= the height.
    out = dec(image=_img(), image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
              height=W, width=H, num_inference_steps=4, strength=0.75, generator=_gen()).images[0]
    assert out.size == (W, H)

    combined = AutoPipelineForImage2Image.from_pretrained(
        ckpts["tiny-kandinsky22-decoder"], **combined_img2img_kwargs(prior), **LOAD
    )
    assert type(combined).__name__ == "KandinskyV22Img2ImgCombinedPipeline"
    out = combined("a cat", image=_img(), height=W, width=H, num_inference_steps=4, strength=0.75,
                   prior_num_inference_steps=3, generator=_gen()).images[0]
    assert out.size == (W, H)


def test_kandinsky22_decoder_model_card_names_prior(ckpts, tmp_path):
    with pytest.raises(ValueError):  # a bare decoder folder lacks the prior_* components
        AutoPipelineForImage2Image.from_pretrained(ckpts["tiny-kandinsky22-decoder"], **LOAD)
    dec_dir = make_kandinsky22_decoder(tmp_path / "dec", seed=0, prior_dir=ckpts["tiny-kandinsky22-prior"])
    pipe = AutoPipelineForImage2Image.from_pretrained(dec_dir, **LOAD)
    assert type(pipe).__name__ == "KandinskyV22Img2ImgCombinedPipeline"
    out = pipe("a cat", image=_img(64, 64), height=64, width=64, num_inference_steps=2, strength=0.75,
               prior_num_inference_steps=2).images[0]
    assert out.size == (64, 64)


def test_sd15_latents_into_x2_latent_upscaler(ckpts, sd15):
    up = DiffusionPipeline.from_pretrained(ckpts["tiny-sd-x2-latent-upscaler"], **LOAD)
    assert type(up).__name__ == "StableDiffusionLatentUpscalePipeline"
    # Same latent space as tiny-sd15: its VAE is weight-identical.
    for (k, a), (_, b) in zip(sd15.vae.state_dict().items(), up.vae.state_dict().items()):
        assert torch.equal(a, b), k

    lat = sd15("a cat", image=_img(), num_inference_steps=4, strength=0.75, output_type="latent").images
    assert lat.shape == (1, 4, H // 8, W // 8)
    out = up("a cat", image=lat, num_inference_steps=3, guidance_scale=0, generator=_gen()).images[0]
    assert out.size == (2 * W, 2 * H)
    lat2 = up("a cat", image=lat, num_inference_steps=3, guidance_scale=0, output_type="latent").images
    assert lat2.shape == (1, 4, H // 4, W // 4)
    # A PIL image is VAE-encoded first, then upscaled the same way.
    assert up("a cat", image=_img(), num_inference_steps=2, guidance_scale=0).images[0].size == (2 * W, 2 * H)


def test_x4_upscaler(ckpts):
    up = DiffusionPipeline.from_pretrained(ckpts["tiny-sd-x4-upscaler"], **LOAD)
    assert type(up).__name__ == "StableDiffusionUpscalePipeline"
    assert up.vae_scale_factor == 4 and up.unet.config.in_channels == 7
    assert up.config.max_noise_level == 350
    idx = json.loads((ckpts["tiny-sd-x4-upscaler"] / "model_index.json").read_text())
    assert idx["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
    out = up("a cat", image=_img(32, 24), num_inference_steps=3, noise_level=20, generator=_gen()).images[0]
    assert out.size == (128, 96)


def test_a_checkpoint_is_written_whole_or_not_under_its_name(tmp_path):
    """A folder left by an interrupted write (weights missing) is written again; writes go
    through a temporary folder renamed into place, and none is left behind."""
    partial = tmp_path / "tiny-sd15-controlnet"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # its config written, its weights not
    out = make_tiny_checkpoints(tmp_path, ["tiny-sd15-controlnet"])["tiny-sd15-controlnet"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd15-controlnet"]
    ControlNetModel.from_pretrained(out)
