"""The HTTP API: submit, follow (SSE), cancel and fetch jobs; uploads; health; metrics.

A thin layer over ``EaselClient``: the same validation, planning and queueing as the CLI,
plus what a shared network service needs: bearer keys (stored as sha256), per-key rate
limits and in-flight caps kept in Redis (shared by every replica), per-key job
visibility, presigned result URLs and signed webhooks. Blocking Redis/S3 calls run in
FastAPI's thread pool; only the SSE stream is async (it waits on Redis pub/sub).
"""

import asyncio
import json
import hashlib
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterable

import boto3
import botocore.exceptions
import redis
import redis.asyncio as aioredis
from botocore.config import Config
from fastapi import Depends, FastAPI, File, Header, HTTPException, Path, Request, Response, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from easel.producer.api.metrics import ApiMetrics, MetricsMiddleware
from easel.producer.api.models import (Health, JobRequest, JobResponse, Link, PresignRequest, PresignResponse, Problem,
                                 ProgressOut, QueueOut, UploadResponse, WebhookOut)
from easel.producer.api.security import InFlight, KeyRing, Principal, RateLimiter
from easel.producer.client import EaselClient, SubmitError
from easel.producer.webhooks import WebhookDispatcher
from easel.shared.celery_app import UnackedMessages, queue_name, send_segment
from easel.shared.images import InputError, check_public_url, decode_image, image_ext
from easel.shared.jobstore import JobStore
from easel.shared.liveness import Reaper
from easel.shared.metrics import live_workers_by_family, queue_depths
from easel.shared.schema import JobSpec, JobState
from easel.shared.settings import Settings, get_settings
from easel.shared.storage import Storage

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex characters)")]
_EXT = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_ERRORS = {401: {"model": Problem, "description": "missing or invalid API key"},
           429: {"model": Problem, "description": "rate limit or in-flight cap reached (see Retry-After)"}}


class Api:
    """Everything a request needs, built once per app."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.client = EaselClient(settings)
        # Fail fast while Redis is away (503 + Retry-After) instead of holding request threads
        # in redis-py's multi-second reconnect backoff; workers keep the patient default.
        fast = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=3,
                                    socket_timeout=15, socket_keepalive=True, health_check_interval=30,
                                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        self.client.store = JobStore(fast, settings.queue_prefix, settings.job_ttl_s)
        self.store = self.client.store
        self.r = self.store.r
        self.keys = KeyRing(settings)
        self.limiter = RateLimiter(self.r, settings.queue_prefix)
        self.inflight = InFlight(self.r, settings.queue_prefix)
        public = settings.model_copy(update={"s3_endpoint_url": settings.s3_public_endpoint_url
                                             or settings.s3_endpoint_url})
        self.public_storage = Storage(public)
        self.families = sorted(self.client.registry.families())
        self.metrics = ApiMetrics(self.r, self.families, settings.queue_prefix)
        # Probes get their own clients with short timeouts: a hung dependency must fail the
        # probe quickly instead of holding it behind the data path's retries.
        self.probe_redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        self.probe_s3 = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            config=Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1},
                          request_checksum_calculation="when_required", response_checksum_validation="when_required",
                          s3={"addressing_style": "path"}), **settings.s3_credentials())
        self.dispatcher = WebhookDispatcher(settings, self.store, render=self.render_dict, secret_for=self.secret_for)
        self.dispatcher.on_result = lambda outcome, event: self.metrics.webhooks.labels(outcome, event).inc()
        self.reaper = Reaper(JobStore.from_settings(settings), lambda *a: send_segment(self.client.celery, *a),
                             settings.reap_every_s, settings.heartbeat_ttl_s, UnackedMessages(self.client.celery),
                             [queue_name(f, settings.queue_prefix) for f in self.client.registry.families()])

    # -- helpers ---------------------------------------------------------------------------
    def secret_for(self, owner: str | None) -> str | None:
        for k in self.keys.by_hash.values():
            if k.name == owner and k.webhook_secret:
                return k.webhook_secret.get_secret_value()
        secret = self.s.webhook_secret.get_secret_value() if self.s.webhook_secret else ""
        return secret or None  # an empty EASEL_WEBHOOK_SECRET (compose default) means none

    def link(self, uri: str) -> Link:
        ttl = self.s.api_presign_ttl_s
        return Link(uri=uri, url=self.public_storage.presign(uri, ttl), expires_at=time.time() + ttl)

    def render(self, job_id: str) -> JobResponse:
        st = self.client.status(job_id)
        hook = self.store.webhook(job_id)
        url, stages = hook["webhook_url"], hook["stages"]
        done = st.state == JobState.succeeded
        return JobResponse(
            id=st.id, state=st.state, created_at=st.created_at, updated_at=st.updated_at, started_at=st.started_at,
            finished_at=st.finished_at, error=st.error, attempts=st.attempts,
            progress=ProgressOut(stage=st.progress.stage, stages=stages, step=st.progress.step,
                                 total_steps=st.progress.total_steps),
            outputs=[self.link(u) for u in st.outputs] if done else [],
            manifest=self.link(st.manifest) if done and st.manifest else None,
            webhook=WebhookOut(url=url, state=hook["webhook_state"] or "pending",
                               attempts=int(hook["webhook_attempts"] or 0),
                               last_error=hook["webhook_last_error"] or None) if url else None,
            links={"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"})

    def render_dict(self, job_id: str) -> dict:
        return json.loads(self.render(job_id).model_dump_json())

    def owned(self, job_id: str, p: Principal) -> None:
        owner = self.store.owner(job_id)
        exists = owner is not None or (p.key.admin and self.store.exists(job_id))
        if not exists or (owner != p.name and not p.key.admin):
            raise HTTPException(404, f"no job {job_id}")

    def check_refs(self, spec: JobSpec, p: Principal) -> None:
        """s3:// references must be uploads: a key may not read other tenants' objects."""
        if p.key.admin:
            return
        b = self.s.s3_bucket
        allowed = (f"s3://{b}/inputs/", f"s3://{b}/uploads/{p.name}/")
        refs = [("input.image", spec.input.image)] + [(f"stages.{i}.control_image", st.control_image)
                                                      for i, st in enumerate(spec.stages)]
        for what, ref in refs:
            if ref and ref.startswith("s3://") and not ref.startswith(allowed):
                raise HTTPException(422, f"{what}: s3 references must come from POST /v1/uploads or "
                                         f"/v1/uploads/presign; {ref[:200]} is not readable with this key")


