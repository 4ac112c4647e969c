"""Loading a family's pipelines once per process and keeping them warm.

Loading goes through ``from_pretrained`` exactly as for a hub checkpoint, so the tiny
test weights and real weights take the same path. Variants of one checkpoint
(text2img, controlnet) are built with ``from_pipe`` and share its modules: no second copy.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from easel.shared.registry import ModelSpec, Registry
from easel.shared.settings import Settings
from easel.worker.device import pick_device, pick_dtype

log = logging.getLogger("easel.worker.pipelines")


@dataclass
class LoadedModel:
    spec: ModelSpec
    source: str
    pipes: dict[str, object]  # task -> pipeline (shared modules)
    device: torch.device
    dtype: torch.dtype
    load_s: float
    extras: dict[str, object] = field(default_factory=dict)


def dtype_kwarg() -> str:
    """The name ``from_pretrained`` / ``from_pipe`` take the dtype by: ``dtype`` where diffusers
    has it (``torch_dtype`` still works there, with a deprecation warning), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _load_kwargs(spec: ModelSpec, dtype: torch.dtype) -> dict:
    kw: dict = {dtype_kwarg(): dtype, "use_safetensors": True}
    if spec.variant:
        kw["variant"] = spec.variant
    if spec.revision:
        kw["revision"] = spec.revision
    return kw


MIRROR_COMPLETE = ".easel-complete"


def _sync_s3_source(source: str, settings: Settings) -> str:
    """An s3:// prefix is mirrored once into the model cache and loaded from there.

    The mirror is downloaded into a temporary folder beside its place and renamed into it
    once whole, with a completion marker inside, so an interrupted download is never taken
    for a checkpoint. A file lock makes the workers of one host download it once."""
    from filelock import FileLock

    from easel.shared.storage import S3Ref, Storage

    ref = S3Ref.parse(source.rstrip("/") + "/")
    target = settings.model_root / "s3" / ref.bucket / ref.key.rstrip("/")
    if (target / MIRROR_COMPLETE).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MIRROR_COMPLETE).exists():
            return str(target)  # another worker of this host finished it while we waited
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            Storage(settings).download_prefix(source, partial)
            (partial / MIRROR_COMPLETE).write_text(source)
            if target.exists():
                shutil.rmtree(target)  # an incomplete mirror from before
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def apply_optimizations(pipe, spec: ModelSpec, device: torch.device) -> None:
    opt = spec.optimizations
    pipe.set_progress_bar_config(disable=True)
    # diffusers already uses torch's scaled_dot_product_attention (SDPA) on torch >= 2;
    # sdpa: false puts back the classic processors (for debugging or old kernels).
    if not opt.sdpa and hasattr(getattr(pipe, "unet", None), "set_default_attn_processor"):
        pipe.unet.set_default_attn_processor()
    if opt.attention_slicing and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
    vae = getattr(pipe, "vae", None)
    if opt.vae_tiling and vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    if opt.vae_slicing and vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if opt.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if opt.compile_unet and hasattr(pipe, "unet"):
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)


def load_model(spec: ModelSpec, settings: Settings, device: torch.device) -> LoadedModel:
    from easel.worker import loaders

    t0 = time.perf_counter()
    source = spec.resolve(spec.source, settings.model_root)
    if source.startswith("s3://"):
        source = _sync_s3_source(source, settings)
    dtype = pick_dtype(spec.dtype, device)
    pipes, extras = loaders.load(spec, source, _load_kwargs(spec, dtype), settings)
    for p in {id(p): p for p in pipes.values()}.values():
        apply_optimizations(p, spec, device)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s) from %s in %.2fs on %s/%s", spec.name, spec.kind, source, load_s, device, dtype)
    return LoadedModel(spec=spec, source=source, pipes=pipes, device=device, dtype=dtype, load_s=load_s, extras=extras)


class PipelineCache:
    """All models of one family, loaded at start and kept for the life of the process."""

    def __init__(self, registry: Registry, settings: Settings, family: str, device: torch.device | None = None):
        self.registry = registry
        self.settings = settings
        self.family = family
        self.device = device or pick_device(settings.device)
        self.models: dict[str, LoadedModel] = {}

    def warm(self) -> float:
        t0 = time.perf_counter()
        for spec in self.registry.family_models(self.family):
            self.get(spec.name)
        return time.perf_counter() - t0

    def get(self, name: str) -> LoadedModel:
        if name not in self.models:
            spec = self.registry.get(name)
            if spec.family != self.family:
                raise ValueError(f"model {name!r} belongs to family {spec.family!r}, this worker serves {self.family!r}")
            self.models[name] = load_model(spec, self.settings, self.device)
        return self.models[name]

