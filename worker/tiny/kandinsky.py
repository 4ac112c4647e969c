"""Tiny Kandinsky 2.2 checkpoints: the prior (text -> CLIP image embedding) and the decoder.

Two folders, like kandinsky-community/kandinsky-2-2-{prior,decoder}:

* prior: KandinskyV22PriorPipeline(PriorTransformer, CLIPVisionModelWithProjection,
  CLIPTextModelWithProjection, CLIPTokenizer, UnCLIPScheduler, CLIPImageProcessor)
* decoder: KandinskyV22Pipeline(UNet2DConditionModel with addition_embed_type="image",
  DDPMScheduler, VQModel "movq"); loads as KandinskyV22Img2ImgPipeline.

Embedding width is 32 throughout (text hidden == projection == prior embedding_dim ==
image-embed width == decoder encoder_hid_dim). The movq has 4 blocks, so it downsamples by 8
like the real one; its latent space (4 channels, no scaling factor) is not SD's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from easel.worker.tiny.clip import offline_clip_tokenizer, tiny_clip_text_model

EMBED_DIM = 32
CLIP_IMAGE_SIZE = 32


def tiny_prior(embed_dim: int = EMBED_DIM, num_embeddings: int = 77) -> PriorTransformer:
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        embedding_dim=embed_dim,
        num_embeddings=num_embeddings,  # == tokenizer max length
        num_layers=1,
    )
    # post_process_latents() returns latents * clip_std + clip_mean and a fresh prior has
    # clip_std == 0, which would make every image embedding identical (== clip_mean).
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    return prior


def tiny_clip_image_encoder(embed_dim: int = EMBED_DIM, image_size: int = CLIP_IMAGE_SIZE) -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=embed_dim,
            intermediate_size=embed_dim * 2,
            projection_dim=embed_dim,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            num_channels=3,
        )
    )


def tiny_clip_image_processor(image_size: int = CLIP_IMAGE_SIZE) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
    )


def make_kandinsky22_prior(out_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = offline_clip_tokenizer()
    pipe = KandinskyV22PriorPipeline(
        prior=tiny_prior(num_embeddings=tok.model_max_length),
        image_encoder=tiny_clip_image_encoder(),
        text_encoder=tiny_clip_text_model(tok, hidden=EMBED_DIM, with_projection=True),
        tokenizer=tok,
        scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            num_train_timesteps=1000,
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        image_processor=tiny_clip_image_processor(),
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Without torchvision, transformers builds (and model_index.json records) the
    # CLIPImageProcessorPil fallback; record CLIPImageProcessor like the real prior repo so
    # the folder loads the same way with or without torchvision.
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def tiny_movq() -> VQModel:
    """Factor-8 MoVQ (4 blocks, spatial norm in the decoder, like kandinsky-2-2-decoder/movq).

    SpatialNorm hard-codes GroupNorm(32 groups), so every width must be a multiple of 32.
    """
    return VQModel(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=32,
        vq_embed_dim=4,
        sample_size=64,
    )


def tiny_kandinsky_unet(embed_dim: int = EMBED_DIM, block_out_channels=(32, 64)) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=8,  # learned variance: eps (4) + variance (4), like the real decoder
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        addition_embed_type="image",
        encoder_hid_dim=embed_dim,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
        norm_num_groups=min(32, block_out_channels[0]),
    )


def make_kandinsky22_decoder(out_dir: Path, seed: int = 0, prior_dir: Path | None = None) -> Path:
    """Decoder folder. With ``prior_dir``, also write a README.md model card naming it as
    ``prior`` (as kandinsky-2-2-decoder's card names its hub prior), which lets
    ``AutoPipelineForImage2Image.from_pretrained(decoder_dir)`` build the
    KandinskyV22Img2ImgCombinedPipeline offline. The path is stored absolute, so such a
    folder is not relocatable; without it, pass the prior's components as ``prior_<name>=``
    kwargs instead (see ``combined_img2img_kwargs``).
    """
    torch.manual_seed(seed)
    pipe = KandinskyV22Pipeline(
        unet=tiny_kandinsky_unet(),
        scheduler=DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
            prediction_type="epsilon",
            thresholding=False,
        ),
        movq=tiny_movq(),
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if prior_dir is not None:
        (out_dir / "README.md").write_text(f"---\nprior:\n- {Path(prior_dir).resolve()}\n---\n")
    return out_dir


def combined_img2img_kwargs(prior_pipe) -> dict:
    """``prior_<component>`` kwargs that complete a decoder folder into the combined pipeline::

        prior = KandinskyV22PriorPipeline.from_pretrained(prior_dir)
        pipe = AutoPipelineForImage2Image.from_pretrained(decoder_dir, **combined_img2img_kwargs(prior))
    """
    return {f"prior_{name}": component for name, component in prior_pipe.components.items()}
