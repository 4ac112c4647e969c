"""bench/flops.py counts the FLOPs of SD 1.5's real architecture (meta device: no weights, ~1 s)."""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from bench import flops

ATTN_OPS = ("aten.bmm", "aten._scaled_dot_product")  # SDPA: bmm on meta (math path), flash/efficient on CUDA


def test_unet_forward_matches_published_sd15_figure():
    total, ops = flops.unet_forward(1, 64)
    # The published figure for SD 1.x's UNet at 512 px (64x64 latents, batch 1) is ~339 G MACs
    # (e.g. BK-SDM, Kim et al. 2023, Table 1; DeepCache's SD 1.5 MACs), counted by module
    # hooks over convolutions and linear layers, which miss the attention matmuls inside SDPA.
    # So: convs + linears alone must be 339 G MACs = 678 GFLOPs within 2% (a hook count and
    # FlopCounterMode differ only in bookkeeping such as the time embedding), ...
    dense = sum(v for k, v in ops.items() if not k.startswith(ATTN_OPS))
    assert 0.98 * 678e9 < dense < 1.02 * 678e9, dense
    # ... and the attention matmuls (QK^T and AV: 2 * 2 * tokens^2 * dim per self-attention,
    # 5 layers at 4096 tokens x 320, 5 at 1024 x 640, 5 at 256 x 1280, 1 at 64 x 1280, plus
    # the 77-token cross-attentions) come to ~126 GFLOPs, which puts the total at ~0.80 TFLOPs.
    attn = total - dense
    expected_self = 4 * (5 * 4096**2 * 320 + 5 * 1024**2 * 640 + 5 * 256**2 * 1280 + 64**2 * 1280)
    assert expected_self < attn < 1.05 * expected_self, (attn, expected_self)
    assert 0.78e12 < total < 0.82e12, total


def test_unet_scales_linearly_with_batch():
    one = flops.unet_forward(1, 64)[0]
    assert flops.unet_forward(2, 64)[0] == pytest.approx(2 * one, rel=1e-3)


def test_unet_scales_a_little_over_quadratically_with_resolution():
    # Convolutions and linears grow with the pixel count (x4 for twice the side); self-attention
    # with its square (x16): 256 px -> 512 px is a bit over x4.
    small, big = flops.unet_forward(1, 32)[0], flops.unet_forward(1, 64)[0]
    assert 4.0 < big / small < 5.0, big / small


def test_the_unet_passes_counted_are_the_ones_img2img_runs(model_root):
    """With the bench checkpoint's scheduler (PNDM, ``skip_prk_steps``), 30 steps at strength
    0.8 run 25 UNet passes, not 24: the scheduler repeats one timestep."""
    import torch
    from diffusers import PNDMScheduler
    from PIL import Image

    from bench.sd15_arch import SCHEDULER
    from easel.shared.registry import load_registry
    from easel.shared.settings import Settings
    from easel.worker.pipelines import PipelineCache

    pipe = PipelineCache(load_registry(), Settings(model_root=model_root), "sd15",
                         device=torch.device("cpu")).get("sd15").pipes["img2img"]
    pipe.scheduler = PNDMScheduler(**SCHEDULER)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        pipe(prompt="a fox", image=Image.new("RGB", (64, 64)), num_inference_steps=30, strength=0.8,
             output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == flops.denoise_steps(30, 0.8) == 25


def test_job_flops_parts():
    parts = flops.job_flops(512, 30, 0.8)
    assert parts["denoise_steps"] == 25
    assert parts["unet"] == 25 * flops.unet_forward(2, 64)[0]
    assert parts["total"] == parts["unet"] + parts["vae_encode"] + parts["vae_decode"] + parts["text_encoder"]
    # The VAE decoder runs its convolutions at up to 512x512 (128-512 channels): ~2.5 TFLOPs,
    # more than three UNet calls; the text encoder is tiny (2 x 77 tokens through 123 M parameters).
    assert 2.0e12 < parts["vae_decode"] < 3.0e12
    assert 2 * 77 * 2 * 85e6 < parts["text_encoder"] < 2 * 77 * 2 * 123e6
    assert 40e12 < parts["total"] < 45e12


def test_peak_table_and_mfu():
    assert flops.peak_flops("NVIDIA H200") == 989.4e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert flops.peak_flops("Some GPU") is None
    assert flops.peak_flops("Some GPU", 100.0) == 100e12
    assert flops.mfu(10.0, 50e12, 1000e12) == pytest.approx(0.5)
    assert flops.mfu(10.0, 50e12, None) is None
