"""Job records in Redis: the single source of truth for a job's state and progress.

This module is the only one that reads or writes a job's hash. One hash per job,
``<prefix>:job:<id>``, with these fields:

- ``spec``, ``plan``: the validated job and its segments (JSON), written at submission.
- ``state`` (queued | running | succeeded | failed | cancelled), ``created_at``,
  ``updated_at``, ``started_at``, ``finished_at``; ``error`` for failed and cancelled jobs;
  ``note``: what recovery did (``requeued: worker X ... stopped beating; ...``), and
  ``requeued_from`` (``<instance>:<segment>``) that recovery's delivery, until the next claim.
- ``queue``: the queue-position set the job waits in (``<prefix>:queued:<queue>``);
  ``cancel`` = 1 once cancel was asked.
- ``segment``: the segment that runs or waits next; ``worker`` (hostname) and ``instance``
  (the worker process's own id) of the delivery running it; ``instance`` is absent between
  deliveries, and names the last holder once the job has ended; ``claimed_at``: when that
  delivery was claimed (its claim's own time, which tells a replayed claim from a copy).
- ``attempts``: deliveries that started; ``attempt:<n>``: JSON of each (segment, worker,
  instance, started_at, and ``ended`` when recovery took it away).
- ``due_at``: when a retry's held-back message is due (its backoff), for the lost-message
  sweep.
- ``inflight:<seg>``: deliveries of a segment that started and never ended (a worker died):
  the poison-job counter; ``retries:<seg>``: transient-error retries, ``oom:<seg>``: those
  out of GPU memory.
- ``stage``, ``step``, ``total_steps``: progress; ``record:<i>``: stage records (JSON).
- ``outputs``, ``manifest``: the results of a succeeded job.
- ``tenant``: whose fair share the job runs in; ``trace``: the submitter's trace context
  (tracing on), for the process that sends its first message when its turn comes.
- ``owner``, ``webhook_url``, ``webhook_events``, ``webhook_state``, ``webhook_attempts``,
  ``webhook_last_error``, ``webhook_sent:<event>``: the HTTP API's key and webhook delivery.

Beside the hashes, for recovery by liveness: ``<prefix>:instances``, a sorted set of
worker instances scored by when their heartbeat expires (Redis's own clock), and
``<prefix>:running:<instance>``, the set of ``<job id>:<segment>`` deliveries an instance
holds, from its claim until the delivery ends (hand-off or final state written, an
overlapped finish included). For metrics, ``<prefix>:finished`` counts the jobs that
ended, by final state.

State changes go through Lua scripts, so a terminal state is never overwritten by a late
or duplicate delivery and each change is one round trip.
"""
from __future__ import annotations

import json
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Callable, NamedTuple

import redis
from pydantic import BaseModel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from easel.shared import tracing
from easel.shared.keys import (backlog_key, family_batch_class_prefix, family_batch_sizes_key, family_capacity_key,
                               family_instances_key, flight_key, job_seconds_prefix, pending_key)
from easel.shared.schema import Attempt, JobSpec, JobState, JobStatus, Plan, Progress

_TERMINAL = "cur == 'succeeded' or cur == 'failed' or cur == 'cancelled'"
# Liveness is judged by Redis's own clock: an instance is alive while its score in the
# instances zset (its heartbeat's expiry) is in the future.
_CLOCK = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function alive(instances, id)
  local expires = redis.call('ZSCORE', instances, id)
  return expires and tonumber(expires) > now()
end
"""

# A webhook's wish for a terminal state: its key's events (JSON; none recorded: the terminal
# ones). A job it wants is due for delivery now; one it does not says so.
_WEBHOOK_DUE = """
local function webhook_due(job_key, due_key, job_id, state, events)
  local wanted = not events
  for _, e in ipairs(events and cjson.decode(events) or {}) do wanted = wanted or e == state end
  if wanted then
    redis.call('ZADD', due_key, 'NX', 0, job_id)
  else
    redis.call('HSET', job_key, 'webhook_state', 'not requested')
  end
end
"""

# KEYS: job hash, events channel, finished-jobs counts, webhooks' due set.
# ARGV: event JSON, running-set prefix,
# job id, segment whose delivery ends ('' = none), instance, new state ('' = none), the
# ending delivery's claim attempt ('' = not known), then field/value pairs. A job that
# ends is counted by its final state, so metrics read the counts instead of walking every
# job, and a job dispatched under its tenant's cap (its
# ``capped`` field names the tenant's in-flight set) leaves that set: the reply is then
# that set's key instead of 1, so the tenant's next job is dispatched at once. A job with a
# webhook is due for its delivery at once, without the dispatchers' looking at every
# watched job until it ends (one that also wants passing events stays watched until a
# sweep has sent them).
# Ending a delivery drops it from the instance's running set and, while the instance still
# holds the job, resets the segment's crash counter and clears the holder (a final state
# keeps it: it names the last holder, and no claim or reaper reads it past a final state);
# while another instance
# holds it, or a reaper took it from this instance (``requeued_from``, until the next claim),
# or a claim came after the delivery's own (the job's ``attempts`` moved on: a worker that
# stalled past its TTL, back after another delivery claimed the job and left it waiting for
# a retry), the delivery has been taken over and its state change is refused; the running
# set keeps what a later claim of the same instance put there. A ``segment``
# field never moves the job back (a late hand-off after the next segment has run). Guards,
# pairs whose name starts with ``?`` (not written): ``?never_claimed`` refuses the change
# once any worker has claimed the job (a producer failing a job whose message it could not
# send must not end one that runs); ``?held`` unless the ending delivery's instance holds the
# job (a hand-off: not a late delivery whose job was requeued, nor a replay of its script).
# Publishing from the script means no event is published for a change that did not happen.
# As a Lua function of (keys, argv), so a script that does more (a hand-off, below) runs
# the same change. ``_TRANSITION`` runs it alone.
_TRANSITION_FN = _WEBHOOK_DUE + f"""
local function transition(K, A)
  local h = redis.call('HMGET', K[1], 'state', 'instance', 'segment', 'capped', 'attempts', 'webhook_url',
                       'webhook_events', 'requeued_from')
  local cur = h[1]
  local replaced = cur and A[7] ~= '' and h[5] ~= A[7]
  if A[4] ~= '' and not (replaced and h[2] == A[5] and h[3] == A[4]) then  -- even from an expired record
    redis.call('SREM', A[2] .. A[5], A[3] .. ':' .. A[4])
  end
  if not cur then
    redis.call('DEL', K[1])  -- what a late write made of an expired record (see _CLAIM)
    return -1
  end
  local writes = {{}}
  if A[4] ~= '' then
    if h[2] == A[5] and not replaced then
      if A[6] ~= 'succeeded' and A[6] ~= 'failed' and A[6] ~= 'cancelled' then
        redis.call('HDEL', K[1], 'instance')
      end
      writes = {{'inflight:' .. A[4], '0'}}
    elseif h[2] or h[8] == A[5] .. ':' .. A[4] or replaced then
      return 0  -- another delivery holds it or claimed it since, or a reaper took it from this one
    end
  end
  local function commit(reply)
    if #writes > 0 then redis.call('HSET', K[1], unpack(writes)) end
    return reply
  end
  if {_TERMINAL} then return commit(0) end
  if A[6] == '' then return commit(1) end
  for i = 8, #A, 2 do
    if A[i] == 'segment' and h[3] and tonumber(A[i+1]) < tonumber(h[3]) then return commit(0) end
    if A[i] == '?never_claimed' and (cur ~= 'queued' or (h[5] and h[5] ~= '0')) then return commit(0) end
    if A[i] == '?held' and h[2] ~= A[5] then return commit(0) end
  end
  for i = 8, #A, 2 do
    if string.sub(A[i], 1, 1) ~= '?' then
      table.insert(writes, A[i])
      table.insert(writes, A[i + 1])
    end
  end
  commit(1)
  local new, reply = A[6], 1
  if new == 'succeeded' or new == 'failed' or new == 'cancelled' then
    redis.call('HINCRBY', K[3], new, 1)
    if h[4] then
      redis.call('ZREM', h[4], A[3])
      reply = h[4]
    end
    if h[6] then webhook_due(K[1], K[4], A[3], new, h[7]) end
  end
  redis.call('PUBLISH', K[2], A[1])
  return reply
