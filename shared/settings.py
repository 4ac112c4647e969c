"""Settings from ``EASEL_*`` environment variables, one object shared by producer and worker."""
from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def queue_name_part(value: str, what: str) -> str:
    """``value`` if it can be part of a queue name (``<queue_prefix>.<family>``). The broker
    names a queue's priority lists ``<queue>:<n>`` and finds a popped message's queue by the
    last ':', so a ':' in the name would send each message back to a queue nobody consumes."""
    if not value or ":" in value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot name a queue: it must be non-empty, without ':' or spaces")
    return value


def secret_keys(secrets: str) -> list[bytes]:
    """The signing keys of a webhook secret setting: space-separated ``whsec_<base64>`` (or
    raw) secrets. Raises ValueError naming the secret's place for a malformed one."""
    keys = []
    for n, secret in enumerate(secrets.split(), 1):
        if secret.startswith("whsec_"):
            b64 = secret[len("whsec_"):]
            try:  # padding is optional, as in the spec's libraries
                keys.append(base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True))
            except binascii.Error:
                raise ValueError(f"webhook secret {n} starts with whsec_ but the rest is not base64") from None
        else:
            keys.append(secret.encode())
    return keys


def _valid_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None:
        secret_keys(value.get_secret_value())
    return value


WebhookEvent = Literal["queued", "started", "progress", "succeeded", "failed", "cancelled"]


