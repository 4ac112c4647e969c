"""Request and response bodies of the HTTP API (they are its OpenAPI schema)."""
from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from easel.shared.schema import JobSpec, JobState


class JobRequest(JobSpec):
    """A job (see JobSpec) plus what only the HTTP API offers: a completion webhook.

    Images must be references the server may read: ``s3://`` objects from an upload
    (``/v1/uploads``), public ``https://`` URLs, or inline ``data:image/...;base64,`` URIs.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "input": {"image": "s3://easel/inputs/0f343b0931126a20f133d67c2b018a3b1e3a2f8a5b0b8d2c7e0f3e8b3c2a1d4e-512x512.png"},
        "stages": [{"task": "img2img", "model": "sd15", "prompt": "an astronaut in a jungle", "strength": 0.8,
                    "steps": 30, "seed": 42}]}]})

    webhook_url: AnyHttpUrl | None = Field(
        default=None, description="POSTed a signed JSON event when the job succeeds, fails or is cancelled.")

    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(exclude={"webhook_url"}))


class Link(BaseModel):
    uri: str = Field(description="s3:// location")
    url: str = Field(description="presigned GET URL")
    expires_at: float = Field(description="unix time the URL stops working")


class ProgressOut(BaseModel):
    stage: int
    stages: int
    step: int
    total_steps: int


class WebhookOut(BaseModel):
    url: str
    # "not requested": the job ended in a state its key's webhook_events leave out
    state: Literal["pending", "delivering", "delivered", "failed", "not requested"]
    attempts: int = 0
    last_error: str | None = None


class JobResponse(BaseModel):
    """A job's state; finished jobs carry presigned URLs for their images and manifest."""

    model_config = ConfigDict(json_schema_extra={"example": {
        "id": "3f1c...", "state": "succeeded", "outputs": [{"uri": "s3://easel/jobs/3f1c.../output/0.png",
                                                             "url": "https://...", "expires_at": 1760000000.0}]}})
    id: str
    state: JobState
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: ProgressOut
    error: str | None = None
    attempts: int = 0
    eta_s: float | None = Field(default=None, description="while queued: seconds until it should start")
    waiting_for: str | None = Field(default=None, description="while queued: why it cannot start, if it cannot")
    note: str | None = Field(default=None, description=(
        "what recovery did last: a retry waiting out its backoff, a worker that stopped beating"))
    outputs: list[Link] = Field(default_factory=list)
    manifest: Link | None = None
    webhook: WebhookOut | None = None
    links: dict[str, str] = Field(default_factory=dict, description="self and events (SSE) paths")


class UploadResponse(BaseModel):
    image: str = Field(description="s3:// reference to put in input.image or control_image")
    bytes: int
    width: int
    height: int


class PresignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content_type: Literal["image/png", "image/jpeg", "image/webp"] = "image/png"


class PresignResponse(BaseModel):
    method: Literal["POST"] = "POST"
    url: str = Field(description="POST a multipart form here: every field of `fields`, then the image as `file`")
    fields: dict[str, str] = Field(description="form fields, policy and signature included; the S3 server refuses "
                                   "a file over EASEL_MAX_INPUT_BYTES or of another content type")
    max_bytes: int
    image: str = Field(description="s3:// reference to use in the job once the upload succeeded")
    expires_at: float


class QueueOut(BaseModel):
    family: str
    queue: str
    waiting: int = Field(description="the family's backlog: `messages` + `pending`")
    messages: int = Field(description="messages in the broker queue, all priority sub-lists together (a few per "
                                      "live worker: the rest wait in `pending`)")
    pending: int = Field(description="jobs pending their tenant's turn (fair share), not yet sent to the broker")
    by_priority: dict[str, int] = Field(description="broker messages per priority sub-list (0 runs first)")
    workers: int


class FieldError(BaseModel):
    """One reason a request failed validation."""

    loc: list[str | int] = Field(description="where: `body`, `header`, `path` or `query`, then the field's path")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. `missing`, `less_than_equal`, `json_invalid`")


class Problem(BaseModel):
    """The body of every error response (but /readyz's 503, which reports its checks as ``Health``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "stages.0.strength: Input should be less than or equal to 1",
         "errors": [{"loc": ["body", "stages", 0, "strength"], "msg": "Input should be less than or equal to 1",
                     "type": "less_than_equal"}]},
        {"detail": "invalid API key"}]})
    detail: str = Field(description="what went wrong, written for people")
    errors: list[FieldError] = Field(
        default_factory=list, description="request validation errors, one per problem, the first 20 (`detail` "
                                          "counts the rest); present only when the request itself failed validation")


class ProgressEvent(BaseModel):
    """SSE `progress`: a denoising step of a running stage."""

    stage: int
    step: int
    total_steps: int


class StateEvent(BaseModel):
    """SSE `state`: a transition that does not end the job (queued -> running, a hand-off to
    the next segment, a retry or a recovery back to queued)."""

    state: JobState
    segment: int | None = None
    worker: str | None = None
    updated_at: float | None = None
    note: str | None = Field(default=None, description="why it went back to queued, when it did")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
