"""Job records in Redis: the single source of truth for a job's state and progress.

One hash per job. State changes go through a Lua script so a terminal state (succeeded,
failed, cancelled) is never overwritten by a late or duplicate delivery.
"""
from __future__ import annotations

import json
import time
import uuid

import redis

from shared.schema import JobSpec, JobState, JobStatus, Plan, Progress

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
if cur == 'succeeded' or cur == 'failed' or cur == 'cancelled' then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
return 1
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "easel", ttl_s: int = 7 * 24 * 3600):
        self.r = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._transition = self.r.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str, prefix: str = "easel", ttl_s: int = 7 * 24 * 3600) -> "JobStore":
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                        socket_keepalive=True, retry_on_timeout=True), prefix, ttl_s)

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
        if st == JobState.queued:
            self.transition(job_id, JobState.cancelled, error="cancelled before it ran")
        return self.status(job_id).state

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancel") == "1"
