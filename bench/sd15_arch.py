"""Stable Diffusion 1.5 at full size, random weights: the GPU benchmark's checkpoint.

The architecture is SD 1.5's published configuration (the ``unet``, ``vae`` and
``text_encoder`` configs of stable-diffusion-v1-5, written out below: 860 M + 83 M + 123 M
parameters), so every kernel, shape and byte moved matches the real model; only the
weight values are random. Nothing is downloaded: the tokenizer is easel's offline CLIP
tokenizer (its ids fit inside SD's 49,408-entry embedding table). The folder is a normal
diffusers checkpoint (safetensors, fp16) that loads through ``from_pretrained`` like the
hub's.
"""
from __future__ import annotations

from pathlib import Path

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)


def make_sd15_full(out_dir: Path, seed: int = 0) -> Path:
    """Write the checkpoint (fp16 safetensors, ~2 GB) unless ``out_dir`` already holds one."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from easel.worker.tiny.clip import BOS, EOS, offline_clip_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    torch.manual_seed(seed)
    tok = offline_clip_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("bos_token_id", BOS), ("eos_token_id", EOS),
                                                         ("pad_token_id", EOS))}
    # Initialising ~1 B parameters is quickest where they will run.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(**TEXT, **ids))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out_dir)
    return out_dir


def bench_checkpoint(arch: str) -> Path:
    """The GPU benchmarks' checkpoint under the bench model root: ``sd15`` (this module's
    full-size architecture) or ``tiny`` (``tiny-sd15``, for dry runs on the CPU)."""
    from bench.common import model_root

    if arch == "sd15":
        return make_sd15_full(model_root() / "sd15-full-random")
    from easel.worker.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(model_root(), ["tiny-sd15"])["tiny-sd15"]
