"""What every request shares: settings, the job store, storage, Redis clients, keys and limits.

One ``ApiState`` per app, kept on ``app.state.api`` and handed to routes by the ``ApiDep``
dependency (deps.py). Blocking Redis/S3 calls made through it run in FastAPI's thread pool.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

import redis
import redis.asyncio as aioredis
from fastapi import HTTPException

from easel.producer.api.metrics import ApiMetrics
from easel.producer.api.models import JobResponse, Link, ProgressOut, WebhookOut
from easel.producer.api.security import InFlight, KeyRing, Principal, RateLimiter
from easel.producer.client import EaselClient
from easel.producer.webhooks import WebhookDispatcher
from easel.shared.celery_app import queue_name, send_segment
from easel.shared.jobstore import REPLY_WITHIN_S, JobStore, redis_client
from easel.shared.liveness import Reaper
from easel.shared.schema import JobSpec, JobState
from easel.shared.settings import Settings
from easel.shared.storage import Storage, s3_client

KEY_SHARES_RETRY_S = 5.0  # between tries to record the keys' weights and caps while Redis is away
log = logging.getLogger("easel.api")


class ApiState:
    """Everything a request needs, built once per app."""

    def __init__(self, settings: Settings):
        self.s = settings
        # Fail fast while Redis is away (503 + Retry-After) instead of holding request threads
        # in redis-py's multi-second reconnect backoff; workers keep the patient default. A
        # request meeting a connection gone silent waits one reply timeout, then goes on a new
        # connection (the pool's other idle ones dropped with it).
        self.client = EaselClient(settings, store=JobStore.from_settings(settings, reply_within_s=REPLY_WITHIN_S,
                                                                         retries=2))
        self.store = self.client.store
        self.r = self.store.r
        self.aredis: aioredis.Redis | None = None  # opened in the app's event loop (start)
        self._stopping = threading.Event()
        self.sse_streams = 0  # open in this process (each holds one of aredis's connections)
        self.sse_by_key: Counter[str] = Counter()  # of those, per API key name
        self.keys = KeyRing(settings)
        self.limiter = RateLimiter(self.r, settings.queue_prefix)
        self.inflight = InFlight(self.r, settings.queue_prefix)
        public = settings.model_copy(update={"s3_endpoint_url": settings.s3_public_endpoint_url
                                             or settings.s3_endpoint_url})
        self.public_storage = Storage(public)
        self.families = sorted(self.client.registry.families())
        self.metrics = ApiMetrics(self.r, self.families, settings.queue_prefix)
        self._probe_clients(settings)
        self.dispatcher = WebhookDispatcher(settings, self.store, render=self.render_dict, secret_for=self.secret_for)
        self.dispatcher.on_result = lambda outcome, event: self.metrics.webhooks.labels(outcome, event).inc()
        self.reaper = Reaper(JobStore.from_settings(settings),
                             lambda *a, **kw: send_segment(self.client.celery, *a, **kw),
                             settings.reap_every_s, settings.heartbeat_ttl_s,
                             [queue_name(f, settings.queue_prefix) for f in self.client.registry.families()])

    def _probe_clients(self, settings: Settings) -> None:
        # Probes get their own clients with short timeouts: a hung dependency must fail the
        # probe quickly instead of holding it behind the data path's retries.
        self.probe_redis = redis_client(settings.redis_url, reply_within_s=2, retries=0, **settings.redis_ssl_kwargs())
        self.probe_s3 = s3_client(settings, attempts=1, connect_s=2, read_s=2)

    # -- lifespan ------------------------------------------------------------------------------
    def start(self, webhooks: bool) -> None:
        # SSE's pub/sub: a stream replaces a silent connection itself (shared.quiet); a connect
        # to an address gone dark must fail in seconds, not the kernel's ~2 min.
        self.aredis = aioredis.Redis.from_url(self.s.redis_url, decode_responses=True, health_check_interval=30,
                                              socket_connect_timeout=3,
                                              max_connections=self.s.api_sse_max_streams + 10,
                                              **self.s.redis_ssl_kwargs())
        if not self._record_key_shares():
            threading.Thread(target=self._record_key_shares_until_done, name="easel-key-shares", daemon=True).start()
        if webhooks:
            self.dispatcher.start()
        self.reaper.start()  # dead workers' jobs come back even while every worker is busy

    def _record_key_shares(self) -> bool:
        """Each key's fair-share weight and cap, read by every dispatcher; False when Redis
        did not take them."""
        try:
            for key in self.keys.by_hash.values():
                self.client.scheduler.set_weight(key.name, key.weight)
                held = key.over_cap == "hold"
                self.client.scheduler.set_cap(key.name, (key.max_in_flight or self.s.api_max_in_flight) if held else None)
            return True
        except redis.RedisError as e:
            log.warning("could not record the keys' fair-share weights and caps (tried again every %.0fs): %s",
                        KEY_SHARES_RETRY_S, e)
            return False

    def _record_key_shares_until_done(self) -> None:
        """An API started before its Redis was ready (a fresh deploy) would otherwise leave
        every weight at 1 and hold keys uncapped until it restarts."""
        while not self._stopping.wait(KEY_SHARES_RETRY_S):
            if self._record_key_shares():
                log.info("recorded the keys' fair-share weights and caps")
                return

    async def stop(self) -> None:
        self._stopping.set()
        self.reaper.stop()
        self.dispatcher.stop()
        if self.aredis is not None:
            await self.aredis.aclose()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return sorted(self.client.registry.models)

    @property
    def controlnet_names(self) -> list[str]:
        return sorted({n for m in self.client.registry.models.values() for n in m.controlnets})

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
        view = self.store.view(job_id)  # one read: the webhook's state pairs with the job's
        st, hook = self.client.scheduler.status_of(view), view.webhook
        done = st.state == JobState.succeeded
        return JobResponse(
            id=st.id, state=st.state, created_at=st.created_at, updated_at=st.updated_at, started_at=st.started_at,
            finished_at=st.finished_at, error=st.error, attempts=st.attempts, eta_s=st.eta_s,
            waiting_for=st.waiting_for, note=st.note,
            progress=ProgressOut(stage=st.progress.stage, stages=view.stages, step=st.progress.step,
                                 total_steps=st.progress.total_steps),
            outputs=[self.link(u) for u in st.outputs] if done else [],
            manifest=self.link(st.manifest) if done and st.manifest else None,
            webhook=WebhookOut(**hook.model_dump()) if hook else None,
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