class ApiKey(BaseModel):
    """One HTTP API key. Only its sha256 is configured: a leaked config file leaks no key.

    Limits left unset fall back to the ``api_*`` defaults on Settings.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Owner name; jobs are visible to this key only.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the bearer token")
    rate_per_min: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1, description="cap on this key's queued+running jobs")
    webhook_secret: SecretStr | None = Field(default=None, description="signs this key's webhooks; else webhook_secret")
    webhook_events: list[WebhookEvent] = Field(default=["succeeded", "failed", "cancelled"],
                                               description="the events this key's webhooks carry")
    admin: bool = Field(default=False, description="sees every job, may reference any s3:// object")
    over_cap: Literal["refuse", "hold"] = Field(default="refuse", description=(
        "beyond max_in_flight, refuse: a submission gets 429 and the reason; hold: it is accepted and waits "
        "in the key's pending set while max_in_flight of its jobs are dispatched and not ended"))
    weight: float = Field(default=1.0, gt=0, le=1000, description=(
        "this key's share of the farm against other backlogged keys (fair share: 2 gets twice a 1's work)"))

    _webhook_secret = field_validator("webhook_secret")(_valid_secret)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EASEL_", extra="ignore", protected_namespaces=())

    redis_url: str = "redis://127.0.0.1:6379/0"
    # TLS for rediss:// URLs (broker and job records). Verified against the system CAs unless
    # redis_ssl_ca_certs is set; "none" turns verification off (never do that in production).
    redis_ssl_ca_certs: Path | None = None
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    redis_ssl_certfile: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    redis_ssl_keyfile: Path | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str = "easel"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    models: Path | None = Field(default=None, description=(
        "model registry YAML; `tiny` for the bundled tiny random-weight checkpoints (demo, tests). A worker "
        "refuses to start without it"))
    model_root: Path = Field(default=Path.home() / ".cache" / "easel" / "models",
                             description="Folder that relative registry sources resolve against.")
    queue_prefix: str = Field(default="easel", description=(
        "first part of every queue name (`<prefix>.<family>`); no ':' or spaces"))
    # Limits on inputs.
    max_image_pixels: int = 4096 * 4096
    max_input_bytes: int = 50 * 1024 * 1024
    max_side: int = 4096
    allow_private_urls: bool = False
    url_fetch_timeout_s: float = Field(default=60.0, gt=0, description="total time for one https image download")
    # Worker behaviour.
    job_ttl_s: int = Field(default=7 * 24 * 3600, gt=0, description=(
        "seconds a job's record (its status) is kept in Redis; at most retention_days, so a status never "
        "points at results that are gone"))
    retention_days: int = Field(default=7, ge=0, description=(
        "days job outputs, manifests, hand-offs and uploaded inputs stay in the bucket: an S3 lifecycle rule "
        "on the jobs/, inputs/ and uploads/ prefixes where the server takes one, else a sweep by one worker "
        "an hour; 0 = kept until you delete them"))
    device: str | None = None  # "cuda", "cpu"; auto when unset
    # Stage time limits (worker/watchdog.py): the cost model's allowance, base + per_mpx_step x steps x
    # SD-equivalent megapixels x images, until the stage's first steps give its pace; then up to
    # stage_timeout_slack x what that pace projects; never over stage_timeout_max_s.
    stage_timeout_base_s: float = 120.0
    stage_timeout_per_mpx_step_s: float = Field(default=5.0, ge=0, description=(
        "seconds per step and SD-equivalent megapixel (the denoised latent area x 64: 0.26 for a 512 px SD "
        "image, 16.8 for the x4 upscaler's 512 px input); a model's timeout_per_mpx_step_s overrides it"))
    stage_timeout_slack: float = Field(default=3.0, ge=1.0, description=(
        "a stage may take this many times what its first steps' pace projects"))
    stage_timeout_max_s: float = Field(default=4 * 3600.0, gt=0, description="no stage runs longer than this")
    stage_compile_allowance_s: float = Field(default=600.0, ge=0, description=(
        "added to the time limit of a compiled model's first call of a kind its warm-up did not make (another "
        "input size, a ControlNet, a batch size): that call compiles before its first step"))
    stage_stuck_grace_s: float = 60.0
    progress_interval_s: float = Field(default=0.25, ge=0.0, le=60.0, description=(
        "a running stage writes step progress once this long after its first step, then at most this often "
        "(0 = every step; each write is two Redis commands per job); "
        "cancels do not wait for it: they are pushed to the worker and checked at every step"))
    input_cache_mb: int = Field(default=256, ge=0, description=(
        "decoded input images a worker keeps, by content-addressed s3 key (inputs/<sha256>-<width>x<height>); 0 = off"))
    overlap_finish: bool | None = Field(default=None, description=(
        "encode and upload a job's outputs while the worker runs the next job (see worker/finisher.py); "
        "unset = on when the worker runs on a GPU, off on the CPU, where the encode would take cores from "
        "the next job's denoising instead of overlapping it"))
    overlap_finish_wait_s: float = Field(default=0.03, ge=0.0, le=5.0, description=(
        "an overlapped finish waits for the next job's pipeline call to reach its first denoising step, so it "
        "does not compete with the fetch, claim and prologue (preprocessing, VAE encode) of that job; when no "
        "next job starts within this many seconds it runs then; a job that leaves its queue empty (the last of a "
        "burst, a lone job) finishes at once"))
    max_pending_finishes: int = Field(default=2, ge=1, le=64, description="finishes waiting at once per worker")
    torch_threads: int | None = Field(default=None, ge=1, le=1024, description=(
        "torch's CPU threads (intra-op) in a worker process; unset = 1 on a GPU (its CPU ops are one image's "
        "pre/postprocessing, and a parallel region stalls whenever one of its cores is busy with the finisher, "
        "the servers or another GPU's process), torch's default (every core) on the CPU"))
    heartbeat_interval_s: float = Field(default=3.0, gt=0, description=(
        "how often a worker process renews its heartbeat in Redis"))
    heartbeat_ttl_s: float = Field(default=15.0, gt=0, description=(
        "a worker process whose heartbeat is older than this is dead: its running jobs go back to their queues; "
        "keep it several heartbeat intervals long"))
    reap_every_s: float = Field(default=5.0, gt=0, description=(
        "how often each worker and API process looks for dead worker processes' jobs to requeue"))
    max_crash_deliveries: int = Field(default=2, ge=1, description="a segment whose worker died this often is poison")
    max_retries: int = Field(default=8, ge=0, description=(
        "retries of transient errors; each waits a random time up to 1 s, doubling per retry, cap 30 s"))
    # Compiled models (registry optimizations compile_unet / compile_vae, profile throughput).
    compile_cache_dir: Path | None = Field(default=None, description=(
        "torch.compile's caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and a saved artifacts file), so a "
        "restarted worker loads compiled graphs instead of compiling for minutes; unset = <model_root>/.compile-cache"))
    compile_warm_sizes: list[int] = Field(default_factory=list, description=(
        "square input sides in pixels a compiled worker compiles for while it warms, before taking jobs; empty = "
        "the model's native size (512 for SD 1.5)"))
    vae_tiling_above_px: int = Field(default=1024 * 1024, ge=0, description=(
        "a pipeline call whose output has more pixels than this encodes and decodes with VAE tiling (models with "
        "vae_tiling: true always do); 0 = never. The default keeps 1024x1024 (SDXL's native size) untiled and "
        "tiles a 2048 px x4-upscaler output, whose VAE would otherwise attend over 512x512 latent pixels at once"))
    # Micro-batching (worker/adaptive.py, worker/batching.py): compatible queued jobs run as one pipeline call.
    batch_size: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(default="auto", description=(
        "micro-batching: up to this many compatible queued jobs run as one pipeline call (1 = off); auto = the "
        "largest of batch_buckets on a GPU when the family has a model that batches (kinds sd, sdxl-refiner, sim), "
        "else 1 (always 1 on the CPU)"))
    batch_buckets: list[int] = Field(default=[1, 2, 4, 8], min_length=1, description=(
        "call sizes (images) a compiled UNet (compile_unet) is run at: a smaller group is padded to the next "
        "bucket, so CUDA graphs keep one capture per bucket; an eager model runs the group's own size. Must "
        "hold 1 (a lone job is never padded)"))
    batch_wait_s: float = Field(default=0.05, ge=0.0, le=10.0, description=(
        "the longest a partial batch waits for more jobs while they keep arriving"))
    batch_idle_s: float | None = Field(default=None, ge=0.0, le=10.0, description=(
        "a partial batch runs once no further message arrived for this long (the queue is empty), so a lone job "
        "runs at once; keep it a few broker round trips long. Unset: 0.005 with batch_size auto; off with a "
        "hand-set batch_size (a partial batch then waits batch_wait_s)"))
    batch_latency_target_s: float | None = Field(default=None, gt=0, description=(
        "with it, a batch is the largest bucket whose measured call time fits this many seconds; unset = "
        "the largest bucket whenever the queue holds that many jobs"))
    # Operations: HTTP API, webhooks, metrics. EASEL_API_KEYS is JSON: [{"name":..,"sha256":..}].
    api_keys: list[ApiKey] = Field(default_factory=list)
    api_keys_file: Path | None = Field(default=None, description="YAML/JSON list of ApiKey, merged with api_keys")
    api_rate_per_min: float = Field(default=600.0, gt=0, description="per-key token refill rate, all /v1 requests")
    api_burst: int = Field(default=60, ge=1)
    api_max_in_flight: int = Field(default=1000, ge=1, description="per-key cap on queued+running jobs")
    api_presign_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    api_sse_max_s: float = Field(default=3600.0, gt=0, description="an SSE stream closes after this; clients reconnect")
    api_sse_max_streams: int = Field(default=1000, ge=1, description=(
        "SSE streams one API process serves at once (each holds a Redis connection); more get 503 and Retry-After. "
        "The last quarter is kept for keys holding less than a quarter"))
    api_max_body_bytes: int = Field(default=160 * 1024 * 1024, ge=64 * 1024, description=(
        "largest request body the API reads, uploads' aside (those may be max_input_bytes plus the form's "
        "framing); a larger one gets 413, and the rest of it is not read. The default holds a job with two images inline as "
        "data: URIs at the job schema's 80 MB cap each (a 50 MiB image is 70 MB of base64), an input and a "
        "control image, and the rest of the job; send more or larger images through POST /v1/uploads"))
    api_max_bodies_in_flight_bytes: int = Field(default=512 * 1024 * 1024, ge=64 * 1024, description=(
        "request body bytes one API process holds at once, counted as they arrive and until the request is "
        "answered; a body whose declared length does not fit gets 503 and Retry-After before it is read, one "
        "sent without a length once it passes the budget. Other requests' bytes only count: a body under the "
        "caps alone on the process is always read"))
    s3_public_endpoint_url: str | None = Field(default=None, description="endpoint presigned URLs are made for "
                                               "(what API clients can reach); s3_endpoint_url if unset")
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(default=20, ge=1, description=(
        "attempts at a terminal event; with the default backoff they span about 9 hours"))
    webhook_backoff_s: float = Field(default=2.0, gt=0, description=(
        "first retry delay (±20 % jitter); doubles per attempt"))
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0, description=(
        "time allowed for one webhook POST, from the connection to the answer's status"))
    webhook_sweep_s: float = Field(default=1.0, gt=0, description="how often the dispatcher looks for job events")
    webhook_progress_every_s: float = Field(default=5.0, gt=0, description="progress webhooks at most this often a job")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="worker Prometheus port; 0 = off. "
                              "Process k of a multi-GPU launcher binds port + GPU index.")
    # Logs (shared/logs.py) of workers, `easel worker` and `easel api`.
    log_format: Literal["auto", "text", "json"] = Field(default="auto", description=(
        "json: one JSON object a line, with job_id, segment, worker and family as fields; text: for a terminal; "
        "auto: text when stderr is a terminal, json otherwise"))
    # Tracing (shared/tracing.py; the `tracing` extra): one OpenTelemetry trace per job.
    tracing: Literal["none", "console", "file", "otlp", "global"] = Field(default="none", description=(
        "none: off (opentelemetry is not imported); console: spans as JSON on stderr; file: JSON lines appended to "
        "tracing_file; otlp: OTLP over HTTP per the OTEL_EXPORTER_OTLP_* variables; global: the TracerProvider "
        "the process set up itself (your application's, opentelemetry-instrument's)"))
    tracing_file: Path | None = Field(default=None, description="where EASEL_TRACING=file appends spans")

    _webhook_secret = field_validator("webhook_secret")(_valid_secret)

    @field_validator("queue_prefix")
    @classmethod
    def _queue_prefix(cls, v: str) -> str:
        return queue_name_part(v, "queue_prefix")

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if 1 not in v or any(not 1 <= b <= 64 for b in v):
            raise ValueError(f"batch_buckets must hold 1 and sizes from 1 to 64, not {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _liveness(self) -> "Settings":
        if self.heartbeat_ttl_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_ttl_s ({self.heartbeat_ttl_s}) must be more than twice heartbeat_interval_s "
                             f"({self.heartbeat_interval_s}): one late beat must not make a live worker dead")
        if self.retention_days and self.job_ttl_s > self.retention_days * 86400:
            raise ValueError(f"job_ttl_s ({self.job_ttl_s}) must be at most retention_days ({self.retention_days}) "
                             "x 86400: a job's status must not outlive its results")
        return self

    def redis_ssl_kwargs(self) -> dict[str, str]:
        """redis-py / kombu connection kwargs for a rediss:// URL; {} for redis://."""
        if not self.redis_url.startswith("rediss://"):
            return {}
        kw = {"ssl_cert_reqs": self.redis_ssl_cert_reqs}
        for k in ("ca_certs", "certfile", "keyfile"):
            if getattr(self, f"redis_ssl_{k}") is not None:
                kw[f"ssl_{k}"] = str(getattr(self, f"redis_ssl_{k}"))
        return kw

    def s3_credentials(self) -> dict[str, str]:
        if self.s3_access_key_id and self.s3_secret_access_key:
            return {
                "aws_access_key_id": self.s3_access_key_id,
                "aws_secret_access_key": self.s3_secret_access_key.get_secret_value(),
            }
        return {}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
