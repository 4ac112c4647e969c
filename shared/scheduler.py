"""Fair share between tenants: new jobs wait in per-tenant pending sets and are fed to their
family's Celery queue just in time, in stride-scheduling order.

A family queue in the broker is first in, first out, so a tenant's backlog of 100,000 jobs
would delay every other tenant's job until it had run. Instead a new job waits in
``<prefix>:pending:<queue>:<tenant>`` (ordered by priority, then submission), and the
dispatch script moves jobs into the broker only while fewer than the family's live workers'
batch sizes, summed, plus a margin wait there. Which tenant's job goes next is stride
scheduling by work: each tenant has a pass value, the lowest pass goes next and advances
by the job's work (``shared.plan.segment_work``: UNet passes x images x latent area, in
units of a default job's denoising) over the tenant's weight, so tenants share GPU time,
not job counts. A tenant that joins starts level with where service stands (the highest
pass served), or up to ``credit`` units of work before it if it has used less: a
newcomer's first jobs start within about one job duration per worker, a heavy past user
is not penalised once it comes back, and backlogged tenants share the farm by their
weights.

A chain's hand-off to its next family is admitted there the same way, under its tenant,
with its first submission's place (``_HAND_OFF``), unless its tenant is capped: it holds a
cap slot already. Everything else already admitted runs as before: Celery on Redis with
acks_late, crash redelivery, retries (which go straight to the broker: the job has started).
Dispatch runs where a slot may have opened: after a submission to a queue with room, after
a worker's claim, when a job dispatched under its tenant's cap ends, and on every worker
heartbeat. Pausing a queue stops dispatch; the pending sets keep the jobs and their order.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from easel.shared.jobstore import (_CLOCK, _CREATE, _SCORES, _TRANSITION_FN, DEFAULT_TENANT, HELD_BACK, DeliveryEnd,
                                   JobStore, JobView, _text, queue_score, run_scripts)
from easel.shared.keys import (backlog_channel, backlog_key, cap_key, family_capacity_key, family_instances_key,
                               flight_key, job_seconds_prefix, pending_key, tenants_waiting_key)
from easel.shared.plan import segment_work
from easel.shared.registry import Registry
from easel.shared.schema import JobSpec, JobState, JobStatus, Plan, Segment
from easel.shared.storage import named_input_size

log = logging.getLogger("easel.scheduler")

CREDIT = 20.0  # units of work (about default jobs) a returning or new tenant may start behind the front
MARGIN = 1  # jobs waiting in the broker beyond the live workers' batches
PENDING, ADMITTED, ROOM = 0, 1, 2  # admission's answers (``_ADMIT``)
CANCEL_ASKED = -2  # a hand-off refused because the job's cancel was asked (``_HAND_OFF``)
SETTLE_WITHIN = 0.1  # a dispatch's charge this close to the work (a fraction of it) is left as it is
FLIGHT_CHECK_AFTER_S = 300  # a held tenant's in-flight jobs dispatched this long ago are checked for records gone

# Room in a queue: each live worker's batch, summed over the family (the capacity key its
# heartbeats keep), plus the margin, less the jobs already sent to it and not yet claimed,
# retries waiting out their backoff aside (``HELD_BACK``).
# ``room_after``: the same with the capacity already read (admission's MGET).
_ROOM = _CLOCK + f"""
local function room_after(queued, capacity, margin)
  return tonumber(capacity or '0') + tonumber(margin) - redis.call('ZCOUNT', queued, '-inf', '({HELD_BACK}')
end
local function room(queued, capacity, margin)
  return room_after(queued, redis.call('GET', capacity), margin)
end
"""

# Admission of one new job. k: its tenant's pending set, active tenants (zset of pass),
# parked passes (hash), the queue's backlog tally, the queue's waiting set, paused flag, the
# family's capacity, the tenant's cap, the backlog channel, the tenants-waiting flag (set
# here as a tenant joins the active set, deleted by the dispatch that empties it; one MGET
# reads it with capacity, pause and cap), the weights hash, the queue's service point (a
# zset of one member, ``pass``: the highest pass a dispatch has served at). Passes advance
# by work/weight a job, so a joining tenant's credit, ``credit`` units of work (about as
# many default jobs), is credit/weight passes. ``score``: ``queue_score``
# (priority, then submission); ``wait_score``, where given, its waiting-set score (the
# broker's order: when it is sent). When no tenant has jobs pending there, the queue is open, the
# job's tenant has no cap and there is room, the job goes straight to the waiting set
# (returns ADMITTED: send it now); else it waits in its tenant's pending set, and a job that
# starts a backlog (no tenant waited) tells the queue's workers (``queue`` on the backlog
# channel). A waiting job returns ROOM when its open queue has room (a dispatch now would
# send it or another tenant's job), else PENDING: with the queue full a dispatch moves
# nothing, and the claim that makes room dispatches.
_ADMIT = """
local function open_room(k, capacity, paused, margin)  -- the queue is open, with room
  return not paused and room_after(k[5], capacity, margin) > 0