end
"""
_TRANSITION = _TRANSITION_FN + "return transition(KEYS, ARGV)\n"

# Record a job's webhook, once: a job that has one keeps it (a replayed request's second
# registration must not send a delivered one again). A job that ended before (a quick job,
# or one cancelled at once) is due at once: its terminal transition found no webhook to make
# due. KEYS: job hash, watch
# set, due set. ARGV: job id, URL, events JSON, '1' to watch for passing events, now.
_SET_WEBHOOK = _WEBHOOK_DUE + f"""
local h = redis.call('HMGET', KEYS[1], 'state', 'webhook_url')
local cur = h[1]
if not cur or h[2] then return 0 end
redis.call('HSET', KEYS[1], 'webhook_url', ARGV[2], 'webhook_state', 'pending', 'webhook_attempts', 0,
           'webhook_events', ARGV[3])
if {_TERMINAL} then
  webhook_due(KEYS[1], KEYS[3], ARGV[1], cur, ARGV[3])
elseif ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
end
return 1
"""

# Everything a delivery checks and records before it runs, in one round trip. Drops the
# job from its current queue-position set; a stale copy (of a segment the job has moved
# past) drops it only from the set of the queue it came from, where it is left over, and
# not where the job's current segment waits. An unknown job's hash, if there is one, is
# what writes after its record expired made of it (a progress write or a cancel flag is a
# plain HSET, which makes a key without a TTL): job ids are never reused, so it is
# deleted, here and where the transition or requeue finds one. Then refuses unknown and terminal jobs, a
# segment the job has moved past (stale), and a segment that another live instance runs (a
# duplicate: a message the lost-message sweep sent again while its first copy was on its
# way). A claim of what this very instance holds with the same claim time is a replay of
# this script (its reply was lost), answered as the first run was; with another, it is a
# copy of the message meeting its holder (still writing the first run's outputs, say).
# Then refuses cancelled and poison deliveries, counts the delivery and the attempt, and
# records this instance as the holder. A run
# answers with the job's spec, plan, times, its attempt count, this attempt's record
# (the manifest reads no attempts back in the common case of one), how many deliveries
# of this segment died before (a worker runs such a job alone, not in a micro-batch) and
# the work this segment's dispatch charged its tenant ('' when none did: ``Scheduler.settle``).
# KEYS: job hash, events channel, instances zset. ARGV: queue-position key prefix, job id,
# segment, worker, now, crash limit, the "running" event JSON, instance, running-set prefix,
# the queue the delivery came from ('' if unknown).
# (Key names built from ARGV assume one Redis, not a cluster; easel's broker is one Redis.)
_CLAIM = _CLOCK + f"""
local h = redis.call('HMGET', KEYS[1], 'state', 'cancel', 'queue', 'spec', 'plan', 'stage', 'created_at',
                     'started_at', 'segment', 'instance', 'attempts', 'inflight:' .. ARGV[3], 'claimed_at',
                     'charged:' .. ARGV[3])
local cur = h[1]
if not cur then
  redis.call('DEL', KEYS[1])
  if ARGV[10] ~= '' then redis.call('ZREM', ARGV[1] .. ARGV[10], ARGV[2]) end  -- an expired job's place
  return {{'unknown'}}
end
local seg = tonumber(ARGV[3])
local stale = h[9] and seg < tonumber(h[9])
if h[3] and not stale then redis.call('ZREM', ARGV[1] .. h[3], ARGV[2]) end
if stale and ARGV[10] ~= '' and ARGV[10] ~= h[3] then redis.call('ZREM', ARGV[1] .. ARGV[10], ARGV[2]) end
if {_TERMINAL} then return {{'terminal', cur}} end
if stale then return {{'stale', h[9]}} end
if h[10] and h[9] and seg == tonumber(h[9]) then
  if h[10] == ARGV[8] and h[13] == ARGV[5] then
    return {{'run', h[4], h[5], h[7], h[8], h[11], redis.call('HGET', KEYS[1], 'attempt:' .. h[11]),
            tonumber(h[12] or '1') - 1, h[14] or ''}}
  end
  if h[10] == ARGV[8] or alive(KEYS[3], h[10]) then return {{'duplicate', h[10]}} end
end
if h[2] == '1' then return {{'cancel', h[8] or ''}} end
local crashed = tonumber(h[12] or '0')
if crashed >= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'inflight:' .. ARGV[3], crashed + 1)
  return {{'poison', tostring(crashed), h[6] or '0'}}
end
local started = h[8] or ARGV[5]
local n = tonumber(h[11] or '0') + 1
local attempt = cjson.encode({{segment = seg, worker = ARGV[4], instance = ARGV[8], started_at = tonumber(ARGV[5])}})
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[4], 'instance', ARGV[8], 'segment', ARGV[3],
           'updated_at', ARGV[5], 'claimed_at', ARGV[5], 'started_at', started, 'attempts', n,
           'attempt:' .. n, attempt, 'inflight:' .. ARGV[3], crashed + 1, 'requeued_from', '')
redis.call('SADD', ARGV[9] .. ARGV[8], ARGV[2] .. ':' .. ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[7])
return {{'run', h[4], h[5], h[7], started, n, attempt, crashed, h[14] or ''}}
"""

# A dead instance's delivery goes back to the queue: only while that instance still holds
# the job at that segment (another delivery may have taken it meanwhile). Returns the note
# it recorded, or false. Idempotent: asked again for the same instance and segment (a
# replayed script, a reaper that died before sending) it answers with the note again, so
# the message is sent at least once; a copy is dropped at its claim.
# The instance it took the job from is told on the stops channel, in case it still runs.
# KEYS: job hash, events channel, stops channel, and the instance's running set when it is
# alive (no reaper's ``forget_instance`` will clear it; in this script, before the message
# is sent again, so a claim of it by the same instance is not undone). ARGV: instance,
# segment, why (after "requeued: worker X (instance I) "), now, job id.
_REQUEUE = f"""
if KEYS[4] then redis.call('SREM', KEYS[4], ARGV[5] .. ':' .. ARGV[2]) end
local h = redis.call('HMGET', KEYS[1], 'state', 'instance', 'segment', 'attempts', 'worker', 'requeued_from', 'note')
local cur = h[1]
if not cur then
  redis.call('DEL', KEYS[1])  -- what a late write made of an expired record (see _CLAIM)
  return false
end
if {_TERMINAL} then return false end
if h[3] ~= ARGV[2] then return false end
if cur == 'queued' and not h[2] and h[6] == ARGV[1] .. ':' .. ARGV[2] then return h[7] end
if h[2] ~= ARGV[1] then return false end
local note = 'requeued: worker ' .. (h[5] or '?') .. ' (instance ' .. ARGV[1] .. ') ' .. ARGV[3]
redis.call('HDEL', KEYS[1], 'instance')
redis.call('HSET', KEYS[1], 'state', 'queued', 'note', note, 'updated_at', ARGV[4],
           'requeued_from', ARGV[1] .. ':' .. ARGV[2])
local akey = 'attempt:' .. (h[4] or '0')
local rec = redis.call('HGET', KEYS[1], akey)
if rec then
  local a = cjson.decode(rec)
  a.ended = note
  redis.call('HSET', KEYS[1], akey, cjson.encode(a))
end
redis.call('PUBLISH', KEYS[2], cjson.encode({{state = 'queued', note = note, segment = tonumber(ARGV[2]),
                                              updated_at = tonumber(ARGV[4])}}))
redis.call('PUBLISH', KEYS[3], cjson.encode({{job_id = ARGV[5], stop = 'taken', instance = ARGV[1]}}))
return note
"""

# KEYS: instances zset. ARGV: running-set prefix, the most instances to take, lease seconds.
# Takes the instances whose heartbeat expired (by Redis's clock, so worker clocks do not
# matter) with their running deliveries: each is leased to this reaper (its score moves
# ``lease`` seconds ahead), so of several reapers one gets it, and one that dies midway
# leaves it to another once the lease runs out. ``forget_instance`` removes it once done.
# Returns the lease's end (the score the instances now have), then flat triples: instance,
# expiry, "<job id>:<segment>"; an instance holding nothing comes back with an empty third
# field.
_REAP = _CLOCK + """
local t = now()
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local leased = t + tonumber(ARGV[3])
local out = {tostring(leased)}
for i = 1, #dead, 2 do
  local id = dead[i]
  redis.call('ZADD', KEYS[1], leased, id)
  local held = redis.call('SMEMBERS', ARGV[1] .. id)
  if #held == 0 then table.insert(out, id); table.insert(out, dead[i + 1]); table.insert(out, '') end
  for _, m in ipairs(held) do
    table.insert(out, id); table.insert(out, dead[i + 1]); table.insert(out, m)
  end
