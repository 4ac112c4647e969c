"""Tiny SDXL-refiner-style checkpoint (StableDiffusionXLImg2ImgPipeline).

Mirrors stabilityai/stable-diffusion-xl-refiner-1.0's layout: ``text_encoder``/``tokenizer``
are null in model_index.json, only ``text_encoder_2`` (CLIPTextModelWithProjection) +
``tokenizer_2`` condition the UNet, ``requires_aesthetics_score=True`` (add_time_ids =
original_size + crop + aesthetic_score: 5 values), ``force_zeros_for_empty_prompt=False``.
The VAE is its own (different weights/width from the SD 1.5 one; scaling_factor 0.13025
like SDXL), so SD 1.5 latents are not meaningful input for it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

from easel.worker.tiny.clip import offline_clip_tokenizer, tiny_clip_text_model

SDXL_SCALING_FACTOR = 0.13025


def tiny_sdxl_vae() -> AutoencoderKL:
    """Factor-8, 4-channel latent VAE like SDXL's (4 blocks), but with SDXL's scaling factor."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=SDXL_SCALING_FACTOR,
        force_upcast=True,
    )


def tiny_sdxl_unet(
    block_out_channels=(32, 64),
    cross_attention_dim: int = 32,
    pooled_dim: int = 32,
    addition_time_embed_dim: int = 8,
    n_time_ids: int = 5,
) -> UNet2DConditionModel:
    """SDXL UNet conditioning: ``text_time`` added embedding.

    projection_class_embeddings_input_dim = n_time_ids * addition_time_embed_dim + pooled text dim;
    n_time_ids is 5 for the refiner (aesthetic score), 6 for the base model (target size).
    """
    n = len(block_out_channels)
    return UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 8, 8)[:n],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=n_time_ids * addition_time_embed_dim + pooled_dim,
        transformer_layers_per_block=1,
        norm_num_groups=min(32, block_out_channels[0]),
    )


def make_sdxl_refiner(out_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = offline_clip_tokenizer()
    hidden = 32  # text_encoder_2 hidden size == projection_dim == cross_attention_dim
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_sdxl_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=tiny_clip_text_model(tok, hidden=hidden, with_projection=True),
        tokenizer_2=tok,
        unet=tiny_sdxl_unet(cross_attention_dim=hidden, pooled_dim=hidden),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
        ),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
