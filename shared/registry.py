"""The model registry: which checkpoints exist, which family (queue) serves each, and how.

Swapping tiny test weights for real ones is an edit here (``source``), nothing else.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from easel.shared.schema import Task
from easel.shared.settings import queue_name_part

# ``sim`` is a simulated GPU for benchmarks and scale tests: it sleeps ``sim_step_s`` per step.
PipelineKind = Literal["sd", "sdxl-refiner", "kandinsky22", "sd-latent-upscaler", "sd-x4-upscaler", "sim"]

# What each pipeline kind can do, and which tasks take latents in (the rest take images).
KIND_TASKS: dict[str, set[str]] = {
    "sd": {"text2img", "img2img", "controlnet_img2img"},
    "sdxl-refiner": {"img2img"},
    "kandinsky22": {"img2img"},
    "sd-latent-upscaler": {"latent_upscale"},
    "sd-x4-upscaler": {"upscale"},
    "sim": {"text2img", "img2img"},
}
# (kind, task) pairs whose pipeline accepts a latent tensor as ``image=`` without VAE encode.
LATENT_IN: set[tuple[str, str]] = {
    ("sd", "img2img"),
    ("sdxl-refiner", "img2img"),
    ("sd-latent-upscaler", "latent_upscale"),
}
# (kind, task) pairs whose pipeline can return latents (``output_type="latent"``).
LATENT_OUT: set[tuple[str, str]] = {
    ("sd", "text2img"),
    ("sd", "img2img"),
    ("sd", "controlnet_img2img"),
    ("sdxl-refiner", "img2img"),
    ("sd-latent-upscaler", "latent_upscale"),
}
# Kinds whose text encoder Compel can weight (prompt_syntax: compel).
COMPEL_KINDS: set[str] = {"sd", "sdxl-refiner", "sd-x4-upscaler"}
# Tasks refused after a stage in another latent space, and sized only by what they are given
# (a first stage of this task encodes the input image with its own VAE).
LATENT_ONLY_AFTER_STAGE: set[str] = {"latent_upscale"}

# Output side over input side, per kind whose output is larger than its input.
UPSCALE: dict[str, int] = {"sd-x4-upscaler": 4, "sd-latent-upscaler": 2}


class StepCache(BaseModel):
    """DeepCache-style step caching (worker/stepcache.py): the UNet's deep blocks run on one
    pass in ``interval`` and their outputs are reused on the passes between, where only the
    shallow blocks (down/up block pairs ``0..branch``) run."""

    model_config = ConfigDict(extra="forbid")
    interval: int = Field(default=3, ge=1, description="a full UNet pass every this many passes; 1 = no caching")
    branch: int = Field(default=0, ge=0, description=(
        "the deepest down/up block pair recomputed on cached passes (0 = outermost only: fastest, most approximate)"))


class Optimizations(BaseModel):
    """The guide's memory/speed switches, per model."""

    model_config = ConfigDict(extra="forbid")
    sdpa: bool = True
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    compile_unet: bool = False
    compile_vae: bool = Field(default=False, description=(
        "`torch.compile` the VAE decoder (mode reduce-overhead, fullgraph) like the UNet"))
    channels_last: bool = Field(default=False, description=(
        "UNet and VAE weights in channels-last memory format (NHWC: faster convolutions on tensor cores)"))
    fuse_qkv: bool = Field(default=False, description=(
        "fuse each attention's query/key/value projections into one matmul (diffusers `fuse_qkv_projections`); "
        "needs `sdpa: true` and no `attention_slicing`"))
    attention_slicing: bool = False
    step_cache: StepCache | None = Field(default=None, description=(
        "reuse the UNet's deep features between steps (DeepCache): `{interval: 3, branch: 0}`; faster, "
        "approximate; works with `compile_unet` (two graphs: full and cached passes)"))

    @model_validator(mode="after")
    def _compatible(self) -> "Optimizations":
        if self.fuse_qkv and (not self.sdpa or self.attention_slicing):
            raise ValueError("fuse_qkv needs sdpa: true and attention_slicing: false (it sets its own fused "
                             "SDPA processors)")
        return self


