"""Tiny upscaler checkpoints.

* ``make_sd_x2_latent_upscaler``: StableDiffusionLatentUpscalePipeline (like
  stabilityai/sd-x2-latent-upscaler). Works in the SD 1.x latent space: its VAE and CLIP
  text encoder are built exactly as ``make_sd15`` builds them, so at the same seed they are
  weight-identical to tiny-sd15's, and latents from ``tiny-sd15`` (``output_type="latent"``)
  can be passed straight in as ``image=``. Output is 2x the latent (and pixel) size.
* ``make_sd_x4_upscaler``: StableDiffusionUpscalePipeline (like
  stabilityai/stable-diffusion-x4-upscaler): pixel-space conditioning (UNet in_channels
  4 latent + 3 RGB = 7, noise level as class label), a 3-block factor-4 VAE with
  scaling_factor 0.08333, ``max_noise_level`` 350. Output is 4x the input pixel size;
  input sides must be multiples of 4.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)

from easel.worker.tiny.clip import offline_clip_tokenizer, tiny_clip_text_model
from easel.worker.tiny.sd import tiny_sd_vae

X4_SCALING_FACTOR = 0.08333


def tiny_latent_upscaler_unet(text_hidden: int = 32, block_out_channels=(32, 64, 64)) -> UNet2DConditionModel:
    """K-diffusion style UNet of the x2 latent upscaler.

    in_channels 8 = 4 noisy latents + 4 (nearest-upsampled) low-res latents; out_channels 5
    (the pipeline drops the last channel); timestep_cond = 64 ones + 64 zeros (noise-level
    embedding) + the text encoder's pooled output, hence time_cond_proj_dim = 128 + hidden.
    The K-blocks only wire up when the last two widths are equal (real: 256,512,512,1024;
    (32,32), (32,64), (32,32,64) fail in the first up block); three blocks downsample by 4,
    so the 2x-upsampled latent needs sides divisible by 4, i.e. input latents with even sides.
    """
    n = len(block_out_channels)
    return UNet2DConditionModel(
        act_fn="gelu",
        attention_head_dim=8,
        norm_num_groups=None,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        time_cond_proj_dim=128 + text_hidden,
        conv_in_kernel=1,
        conv_out_kernel=1,
        cross_attention_dim=text_hidden,
        down_block_types=("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("KCrossAttnUpBlock2D",) * (n - 1) + ("KUpBlock2D",),
        in_channels=8,
        out_channels=5,
        mid_block_type=None,
        only_cross_attention=False,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
        sample_size=32,
    )


def make_sd_x2_latent_upscaler(out_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = offline_clip_tokenizer()
    # Same construction order as make_sd15 (vae, then text encoder) -> same weights at the same seed.
    vae = tiny_sd_vae()
    text_encoder = tiny_clip_text_model(tok, hidden=32)
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=tiny_latent_upscaler_unet(text_hidden=32),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="sample",
        ),
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def tiny_x4_vae() -> AutoencoderKL:
    """Three blocks -> downsamples by 4, like the x4 upscaler's VAE ([128, 256, 512]).

    Unlike the real one, no self-attention in the mid block: the x4 latent is as large as
    the low-res input (128x128 px in -> 16384 tokens), which made decoding the 512x512
    output take ~0.6 s on 2 CPU cores (vs ~0.25 s without).
    """
    return AutoencoderKL(
        block_out_channels=(16, 16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=X4_SCALING_FACTOR,
        mid_block_add_attention=False,
    )


def tiny_x4_unet(block_out_channels=(16, 32, 64), cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """x4 UNet: noisy latents + the low-res RGB image, both at the input's pixel size.

    Cross-attention only in the last (1/4-resolution) block and the mid block: with it at
    1/2 resolution, one CFG step on a 128x128 input took ~1.2-1.4 s on 2 CPU cores. Three blocks -> input sides
    must be divisible by 4.
    """
    n = len(block_out_channels)
    return UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        sample_size=32,
        in_channels=7,  # 4 latent + 3 low-res RGB
        out_channels=4,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        use_linear_projection=True,
        num_class_embeds=1000,  # noise_level is passed as class_labels
        norm_num_groups=min(32, block_out_channels[0]),
    )


def make_sd_x4_upscaler(out_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = offline_clip_tokenizer()
    pipe = StableDiffusionUpscalePipeline(
        vae=tiny_x4_vae(),
        text_encoder=tiny_clip_text_model(tok, hidden=32),
        tokenizer=tok,
        unet=tiny_x4_unet(),
        low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
