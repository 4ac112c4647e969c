"""Job records in Redis: the single source of truth for a job's state and progress.

One hash per job. State changes go through a Lua script so a terminal state (succeeded,
failed, cancelled) is never overwritten by a late or duplicate delivery.
"""
from __future__ import annotations

import json
import ssl
import time
import uuid

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.schema import JobSpec, JobState, JobStatus, Plan, Progress

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
if cur == 'succeeded' or cur == 'failed' or cur == 'cancelled' then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
return 1
"""


class _Retry(Retry):
    """Retries lost connections, never a refused password or TLS certificate: retrying cannot
    fix those, and the caller should hear "invalid username-password pair" or
    "CERTIFICATE_VERIFY_FAILED" at once, not after ~30 s."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(e: Exception) -> bool:
            if isinstance(e, redis.exceptions.AuthenticationError):
                return False
            if isinstance(e.__cause__ or e.__context__, ssl.SSLCertVerificationError):
                return False
            return is_retryable is None or is_retryable(e)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def redis_client(url: str, **kw) -> redis.Redis:
    """A client that rides out a Redis restart: commands retry with backoff for ~30 s."""
    return redis.Redis.from_url(
        url, decode_responses=True, health_check_interval=30, socket_keepalive=True, socket_connect_timeout=5,
        retry=_Retry(ExponentialBackoff(cap=2.0, base=0.1), 20),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError], **kw)


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "easel", ttl_s: int = 7 * 24 * 3600):
        self.r = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._transition = self.r.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str, prefix: str = "easel", ttl_s: int = 7 * 24 * 3600, **redis_kw) -> "JobStore":
        return cls(redis_client(url, **redis_kw), prefix, ttl_s)

    @classmethod
    def from_settings(cls, s) -> "JobStore":
        """From Settings, TLS options (redis_ssl_*) included for rediss:// URLs."""
        return cls.from_url(s.redis_url, s.queue_prefix, s.job_ttl_s, **s.redis_ssl_kwargs())

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_channel(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def create(self, spec: JobSpec, plan: Plan, job_id: str | None = None) -> tuple[str, bool]:
        """Store a queued job. Returns (job_id, created); an idempotency key seen before
        returns the first job's id and created=False."""
        job_id = job_id or new_job_id()
        now = time.time()
        key = self.key(job_id)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={
            "spec": spec.model_dump_json(), "plan": plan.model_dump_json(), "state": JobState.queued.value,
            "created_at": now, "updated_at": now, "attempts": 0, "stage": 0, "step": 0, "total_steps": 0,
        })
        pipe.expire(key, self.ttl_s)
        pipe.execute()
        if spec.idempotency_key:
            idem = f"{self.prefix}:idem:{spec.idempotency_key}"
            if not self.r.set(idem, job_id, nx=True, ex=self.ttl_s):
                self.r.delete(key)
                existing = self.r.get(idem)
                if existing:
                    return existing, False
        return job_id, True

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id)))

    def load(self, job_id: str) -> tuple[JobSpec, Plan]:
        spec, plan = self.r.hmget(self.key(job_id), "spec", "plan")
        if spec is None:
            raise KeyError(f"no job {job_id}")
        return JobSpec.model_validate_json(spec), Plan.model_validate_json(plan)

    def status(self, job_id: str) -> JobStatus:
        h = self.r.hgetall(self.key(job_id))
        if not h:
            raise KeyError(f"no job {job_id}")
        f = lambda k: float(h[k]) if h.get(k) else None  # noqa: E731
        return JobStatus(
            id=job_id, state=JobState(h["state"]), created_at=f("created_at"), updated_at=f("updated_at"),
            started_at=f("started_at"), finished_at=f("finished_at"),
            progress=Progress(stage=int(h.get("stage", 0)), step=int(h.get("step", 0)),
                              total_steps=int(h.get("total_steps", 0))),
            error=h.get("error") or None, outputs=json.loads(h.get("outputs") or "[]"),
            manifest=h.get("manifest") or None, attempts=int(h.get("attempts", 0)),
            queue_position=None if JobState(h["state"]).terminal else self.queue_position(job_id),
        )

    def transition(self, job_id: str, state: JobState, **fields) -> bool:
        """Move a non-terminal job to ``state`` with extra fields; False if it was already terminal."""
        now = time.time()
        fields = {"state": state.value, "updated_at": now, **fields}
        if state.terminal:
            fields.setdefault("finished_at", now)
        argv: list = []
        for k, v in fields.items():
            argv += [k, json.dumps(v) if isinstance(v, (list, dict)) else v]
        ok = self._transition(keys=[self.key(job_id)], args=argv) == 1
        if ok:
            self.publish(job_id, {"state": state.value, **{k: v for k, v in fields.items() if k != "spec"}})
        return ok

    def progress(self, job_id: str, stage: int, step: int, total: int) -> bool:
        """Record a denoising step; one round trip that also says whether cancel was asked."""
        key = self.key(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={"stage": stage, "step": step, "total_steps": total, "updated_at": time.time()})
        pipe.publish(self.events_channel(job_id), json.dumps({"stage": stage, "step": step, "total_steps": total}))
        pipe.hget(key, "cancel")
        return pipe.execute()[-1] == "1"

    def save_record(self, job_id: str, index: int, record_json: str) -> None:
        self.r.hset(self.key(job_id), f"record:{index}", record_json)

    def records(self, job_id: str, count: int) -> list[str]:
        return self.r.hmget(self.key(job_id), [f"record:{i}" for i in range(count)])

    def publish(self, job_id: str, event: dict) -> None:
        self.r.publish(self.events_channel(job_id), json.dumps(event, default=str))

    def incr_attempts(self, job_id: str) -> int:
        return int(self.r.hincrby(self.key(job_id), "attempts", 1))

    def claim_once(self, job_id: str, marker: str) -> bool:
        """True the first time ``marker`` is claimed for this job (guards side effects like enqueueing)."""
        return bool(self.r.hsetnx(self.key(job_id), f"once:{marker}", time.time()))

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel: a queued job ends now; a running one stops at its next denoising step."""
        if not self.exists(job_id):
            raise KeyError(f"no job {job_id}")
        self.r.hset(self.key(job_id), "cancel", 1)
        st = self.status(job_id).state
        if st == JobState.queued and self.transition(job_id, JobState.cancelled, error="cancelled before it ran"):
            self.unmark_queued(job_id)
        return self.status(job_id).state

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancel") == "1"

    # -- queue position: a sorted set per queue, ordered as the broker serves it ---------
    def _queued_key(self, queue: str) -> str:
        return f"{self.prefix}:queued:{queue}"

    def mark_queued(self, job_id: str, queue: str, priority: int, pipe=None) -> None:
        """Record that a job waits in ``queue`` (priority 0 first, then submission order)."""
        seq = self.r.incr(f"{self.prefix}:seq")
        p = pipe if pipe is not None else self.r.pipeline(transaction=False)
        p.zadd(self._queued_key(queue), {job_id: priority * 1e13 + seq})
        p.hset(self.key(job_id), "queue", queue)
        if pipe is None:
            p.execute()

    def unmark_queued(self, job_id: str) -> None:
        queue = self.r.hget(self.key(job_id), "queue")
        if queue:
            self.r.zrem(self._queued_key(queue), job_id)

    def queue_position(self, job_id: str) -> int | None:
        """0 = next to run in its family's queue; None when not waiting."""
        queue = self.r.hget(self.key(job_id), "queue")
        if not queue:
            return None
        rank = self.r.zrank(self._queued_key(queue), job_id)
        return None if rank is None else int(rank)

    # -- deliveries that did not end: a worker died while running them -----------------
    def begin_delivery(self, job_id: str, segment: int) -> int:
        """Count a delivery; returns how many earlier deliveries of this segment never ended."""
        return int(self.r.hincrby(self.key(job_id), f"inflight:{segment}", 1)) - 1

    def end_delivery(self, job_id: str, segment: int) -> None:
        if self.r.exists(self.key(job_id)):  # never resurrect an expired job as a bare hash
            self.r.hset(self.key(job_id), f"inflight:{segment}", 0)
