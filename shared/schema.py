"""The job format: pydantic models validated at every boundary (CLI, client, HTTP API, worker).

A job is a chain of stages; a plain img2img job is a one-stage chain. Images are passed
by reference (``s3://``, ``https://``, ``data:`` URI); the client turns local paths and
``data:`` URIs into content-addressed ``s3://`` references before anything is queued, so
no blob ever travels through the broker.
"""
from __future__ import annotations

import re
import secrets
import time
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STEPS = 500
MAX_SIDE = 4096
MAX_PROMPT_CHARS = 4000
MAX_STAGES = 16
MAX_IMAGES = 16
SEED_MAX = 2**63 - 1

Task = Literal["text2img", "img2img", "controlnet_img2img", "latent_upscale", "upscale"]
ImageFormat = Literal["png", "webp", "jpeg"]
_KEY_RE = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class EaselModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerRecord(BaseModel):
    """What workers write and clients read back (manifests): a field a newer worker adds is
    ignored by an older client instead of making the result unreadable mid-upgrade."""

    model_config = ConfigDict(extra="ignore")


def check_image_ref(ref: str) -> str:
    """Accept the reference forms a queued job may hold; refuse anything else by name."""
    if not isinstance(ref, str) or not ref:
        raise ValueError("image reference must be a non-empty string")
    if len(ref) > 2048 and not ref.startswith("data:"):
        raise ValueError("image reference longer than 2048 characters")
    if _CONTROL_CHARS.search(ref[:4096]):
        raise ValueError("image reference contains control characters")
    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"s3 reference must be s3://bucket/key, got {ref!r}")
        if key.startswith("/") or any(part in ("..", ".") for part in key.split("/")):
            raise ValueError(f"s3 key may not contain '..', '.' or a leading '/': {ref!r}")
        return ref
    if ref.startswith(("https://", "http://")):
        return ref
    if ref.startswith("data:image/") and ";base64," in ref[:64]:
        return ref
    raise ValueError(
        "image reference must be s3://bucket/key, https://..., or data:image/...;base64,... "
        f"(local paths are uploaded by the client/CLI first); got {ref[:80]!r}"
    )


ImageRef = Annotated[str, Field(max_length=80_000_000)]


# Tasks that denoise only the last ``strength`` of their ``steps``, as diffusers' img2img does.
STRENGTH_TASKS = ("img2img", "controlnet_img2img")


class Stage(EaselModel):
    """One pipeline call. The defaults are SD 1.5 img2img settings, for every model: set
    strength, guidance_scale and steps for others (diffusers' own defaults, which the img2img
    guide's snippets use, are strength 0.3 for the SDXL refiner and Kandinsky 2.2, and 75
    steps for the upscalers)."""

    task: Task = "img2img"
    model: str = Field(min_length=1, max_length=128)
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    prompt_syntax: Literal["plain", "compel"] = "plain"
    strength: float = Field(default=0.8, gt=0.0, le=1.0)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0)
    steps: int = Field(default=30, ge=1, le=MAX_STEPS)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    width: int | None = Field(default=None, ge=8, le=MAX_SIDE, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=MAX_SIDE, multiple_of=8)
    control_image: ImageRef | None = None
    controlnet: str | None = Field(default=None, max_length=128)
    controlnet_conditioning_scale: float = Field(default=1.0, ge=0.0, le=10.0)
    noise_level: int = Field(default=20, ge=0, le=350)

    @field_validator("model", "controlnet")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _KEY_RE.match(v):
            raise ValueError(f"model names are letters, digits, '.', '_' and '-': {v[:64]!r}")
        return v

    @field_validator("control_image")
    @classmethod
    def _control_ref(cls, v: str | None) -> str | None:
        return None if v is None else check_image_ref(v)

    @model_validator(mode="after")
    def _task_fields(self) -> "Stage":
        if self.task == "controlnet_img2img" and not self.control_image:
            raise ValueError("controlnet_img2img needs control_image")
        if self.task != "controlnet_img2img" and (self.control_image or self.controlnet):
            raise ValueError(f"control_image/controlnet only apply to controlnet_img2img, not {self.task}")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if self.task in STRENGTH_TASKS and int(self.steps * self.strength) < 1:
            # diffusers denoises int(steps * strength) steps: none at all fails deep in the call
            raise ValueError(f"{self.task} runs int(steps x strength) denoising steps, and "
                             f"int({self.steps} x {self.strength}) is 0: raise steps or strength")
        return self


class JobInput(EaselModel):
    image: ImageRef | None = None

    @field_validator("image")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return None if v is None else check_image_ref(v)


class OutputSpec(EaselModel):
    format: ImageFormat = "png"
    quality: int = Field(default=95, ge=1, le=100)
    keep_intermediates: bool = False


