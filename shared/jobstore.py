"""Job records in Redis: the single source of truth for a job's state and progress.

One hash per job. State changes go through a Lua script so a terminal state (succeeded,
failed, cancelled) is never overwritten by a late or duplicate delivery.
"""
from __future__ import annotations

import json
import ssl
import time
import uuid
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.schema import JobSpec, JobState, JobStatus, Plan, Progress

# KEYS: job hash, events channel. ARGV: event JSON, then field/value pairs.
# Publishing from the script makes a state change one round trip, and no event is ever
# published for a change that did not happen.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
if cur == 'succeeded' or cur == 'failed' or cur == 'cancelled' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""

# Everything a delivery checks and records before it runs, in one round trip (it was
# twelve): drop the job from its queue-position set, then refuse unknown / terminal /
# cancelled / poison deliveries, else count the delivery and the attempt and mark it
# running. KEYS: job hash, events channel. ARGV: queue-position key prefix, job id,
# segment, worker, now, crash limit, the "running" event JSON.
# (The queue-position set's name is read from the hash, so this assumes one Redis, not a
# cluster; easel's broker is one Redis anyway.)
_CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'state', 'cancel', 'queue', 'spec', 'plan', 'stage', 'created_at', 'started_at')
local state = h[1]
if not state then return {'unknown'} end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return {'terminal', state} end
if h[3] then redis.call('ZREM', ARGV[1] .. h[3], ARGV[2]) end
if h[2] == '1' then return {'cancel'} end
local crashed = redis.call('HINCRBY', KEYS[1], 'inflight:' .. ARGV[3], 1) - 1
if crashed >= tonumber(ARGV[6]) then return {'poison', tostring(crashed), h[6] or '0'} end
local started = h[8]
if not started then started = ARGV[5]; redis.call('HSET', KEYS[1], 'started_at', started) end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[4], 'segment', ARGV[3], 'updated_at', ARGV[5])
redis.call('PUBLISH', KEYS[2], ARGV[7])
return {'run', h[4], h[5], h[7], started}
"""

# KEYS: job hash. ARGV: field. Never resurrects an expired job as a bare hash.
_END_DELIVERY = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """What ``JobStore.claim`` found: ``run`` (with the job's spec and plan) or why not."""

    outcome: str  # run | unknown | terminal | cancel | poison
    spec: JobSpec | None = None
    plan: Plan | None = None
    state: str | None = None  # terminal: which state
    crashed: int = 0  # poison: deliveries of this segment that never ended
    stage: int = 0  # poison: the stage it was at
    created_at: float = 0.0  # run: for the manifest's timings
    started_at: float = 0.0


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
        self._claim = self.r.register_script(_CLAIM)
        self._end_delivery = self.r.register_script(_END_DELIVERY)

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

    def _new_record(self, spec: JobSpec, plan: Plan, now: float) -> dict:
        """A queued job's hash. Counters and progress start absent (read as 0), which keeps
        bulk submission's writes small."""
        return {"spec": spec.model_dump_json(), "plan": plan.model_dump_json(), "state": JobState.queued.value,
                "created_at": now, "updated_at": now}

    def _idem_key(self, spec: JobSpec) -> str:
        return f"{self.prefix}:idem:{spec.idempotency_key}"

    def create(self, spec: JobSpec, plan: Plan, job_id: str | None = None) -> tuple[str, bool]:
        """Store a queued job. Returns (job_id, created); an idempotency key seen before
        returns the first job's id and created=False."""
        return self.create_many([(spec, plan)], [job_id] if job_id else None)[0]

    def create_many(self, items: list[tuple[JobSpec, Plan]], ids: list[str] | None = None) -> list[tuple[str, bool]]:
        """Store queued jobs in one MULTI/EXEC (plus two round trips only when an
        idempotency claim was lost). Returns (job_id, created) per item, in order.

        Each record (hash + TTL) and each idempotency claim (SET NX, in input order, so the
        first of two equal keys in one call wins) is written together; a lost claim drops
        its record and answers with the winner's id. A claim that reads back as our own id
        is ours: the EXEC was replayed after its first reply was lost.
        """
        now = time.time()
        ids = list(ids) if ids else [new_job_id() for _ in items]
        pipe = self.r.pipeline(transaction=True)
        claims: list[tuple[int, int]] = []  # (item index, position of its SET NX reply)
        n_cmds = 0
        for i, (job_id, (spec, plan)) in enumerate(zip(ids, items)):
            key = self.key(job_id)
            pipe.hset(key, mapping=self._new_record(spec, plan, now))
            pipe.expire(key, self.ttl_s)
            n_cmds += 2
            if spec.idempotency_key:
                pipe.set(self._idem_key(spec), job_id, nx=True, ex=self.ttl_s)
                claims.append((i, n_cmds))
                n_cmds += 1
        res = pipe.execute()
        out = [(job_id, True) for job_id in ids]
        lost = [i for i, pos in claims if not res[pos]]
        if not lost:
            return out
        pipe = self.r.pipeline(transaction=False)
        for i in lost:
            pipe.get(self._idem_key(items[i][0]))
        winners = pipe.execute()
        retry: list[int] = []
        pipe = self.r.pipeline(transaction=False)
        for i, existing in zip(lost, winners):
            if existing == ids[i]:
                continue  # our own claim, replayed: still ours
            pipe.delete(self.key(ids[i]))
            if existing:
                out[i] = (existing, False)
            else:
                retry.append(i)  # the winner expired in between: claim again
        pipe.execute()
        for i in retry:
            out[i] = self.create(*items[i])
        return out

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id)))

    def load(self, job_id: str) -> tuple[JobSpec, Plan]:
        spec, plan = self.r.hmget(self.key(job_id), "spec", "plan")
        if spec is None:
            raise KeyError(f"no job {job_id}")
        return JobSpec.model_validate_json(spec), Plan.model_validate_json(plan)

    def load_many(self, job_ids: list[str]) -> list[tuple[JobSpec, Plan] | None]:
        """``load`` for several jobs in one round trip; None for a job that is gone."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.key(job_id), "spec", "plan")
        return [None if spec is None else (JobSpec.model_validate_json(spec), Plan.model_validate_json(plan))
                for spec, plan in pipe.execute()]

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

    def _event(self, state: JobState, fields: dict) -> str:
        """The event a state change publishes: its fields, less the bulky spec and stage records."""
        return json.dumps({"state": state.value, **{k: v for k, v in fields.items()
                                                    if k != "spec" and not k.startswith("record:")}}, default=str)

    def _transition_args(self, state: JobState, fields: dict) -> list:
        now = time.time()
        fields = {"state": state.value, "updated_at": now, **fields}
        if state.terminal:
            fields.setdefault("finished_at", now)
        argv: list = [self._event(state, fields)]
        for k, v in fields.items():
            argv += [k, json.dumps(v) if isinstance(v, (list, dict)) else v]
        return argv

    def transition(self, job_id: str, state: JobState, **fields) -> bool:
        """Move a non-terminal job to ``state`` with extra fields; False if it was already terminal.
        One round trip: the event is published by the same script, only if the change happened."""
        return self._transition(keys=[self.key(job_id), self.events_channel(job_id)],
                                args=self._transition_args(state, fields)) == 1

    def transition_many(self, changes: list[tuple[str, JobState, dict]]) -> list[bool]:
        """``transition`` for (job_id, state, fields) changes in one pipeline (a micro-batch's
        final states): each change is its own script run, so each stays all-or-nothing."""
        pipe = self.r.pipeline(transaction=False)
        for job_id, state, fields in changes:
            self._transition(keys=[self.key(job_id), self.events_channel(job_id)],
                             args=self._transition_args(state, fields), client=pipe)
        return [res == 1 for res in pipe.execute()]

    def _claim_args(self, job_id: str, segment: int, worker: str, max_crash_deliveries: int) -> dict:
        now = time.time()
        event = self._event(JobState.running, {"updated_at": now, "worker": worker, "segment": segment})
        return {"keys": [self.key(job_id), self.events_channel(job_id)],
                "args": [f"{self.prefix}:queued:", job_id, segment, worker, now, max_crash_deliveries, event]}

    def claim(self, job_id: str, segment: int, worker: str, max_crash_deliveries: int) -> Claim:
        """Start a delivery of ``segment``: one round trip (see ``_CLAIM``)."""
        return self._parse_claim(self._claim(**self._claim_args(job_id, segment, worker, max_crash_deliveries)))

    def claim_many(self, deliveries: list[tuple[str, int]], worker: str, max_crash_deliveries: int) -> list[Claim]:
        """``claim`` for (job_id, segment) deliveries in one pipeline (a micro-batch's members)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id, segment in deliveries:
            self._claim(**self._claim_args(job_id, segment, worker, max_crash_deliveries), client=pipe)
        return [self._parse_claim(res) for res in pipe.execute()]

    @staticmethod
    def _parse_claim(res: list) -> Claim:
        outcome = res[0]
        if outcome == "run":
            return Claim("run", spec=JobSpec.model_validate_json(res[1]), plan=Plan.model_validate_json(res[2]),
                         created_at=float(res[3]), started_at=float(res[4]))
        if outcome == "terminal":
            return Claim("terminal", state=res[1])
        if outcome == "poison":
            return Claim("poison", crashed=int(res[1]), stage=int(res[2]))
        return Claim(outcome)

    def progress(self, job_id: str, stage: int, step: int, total: int) -> bool:
        """Record a denoising step; one round trip that also says whether cancel was asked."""
        key = self.key(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={"stage": stage, "step": step, "total_steps": total, "updated_at": time.time()})
        pipe.publish(self.events_channel(job_id), json.dumps({"stage": stage, "step": step, "total_steps": total}))
        pipe.hget(key, "cancel")
        return pipe.execute()[-1] == "1"

    def save_records(self, job_id: str, records: dict[int, str]) -> None:
        if records:
            self.r.hset(self.key(job_id), mapping={f"record:{i}": r for i, r in records.items()})

    def records_at(self, job_id: str, indices: list[int]) -> list[str | None]:
        """Those stages' records (JSON, None where missing), one round trip."""
        return self.r.hmget(self.key(job_id), [f"record:{i}" for i in indices]) if indices else []

    def records(self, job_id: str, count: int) -> list[str | None]:
        return self.records_at(job_id, list(range(count)))

    def publish(self, job_id: str, event: dict) -> None:
        self.r.publish(self.events_channel(job_id), json.dumps(event, default=str))

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

    def _field_of_each(self, job_ids: list[str], field: str) -> list[str | None]:
        """One hash field of each job, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.key(job_id), field)
        return pipe.execute()

    def terminal_states(self, job_ids: list[str]) -> list[bool]:
        """Whether each job has ended (succeeded, failed or cancelled), in one round trip."""
        return [v is not None and JobState(v).terminal for v in self._field_of_each(job_ids, "state")]

    def cancels_requested(self, job_ids: list[str]) -> list[bool]:
        """Whether cancel was asked, per job, in one round trip."""
        return [v == "1" for v in self._field_of_each(job_ids, "cancel")]

    # -- queue position: a sorted set per queue, ordered as the broker serves it ---------
    def _queued_key(self, queue: str) -> str:
        return f"{self.prefix}:queued:{queue}"

    def mark_queued(self, job_id: str, queue: str, priority: int) -> None:
        """Record that a job waits in ``queue`` (priority 0 first, then submission order)."""
        self.mark_queued_many([(job_id, queue, priority)])

    def mark_queued_many(self, entries: list[tuple[str, str, int]]) -> None:
        """``mark_queued`` for (job_id, queue, priority) entries in two round trips: one
        INCRBY reserves the sequence numbers the per-job INCRs would have drawn, one
        pipeline writes the entries (same scores, so the same order)."""
        last = int(self.r.incrby(f"{self.prefix}:seq", len(entries)))
        pipe = self.r.pipeline(transaction=False)
        for seq, (job_id, queue, priority) in enumerate(entries, start=last - len(entries) + 1):
            pipe.zadd(self._queued_key(queue), {job_id: priority * 1e13 + seq})
            pipe.hset(self.key(job_id), "queue", queue)
        pipe.execute()

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

    # -- deliveries that did not end (counted by ``claim``): a worker died running them --
    def end_delivery(self, job_id: str, segment: int) -> None:
        self._end_delivery(keys=[self.key(job_id)], args=[f"inflight:{segment}"])
