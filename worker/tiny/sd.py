"""Tiny Stable Diffusion 1.x checkpoint: UNet + factor-8 VAE + CLIP text encoder."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from easel.worker.tiny.clip import offline_clip_tokenizer, tiny_clip_text_model


def tiny_sd_vae() -> AutoencoderKL:
    """Four blocks, so the VAE downscales by 8 like SD's (the 2-block test VAE only by 2)."""
    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
    )


def tiny_sd_unet(block_out_channels=(32, 64), cross_attention_dim: int = 32, in_channels: int = 4) -> UNet2DConditionModel:
    n = len(block_out_channels)
    return UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, block_out_channels[0]),
    )


def make_sd15(out_dir: Path, seed: int = 0, block_out_channels=(32, 64)) -> Path:
    torch.manual_seed(seed)
    tok = offline_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_sd_vae(),
        text_encoder=tiny_clip_text_model(tok, hidden=32),
        tokenizer=tok,
        unet=tiny_sd_unet(block_out_channels),
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
