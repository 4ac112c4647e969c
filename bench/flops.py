"""``python -m bench flops``: FLOPs per image of the GPU benchmark's job, counted on SD 1.5's real architecture.

The job (``bench gpu``): img2img at 512 px, 30 steps at strength 0.8 (so 24 denoising
steps: diffusers runs ``int(steps * strength)``), guidance 7.5 (classifier-free guidance:
every UNet call at batch 2, the prompt's and the negative's), PNG out. Per image that is

- the text encoder (CLIP ViT-L/14 text, 77 tokens) on the prompt and the negative (batch 2),
- the VAE encoder once at 512 px, the VAE decoder once from 64x64 latents,
- 24 UNet forwards at batch 2 on 64x64 latents.

Each part is counted with ``torch.utils.flop_counter.FlopCounterMode`` on models built
from ``bench/sd15_arch.py``'s configs (SD 1.5's published ``unet``/``vae``/``text_encoder``)
on the ``meta`` device: no weights are allocated, the whole count takes about a second
on a CPU. Should an op ever have no meta kernel, the count falls back to real CPU fp32
tensors (slower, same figures). FlopCounterMode counts matmuls and convolutions (2 FLOPs
per multiply-add), the work that tensor cores do; norms, activations and the scheduler
are left out, as MFU conventions do.

Headlines: ``flops_per_image`` and its parts, the UNet forward alone
(``flops_unet_forward_b1``), and what 50% MFU would mean in images/s on an H200
(``h200_images_per_s_at_mfu50``). ``mfu()`` and ``peak_flops()`` are what ``bench gpu``
uses for ``gpu_mfu``.
"""
from __future__ import annotations

import argparse
import functools

NEEDS_S3 = False
NEEDS_MODELS = False

# Dense (no sparsity) FP16/BF16 tensor-core peak, FLOP/s, with FP32 accumulate, from the
# vendor datasheets. Matched as substrings of torch.cuda.get_device_name(), first match
# wins (so the more specific names come first); ``--peak-tflops`` overrides.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),        # H200 SXM
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),        # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0e12),
    ("L40S", 362.05e12),
)


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """The dense fp16 peak of the GPU called ``device_name`` (FLOP/s), or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: useful FLOP/s over the GPU's peak."""
    return None if not peak else images_per_s * flops_per_image / peak


def denoise_steps(steps: int, strength: float) -> int:
    """The UNet passes diffusers' img2img runs for ``steps`` at ``strength`` with the bench
    checkpoint's scheduler: what its timesteps hold past the ones strength skips (PNDM with
    ``skip_prk_steps`` repeats one timestep, so 30 steps are 31 passes in all)."""
    from diffusers import PNDMScheduler

    from bench.sd15_arch import SCHEDULER

    scheduler = PNDMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    skipped = steps - min(int(steps * strength), steps)
    return len(scheduler.timesteps[skipped * scheduler.order:])


@functools.cache
def _models(device: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.sd15_arch import TEXT, UNET, VAE

    with torch.device(device):
        models = (UNet2DConditionModel(**UNET), AutoencoderKL(**VAE), CLIPTextModel(CLIPTextConfig(**TEXT)))
    for m in models:
        m.eval()
    return models


def _count(call) -> tuple[int, dict[str, int]]:
    """(total FLOPs, per aten op) of ``call(device, unet, vae, text)``: on meta, else on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    last: Exception | None = None
    for device in ("meta", "cpu"):
        try:
            models = _models(device)
            with torch.device(device), torch.no_grad(), FlopCounterMode(display=False) as fc:
                call(device, *models)
            return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts().get("Global", {}).items()}
        except (NotImplementedError, RuntimeError) as e:  # an op without a meta kernel
            last = e
    raise RuntimeError(f"FLOP count failed on meta and cpu: {last}")


@functools.cache
def unet_forward(batch: int = 1, latent_px: int = 64) -> tuple[int, dict[str, int]]:
    """One UNet forward (77-token text conditioning)."""
    import torch

    def call(dev, unet, vae, text):
        unet(torch.randn(batch, 4, latent_px, latent_px), torch.full((batch,), 500),
             encoder_hidden_states=torch.randn(batch, 77, 768))
    return _count(call)


@functools.cache
def vae_encode(px: int = 512, batch: int = 1) -> int:
    import torch

    return _count(lambda dev, unet, vae, text: vae.encode(torch.randn(batch, 3, px, px)))[0]


@functools.cache
def vae_decode(px: int = 512, batch: int = 1) -> int:
    import torch

    return _count(lambda dev, unet, vae, text: vae.decode(torch.randn(batch, 4, px // 8, px // 8)))[0]


@functools.cache
def text_encode(batch: int = 2, tokens: int = 77) -> int:
    import torch

    return _count(lambda dev, unet, vae, text: text(torch.zeros(batch, tokens, dtype=torch.long)))[0]


@functools.cache
def job_flops(px: int = 512, steps: int = 30, strength: float = 0.8, cfg: bool = True) -> dict[str, float]:
    """FLOPs per image of one img2img job, by part, and ``total``."""
    k = denoise_steps(steps, strength)
    b = 2 if cfg else 1
    parts = {
        "unet": unet_forward(b, px // 8)[0] * k,
        "vae_encode": vae_encode(px),
        "vae_decode": vae_decode(px),
        "text_encoder": text_encode(b),
    }
    parts["total"] = sum(parts.values())
    parts["denoise_steps"] = k
    return parts


def run(px: int = 512, steps: int = 30, strength: float = 0.8, peak_tflops: float | None = None) -> dict:
    from bench.common import headline, log

    parts = job_flops(px, steps, strength)
    fwd, ops = unet_forward(1, px // 8)
    total = parts["total"]
    h200 = peak_flops("NVIDIA H200", peak_tflops)
    out = {
        "flops_per_image": f"{total:.4e}",
        "flops_unet_per_image": f"{parts['unet']:.4e}",
        "flops_vae_encode_per_image": f"{parts['vae_encode']:.4e}",
        "flops_vae_decode_per_image": f"{parts['vae_decode']:.4e}",
        "flops_text_encoder_per_image": f"{parts['text_encoder']:.4e}",
        "flops_unet_forward_b1": f"{fwd:.4e}",
        "h200_images_per_s_at_mfu50": f"{0.5 * h200 / total:.2f}",
    }
    log(f"job: {px} px img2img, {steps} steps at strength {strength} -> {parts['denoise_steps']} UNet calls at "
        f"batch 2 (CFG); UNet forward batch 1 by op (GFLOPs): "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in ops.items()))
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {"parts": parts, "unet_forward_b1_ops": ops}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the H200's 989.4 dense fp16 TFLOPS")


def main(env, args) -> dict:
    return run(args.px, args.steps, args.strength, args.peak_tflops)