end
-- A replayed admission (its first run's reply lost) answers from where the job waits: ADMITTED
-- while it is in the queue's waiting set (its message still to send), else ROOM or PENDING.
local function where_it_waits(k, job, margin)
  if redis.call('ZSCORE', k[5], job) then return 1 end
  local v = redis.call('MGET', k[7], k[6])
  if open_room(k, v[1], v[2], margin) then return 2 end
  return 0
end
local function admit(k, job, score, tenant, credit, margin, queue, wait_score)
  local v = redis.call('MGET', k[7], k[6], k[8], k[10])
  local room = open_room(k, v[1], v[2], margin)
  if room and not v[3] and not v[4] then
    redis.call('ZADD', k[5], wait_score or score, job)
    return 1
  end
  if redis.call('ZADD', k[1], score, job) == 1 then
    redis.call('RPUSH', k[4], 1)
    if not v[4] then redis.call('PUBLISH', k[9], queue) end
  end
  if not redis.call('ZSCORE', k[2], tenant) then
    local pass = tonumber(redis.call('HGET', k[3], tenant) or '0')
    -- No further back than where service stands, less its credit. Service stands at the
    -- highest pass served (the lowest active pass where that is higher: tenants not served
    -- yet). Not the lowest pass alone: newcomers run below it during their credit, so each
    -- newcomer would start a credit below the one before, and a backlogged tenant would wait
    -- behind them all. Nor the highest: a low-weight tenant's stride puts it far ahead, and
    -- a newcomer would start level with the others, with no credit. A tenant back with a
    -- pass ahead of that (its last jobs' work, not yet matched by the others) keeps it:
    -- forgiven, a tenant whose pending set empties at each dispatch (one job at a time)
    -- would be served at the front each time, whatever its jobs' work.
    local point = redis.call('ZSCORE', k[12], 'pass')
    local lowest = redis.call('ZRANGE', k[2], 0, 0, 'WITHSCORES')[2]
    local front = point and tonumber(point)
    if lowest and (not front or tonumber(lowest) > front) then front = tonumber(lowest) end
    if front then
      local weight = tonumber(redis.call('HGET', k[11], tenant) or '1')
      pass = math.max(pass, front - tonumber(credit) / weight)
    end
    redis.call('ZADD', k[2], pass, tenant)
    redis.call('SET', k[10], 1)
  end
  if room then return 2 end
  return 0
end
"""

# A new job's record and its admission, in one script. KEYS: the job hash, its idempotency
# key (the hash again when it has none), then admit's twelve keys. ARGV: job id, record TTL,
# whether it has an idempotency key ('1' or ''), queue score, tenant, credit, margin, queue,
# then the record's fields and values. Returns {winner id, PENDING} when another job
# holds the idempotency key, else {job id, admit's answer}. A replay of a call whose reply was lost
# answers from where the job is now: ADMITTED while it waits in the queue (its message is
# still to send), else ROOM or PENDING by the queue's room, as a waiting job's first run.
_SUBMIT = _ROOM + _CREATE + _ADMIT + """
local k = {}
for i = 3, 14 do k[i - 2] = KEYS[i] end
local winner = create(KEYS[1], ARGV[3] == '1' and KEYS[2] or '', ARGV[1], ARGV[2], ARGV, 9)
if winner == ARGV[1] then return {ARGV[1], where_it_waits(k, ARGV[1], ARGV[7])} end
if winner then return {winner, 0} end
return {ARGV[1], admit(k, ARGV[1], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])}
"""

# A chain's hand-off to its next family, in one script: the ended segment's delivery ends
# (``transition`` to queued, at the next segment, in the next queue), then the job is
# admitted there as a new job would be, under its tenant, scored by its first submission:
# ahead of its tenant's newer jobs, in turn with the other tenants'. A job dispatched under
# its tenant's cap goes straight to the waiting set: it holds a cap slot already, and
# waiting behind that cap could deadlock it. Only the delivery that holds the job hands it
# off (transition's ``?held``): a late one taken over meanwhile admits nothing; nor does a
# job whose cancel was asked while its segment ended (after its last step, its hand-off
# being written): the delivery ends it cancelled instead. A replay of this script after a
# lost reply (its first run cleared the holder: the job waits at the next segment, claimed
# by no one since, under the delivery's own attempt) answers from where the job waits, as
# _SUBMIT answers its replay, so the message that the lost reply kept from going goes now.
# KEYS: transition's four, then admit's twelve.
# ARGV: job id, its pending score, its waiting-set score (now), tenant, credit, margin,
# queue, then transition's argv. Returns {transition's answer,
# admit's answer (ADMITTED for a capped job; -1 when the transition was refused; -2,
# CANCEL_ASKED, with 0: not run)}.
_HAND_OFF = _ROOM + _ADMIT + _TRANSITION_FN + """
local k, change = {}, {}
for i = 5, 16 do k[i - 4] = KEYS[i] end
for i = 8, #ARGV do change[i - 7] = ARGV[i] end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {0, -2} end
local done = transition({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}, change)
if done == 0 and change[7] ~= '' then
  local h = redis.call('HMGET', KEYS[1], 'state', 'segment', 'attempts', 'instance')
  if h[1] == 'queued' and not h[4] and h[3] == change[7] and h[2] == tostring(tonumber(change[4]) + 1) then
    return {1, where_it_waits(k, ARGV[1], ARGV[6])}
  end
end
if done ~= 1 then return {done, -1} end
if redis.call('HGET', KEYS[1], 'capped') then
  redis.call('ZADD', k[5], ARGV[3], ARGV[1])
  return {1, 1}
end
return {1, admit(k, ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[3])}
"""

# What a segment's dispatch charged its tenant, settled by the worker that has read what
# the delivery runs on: the difference from its work, over the tenant's weight, goes onto
# the tenant's pass (active or parked). Once: the record's ``charged:<segment>`` becomes the
# work, so a rerun of the delivery (a retry, a requeue) settles nothing more. Only while
# the settling instance holds the job at that segment (not a delivery taken over), and
# nothing for a segment no dispatch charged (sent straight to an idle queue, with no
# tenant waiting) or a record that is gone. KEYS: the job's record, the queue's active
# tenants, parked passes, weights. ARGV: tenant, the delivery's work, segment, instance.
_SETTLE = """
local h = redis.call('HMGET', KEYS[1], 'charged:' .. ARGV[3], 'segment', 'instance')
local charged, work = tonumber(h[1]), tonumber(ARGV[2])
if not charged or charged == work or h[2] ~= ARGV[3] or h[3] ~= ARGV[4] then return 0 end
local step = (work - charged) / tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '1')
redis.call('HSET', KEYS[1], 'charged:' .. ARGV[3], ARGV[2])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZINCRBY', KEYS[2], step, ARGV[1])
else
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[1], step)
end
return 1
"""

# KEYS: active tenants, parked passes, weights, the queue's waiting set (jobs sent and not
# yet claimed), paused flag, the family's capacity, the backlog tally, the tenants-waiting
# flag (deleted when this run empties the active set), the service point (raised to the
# last pass this run served at). A job dispatched advances its tenant's pass by its work
# over the tenant's weight (a record without work: 1), which its record keeps as
# ``charged:<segment>`` for its worker to settle (``_SETTLE``). ARGV: pending-set
# prefix, margin, most jobs to move, in-flight-set prefix, job-record prefix, now (the
# dispatched jobs' updated_at), cap-key prefix, FLIGHT_CHECK_AFTER_S, the queue, then tenants of which
# one at least must have jobs pending here (none named: no such condition; a freed cap slot
# changes nothing for a queue where its tenant has none). A job's waiting-set
# score is its priority and the time it is sent (the broker serves each priority in the order it was sent, which
# queue positions follow). A capped tenant (an API key
# whose over_cap is "hold") is passed over while its dispatched jobs that have not ended
# reach its cap, and its pass is raised to the last pass served. Returns {flat (job id,
# priority) pairs, tenants still waiting, flat (job id, segment) pairs of the moved jobs
# whose next segment is not their first}.
_DISPATCH = _ROOM + _SCORES + """
local waiting = redis.call('ZCARD', KEYS[1])
if waiting == 0 or redis.call('EXISTS', KEYS[5]) == 1 then return {{}, waiting, {}} end
if #ARGV > 9 then
  local named = false
  for i = 10, #ARGV do named = named or redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 1 end
  if not named then return {{}, waiting, {}} end