def create_app(settings: Settings | None = None, *, webhooks: bool = True) -> FastAPI:
    """The ASGI app. ``webhooks=False`` runs no dispatcher in this process (run one elsewhere)."""
    s = settings or get_settings()
    api = Api(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.aredis = aioredis.Redis.from_url(s.redis_url, decode_responses=True, health_check_interval=30)
        if webhooks:
            api.dispatcher.start()
        api.reaper.start()  # dead workers' jobs come back even while every worker is busy
        try:
            yield
        finally:
            api.reaper.stop()
            api.dispatcher.stop()
            await app.state.aredis.aclose()

    app = FastAPI(title="easel", version=_version(), lifespan=lifespan,
                  description="Diffusers image-to-image jobs: submit, follow (SSE), cancel, fetch. "
                              "Authenticate with `Authorization: Bearer <API key>`.")
    app.state.api = api
    app.add_middleware(MetricsMiddleware, metrics=api.metrics)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_req: Request, exc: redis.RedisError):
        return JSONResponse({"detail": f"Redis unavailable: {exc}"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(botocore.exceptions.BotoCoreError)
    async def _s3_down(_req: Request, exc: Exception):
        return JSONResponse({"detail": f"object storage unavailable: {exc}"}, status_code=503,
                            headers={"Retry-After": "5"})

    bearer = HTTPBearer(auto_error=False, description="An API key; the server stores only its sha256.")

    def principal(request: Request,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Principal:
        if creds is None:
            api.metrics.refused.labels("unauthenticated").inc()
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        p = api.keys.lookup(creds.credentials)
        if p is None:
            api.metrics.refused.labels("invalid_key").inc()
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        d = api.limiter.hit(p)
        if not d.allowed:
            api.metrics.refused.labels("rate_limited").inc()
            wait = max(1, math.ceil(d.retry_after_s))
            raise HTTPException(429, f"rate limit exceeded for key {p.name!r}: {p.rate_per_min:g} requests/minute "
                                     f"(burst {p.burst}); retry in {wait}s",
                                headers={"Retry-After": str(wait), "X-RateLimit-Limit": f"{p.rate_per_min:g}/min",
                                         "X-RateLimit-Remaining": "0"})
        request.state.principal = p
        return p

    Caller = Annotated[Principal, Depends(principal)]

    def owned_job(job_id: JobId, p: Caller) -> str:
        api.owned(job_id, p)
        return job_id

    OwnedJob = Annotated[str, Depends(owned_job)]

    # -- jobs ------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, response_model=JobResponse, tags=["jobs"],
              responses={**_ERRORS, 200: {"model": JobResponse, "description": "idempotent replay: the existing job"},
                         422: {"model": Problem, "description": "job refused, the message says why"}})
    def create_job(body: JobRequest, response: Response, p: Caller,
                   idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                                 max_length=150)] = None) -> JobResponse:
        """Queue a job. Same idempotency key (body or header) from the same API key: the same job."""
        spec = body.spec()
        key = spec.idempotency_key or idempotency_key
        if key:  # namespaced per API key: one tenant's key never resolves to another's job
            ns = f"{p.name}/{key}"
            if len(ns) > 200:
                ns = f"{p.name}/sha256:{hashlib.sha256(key.encode()).hexdigest()}"
            spec = spec.model_copy(update={"idempotency_key": ns})
        api.check_refs(spec, p)
        url = str(body.webhook_url) if body.webhook_url else None
        if url:
            if not api.secret_for(p.name):
                raise HTTPException(422, "webhook_url: this server has no webhook secret (EASEL_WEBHOOK_SECRET)")
            try:
                check_public_url(url, s)
            except InputError as e:
                raise HTTPException(422, f"webhook_url: {e}") from None
        token, n = api.inflight.reserve(p)
        if token is None:
            api.metrics.refused.labels("in_flight_cap").inc()
            raise HTTPException(429, f"key {p.name!r} already has {n} jobs queued or running, its cap is "
                                     f"{p.max_in_flight}; wait for some to finish or cancel some",
                                headers={"Retry-After": "10"})
        try:
            job_id = api.client.submit(spec)
        except SubmitError as e:
            api.inflight.release(p.name, token)
            api.metrics.refused.labels("invalid_job").inc()
            raise HTTPException(422, str(e)) from None
        except BaseException:
            api.inflight.release(p.name, token)
            raise
        if api.store.take_owner(job_id, p.name):
            api.inflight.commit(p.name, token, job_id)
            if url:
                api.dispatcher.register(job_id, url, p.key.webhook_events)
            api.metrics.submitted.labels(p.name).inc()
        else:
            api.inflight.release(p.name, token)
            response.status_code = 200
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return api.render(job_id)

    @app.get("/v1/jobs/{job_id}", response_model=JobResponse, tags=["jobs"],
             responses={**_ERRORS, 404: {"model": Problem}})
    def get_job(job_id: OwnedJob) -> JobResponse:
        """A job's state and progress; when it succeeded, presigned URLs for its images and manifest."""
        return api.render(job_id)

    @app.delete("/v1/jobs/{job_id}", response_model=JobResponse, tags=["jobs"],
                responses={**_ERRORS, 404: {"model": Problem}})
    def cancel_job(job_id: OwnedJob) -> JobResponse:
        """Cancel: a queued job ends at once, a running one within one denoising step."""
        api.client.cancel(job_id)
        return api.render(job_id)

    @app.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse, tags=["jobs"],
             responses={**_ERRORS, 404: {"model": Problem}})
    async def job_events(job_id: OwnedJob, request: Request) -> AsyncIterable[ServerSentEvent]:
        """Server-sent events: `status` (snapshot) first, then `progress` (denoising steps) and
        `state` (transitions), and finally `done` with the finished job; then the stream ends."""
        channel = api.store.events_channel(job_id)
        pubsub = request.app.state.aredis.pubsub()
        await pubsub.subscribe(channel)  # before the snapshot: nothing falls between the two
        api.metrics.sse_streams.inc()
        n = 0

        def event(name: str, data) -> ServerSentEvent:
            nonlocal n
            n += 1
            return ServerSentEvent(event=name, data=data, id=str(n))

        try:
            snap = await run_in_threadpool(api.render, job_id)
            if snap.state.terminal:
                yield event("done", snap)
                return
            yield event("status", snap)
            deadline = time.monotonic() + s.api_sse_max_s
            last_check = time.monotonic()
            while time.monotonic() < deadline:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    ev = json.loads(msg["data"])
                    if "state" not in ev:
                        yield event("progress", ev)
                        continue
                    if JobState(ev["state"]).terminal:
                        if "step" in ev:  # the last step: workers throttle progress, the final state carries it
                            yield event("progress", {k: ev[k] for k in ("stage", "step", "total_steps") if k in ev})
                        yield event("done", await run_in_threadpool(api.render, job_id))
                        return
                    yield event("state", {k: ev[k] for k in ("state", "segment", "worker", "updated_at") if k in ev})
                # Pub/sub is fire-and-forget: re-read the record now and then so a lost
                # message cannot leave the stream open after the job ended.
                if time.monotonic() - last_check > 5:
                    last_check = time.monotonic()
                    cur = await run_in_threadpool(api.render, job_id)
                    if cur.state.terminal:
                        yield event("done", cur)
                        return
        finally:
            api.metrics.sse_streams.dec()
            try:
                await pubsub.unsubscribe(channel)
                await pubsub.aclose()
            except (redis.RedisError, asyncio.CancelledError, RuntimeError):
                pass

    # -- uploads ---------------------------------------------------------------------------
    @app.post("/v1/uploads", status_code=201, response_model=UploadResponse, tags=["uploads"],
              responses={**_ERRORS, 413: {"model": Problem}, 422: {"model": Problem}})
    def upload(file: Annotated[UploadFile, File(description="PNG, JPEG or WEBP image")], p: Caller) -> UploadResponse:
        """Upload an input image; use the returned `image` in a job. Stored content-addressed."""
        data = file.file.read(s.max_input_bytes + 1)
        if len(data) > s.max_input_bytes:
            raise HTTPException(413, f"upload is over the {s.max_input_bytes}-byte limit")
        try:
            img = decode_image(data, s, "upload")
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        ref = api.client.storage.put_input(data, image_ext(data))
        return UploadResponse(image=ref, bytes=len(data), width=img.width, height=img.height)

    @app.post("/v1/uploads/presign", response_model=PresignResponse, tags=["uploads"], responses=_ERRORS)
    def presign_upload(body: PresignRequest, p: Caller) -> PresignResponse:
        """A presigned POST for a large input, bounded in size and type by the S3 server; the
        worker checks the image like any input."""
        key = f"uploads/{p.name}/{uuid.uuid4().hex}.{_EXT[body.content_type]}"
        ttl = s.api_presign_ttl_s
        api.client.storage.ensure_bucket()
        post = api.public_storage.presign_upload(key, body.content_type, s.max_input_bytes, ttl)
        return PresignResponse(url=post["url"], fields=post["fields"], max_bytes=s.max_input_bytes,
                               image=f"s3://{s.s3_bucket}/{key}", expires_at=time.time() + ttl)

    # -- queues, health, metrics -----------------------------------------------------------
    @app.get("/v1/queues", response_model=list[QueueOut], tags=["operations"], responses=_ERRORS)
    def queues(p: Caller) -> list[QueueOut]:
        """Messages waiting per family (priority sub-queues included) and live workers."""
        depths = queue_depths(api.r, api.families, s.queue_prefix)
        live = live_workers_by_family(api.r, s.queue_prefix)
        return [QueueOut(family=f, queue=queue_name(f, s.queue_prefix), waiting=sum(d.values()),
                         by_priority={str(k): v for k, v in d.items()}, workers=live.get(f, 0))
                for f, d in depths.items()]

    @app.get("/healthz", response_model=Health, tags=["operations"])
    def healthz() -> Health:
        """Liveness: the process answers. Never checks dependencies (a Redis blip must not restart pods)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
    def readyz() -> JSONResponse:
        """Readiness: Redis answers PING and the bucket is reachable."""
        checks: dict[str, str] = {}
        try:
            api.probe_redis.ping()
            checks["redis"] = "ok"
        except redis.RedisError as e:
            checks["redis"] = f"error: {e}"
        try:
            try:
                api.probe_s3.head_bucket(Bucket=s.s3_bucket)
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                api.client.storage.ensure_bucket()  # S3 answered; the bucket is ours to create
            checks["s3"] = "ok"
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            checks["s3"] = f"error: {e}"
        ok = all(v == "ok" for v in checks.values())
        body = Health(status="ok" if ok else "unavailable", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easel")
    except PackageNotFoundError:
        return "dev"