end
return out
"""

# A reaped instance is forgotten once the deliveries its reap found are requeued: those
# leave its running set, and it leaves the instances only if nothing else is left there and
# its score is still the lease's (an instance that stalled past its TTL and then came back
# has beaten since, or claimed anew: what it holds now must stay reapable). A delivery the
# instance claimed again after the requeue (it came back and took the re-sent message)
# stays in its running set: the instance holds it.
# KEYS: instances zset, its running set. ARGV: instance, the lease's end, the job-hash key
# prefix, then the "<job id>:<segment>" members its reap found.
_FORGET = f"""
for i = 4, #ARGV do
  local job_id, seg = string.match(ARGV[i], '^(.*):(%d+)$')
  local h = redis.call('HMGET', ARGV[3] .. job_id, 'state', 'instance', 'segment')
  local cur = h[1]
  if not cur or {_TERMINAL} or h[2] ~= ARGV[1] or h[3] ~= seg then redis.call('SREM', KEYS[2], ARGV[i]) end
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and math.abs(tonumber(score) - tonumber(ARGV[2])) < 0.001 and redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
"""

# A new job's record: its idempotency claim (SET NX) and its hash, with the record TTL, in the
# script that calls it (``_CREATE_ONE`` here, the scheduler's submit with admission). Returns
# false when it created the record, else the id that holds the idempotency key: another
# job's, or this job's own when the call is a replay of one whose reply was lost (a record
# that exists already is such a replay too: ids are fresh, and a replay must not write over
# a job that a dispatch may have sent meanwhile).
_CREATE = """
local function create(job_key, idem_key, job_id, ttl, argv, first)
  if idem_key ~= '' and not redis.call('SET', idem_key, job_id, 'NX', 'EX', ttl) then
    return redis.call('GET', idem_key)
  end
  if redis.call('EXISTS', job_key) == 1 then return job_id end
  redis.call('HSET', job_key, unpack(argv, first))
  redis.call('EXPIRE', job_key, ttl)
  return false
end
"""

# KEYS: the job hash, its idempotency key (the hash again when it has none). ARGV: job id,
# TTL, '1' when it has an idempotency key, then the record's fields and values. Returns
# {id, 1} when created (or replayed), {winner id, 0} when another job holds the key.
_CREATE_ONE = _CREATE + """
local winner = create(KEYS[1], ARGV[3] == '1' and KEYS[2] or '', ARGV[1], ARGV[2], ARGV, 4)
if winner and winner ~= ARGV[1] then return {winner, 0} end
return {ARGV[1], 1}
"""

# KEYS: an idempotency key. ARGV: the job id. Deletes the key while it still names that job.
_RELEASE_IDEM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: job hashes. ARGV: instance, then per key its segment and the crash count to record
# (``inflight:<segment>``), only where that instance holds the job at that segment: a job
# taken over meanwhile keeps its new holder's count.
_SET_CRASHES = """
for i, key in ipairs(KEYS) do
  local seg = ARGV[2 * i]
  local h = redis.call('HMGET', key, 'instance', 'segment')
  if h[1] == ARGV[1] and h[2] == seg then redis.call('HSET', key, 'inflight:' .. seg, ARGV[2 * i + 1]) end