# What each profile switches on. A field set explicitly in a model's ``optimizations`` wins.
# ``throughput`` is the GPU profile: CUDA graphs (compile), NHWC convolutions and fused
# attention projections; micro-batching reads ``compile_unet`` (worker/batching.py).
PROFILES: dict[str, dict[str, bool]] = {
    "default": {},
    "throughput": {"compile_unet": True, "compile_vae": True, "channels_last": True, "fuse_qkv": True},
}
Profile = Literal["default", "throughput"]


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    source: str = Field(description="hub id, local folder (absolute or relative to model_root) or s3:// prefix")
    family: str = Field(description="the worker pool (queue `<queue_prefix>.<family>`) that serves it; no ':' or spaces")
    latent_space: str
    kind: PipelineKind = "sd"
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "auto"
    variant: str | None = Field(default=None, description=(
        "load `source`'s files of this variant (e.g. fp16); its ControlNets and prior load their default files"))
    revision: str | None = Field(default=None, description=(
        "`source`'s branch, tag or commit on the Hub; its ControlNets and prior load their default revision"))
    controlnets: dict[str, str] = Field(default_factory=dict, description="name -> source of ControlNets for this model")
    prior: str | None = Field(default=None, description="Kandinsky prior source")
    profile: Profile = Field(default="default", description=(
        "a set of optimizations: `throughput` = compile_unet, compile_vae, channels_last, fuse_qkv; fields set "
        "in `optimizations` win over it"))
    optimizations: Optimizations = Field(default_factory=Optimizations)
    sim_step_s: float = Field(default=0.05, ge=0, description="kind sim only: seconds each step sleeps")
    timeout_per_mpx_step_s: float | None = Field(default=None, ge=0, description=(
        "this model's stage time allowance per step and SD-equivalent megapixel; "
        "EASEL_STAGE_TIMEOUT_PER_MPX_STEP_S if unset"))

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        return queue_name_part(v, "family")

    @model_validator(mode="after")
    def _tasks(self) -> "ModelSpec":
        if self.kind not in KIND_TASKS:
            raise ValueError(f"unknown pipeline kind {self.kind}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, data: object) -> object:
        """Resolve ``profile`` into ``optimizations`` here, so every consumer reads only
        ``spec.optimizations``; the fields a model sets itself stay as it set them."""
        if not isinstance(data, dict):
            return data
        preset = PROFILES.get(data.get("profile", "default"))
        if not preset:
            return data  # default, or an unknown name the field's own validation refuses
        given = data.get("optimizations") or {}
        if isinstance(given, Optimizations):
            given = given.model_dump(exclude_unset=True)
        return {**data, "optimizations": {**preset, **given}}

    def supports(self, task: Task) -> bool:
        return task in KIND_TASKS[self.kind]

    @staticmethod
    def resolve(source: str, model_root: Path) -> str:
        """Relative names resolve under model_root; s3:// prefixes, absolute paths and hub ids stay."""
        if source.startswith("s3://") or Path(source).is_absolute():
            return source
        local = Path(model_root) / source
        return str(local) if local.exists() or "/" not in source else source


class Registry(BaseModel):
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _names(self) -> "Registry":
        for name, spec in self.models.items():
            spec.name = name
        return self

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(self.models))}") from None

    def families(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, spec in self.models.items():
            out.setdefault(spec.family, []).append(name)
        return out

    def family_models(self, family: str) -> list[ModelSpec]:
        specs = [s for s in self.models.values() if s.family == family]
        if not specs:
            raise KeyError(f"unknown family {family!r}; known: {', '.join(sorted(self.families()))}")
        return specs

    @classmethod
    def load(cls, path: Path) -> "Registry":
        data = yaml.safe_load(Path(path).read_text())
        return cls.model_validate(data)


BUNDLED = Path(__file__).with_name("models.yaml")
TINY = "tiny"  # EASEL_MODELS=tiny: the bundled registry of tiny random-weight checkpoints


def registry_name(path: Path | str | None) -> str:
    """What a manifest records as the registry: its file, or ``tiny`` for the bundled one."""
    return TINY if path is None or str(path) == TINY else str(Path(path).resolve())


@lru_cache(maxsize=8)
def load_registry(path: Path | None = None) -> Registry:
    """The registry at ``path``; the bundled tiny one for ``tiny`` or None (producers only
    validate model names with it; a worker refuses to start without EASEL_MODELS)."""
    return Registry.load(BUNDLED if registry_name(path) == TINY else path)