class JobSpec(EaselModel):
    """What a producer submits."""

    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    priority: int = Field(default=5, ge=0, le=9, description="0 runs first, 9 last (Celery-on-Redis order).")
    tenant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description=(
        "who the farm is shared with fairly (stride scheduling by weight); the HTTP API sets it to the "
        "API key's name. Unset: `default`"))
    input: JobInput = Field(default_factory=JobInput)
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    output: OutputSpec = Field(default_factory=OutputSpec)
    handoff: Literal["auto", "image"] = Field(
        default="auto", description="auto: easel hands latents on where it can; image: always decode and "
                                    "re-encode between stages (for comparing quality, or debugging).")

    @field_validator("idempotency_key")
    @classmethod
    def _idem(cls, v: str | None) -> str | None:
        if v is not None and _CONTROL_CHARS.search(v):
            raise ValueError("idempotency_key contains control characters")
        return v

    def with_seeds(self) -> "JobSpec":
        """Fix every stage's seed at submission so the manifest and a resubmission reproduce it."""
        stages = [s if s.seed is not None else s.model_copy(update={"seed": secrets.randbelow(2**31)}) for s in self.stages]
        return self.model_copy(update={"stages": stages})


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


TERMINAL_STATES = frozenset(state.value for state in JobState if state.terminal)  # as a record stores them


Handoff = Literal["none", "image", "latent"]


class Segment(EaselModel):
    """Consecutive stages on one family: one task on one worker, latents kept on the device."""

    family: str
    queue: str
    stages: list[int]
    handoff_in: Handoff


class Plan(EaselModel):
    segments: list[Segment]
    handoffs: list[Handoff] = Field(description="handoffs[i] is how stage i receives its input.")


class Progress(EaselModel):
    stage: int = 0
    step: int = 0
    total_steps: int = 0


class Attempt(WorkerRecord):
    """One delivery of a segment that started on a worker."""

    segment: int
    worker: str = Field(description="hostname of the worker process")
    instance: str = Field(description="id of that worker process (a restarted process gets a new one)")
    started_at: float
    ended: str | None = Field(default=None, description="set when recovery took the delivery away, and why")


class JobStatus(EaselModel):
    id: str
    state: JobState
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = Field(default_factory=Progress)
    error: str | None = None
    outputs: list[str] = Field(default_factory=list)
    manifest: str | None = None
    attempts: int = Field(default=0, description=(
        "deliveries that started: one per family's turn in a chain, plus one per re-run (a retry, or a worker "
        "that died); the manifest's attempts list them"))
    worker: str | None = Field(default=None, description="hostname of the worker that ran (or runs) it last")
    note: str | None = Field(default=None, description="what recovery did last, e.g. 'requeued: worker X stopped "
                             "beating at T' or 'retry 1 of 8 after <error>, sent again in 0.6s'")
    queue_position: int | None = Field(default=None, description="0 = next in its family queue; only while queued")
    eta_s: float | None = Field(default=None, description=(
        "seconds until it should start, from the jobs ahead of it, its family's live workers and their recent "
        "seconds per job; only while queued, and only once the family's workers have run jobs"))
    waiting_for: str | None = Field(default=None, description=(
        "why a queued job cannot start, e.g. 'no live worker serves family sd15 (none for 2m10s)', or that "
        "its family's queue is paused"))


class StageRecord(WorkerRecord):
    model_config = ConfigDict(protected_namespaces=())  # model_source is a field, not pydantic's

    index: int
    task: Task
    model: str
    model_source: str
    model_revision: str | None
    family: str
    handoff_in: Handoff
    handoff_out: Handoff
    params: dict
    seeds: list[int]
    output_size: tuple[int, int] | None
    timings_s: dict[str, float] = Field(description=(
        "seconds by phase: input (reading the segment's input; its first stage only), prepare (prompt encoding "
        "and call set-up), denoise (the pipeline call, VAE decode included), intermediates (writing kept "
        "intermediate images, when asked for)"))
    batch_size: int = Field(default=1, description="jobs that shared this stage's pipeline call (micro-batching)")
    intermediates: list[str] = Field(default_factory=list)
    worker: str


class Manifest(WorkerRecord):
    """Written next to the images: enough to reproduce and to account for every second."""

    job_id: str
    spec: JobSpec
    stages: list[StageRecord]
    outputs: list[str]
    timings_s: dict[str, float] = Field(description=(
        "seconds: queued (from submission to the first claim), stages (the stages' phases summed), total "
        "(from submission to the manifest)"))
    created_at: float
    finished_at: float = Field(default_factory=time.time)
    easel_version: str
    versions: dict[str, str]
    attempts: list[Attempt] = Field(default_factory=list, description="every delivery that started, in order")
    registry: str = Field(default="", description="the worker's model registry (EASEL_MODELS; `tiny` for the "
                          "bundled random-weight checkpoints); each stage names its weights' source and revision")