end
"""

# KEYS: the job hash, a queue's position set. ARGV: job id, that queue.
_DROP_POSITION = """
local h = redis.call('HMGET', KEYS[1], 'state', 'queue')
if h[1] ~= 'queued' or h[2] ~= ARGV[2] then redis.call('ZREM', KEYS[2], ARGV[1]) end
"""

# KEYS: the queue's waiting set, the tenant's pending set, the queue's backlog tally. ARGV: the
# job id. In one script, so a replay after a lost reply (the ZREMs then find nothing) or a
# crash cannot leave the tally one too high. Returns {was waiting, was pending}.
_UNMARK = """
local had_room = redis.call('ZREM', KEYS[1], ARGV[1])
local was_pending = redis.call('ZREM', KEYS[2], ARGV[1])
if was_pending == 1 then redis.call('LPOP', KEYS[3]) end
return {had_room, was_pending}
"""

# KEYS: instances zset, presence key, the family's instances zset (what ETAs count; instances
# dead for a day leave it), the family's capacity (what admission reads), the family's batch
# sizes set. ARGV: instance, ttl, presence JSON, job-seconds key prefix, this instance's mean
# seconds per job ('' = none yet), its batch size (what it takes from the queue at once), the
# family's batch-class prefix. The capacity is the sum of the live instances' batch sizes,
# counted by class of size (a family's workers may take different batches: GPUs of two kinds,
# a hand-set size), so every beat sets the same figure. The classes expire with the beats
# that keep them.
_BEAT = _CLOCK + """
local t = now()
local ttl_ms = math.ceil(tonumber(ARGV[2]) * 1000)
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl_ms)
redis.call('ZADD', KEYS[3], t + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', t - 86400)
if ARGV[5] ~= '' then redis.call('SET', ARGV[4] .. ARGV[1], ARGV[5], 'PX', ttl_ms) end
redis.call('SADD', KEYS[5], ARGV[6])
redis.call('PEXPIRE', KEYS[5], ttl_ms)
redis.call('ZADD', ARGV[7] .. ARGV[6], t + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', ARGV[7] .. ARGV[6], ttl_ms)
local capacity, sized = 0, 0
for _, size in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  redis.call('ZREMRANGEBYSCORE', ARGV[7] .. size, '-inf', t)
  local live = redis.call('ZCARD', ARGV[7] .. size)
  if live == 0 then redis.call('SREM', KEYS[5], size) end
  capacity, sized = capacity + live * tonumber(size), sized + live
end
-- Live instances in no class (an earlier version's, mid-upgrade) count at this one's size.
local unsized = redis.call('ZCOUNT', KEYS[3], t, '+inf') - sized
if unsized > 0 then capacity = capacity + unsized * tonumber(ARGV[6]) end
redis.call('SET', KEYS[4], capacity, 'PX', ttl_ms)
return 0
"""


@dataclass(frozen=True)
class Claim:
    """What ``JobStore.claim`` found: ``run`` (with the job's spec and plan) or why not."""

    outcome: str  # run | unknown | terminal | stale | duplicate | cancel | poison | corrupt
    spec: JobSpec | None = None
    plan: Plan | None = None
    detail: str | None = None  # terminal: the state; stale: the job's segment; duplicate: the live
    # instance running it; corrupt: why the record cannot be read
    crashed: int = 0  # run, poison: deliveries of this segment that never ended (before this one)
    stage: int = 0  # poison: the stage it was at
    created_at: float = 0.0  # run: for the manifest's timings
    started_at: float = 0.0
    attempts: int = 0  # run: deliveries that started, this one included
    attempt: Attempt | None = None  # run: this delivery's attempt record
    charged: float | None = None  # run: the work its dispatch charged its tenant (None: not dispatched)


class DeliveryEnd(NamedTuple):
    """The delivery a state change ends: its segment, its instance and its claim's attempt
    number (``Claim.attempts``; None where not known: the claim itself failed). With the
    attempt, the change is refused once a later claim replaced the delivery, whoever holds
    the job now."""

    segment: int
    instance: str
    attempt: int | None = None


class _Retry(Retry):
    """Retries lost connections, never a refused password or TLS certificate: retrying cannot
    fix those, and the caller should hear "invalid username-password pair" or
    "CERTIFICATE_VERIFY_FAILED" at once, not after ~30 s.

    A reply that timed out also drops the pool's idle connections (``drop_idle``): they lead
    to the same server, gone silent, and each would cost its next caller the same wait."""

    drop_idle: Callable[[], None] | None = None

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(e: Exception) -> bool:
            if isinstance(e, redis.exceptions.AuthenticationError):
                return False
            if isinstance(e.__cause__ or e.__context__, ssl.SSLCertVerificationError):
                return False
            return is_retryable is None or is_retryable(e)

        def failed(e: Exception, *count: int):
            if isinstance(e, redis.exceptions.TimeoutError) and self.drop_idle is not None:
                self.drop_idle()
            return fail(e, *count)

        return super().call_with_retry(do, failed, retryable, with_failure_count)


# Redis refusing commands for now: full (OOM under noeviction), a demoted primary during a
# failover (READONLY; MASTERDOWN from a replica that lost its primary), a script running
# long (BUSY), too few replicas (NOREPLICAS), a failing snapshot refusing writes (MISCONF),
# a dataset still loading after a restart (LOADING). The command did nothing and may work
# in a while: a job meeting it is retried, never failed.
_REFUSING_FOR_NOW = (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError,
                     redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)


def refusing_for_now(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a command for now rather than the command's fault."""
    return isinstance(exc, _REFUSING_FOR_NOW) or (
        isinstance(exc, redis.exceptions.ResponseError)
        and str(exc).startswith(("BUSY ", "NOREPLICAS ", "MASTERDOWN ", "MISCONF ", "LOADING ")))


# A reply not back within this is taken as lost and the command sent again on a new
# connection. Redis answers in milliseconds, and every command easel sends is bounded (no
# blocking reads; scans are paged), so only a connection gone silent waits this long: one
# to a Redis host that vanished without closing it (a failover, a NAT or firewall dropping
# the flow) would otherwise block its thread for the kernel's ~15 min, a worker's heartbeat
# with it. Within a third of the default heartbeat TTL, so a beat held up by a silent
# connection is written on a new one before the worker is taken for dead.
REPLY_WITHIN_S = 5.0


def redis_client(url: str, reply_within_s: float | None = None, retries: int = 20, **kw) -> redis.Redis:
    """A client that rides out a Redis restart, or a connection gone silent: commands retry
    with backoff, a reply overdue by ``REPLY_WITHIN_S`` counted as a lost one, for ~30 s
    while Redis refuses connections and up to ~2 min while every try waits out a timeout.

    A caller with a deadline of its own (an HTTP request, a watch with a timeout, a health
    probe) passes ``reply_within_s`` and few ``retries``: each call then gives up within about
    ``reply_within_s x (retries + 1)`` and the caller decides what to do while Redis is away."""
    patient = reply_within_s is None
    retry = _Retry(ExponentialBackoff(cap=2.0, base=0.1) if patient else ExponentialBackoff(cap=0.5, base=0.05),
                   retries)
    client = redis.Redis.from_url(
        url, decode_responses=True, health_check_interval=30, socket_keepalive=True,
        socket_connect_timeout=5 if patient else min(3.0, reply_within_s),
        socket_timeout=REPLY_WITHIN_S if patient else reply_within_s,
        retry=retry, retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError], **kw)
    pool = client.connection_pool  # each connection gets a copy of ``retry``, made as it opens
    retry.drop_idle = lambda: pool.disconnect(inuse_connections=False)
    return client


def retry_fields(segment: int, retries: int, out_of_memory: int) -> dict[str, int]:
    """A segment's retry counts as record fields: all retries, and those out of GPU memory."""
    return {f"retries:{segment}": retries, f"oom:{segment}": out_of_memory}


def run_scripts(r: redis.Redis, calls: list[tuple]) -> list:
    """Run (script, keys, args) calls in one pipeline of EVALSHA alone: redis-py's own
    pipelines send SCRIPT EXISTS before every script call. A script Redis has lost (a
    restart) is loaded and only the calls it refused are sent again: those did not run.
    Errors come back in place of their replies."""
    replies = _evalsha_all(r, calls)
    lost = [i for i, x in enumerate(replies) if isinstance(x, redis.exceptions.NoScriptError)]
    if lost:
        for script in {id(calls[i][0]): calls[i][0] for i in lost}.values():
            r.script_load(script.script)
        for i, reply in zip(lost, _evalsha_all(r, [calls[i] for i in lost])):
            replies[i] = reply
    return replies


def _evalsha_all(r: redis.Redis, calls: list[tuple]) -> list:
    pipe = r.pipeline(transaction=False)
    for script, keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    return pipe.execute(raise_on_error=False)


def _number(v: bytes | str | None) -> float | None:
    """A record's number, None where it has none (or not a number)."""
    try:
        return float(v) if v else None
    except ValueError:
        return None


def _text(v: bytes | str) -> str:
    """A reply as text, from a client with or without ``decode_responses``."""
    return v.decode() if isinstance(v, bytes) else v


DEFAULT_TENANT = "default"  # the tenant of jobs submitted without one


class WaitsIn(BaseModel):
    """The segment a queued job waits for: its queue, family and fair-share tenant."""
    queue: str
    family: str
    tenant: str


class WebhookView(BaseModel):
    """A job's webhook as its record holds it (``webhook_*`` fields)."""
    url: str
    state: str
    attempts: int = 0
    last_error: str | None = None


class JobView(BaseModel):
    """One read of a job's record: its status, where it waits (queued jobs only), its webhook
    (if it has one) and its number of stages."""
    status: JobStatus
    waits_in: WaitsIn | None = None
    webhook: WebhookView | None = None
    stages: int = 0


def _status_from(job_id: str, h: dict[str, str]) -> JobStatus:
    """A job's status from its record's fields (no place in line: that is other keys')."""
    f = lambda k: float(h[k]) if h.get(k) else None  # noqa: E731
    return JobStatus(
        id=job_id, state=JobState(h["state"]), created_at=f("created_at"), updated_at=f("updated_at"),
        started_at=f("started_at"), finished_at=f("finished_at"),
        progress=Progress(stage=int(h.get("stage", 0)), step=int(h.get("step", 0)),
                          total_steps=int(h.get("total_steps", 0))),
        error=h.get("error") or None, outputs=json.loads(h.get("outputs") or "[]"),
        manifest=h.get("manifest") or None, attempts=int(h.get("attempts", 0)), note=h.get("note") or None,
        worker=h.get("worker") or None)


ORDER_EPOCH = 1_767_225_600  # 2026-01-01 UTC


SCORE_PRIORITY = 10**14  # a score's priority part: (priority + 1) x this
# Added to the waiting-set score of a retry that waits out its backoff (its message held back
# by a countdown): such a job holds no room in its queue (``scheduler._ROOM`` counts scores
# below this), so one tenant's failing jobs cannot keep every other tenant's from being sent;
# it ranks behind every job that can be claimed now. Scores stay exact in a double (< 2**53).
HELD_BACK = 16 * SCORE_PRIORITY


def queue_score(priority: int, t: float) -> int:
    """A waiting job's score in the pending and waiting sets: priority first (0 runs first),
    then when it was queued, in 10 µs since ``ORDER_EPOCH`` (exact in a double until 2057).
    Time instead of a counter: no INCR per job. Producers' clocks order their own jobs; ties
    and skew between producers only reorder jobs queued within that skew. Scores are at least
    ``SCORE_PRIORITY``: smaller ones are an earlier version's (priority x 1e13 + sequence),
    which ``priority_of`` in ``_SCORES`` still reads."""
    return (priority + 1) * SCORE_PRIORITY + int((t - ORDER_EPOCH) * 1e5)


# Lua: a score's priority, in either version's form; the waiting-set score of a job sent
# now (``queue_score``; ``k`` orders the jobs one dispatch run sends).
_SCORES = f"""
local function priority_of(score)
  score = tonumber(score)
  if score >= {SCORE_PRIORITY} then return math.floor(score / {SCORE_PRIORITY}) - 1 end
  return math.floor(score / 1e13)
end
local function score_at(priority, t, k)
  return (priority + 1) * {SCORE_PRIORITY} + math.floor((tonumber(t) - {ORDER_EPOCH}) * 1e5) + k
end
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "easel", ttl_s: int = 7 * 24 * 3600):
        self.r = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        # Told (tenants whose cap slots freed, queues where a waiting job left room) when a
        # change here may let pending jobs go: a worker's or a client's feeder dispatches them.
        # None: nobody here dispatches.
        self.on_slot_freed: Callable[[set[str], set[str]], None] | None = None
        self._transition = self.r.register_script(_TRANSITION)
        self._claim = self.r.register_script(_CLAIM)
        self._requeue = self.r.register_script(_REQUEUE)
        self._reap = self.r.register_script(_REAP)
        self._forget = self.r.register_script(_FORGET)
        self._beat = self.r.register_script(_BEAT)
        self._create = self.r.register_script(_CREATE_ONE)
        self._release_idem = self.r.register_script(_RELEASE_IDEM)
        self._unmark = self.r.register_script(_UNMARK)
        self._drop_position = self.r.register_script(_DROP_POSITION)
        self._set_crashes = self.r.register_script(_SET_CRASHES)
        self._set_webhook = self.r.register_script(_SET_WEBHOOK)

    @classmethod
    def from_url(cls, url: str, prefix: str = "easel", ttl_s: int = 7 * 24 * 3600, **redis_kw) -> "JobStore":
        return cls(redis_client(url, **redis_kw), prefix, ttl_s)

    @classmethod
    def from_settings(cls, s, **redis_kw) -> "JobStore":
        """From Settings, TLS options (redis_ssl_*) included for rediss:// URLs; ``redis_kw``
        as ``redis_client`` takes them."""
        return cls.from_url(s.redis_url, s.queue_prefix, s.job_ttl_s, **redis_kw, **s.redis_ssl_kwargs())

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_channel(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def stops_channel(self) -> str:
        """Where running jobs are told to stop: cancelled, or taken from their instance (JSON
        ``{"job_id", "stop": "cancel" | "taken", "instance"}``); workers listen
        (``worker.stops``), so a denoising step checks a set in memory, not Redis."""
        return f"{self.prefix}:stops"

    def record_fields(self, spec: JobSpec, plan: Plan, now: float, trace: dict | None = None,
                      owner: str | None = None, work: float = 1.0) -> list:
        """A queued job's hash, as the flat field/value list the create script takes. Counters
        and progress start absent (read as 0), which keeps bulk submission's writes small;
        ``trace`` is the submitter's trace context (tracing on); ``owner`` the API key that
        submits it, written with the record so that no job exists without it; ``work``: what
        its dispatch charges its tenant (``shared.plan.segment_work``)."""
        fields = {"spec": spec.model_dump_json(), "plan": plan.model_dump_json(), "state": JobState.queued.value,
                  "queue": plan.segments[0].queue, "tenant": spec.tenant or DEFAULT_TENANT, "created_at": now,
                  "updated_at": now, "work": work}
        if trace:
            fields["trace"] = json.dumps(trace)
        if owner:
            fields["owner"] = owner
        return [x for kv in fields.items() for x in kv]

    def _idem_key(self, spec: JobSpec) -> str:
        return self._idem_name(spec.idempotency_key)

    def _idem_name(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    def idempotent_job(self, spec: JobSpec) -> str | None:
        """The job that already holds ``spec``'s idempotency key, if any."""
        return self.idempotent_jobs([spec.idempotency_key])[0] if spec.idempotency_key else None

    def idempotent_jobs(self, keys: list[str]) -> list[str | None]:
        """The jobs that already hold these idempotency keys (None where none), in one read."""
        return [_text(v) for v in self.r.mget([self._idem_name(key) for key in keys])] if keys else []

    def release_idempotency(self, job_id: str) -> None:
        """A job that could not be queued lets go of its idempotency key, so that a retry of
        its submission queues it anew (a key that names another job by now is left)."""
        raw = self.r.hget(self.key(job_id), "spec")
        spec = JobSpec.model_validate_json(raw) if raw else None
        if spec is not None and spec.idempotency_key:
            self._release_idem(keys=[self._idem_key(spec)], args=[job_id])

    def create_head(self, job_id: str, spec: JobSpec) -> tuple[list[str], list]:
        """The create function's keys (job hash, idempotency key) and leading args (id, TTL,
        idempotency flag)."""
        idem = self._idem_key(spec) if spec.idempotency_key else self.key(job_id)
        return [self.key(job_id), idem], [job_id, self.ttl_s, "1" if spec.idempotency_key else ""]

    def create(self, spec: JobSpec, plan: Plan, job_id: str | None = None,
               trace: dict | None = None, owner: str | None = None) -> tuple[str, bool]:
        """Store a queued job's record alone: nothing admits, dispatches or sends it (submission
        is ``Scheduler.submit_many``, which writes the record and admits it in one script).
        For tools and tests that need a record. Returns (job_id, created); an idempotency key
        another job holds gives that job's id and created=False."""
        job_id = job_id or new_job_id()
        keys, head = self.create_head(job_id, spec)
        winner, created = self._create(keys=keys, args=head + self.record_fields(spec, plan, time.time(), trace, owner))
        return _text(winner), bool(int(created))

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.key(job_id)))

    def load(self, job_id: str) -> tuple[JobSpec, Plan]:
        spec, plan = self.r.hmget(self.key(job_id), "spec", "plan")
        if spec is None:
            raise KeyError(f"no job {job_id}")
        return JobSpec.model_validate_json(spec), Plan.model_validate_json(plan)

    def status(self, job_id: str, position: bool = True) -> JobStatus:
        """The job's status; ``position``: also its place in the queue while it waits (two
        more reads, so followers that do not show it leave it out)."""
        st = _status_from(job_id, self._read(job_id))
        if position and not st.state.terminal:
            return st.model_copy(update={"queue_position": self.queue_position(job_id)})
        return st

    def view(self, job_id: str) -> JobView:
        """The job's status, where it waits and its webhook, from one read of its record: a
        reader that needs more than the status never pairs two reads a state change fell
        between. Raises KeyError when there is no record (or it expired)."""
        h = self._read(job_id)
        st = _status_from(job_id, h)
        waits_in = None
        if st.state == JobState.queued:
            seg = Plan.model_validate_json(h["plan"]).segments[int(h.get("segment") or 0)]
            waits_in = WaitsIn(queue=seg.queue, family=seg.family, tenant=h.get("tenant") or DEFAULT_TENANT)
        webhook = None
        if h.get("webhook_url"):
            webhook = WebhookView(url=h["webhook_url"], state=h.get("webhook_state") or "pending",
                                  attempts=int(h.get("webhook_attempts") or 0),
                                  last_error=h.get("webhook_last_error") or None)
        return JobView(status=st, waits_in=waits_in, webhook=webhook,
                       stages=len(json.loads(h["spec"])["stages"]) if h.get("spec") else 0)

    def _read(self, job_id: str) -> dict[str, str]:
        h = self.r.hgetall(self.key(job_id))
        if not h:
            raise KeyError(f"no job {job_id}")
        return h

    def _event(self, state: JobState, fields: dict) -> str:
        """The event a state change publishes: its fields, less the bulky spec and stage records,
        the kept trace context, the work fair share charges and the retry counts."""
        shown = {k: v for k, v in fields.items()
                 if k not in ("spec", "trace", "work") and not k.startswith(("record:", "retries:", "oom:"))}
        return json.dumps({"state": state.value, **shown}, default=str)

    def _transition_args(self, job_id: str, state: JobState | None, fields: dict,
                         end: tuple | None, guards: tuple[str, ...] = ()) -> list:
        segment, instance, attempt = DeliveryEnd(*end) if end is not None else ("", "", None)
        argv: list = ["", self._running_prefix(), job_id, segment, instance, "", "" if attempt is None else attempt]
        if state is None:
            return argv
        now = time.time()
        fields = {"state": state.value, "updated_at": now, **fields}
        if state.terminal:
            fields.setdefault("finished_at", now)
        if end is not None:  # never a segment the job has moved past (unless the change names the next)
            fields.setdefault("segment", segment)
        argv[0], argv[5] = self._event(state, fields), state.value
        for k, v in fields.items():
            argv += [k, json.dumps(v) if isinstance(v, (list, dict)) else v]
        return argv + [item for guard in guards for item in (guard, 1)]

    def transition(self, job_id: str, state: JobState | None, *, end: tuple | None = None,
                   never_claimed: bool = False, **fields) -> bool:
        """Move a non-terminal job to ``state`` with extra fields; False if it was already terminal.
        ``end`` (a ``DeliveryEnd``, or its fields) also ends that delivery, and is refused
        once the delivery was taken over or the job has moved past its segment;
        ``never_claimed`` refuses the change once a worker has claimed the job. One round
        trip: the event is published by the same script, only if the change happened."""
        args = self._transition_args(job_id, state, fields, end, ("?never_claimed",) if never_claimed else ())
        return self._ended([self._transition(keys=self._transition_keys(job_id), args=args)])[0]

    def fail_unsent(self, job_id: str, error: str) -> bool:
        """End as failed a job whose first message could not be sent; False when a worker
        has claimed it meanwhile (the send reached Redis, only its reply was lost). True
        also when a replay of this same change finds it done (its reply lost: the client
        sends it again), so the caller's clean-up still runs."""
        if self.transition(job_id, JobState.failed, error=error, never_claimed=True):
            return True
        state, why, attempts = self.r.hmget(self.key(job_id), "state", "error", "attempts")
        return state == JobState.failed.value and why == error and not int(attempts or 0)

    def transition_call(self, job_id: str, state: JobState | None, *, end: tuple | None = None,
                        guards: tuple[str, ...] = (), **fields) -> tuple[list, list]:
        """(keys, argv) of ``transition``'s change, for a script that runs it with more
        (``_TRANSITION_FN``: a hand-off); ``guards`` as the script names them."""
        return self._transition_keys(job_id), self._transition_args(job_id, state, fields, end, guards)

    def _transition_keys(self, job_id: str) -> list[str]:
        return [self.key(job_id), self.events_channel(job_id), self.finished_key(), self.webhooks_due_key()]

    def finished_key(self) -> str:
        return f"{self.prefix}:finished"

    def webhooks_watch_key(self) -> str:
        """Jobs whose webhook wants passing events (queued, started, progress), which the
        dispatchers look for; by when they were registered."""
        return f"{self.prefix}:webhooks:watch"

    def webhooks_due_key(self) -> str:
        """Webhook deliveries to attempt, by when (0: now)."""
        return f"{self.prefix}:webhooks:due"

    def transition_many(self, changes: list[tuple[str, JobState, dict]], *,
                        ends: list[tuple] | None = None) -> list[bool]:
        """``transition`` for (job_id, state, fields) changes in one pipeline (a micro-batch's
        final states), each with its delivery's end if ``ends`` is given: each change is its
        own script run, so each stays all-or-nothing."""
        calls = [(self._transition_keys(job_id), self._transition_args(job_id, state, fields, end))
                 for (job_id, state, fields), end in zip(changes, ends or [None] * len(changes), strict=True)]
        return self._ended(self._run_script(self._transition, calls, raise_on_error=True))

    def _ended(self, replies: list) -> list[bool]:
        """Transition replies as done/refused; tells ``on_slot_freed`` the tenants whose slots
        the changes freed (a reply naming the tenant's in-flight set)."""
        flights = flight_key(self.prefix, "")
        freed = {_text(res).removeprefix(flights) for res in replies if isinstance(res, (bytes, str))}
        if freed and self.on_slot_freed is not None:
            self.on_slot_freed(freed, set())
        return [res == 1 or isinstance(res, (bytes, str)) for res in replies]

    def _run_script(self, script, calls: list[tuple[list, list]], raise_on_error: bool) -> list:
        replies = run_scripts(self.r, [(script, keys, args) for keys, args in calls])
        errors = [r for r in replies if isinstance(r, Exception)]
        if raise_on_error and errors:
            raise errors[0]
        return replies

    def end_delivery(self, job_id: str, end: "DeliveryEnd") -> None:
        """The delivery ended without a state change of its own (it was taken over)."""
        self.transition(job_id, None, end=end)

    def _claim_args(self, job_id: str, segment: int, queue: str | None, worker: str, instance: str,
                    max_crash_deliveries: int) -> tuple[list, list]:
        now = time.time()
        event = self._event(JobState.running, {"updated_at": now, "worker": worker, "segment": segment})
        return ([self.key(job_id), self.events_channel(job_id), self.instances_key()],
                [f"{self.prefix}:queued:", job_id, segment, worker, now, max_crash_deliveries, event,
                 instance, self._running_prefix(), queue or ""])

    def claim_many(self, deliveries: list[tuple[str, int, str | None]], worker: str, instance: str,
                   max_crash_deliveries: int) -> list[Claim]:
        """Claim (job_id, segment, the queue it came from or None) deliveries in one pipeline
        (a micro-batch's members)."""
        calls = [self._claim_args(job_id, segment, queue, worker, instance, max_crash_deliveries)
                 for job_id, segment, queue in deliveries]
        return [self._parse_claim(res) for res in self._run_script(self._claim, calls, raise_on_error=False)]

    @staticmethod
    def _parse_claim(res: list | Exception) -> Claim:
        """One claim's reply; a record this version cannot read (or a script error) is a
        ``corrupt`` claim of that job alone, with the reason."""
        if isinstance(res, Exception):
            if isinstance(res, redis.ConnectionError | redis.TimeoutError) or refusing_for_now(res):
                raise res
            return Claim("corrupt", detail=str(res)[:500])
        outcome = res[0]
        if outcome == "run":
            try:
                return Claim("run", spec=JobSpec.model_validate_json(res[1]), plan=Plan.model_validate_json(res[2]),
                             created_at=float(res[3]), started_at=float(res[4]), attempts=int(res[5] or 0),
                             attempt=Attempt.model_validate_json(res[6]) if res[6] else None,
                             crashed=int(res[7]) if len(res) > 7 else 0,
                             charged=_number(res[8]) if len(res) > 8 else None)
            except ValueError as e:
                return Claim("corrupt", detail=f"unreadable job record: {e}"[:500])
        if outcome in ("terminal", "duplicate", "stale", "cancel"):  # a cancel's detail: when it started, or ''
            return Claim(outcome, detail=res[1] if len(res) > 1 else "")
        if outcome == "poison":
            return Claim("poison", crashed=int(res[1]), stage=int(res[2]))
        return Claim(outcome)

    def progress_many(self, job_ids: list[str], stage: int, step: int, total: int,
                      instance: str, check: bool = True) -> list[tuple[bool, bool]]:
        """Record a denoising step of each job, in one round trip that also answers, with
        ``check``, per job (cancel asked, superseded: another delivery took the job from
        ``instance``); without it (a worker that hears stops pushed, ``worker.stops``) it
        answers []."""
        pipe = self.r.pipeline(transaction=False)
        event = json.dumps({"stage": stage, "step": step, "total_steps": total})
        for job_id in job_ids:
            key = self.key(job_id)
            pipe.hset(key, mapping={"stage": stage, "step": step, "total_steps": total, "updated_at": time.time()})
            pipe.publish(self.events_channel(job_id), event)
            if check:
                pipe.hmget(key, "cancel", "instance")
        if not check:
            pipe.execute()
            return []
        replies = pipe.execute()[2::3]
        return [(cancel == "1", holder != instance) for cancel, holder in replies]

    def kept_traces(self, job_ids: list[str]) -> dict[str, dict]:
        """The trace contexts submitters kept in these jobs' records; read only with tracing on."""
        if not job_ids or not tracing.enabled():
            return {}
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.key(job_id), "trace")
        return {job_id: json.loads(v) for job_id, v in zip(job_ids, pipe.execute()) if v}

    def save_records(self, job_id: str, records: dict[int, str]) -> None:
        if records:
            self.r.hset(self.key(job_id), mapping={f"record:{i}": r for i, r in records.items()})

    def records_at(self, job_id: str, indices: list[int]) -> list[str | None]:
        """Those stages' records (JSON, None where missing), one round trip."""
        return self.r.hmget(self.key(job_id), [f"record:{i}" for i in indices]) if indices else []

    def records(self, job_id: str, count: int) -> list[str | None]:
        return self.records_at(job_id, list(range(count)))

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel: a job no worker holds (queued; or running between deliveries, as workers of
        an earlier version left a retry) ends now; a running one stops at its next denoising
        step."""
        if not self.exists(job_id):
            raise KeyError(f"no job {job_id}")
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key(job_id), "cancel", 1)
        pipe.publish(self.stops_channel(), json.dumps({"job_id": job_id, "stop": "cancel"}))
        pipe.hmget(self.key(job_id), "state", "instance", "started_at")
        state, holder, started = (_text(v) if v is not None else None for v in pipe.execute()[2])
        if state is None:  # expired since the check: the flag alone would stay, without a TTL
            self.r.delete(self.key(job_id))
            raise KeyError(f"no job {job_id}")
        # A claim landing between the read and the transition gets the pushed cancel and stops.
        unheld = state == JobState.queued.value or (state == JobState.running.value and not holder)
        why = "cancelled while it waited in a queue" if started else "cancelled before it ran"
        if unheld and self.transition(job_id, JobState.cancelled, error=why):
            room = self.unmark_queued(job_id)
            if room and self.on_slot_freed is not None:  # a full queue's next job need not wait for a claim
                self.on_slot_freed(set(), {room})
        return self.status(job_id).state

    # -- queue position: a sorted set per queue, ordered as the broker serves it ---------
    def _queued_key(self, queue: str) -> str:
        return f"{self.prefix}:queued:{queue}"

    def mark_queued(self, job_id: str, queue: str, priority: int, *, due_at: float | None = None) -> None:
        """Record that a job waits in ``queue`` (priority 0 first, then submission order).
        ``due_at``: its message is held back until then (a countdown), so the lost-message
        sweep counts its wait from then, not from its last state change."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self._queued_key(queue), {job_id: queue_score(priority, time.time())})
        pipe.hset(self.key(job_id), mapping={"queue": queue, **({"due_at": due_at} if due_at else {})})
        pipe.execute()

    def mark_position(self, job_id: str, queue: str, priority: int, *, held_back: bool = False) -> None:
        """Enter ``queue``'s position set alone (kept where the job has one already), for a
        state change that writes the record's ``queue`` itself only if it happens (a
        retry's, a requeue's); ``drop_position`` if it did not. ``held_back``: its message
        waits out a countdown (``HELD_BACK``)."""
        score = queue_score(priority, time.time()) + (HELD_BACK if held_back else 0)
        self.r.zadd(self._queued_key(queue), {job_id: score}, nx=True)

    def set_crash_counts(self, instance: str, counts: list[tuple[str, int, int]]) -> None:
        """Record (job id, segment, count) as each delivery's crash count while ``instance``
        still holds it: a claim counts every delivery it takes as started; a worker whose
        task holds deliveries that wait behind another call sets theirs back until their
        own call starts (``worker.engine``)."""
        if counts:
            self._set_crashes(keys=[self.key(job_id) for job_id, _, _ in counts],
                              args=[instance, *(v for _, seg, n in counts for v in (seg, n))])

    def drop_position(self, job_id: str, queue: str) -> None:
        """Leave ``queue``'s position set unless the job's record says it waits there; in one
        script, so a retry that marks the job's place there meanwhile keeps it."""
        self._drop_position(keys=[self.key(job_id), self._queued_key(queue)], args=[job_id, queue])

    def unmark_queued(self, job_id: str) -> str | None:
        """The job no longer waits: out of its queue-position set, and out of its tenant's
        pending set if it was never dispatched. Returns the queue whose room it held (it had
        been dispatched there), else None."""
        queue, tenant = self.r.hmget(self.key(job_id), "queue", "tenant")
        if not queue:
            return None
        had_room, was_pending = self._unmark(keys=[self._queued_key(queue),
                                                   pending_key(self.prefix, queue, tenant or DEFAULT_TENANT),
                                                   backlog_key(self.prefix, queue)], args=[job_id])
        return queue if had_room and not was_pending else None

    def waiting_since(self, queue: str, limit: int = 500) -> list[tuple[str, int, float]]:
        """(job id, segment, waiting since) of the first jobs marked waiting in ``queue`` that
        no instance holds: queued ones, and running ones between deliveries (a hand-off or a
        retry on its way). The first ``limit`` of those that can be claimed now, and as many
        retries waiting out a backoff (``HELD_BACK``: they rank behind every other, and a
        worker that dies holding one's countdown message leaves it to this sweep)."""
        key, pipe = self._queued_key(queue), self.r.pipeline(transaction=False)
        pipe.zrangebyscore(key, "-inf", f"({HELD_BACK}", start=0, num=limit)
        pipe.zrangebyscore(key, HELD_BACK, "+inf", start=0, num=limit)
        now, held_back = pipe.execute()
        ids = [*now, *held_back]
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.key(job_id), "state", "segment", "updated_at", "instance", "due_at", "queue")
        out, stale = [], []
        for job_id, (state, segment, since, holder, due, waits_in) in zip(ids, pipe.execute()):
            if state is None or JobState(state).terminal or (waits_in and waits_in != queue):
                stale.append(job_id)  # expired, ended without a claim, or moved on: it holds no place here
            elif since and not holder and state in (JobState.queued.value, JobState.running.value):
                out.append((job_id, int(segment or 0), max(float(since), float(due or 0))))
        if stale:
            self.r.zrem(self._queued_key(queue), *stale)
        return out

    def queue_position(self, job_id: str) -> int | None:
        """0 = next to run in its family's queue; None when not waiting."""
        queue = self.r.hget(self.key(job_id), "queue")
        if not queue:
            return None
        rank = self.r.zrank(self._queued_key(queue), job_id)
        return None if rank is None else int(rank)

    # -- retries and attempts ----------------------------------------------------------------
    def retries_of(self, job_id: str, segment: int) -> tuple[int, int]:
        """(transient-error retries, of which out of GPU memory) of ``segment`` so far. The
        counts are written with the retry's own state change (``retry_fields``), so a delivery
        taken over meanwhile, or a replayed write, counts nothing."""
        retries, oom = self.r.hmget(self.key(job_id), list(retry_fields(segment, 0, 0)))
        return int(retries or 0), int(oom or 0)

    def manifest_reads(self, job_id: str, indices: list[int],
                       first: Attempt | None = None) -> tuple[list[str | None], list[Attempt]]:
        """What a manifest needs from the record: those stages' records (JSON, None where
        missing) and every attempt. One round trip while a job has had at most 8 attempts;
        none for a job whose one attempt (``first``) is known and that needs no records."""
        if first is not None and not indices:
            return [], [first]
        guess = 8
        fields = [f"record:{i}" for i in indices] + ["attempts"] + [f"attempt:{k}" for k in range(1, guess + 1)]
        got = self.r.hmget(self.key(job_id), fields)
        records, n, attempts = got[:len(indices)], int(got[len(indices)] or 0), got[len(indices) + 1:]
        if n > guess:
            attempts += self.r.hmget(self.key(job_id), [f"attempt:{k}" for k in range(guess + 1, n + 1)])
        return records, [Attempt.model_validate_json(a) for a in attempts[:n] if a]

    def queue_depth(self, queue: str, lists: list[str]) -> int:
        """Messages waiting in a queue's broker lists (all its priorities), one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for name in lists:
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())

    # -- liveness: worker instances, their heartbeats and running deliveries -----------------
    def instances_key(self) -> str:
        return f"{self.prefix}:instances"

    def _running_prefix(self) -> str:
        return f"{self.prefix}:running:"

    def presence_key(self, hostname: str) -> str:
        return f"{self.prefix}:worker:{hostname}"

    def beat(self, instance: str, hostname: str, presence: dict, ttl_s: float) -> None:
        """An instance is alive for ``ttl_s`` more seconds (Redis's clock); its presence record
        (for ``easel queues``, metrics) lives as long."""
        family = presence.get("family", "unknown")
        job_s = presence.get("job_s")
        self._beat(keys=[self.instances_key(), self.presence_key(hostname), family_instances_key(self.prefix, family),
                         family_capacity_key(self.prefix, family), family_batch_sizes_key(self.prefix, family)],
                   args=[instance, ttl_s, json.dumps(presence), job_seconds_prefix(self.prefix),
                         "" if job_s is None else job_s, int(presence.get("batch_size") or 1),
                         family_batch_class_prefix(self.prefix, family)])

    def retire(self, instance: str, hostname: str, family: str | None = None) -> None:
        """A clean shutdown: the instance is gone now; anything it still held is reaped at once."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(self.instances_key(), {instance: 0})
        if family:  # gone now, by Redis's clock as liveness is judged
            seconds, micros = self.r.time()
            pipe.zadd(family_instances_key(self.prefix, family), {instance: seconds + micros / 1e6})
            for size in self.r.smembers(family_batch_sizes_key(self.prefix, family)):
                pipe.zrem(family_batch_class_prefix(self.prefix, family) + _text(size), instance)
            # The family's capacity counted this instance: the next beat of a live one sets it
            # again; until then admission holds back (jobs wait their turn) rather than over-fill.
            pipe.delete(family_capacity_key(self.prefix, family))
        pipe.delete(self.presence_key(hostname))
        pipe.execute()

    def state_counts(self, queues: list[str]) -> dict[str, int]:
        """Jobs waiting in ``queues`` (sent to the broker, pending their tenant's turn, or
        between stages), running (held by a worker process), and ended since the counts began
        (by final state): O(queues + instances), whatever the number of jobs."""
        instances = [_text(i) for i in self.r.zrange(self.instances_key(), 0, -1)]
        # One transaction: a claim or an end between two reads would count its job twice.
        pipe = self.r.pipeline(transaction=True)
        for queue in queues:
            pipe.zcard(self._queued_key(queue))
            pipe.llen(backlog_key(self.prefix, queue))
        for instance in instances:
            pipe.scard(self._running_prefix() + instance)
        pipe.hgetall(self.finished_key())
        replies = pipe.execute()
        finished = {_text(k): int(v) for k, v in replies.pop().items()}
        waiting, held = replies[:2 * len(queues)], replies[2 * len(queues):]
        counts = {JobState.queued.value: sum(waiting), JobState.running.value: sum(held)}
        for state in (JobState.succeeded, JobState.failed, JobState.cancelled):
            counts[state.value] = finished.get(state.value, 0)
        return counts

    def live_instances(self, families: list[str]) -> dict[str, int]:
        """Live worker processes per family, by their heartbeats on Redis's clock: one read
        per family, whatever else the keyspace holds (what metrics scrapes and /v1/queues ask
        every few seconds; ``presences`` scans the keyspace)."""
        if not families:
            return {}
        seconds, micros = self.r.time()
        now = seconds + micros / 1e6
        pipe = self.r.pipeline(transaction=False)
        for family in families:  # an instance's score is when its heartbeat runs out
            pipe.zcount(family_instances_key(self.prefix, family), f"({now}", "+inf")
        return {family: int(n) for family, n in zip(families, pipe.execute())}

    def presences(self) -> list[dict]:
        """The presence records of live worker processes (what each one serves): a scan of
        the keyspace, for operators' commands (``easel workers``, ``easel drain``)."""
        keys = list(self.r.scan_iter(f"{self.prefix}:worker:*", count=500))
        return [json.loads(v) for v in self.r.mget(keys) if v] if keys else []

    def reap_dead(self, limit: int = 100, lease_s: float = 60.0
                  ) -> tuple[str, dict[str, tuple[float, list[tuple[str, int]]]]]:
        """Lease the instances whose heartbeat expired, with the deliveries they held: (the
        lease's end, instance -> (expired at, [(job id, segment)])). Of several reapers one
        gets each; call ``forget_instance`` once its deliveries are requeued."""
        leased, *flat = self._reap(keys=[self.instances_key()], args=[self._running_prefix(), limit, lease_s])
        out: dict[str, tuple[float, list[tuple[str, int]]]] = {}
        for i in range(0, len(flat), 3):
            held = out.setdefault(flat[i], (float(flat[i + 1]), []))[1]
            if flat[i + 2]:
                job_id, _, seg = flat[i + 2].rpartition(":")
                held.append((job_id, int(seg)))
        return leased, out

    def forget_instance(self, instance: str, held: list[tuple[str, int]], leased: str) -> None:
        """Drop a reaped instance and the deliveries ``reap_dead`` found it holding, except one
        it claimed again since (``_FORGET``)."""
        self._forget(keys=[self.instances_key(), self._running_prefix() + instance],
                     args=[instance, leased, self.key(""), *(f"{job_id}:{segment}" for job_id, segment in held)])

    def requeue(self, job_id: str, segment: int, instance: str, why: str, *, live: bool = False) -> str | None:
        """Put an instance's delivery back in the queue (state queued, with a note that says
        why, returned); None when the instance no longer held it. ``why`` follows "requeued:
        worker X (instance I) " in the note. ``live``: the instance still beats, and its
        running set no longer lists the delivery either way. The caller re-sends the message
        and marks the queue position."""
        keys = [self.key(job_id), self.events_channel(job_id), self.stops_channel()]
        return self._requeue(keys=keys + ([self._running_prefix() + instance] if live else []),
                             args=[instance, segment, why, time.time(), job_id])

    def held_by(self, instance: str) -> set[tuple[str, int]]:
        """The (job id, segment) deliveries Redis records ``instance`` as running."""
        return {(job_id, int(segment)) for job_id, _, segment in
                (member.rpartition(":") for member in self.r.smembers(self._running_prefix() + instance))}


    def lease(self, name: str, seconds: float) -> bool:
        """True for the one caller that takes ``name`` for ``seconds`` (a farm-wide chore)."""
        return bool(self.r.set(f"{self.prefix}:lease:{name}", 1, nx=True, px=max(1, int(seconds * 1000))))

    def release_lease(self, name: str) -> None:
        """Let another caller take ``name`` now (its holder could not do the chore)."""
        self.r.delete(f"{self.prefix}:lease:{name}")

    def ping(self) -> None:
        self.r.ping()

    # -- views and fields for the producer side (HTTP API, webhooks, bulk runs) --------------
    def outcomes_of(self, job_ids: list[str]) -> list[tuple[str | None, str | None, str | None, str | None]]:
        """(state, error, outputs JSON, manifest) per job, one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.key(job_id), "state", "error", "outputs", "manifest")
        return [tuple(x) for x in pipe.execute()]

    def state_and_holder(self, job_id: str) -> tuple[str | None, str | None]:
        """The job's state and the instance holding it (a final state names its last one)."""
        state, holder = self.r.hmget(self.key(job_id), "state", "instance")
        return state, holder

    def states_of(self, job_ids: list[str]) -> list[str | None]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.key(job_id), "state")
        return pipe.execute()

    def segment_of(self, job_id: str) -> int:
        """The segment the job runs or waits for (0 when its record is gone)."""
        return int(self.r.hget(self.key(job_id), "segment") or 0)

    def owner(self, job_id: str) -> str | None:
        """The API key name that submitted the job (None: not submitted over the API, or gone)."""
        return self.r.hget(self.key(job_id), "owner")

    def webhook_target(self, job_id: str) -> tuple[str | None, str | None, str | None]:
        """(webhook URL, owner, job state): what a delivery attempt needs."""
        return tuple(self.r.hmget(self.key(job_id), "webhook_url", "owner", "state"))

    def set_webhook(self, job_id: str, url: str, events: list[str], passing: bool) -> None:
        """Record the job's webhook and the events it carries (``_SET_WEBHOOK``); ``passing``:
        some are passing events, which the dispatchers watch the job for."""
        self._set_webhook(keys=[self.key(job_id), self.webhooks_watch_key(), self.webhooks_due_key()],
                          args=[job_id, url, json.dumps(events), int(passing), time.time()])

    def webhook_watch(self, job_ids: list[str]) -> list[dict | None]:
        """What the dispatcher needs to see a watched job's new events, per job (None: gone)."""
        names = ("state", "stage", "step", "started_at", "webhook_events")
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.key(job_id), names)
        out: list[dict | None] = []
        for got in pipe.execute():
            view = dict(zip(names, got))
            if view["state"] is None:
                out.append(None)
                continue
            view["webhook_events"] = json.loads(view["webhook_events"] or "null")
            out.append(view)
        return out

    def _write_while_kept(self, job_id: str, write) -> list:
        """Run ``write(pipe, key)``'s commands on a record that may expire meanwhile (a
        delivery outlives the read before it): a hash they leave without a ``state`` is
        what they made of a gone record, deleted, since it would have no TTL. Returns the
        commands' replies."""
        key = self.key(job_id)
        pipe = self.r.pipeline(transaction=False)  # one connection runs them in order: no MULTI needed
        write(pipe, key)
        pipe.hexists(key, "state")
        *replies, kept = pipe.execute()
        if not kept:
            self.r.delete(key)
        return replies

    def webhook_first(self, job_id: str, event: str) -> bool:
        """True for the one caller (of all API replicas) that first schedules ``event``."""
        (first,) = self._write_while_kept(job_id, lambda p, k: p.hsetnx(k, f"webhook_sent:{event}", time.time()))
        return bool(first)

    def webhook_attempt(self, job_id: str) -> int:
        """One more delivery attempt starts; returns its number."""
        def write(pipe, key) -> None:
            pipe.hincrby(key, "webhook_attempts", 1)
            pipe.hset(key, "webhook_state", "delivering")
        return int(self._write_while_kept(job_id, write)[0])

    def webhook_state(self, job_id: str, state: str, error: str = "") -> None:
        self._write_while_kept(job_id, lambda p, k: p.hset(k, mapping={"webhook_state": state,
                                                                          "webhook_last_error": error}))
