"""Tiny random-weight diffusers checkpoints for the demo, tests and benchmarks.

Each maker writes a real diffusers folder (safetensors, model_index.json) that loads
back through the same ``from_pretrained`` path a hub checkpoint takes, so swapping in
real weights is a registry change only. Nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from easel.worker.tiny.controlnet import make_sd15_controlnet
from easel.worker.tiny.kandinsky import make_kandinsky22_decoder, make_kandinsky22_prior
from easel.worker.tiny.sd import make_sd15
from easel.worker.tiny.sdxl import make_sdxl_refiner
from easel.worker.tiny.upscalers import make_sd_x2_latent_upscaler, make_sd_x4_upscaler

# name -> maker(out_dir, seed). Names are referenced by shared/models.yaml.
TINY_MAKERS: dict[str, Callable[[Path, int], Path]] = {
    "tiny-sd15": lambda d, s: make_sd15(d, seed=s),
    "tiny-sd15-comic": lambda d, s: make_sd15(d, seed=s + 1),
    "tiny-sd15-pixel": lambda d, s: make_sd15(d, seed=s + 2),
    "tiny-sd15-wide": lambda d, s: make_sd15(d, seed=s + 3, block_out_channels=(64, 128, 256)),
    # ControlNet for the (32, 64) tiny-sd15* UNets; a bare model folder (config.json).
    "tiny-sd15-controlnet": lambda d, s: make_sd15_controlnet(d, seed=s + 10),
    "tiny-sdxl-refiner": lambda d, s: make_sdxl_refiner(d, seed=s + 11),
    "tiny-kandinsky22-prior": lambda d, s: make_kandinsky22_prior(d, seed=s + 12),
    "tiny-kandinsky22-decoder": lambda d, s: make_kandinsky22_decoder(d, seed=s + 13),
    # Same seed as tiny-sd15: its VAE and text encoder are then weight-identical to tiny-sd15's.
    "tiny-sd-x2-latent-upscaler": lambda d, s: make_sd_x2_latent_upscaler(d, seed=s),
    "tiny-sd-x4-upscaler": lambda d, s: make_sd_x4_upscaler(d, seed=s + 14),
}


def make_tiny_checkpoints(root: Path, names: list[str] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write every (or the named) tiny checkpoint under ``root``; skip ones already complete."""
    root = Path(root)
    out: dict[str, Path] = {}
    for name in names or list(TINY_MAKERS):
        if name not in TINY_MAKERS:
            raise KeyError(f"unknown tiny checkpoint {name!r}; known: {sorted(TINY_MAKERS)}")
        target = root / name
        if not complete(target):
            _write_whole(name, target, seed)
        out[name] = target
    return out


def complete(folder: Path) -> bool:
    """A pipeline folder (model_index.json, which diffusers writes last) or a bare model's
    (config.json with its weights): written whole, or by an older version that wrote in
    place and was not stopped part way."""
    if (folder / "model_index.json").exists():
        return True
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def _write_whole(name: str, target: Path, seed: int) -> None:
    """Written beside its place and renamed into it, so a folder under the name is always
    whole: an interrupted write (Ctrl-C in a first ``easel dev``) leaves a temporary folder,
    never a config without its weights that a worker would then fail to load."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    TINY_MAKERS[name](tmp, seed)
    if target.exists() and not complete(target):
        shutil.rmtree(target)  # a partial folder an older version left
    try:
        tmp.rename(target)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoints_for(registry, families: set[str] | list[str]) -> list[str]:
    """Tiny checkpoint names that the registry's models of these families load (a worker warms
    its whole family: ControlNets and priors included)."""
    names: list[str] = []
    for fam in sorted(families):
        for spec in registry.family_models(fam):
            for src in [spec.source, *spec.controlnets.values(), spec.prior]:
                if src and src in TINY_MAKERS and src not in names:
                    names.append(src)
    return names