end
local space = math.min(room(KEYS[4], KEYS[6], ARGV[2]), tonumber(ARGV[3]))
local caps = {}  -- each tenant's cap (false: none), read once per run
local flying = {}  -- capped tenants' jobs in flight, counted once per run
local function at_cap(tenant, cap)
  if not flying[tenant] then
    local flight = ARGV[4] .. tenant
    flying[tenant] = redis.call('ZCARD', flight)
    if flying[tenant] >= tonumber(cap) then
      -- A final state takes its job out (_TRANSITION); what stays is a job whose record
      -- expired or was deleted. An entry is looked at once per FLIGHT_CHECK_AFTER_S, so a
      -- tenant held at a cap of hundreds costs no read per job on every dispatch.
      local t = now()
      for _, id in ipairs(redis.call('ZRANGEBYSCORE', flight, '-inf', t - tonumber(ARGV[8]))) do
        local st = redis.call('HGET', ARGV[5] .. id, 'state')
        if not st or st == 'succeeded' or st == 'failed' or st == 'cancelled' then
          redis.call('ZREM', flight, id)
        else
          redis.call('ZADD', flight, 'XX', t, id)  -- live: looked at again a period from now
        end
      end
      flying[tenant] = redis.call('ZCARD', flight)
    end
  end
  return flying[tenant] >= tonumber(cap)
