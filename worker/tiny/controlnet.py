"""Tiny ControlNet matching the tiny SD 1.5 UNet (``worker.tiny.sd.tiny_sd_unet``).

Saved as a bare model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
like real ControlNet repos; it is attached to an SD 1.5 folder at load time::

    cn = ControlNetModel.from_pretrained(cn_dir)
    pipe = AutoPipelineForImage2Image.from_pretrained(sd15_dir, controlnet=cn)
    # -> StableDiffusionControlNetImg2ImgPipeline; call with image= and control_image=
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel


def tiny_sd_controlnet(block_out_channels=(32, 64), cross_attention_dim: int = 32) -> ControlNetModel:
    n = len(block_out_channels)
    return ControlNetModel(
        in_channels=4,
        conditioning_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, block_out_channels[0]),
        # Four entries -> three stride-2 convs: the control image (pixels) is brought down
        # by 8, the SD VAE factor, so it lines up with the latents.
        conditioning_embedding_out_channels=(8, 8, 16, 16),
    )


def make_sd15_controlnet(out_dir: Path, seed: int = 0, block_out_channels=(32, 64)) -> Path:
    torch.manual_seed(seed)
    cn = tiny_sd_controlnet(block_out_channels)
    # A fresh ControlNet has zero-initialised output convs (a no-op until trained);
    # re-initialise them so control_image visibly changes the output in tests.
    # The conditioning tower gets variance-preserving init: with the default init the control
    # signal fades over its convs (white vs black control image moved latents by ~3e-5).
    for m in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
        m.reset_parameters()
    for m in cn.controlnet_cond_embedding.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    out_dir = Path(out_dir)
    cn.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