end
local out, later, held, nheld, popped, front = {}, {}, {}, 0, 0, nil
-- Entries with nothing to run (records that expired while they waited) are popped without
-- using space. They count against the limit too, so one run stays short however many of
-- them a long-held tenant left; and a tenant that has popped STALE_TURN of them in a run
-- is passed over for the rest of it (the next run goes on), so the others are served.
local STALE_TURN, stale, passed_over = 100, {}, {}
while space > 0 and popped < tonumber(ARGV[3]) do
  local tenant, pass, cap
  local lead = redis.call('ZRANGE', KEYS[1], 0, nheld, 'WITHSCORES')
  for i = 1, #lead, 2 do
    if not held[lead[i]] then tenant, pass = lead[i], tonumber(lead[i + 1]); break end
  end
  if not tenant then break end
  if caps[tenant] == nil then caps[tenant] = redis.call('GET', ARGV[7] .. tenant) or false end
  cap = caps[tenant]
  if cap and at_cap(tenant, cap) then
    held[tenant] = true
    nheld = nheld + 1
  else
    local pending = ARGV[1] .. tenant
    local job = redis.call('ZPOPMIN', pending)
    if #job > 0 then popped = popped + 1 end
    -- A record that expired while its job waited, a job that ended there (a cancel moves it
    -- out after its final state), or one whose record waits in another queue now (a copy
    -- left by a lost reply): nothing to run here, nothing to hold room for, no turn used.
    -- Otherwise its wait in the broker starts now (what a lost-message sweep measures), and
    -- a capped tenant's job names its in-flight set, which its final state leaves.
    local rec = #job > 0 and redis.call('HMGET', ARGV[5] .. job[1], 'state', 'segment', 'queue', 'work') or {}
    if rec[1] == 'queued' and (not rec[3] or rec[3] == ARGV[9]) then
      front = pass
      local work = tonumber(rec[4]) and rec[4] or '1'
      pass = pass + tonumber(work) / tonumber(redis.call('HGET', KEYS[3], tenant) or '1')
      local fields = {'updated_at', ARGV[6], 'charged:' .. (rec[2] or '0'), work}
      if cap then table.insert(fields, 'capped'); table.insert(fields, ARGV[4] .. tenant) end
      redis.call('HSET', ARGV[5] .. job[1], unpack(fields))
      local priority = priority_of(job[2])
      redis.call('ZADD', KEYS[4], score_at(priority, ARGV[6], #out / 2), job[1])
      if cap then
        redis.call('ZADD', ARGV[4] .. tenant, now(), job[1])
        flying[tenant] = flying[tenant] + 1
      end
      table.insert(out, job[1])
      table.insert(out, tostring(priority))
      if rec[2] and rec[2] ~= '0' then  -- a chain's later stage (a hand-off that waited its turn)
        table.insert(later, job[1])
        table.insert(later, rec[2])
      end
      space = space - 1
    elseif #job > 0 then
      stale[tenant] = (stale[tenant] or 0) + 1
      if stale[tenant] >= STALE_TURN then
        held[tenant], passed_over[tenant] = true, true
        nheld = nheld + 1
      end
    end
    if redis.call('EXISTS', pending) == 1 then
      redis.call('ZADD', KEYS[1], pass, tenant)
    else
      redis.call('ZREM', KEYS[1], tenant)
      redis.call('HSET', KEYS[2], tenant, pass)
    end
  end
end
if popped > 0 then redis.call('LPOP', KEYS[7], popped) end
-- A held tenant cannot run: like a stride client that left, it keeps no claim to the slots
-- the others used meanwhile, and comes back level with the front (the last pass served).
-- Left behind, it would take every slot once its cap freed, until its pass caught up, and
-- the tenants that had waited their turns would wait again.
if front then
  redis.call('ZADD', KEYS[9], 'GT', front, 'pass')
  for tenant in pairs(held) do
    -- (not one passed over for its expired entries: they used no turn, so it keeps its pass)
    if not passed_over[tenant] then redis.call('ZADD', KEYS[1], 'XX', 'GT', front, tenant) end
  end
end
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then redis.call('DEL', KEYS[8]) end
return {out, left, later}
"""

# What an earlier version kept otherwise, for a queue. KEYS: active tenants, the
# tenants-waiting flag, the caps hash an earlier version kept. ARGV: cap-key prefix. Sets the
# flag while tenants wait (admission checks the flag alone) and moves the caps to their keys.
_ADOPT = """
if redis.call('ZCARD', KEYS[1]) > 0 then redis.call('SET', KEYS[2], 1) end
local caps = redis.call('HGETALL', KEYS[3])
for i = 1, #caps, 2 do redis.call('SET', ARGV[1] .. caps[i], caps[i + 1]) end
if #caps > 0 then redis.call('DEL', KEYS[3]) end
return 0
"""

# KEYS: the family's instances. ARGV: job-seconds key prefix. Returns live instances, their
# mean seconds per job ('' if none reported), the latest heartbeat expiry seen ('' if none)
# and Redis's time.
_FAMILY = _CLOCK + """
local t = now()
local live = redis.call('ZRANGEBYSCORE', KEYS[1], t, '+inf')
local sum, n = 0, 0
for _, id in ipairs(live) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then sum = sum + tonumber(v); n = n + 1 end
end
local last = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#live, n > 0 and tostring(sum / n) or '', last[2] or '', tostring(t)}
"""


@dataclass(frozen=True)
class Admission:
    job_id: str  # the job's id, or the id of the job that holds its idempotency key
    created: bool
    admitted: bool  # sent to its queue now: its message goes out next
    room: bool  # waits its turn while its queue has room: a dispatch now sends it or another's job


@dataclass(frozen=True)
class Dispatched:
    moved: list[tuple[str, str, int]]  # (job id, queue, priority) of the jobs to send now
    waiting: set[str]  # the queues where tenants still have jobs pending
    segments: dict[str, int] = field(default_factory=dict)  # the segment to send, where not the first

    def segment(self, job_id: str) -> int:
        return self.segments.get(job_id, 0)


@dataclass(frozen=True)
class Settlement:
    """A claimed delivery's work, for ``Scheduler.settle``."""

    job_id: str
    segment: int
    instance: str  # the worker instance that claimed it
    tenant: str
    queue: str
    charged: float  # what its dispatch charged (``Claim.charged``)
    work: float  # its work at the size it runs on


@dataclass(frozen=True)
class FamilyView:
    live: int
    job_s: float | None
    no_worker_for_s: float | None  # since the last heartbeat expired; None if never seen or live


class Scheduler:
    """Pending sets, tenant passes and dispatch for one Redis and queue prefix."""

    def __init__(self, store: JobStore, registry: Registry | None = None, credit: float = CREDIT,
                 margin: int = MARGIN):
        """``registry``: the models, which a job's work follows (``shared.plan.segment_work``);
        None for a scheduler that only reads (a status), whose submissions count 1 a job."""
        self.store, self.registry, self.credit, self.margin = store, registry, credit, margin
        self.r, self.prefix = store.r, store.prefix
        self._submit = self.r.register_script(_SUBMIT)
        self._hand_off = self.r.register_script(_HAND_OFF)
        self._dispatch = self.r.register_script(_DISPATCH)
        self._family = self.r.register_script(_FAMILY)
        self._adopt = self.r.register_script(_ADOPT)
        self._settle = self.r.register_script(_SETTLE)

    def _key(self, what: str, queue: str) -> str:
        return f"{self.prefix}:{what}:{queue}"

    def submit_many(self, items: list[tuple[str, JobSpec, Plan]], traces: dict[str, dict] | None = None,
                    owner: str | None = None, now: float | None = None) -> list[Admission]:
        """Store new jobs and admit each, one script per job, all in one round trip. A job goes
        straight to its queue when no tenant has jobs pending there, its tenant has no cap,
        the queue is open and there is room; else it waits in its tenant's pending set.
        A job whose idempotency key another holds gives that job's id, created False.
        ``traces``: submitters' trace contexts; ``owner``: the API key submitting them."""
        now = time.time() if now is None else now
        traces = traces or {}
        calls = []
        for i, (job_id, spec, plan) in enumerate(items):
            tenant = spec.tenant or DEFAULT_TENANT
            keys, head = self.store.create_head(job_id, spec)
            score = queue_score(spec.priority, now) + i  # a bulk call's jobs keep their order
            first = plan.segments[0]
            work = self.work(spec, first.stages, named_input_size(spec.input.image))
            fields = self.store.record_fields(spec, plan, now, traces.get(job_id), owner, work=work)
            calls.append((self._submit, keys + self._admit_keys(first.queue, first.family, tenant),
                          head + [score, tenant, self.credit, self.margin, first.queue, *fields]))
        replies = run_scripts(self.r, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [Admission(_text(got), _text(got) == job_id, int(answer) == ADMITTED, int(answer) == ROOM)
                for (job_id, _, _), (got, answer) in zip(items, replies)]

    def hand_off(self, job_id: str, spec: JobSpec, created_at: float, end: DeliveryEnd, nxt: Segment,
                 entering: tuple[int, int] | None = None, trace: dict | None = None) -> tuple[bool, int]:
        """End the delivery ``end`` names and queue the job's next segment ``nxt`` in its queue
        under the job's tenant, one round trip (``_HAND_OFF``); the record's work becomes the
        segment's (``entering``: the pixel size handed on), which its dispatch charges the
        tenant. ``trace``: the hand-off's trace context, kept for a dispatch that sends the
        message later.
        Returns (done: False when the delivery was refused, taken over or the job ended;
        admission's answer: ADMITTED, send its message now; ROOM, dispatch the queue;
        PENDING, it waits for a claim there; CANCEL_ASKED, not done: the job is to end
        cancelled)."""
        tenant = spec.tenant or DEFAULT_TENANT
        kept = {"trace": json.dumps(trace)} if trace else {}
        keys, change = self.store.transition_call(job_id, JobState.queued, end=end, guards=("?held",),
                                                  segment=end.segment + 1, queue=nxt.queue,
                                                  work=self.work(spec, nxt.stages, entering), **kept)
        args = [job_id, queue_score(spec.priority, created_at), queue_score(spec.priority, time.time()), tenant,
                self.credit, self.margin, nxt.queue, *change]
        (reply,) = run_scripts(self.r, [(self._hand_off, keys + self._admit_keys(nxt.queue, nxt.family, tenant),
                                         args)])
        if isinstance(reply, Exception):
            raise reply
        done, answer = reply
        return int(done) == 1, int(answer)

    def work(self, spec: JobSpec, stages: list[int], entering: tuple[int, int] | None = None) -> float:
        """A delivery's work (``shared.plan.segment_work``). 1, about a default job's, without a
        registry, or where this process's registry lacks one of the job's models (a worker's
        own registry file may name fewer models than the producers' that planned the job): a
        hand-off is never refused over what it is charged, and the worker that runs the
        delivery settles the difference."""
        try:
            return segment_work(spec, self.registry, stages, entering) if self.registry is not None else 1.0
        except KeyError:
            return 1.0

    def settle(self, deliveries: list[Settlement]) -> int:
        """Charge each delivery's tenant the difference between what its dispatch charged and
        its work, worked out by the worker that has read what the delivery runs on
        (``_SETTLE``; one round trip for all, none when every charge is within
        ``SETTLE_WITHIN`` of its work). Returns how many were settled."""
        due = [d for d in deliveries if abs(d.work - d.charged) > SETTLE_WITHIN * max(d.charged, d.work)]
        calls = [(self._settle, [self.store.key(d.job_id), self._key("active", d.queue), self._key("passes", d.queue),
                                 f"{self.prefix}:weights"], [d.tenant, d.work, d.segment, d.instance]) for d in due]
        replies = run_scripts(self.r, calls) if calls else []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return sum(int(reply) for reply in replies)

    def _admit_keys(self, queue: str, family: str, tenant: str) -> list[str]:
        return [pending_key(self.prefix, queue, tenant), self._key("active", queue), self._key("passes", queue),
                backlog_key(self.prefix, queue), self._key("queued", queue), self._key("paused", queue),
                family_capacity_key(self.prefix, family), cap_key(self.prefix, tenant), backlog_channel(self.prefix),
                tenants_waiting_key(self.prefix, queue), f"{self.prefix}:weights", self._key("served", queue)]

    def dispatch(self, queues: dict[str, str], tenants: Iterable[str] = ()) -> Dispatched:
        """Move what fits from the pending sets of ``queues`` (queue -> family) into them, one
        round trip. ``tenants``: only in queues where one of them has jobs pending (the
        tenants whose cap slots freed)."""
        tenants = list(tenants)
        replies = run_scripts(self.r, [self._dispatch_call(queue, family, tenants)
                                       for queue, family in queues.items()])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return Dispatched([(job_id, queue, priority) for queue, (flat, _, _) in zip(queues, replies)
                           for job_id, priority in _pairs(flat)],
                          {queue for queue, (_, waiting, _) in zip(queues, replies) if int(waiting)},
                          {job_id: segment for _, _, later in replies for job_id, segment in _pairs(later)})

    def _dispatch_call(self, queue: str, family: str, tenants: list[str], limit: int = 1000) -> tuple:
        return (self._dispatch,
                [self._key("active", queue), self._key("passes", queue), f"{self.prefix}:weights",
                 self._key("queued", queue), self._key("paused", queue), family_capacity_key(self.prefix, family),
                 backlog_key(self.prefix, queue), tenants_waiting_key(self.prefix, queue), self._key("served", queue)],
                [pending_key(self.prefix, queue, ""), self.margin, limit, flight_key(self.prefix, ""),
                 f"{self.prefix}:job:", time.time(), cap_key(self.prefix, ""), FLIGHT_CHECK_AFTER_S, queue,
                 *tenants])

    def feed(self, queues: dict[str, str], send: Callable[..., None], tenants: Iterable[str] = ()) -> Dispatched:
        """``dispatch`` ``queues`` (queue -> family; ``tenants`` as there), and send each moved
        job's message (its first segment's, or a hand-off's that waited its turn) with the trace
        its submitter kept (``send(job_id, segment, queue, priority, on_behalf=True,
        kept_trace=...)``). A send that fails leaves its job waiting
        with no message: the lost-message sweep sends it again."""
        done = self.dispatch(queues, tenants)
        kept = self.store.kept_traces([job_id for job_id, _, _ in done.moved])
        for job_id, queue, priority in done.moved:
            send(job_id, done.segment(job_id), queue, priority, on_behalf=True, kept_trace=kept.get(job_id))
        return done

    def adopt_earlier_keys(self, queue: str) -> None:
        """Bring what an earlier version kept for ``queue`` into this one's keys (a worker
        does at start, so a rolling upgrade keeps its waiting tenants and caps)."""
        self._adopt(keys=[self._key("active", queue), tenants_waiting_key(self.prefix, queue), f"{self.prefix}:caps"],
                    args=[cap_key(self.prefix, "")])

    def set_weight(self, tenant: str, weight: float) -> None:
        self.r.hset(f"{self.prefix}:weights", tenant, weight)

    def set_cap(self, tenant: str, cap: int | None) -> None:
        """Hold a tenant's jobs back while ``cap`` of them are dispatched and not ended (None:
        no cap)."""
        if cap is None:
            self.r.delete(cap_key(self.prefix, tenant))
        else:
            self.r.set(cap_key(self.prefix, tenant), cap)

    def pause(self, queue: str) -> None:
        self.r.set(self._key("paused", queue), 1)

    def resume(self, queue: str) -> None:
        self.r.delete(self._key("paused", queue))

    def paused(self, queue: str) -> bool:
        return bool(self.r.exists(self._key("paused", queue)))

    def family(self, family: str) -> FamilyView:
        live, job_s, last, now = self._family(keys=[family_instances_key(self.prefix, family)],
                                              args=[job_seconds_prefix(self.prefix)])
        gone = float(now) - float(last) if not int(live) and last else None
        return FamilyView(int(live), float(job_s) if job_s else None, gone)

    def status_of(self, view: JobView) -> JobStatus:
        """A job's status as one read of its record shows it, with a queued job's place in
        line and ETA, or why it cannot start."""
        w = view.waits_in
        if w is None:
            return view.status
        return view.status.model_copy(update=self.estimate(view.status.id, w.queue, w.family, w.tenant))

    def estimate(self, job_id: str, queue: str, family: str, tenant: str) -> dict:
        """A queued job's ``queue_position`` (jobs that start before it), ``eta_s`` ((position
        + 1) x the family's recent seconds per job / its live workers) and ``waiting_for``."""
        ahead = self.jobs_ahead(job_id, queue, tenant)
        out = {"queue_position": ahead, "eta_s": None, "waiting_for": None}
        view = self.family(family)
        if not view.live:
            since = f"none for {describe_wait(view.no_worker_for_s)}" if view.no_worker_for_s is not None \
                else "none seen yet"
            out["waiting_for"] = f"no live worker serves family {family} ({since})"
        elif self.paused(queue):
            out["waiting_for"] = f"the {family} queue is paused"
        elif view.job_s is not None and ahead is not None:
            out["eta_s"] = round((ahead + 1) * view.job_s / view.live, 1)
        return out

    def jobs_ahead(self, job_id: str, queue: str, tenant: str) -> int | None:
        """Jobs that start before this one. Sent to the broker: those ahead of it there.
        Pending: those already sent, those ahead in its tenant's set, and what the other
        tenants get meanwhile by their passes and weights. None when it waits in neither."""
        # Both ranks in one transaction: a dispatch between two reads would move the job
        # from the pending set to the sent one unseen.
        pipe = self.r.pipeline(transaction=True)
        pipe.zrank(pending_key(self.prefix, queue, tenant), job_id)
        pipe.zrank(self._key("queued", queue), job_id)
        rank, sent_rank = pipe.execute()
        if rank is None:
            return None if sent_rank is None else int(sent_rank)
        active = [(_text(t), p) for t, p in self.r.zrange(self._key("active", queue), 0, -1, withscores=True)]
        passes = dict(active)
        weights = {_text(k): float(v) for k, v in self.r.hgetall(f"{self.prefix}:weights").items()}
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(self._key("queued", queue))
        for t, _ in active:
            pipe.zcard(pending_key(self.prefix, queue, t))
            pipe.zrange(pending_key(self.prefix, queue, t), 0, 0)
        sent, *found = pipe.execute()
        sizes, heads = found[0::2], [ids[0] if ids else None for ids in found[1::2]]
        my_work, *works = self._works([job_id, *heads])
        # Passes advance by work/weight a job: its tenant's jobs ahead of it, taken as costing
        # what it costs, bring it to my_pass; each other tenant runs jobs like its next one
        # until it passes that.
        my_pass = passes.get(tenant, 0.0) + rank * my_work / weights.get(tenant, 1.0)
        others = sum(min(n, max(0, int((my_pass - p) * weights.get(t, 1.0) / work)) + (1 if p < my_pass else 0))
                     for (t, p), n, work in zip(active, sizes, works) if t != tenant)
        return int(sent) + rank + others

    def _works(self, job_ids: list) -> list[float]:
        """Each job's work as its record holds it (1 where none is recorded)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.store.key(_text(job_id or "")), "work")
        return [float(w or 0) or 1.0 for w in pipe.execute()]


def describe_wait(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _pairs(flat: list) -> list[tuple[str, int]]:
    return [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
