"""Recovery by liveness: worker instances beat, reapers re-send what dead ones held.

Each worker process has an instance id of its own (a process restarted under the same
hostname gets a new one) and beats every ``heartbeat_interval_s``: its entry in
``<prefix>:instances`` then expires ``heartbeat_ttl_s`` later by Redis's clock. A claim
records the instance that runs a segment, until the delivery ends (hand-off, or final
state written: an overlapped finish counts as running). A reaper, in every worker and in
the API, takes the expired instances with their deliveries in one atomic script, so one
reaper acts on each, and puts each delivery back in its queue with a note saying why.

The broker keeps no record of delivered messages (``shared.celery_app``): a message a
worker popped and died with before claiming its job is found by the lost-message sweep,
which sends a job again once it has waited ``heartbeat_ttl_s`` with its message in no
queue. A copy sent while the first still lives is dropped at its claim
(``shared/jobstore.py``), so nothing runs twice.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Callable

import redis

from easel.shared import logs
from easel.shared.celery_app import queued_deliveries
from easel.shared.jobstore import JobStore
from easel.shared.metrics import priority_lists

log = logging.getLogger("easel.liveness")

# (job id, segment, queue, priority) and the keywords ``on_behalf`` and ``kept_trace``
# (``shared.celery_app.send_segment``): a re-sent delivery continues its job's trace.
Send = Callable[..., None]
LOST_SWEEP_MAX_MESSAGES = 10_000  # a queue longer than this is not read whole each pass
RETIRE_WAIT_S = 5.0  # most a retiring worker waits for its beat in flight (longer: Redis is in trouble)


def new_instance_id() -> str:
    return uuid.uuid4().hex[:16]


class _Loop:
    """A daemon thread that calls ``tick`` every ``every_s`` until stopped."""

    name = "easel-loop"

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()

    def start(self):
        threading.Thread(target=self._run, name=self.name, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.warning("%s: pass failed; next in %ss", self.name, self.every_s, exc_info=True)
            if self._stop.wait(self.every_s):
                return

    def tick(self) -> None:
        raise NotImplementedError


class Heartbeat(_Loop):
    """Keeps one worker instance alive in Redis, and its presence record (``easel queues``)."""

    name = "easel-heartbeat"

    def __init__(self, store: JobStore, instance: str, hostname: str, presence: dict, every_s: float, ttl_s: float,
                 after_beat: Callable[[], None] | None = None):
        super().__init__(every_s)
        self.store, self.instance, self.hostname, self.ttl_s = store, instance, hostname, ttl_s
        self.presence = {**presence, "hostname": hostname, "instance": instance, "pid": os.getpid(),
                         "since": time.time()}
        self.after_beat = after_beat  # the worker settles deliveries it could not end before
        # A beat and the retirement never cross: a beat landing after the retirement would
        # bring the instance back to life (and into its family's capacity) for a whole TTL.
        self._beating = threading.Lock()
        self._retired = False

    def tick(self) -> None:
        with self._beating:
            if self._retired:
                return
            self.store.beat(self.instance, self.hostname, self.presence, self.ttl_s)
        if self.after_beat is not None:
            self.after_beat()

    def retire(self) -> None:
        """A clean exit: stop beating, and let reapers take anything still held at once. A beat
        on its way to Redis lands first (waited for up to ``RETIRE_WAIT_S``)."""
        self.stop()
        waited = self._beating.acquire(timeout=RETIRE_WAIT_S)
        try:
            self._retired = True
            self.store.retire(self.instance, self.hostname, self.presence.get("family"))
        except redis.RedisError:
            log.warning("could not retire instance %s; its heartbeat expires in %ss", self.instance, self.ttl_s)
        finally:
            if waited:
                self._beating.release()


class Reaper(_Loop):
    """Re-sends the running deliveries of instances whose heartbeat expired.

    It acts only after ``ttl_s`` of unbroken contact with Redis: after an outage, every
    instance's entry may have expired while the instances themselves ran on, and they
    must get the chance to beat again before anyone is declared dead.
    """

    name = "easel-reaper"

    def __init__(self, store: JobStore, send: Send, every_s: float, ttl_s: float,
                 queues: list[str] = (), chores: list[Callable[[], object]] = ()):
        super().__init__(every_s)
        self.store, self.send, self.ttl_s, self.queues = store, send, ttl_s, list(queues)
        self.chores = list(chores)  # farm-wide housekeeping that paces itself (result retention)
        self._in_contact_since = self._last_contact = time.monotonic()

    def tick(self) -> None:
        """Sweep once in unbroken contact for a TTL. The client rides out short outages by
        retrying, so a gap between answers longer than a couple of periods counts as lost
        contact too, not only an error."""
        try:
            self.store.ping()
        except redis.RedisError:
            self._in_contact_since = time.monotonic()
            raise
        now = time.monotonic()
        if now - self._last_contact > 2 * self.every_s + 1:
            self._in_contact_since = now
        self._last_contact = now
        if now - self._in_contact_since < self.ttl_s:
            return
        self.sweep()
        for queue in self.queues:  # one sweep per queue per period, by any of its reapers
            if self.store.lease(f"lost-sweep:{queue}", self.every_s):
                self.sweep_lost(queue)
        for chore in self.chores:
            chore()

    def sweep(self) -> list[str]:
        """One pass; returns the ids of the jobs sent back to their queues. An instance is
        forgotten only once all it held is requeued; until then, a later pass (this
        reaper's or another's, once the lease runs out) takes it again."""
        resent = []
        leased, dead = self.store.reap_dead(lease_s=max(30.0, 4 * self.every_s))
        for instance, (expired_at, held) in dead.items():
            why = "stopped beating; " + ("it shut down" if expired_at < 1e9 else
                                         f"its heartbeat expired at "
                                         f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expired_at))}")
            for job_id, segment in held:
                # One job that cannot be requeued must not strand the rest. A record this
                # process cannot read stays in the instance's running set, so the instance
                # is kept (``forget_instance``) and a later pass retries it; a job requeued
                # whose send failed waits with no message, for the lost-message sweep. Redis
                # itself away ends the pass (every job would fail the same way).
                with logs.job_context(job_id, segment):  # the job's fields on its lines, as a worker's
                    try:
                        if self.requeue(instance, job_id, segment, why):
                            resent.append(job_id)
                    except (redis.ConnectionError, redis.TimeoutError):
                        raise
                    except Exception:
                        log.exception("could not requeue job %s segment %d that instance %s held; a later pass "
                                      "retries", job_id, segment, instance)
            self.store.forget_instance(instance, held, leased)
        return resent

    def requeue(self, instance: str, job_id: str, segment: int, why: str, *, live: bool = False) -> bool:
        """Send ``instance``'s delivery again (``JobStore.requeue``, ``live`` as there); False
        when it no longer held it. In its queue's position set before the requeue: should this stop before the
        send, the lost-message sweep finds the job waiting there with no message."""
        try:
            spec, plan = self.store.load(job_id)
        except KeyError:  # its record expired: nothing to requeue (the script deletes what is left)
            self.store.requeue(job_id, segment, instance, why, live=live)
            return False
        queue = plan.segments[segment].queue
        self.store.mark_position(job_id, queue, spec.priority)
        note = self.store.requeue(job_id, segment, instance, why, live=live)
        if note is None:
            self.store.drop_position(job_id, queue)
            return False  # ended, or another delivery took it meanwhile
        self.store.mark_queued(job_id, queue, spec.priority)
        self._send_again(job_id, segment, queue, spec.priority)
        log.warning("job %s segment %d %s", job_id, segment, note)
        return True

    def sweep_lost(self, queue: str) -> list[str]:
        """Jobs waiting in ``queue`` for over ``ttl_s``, held by no instance, whose message is
        in none of the queue's lists: a worker popped it and died before its claim, or a send
        failed. Each is sent again; returns their ids. The lists are read only when such a
        job exists, and not at all past 10,000 messages (a later pass, once the queue is
        shorter, finds it). One reaper per queue does this per period (a lease per queue: a
        farm-wide one would leave a small pool's queue to the rare periods its own workers
        win it)."""
        old = [(j, seg) for j, seg, since in self.store.waiting_since(queue) if time.time() - since > self.ttl_s]
        if not old:
            return []
        lists = [name for _, name in priority_lists(queue)]
        if self.store.queue_depth(queue, lists) > LOST_SWEEP_MAX_MESSAGES:
            return []
        present = queued_deliveries(self.store.r, lists)
        resent = []
        for job_id, segment in old:
            if (job_id, segment) in present:
                continue
            with logs.job_context(job_id, segment):  # the job's fields on its lines, as a worker's
                if self._resend_lost(job_id, segment, queue):
                    resent.append(job_id)
        return resent

    def _resend_lost(self, job_id: str, segment: int, queue: str) -> bool:
        """Send a lost delivery again; False when it cannot be now. Each job alone: one that
        cannot be sent must not keep the others waiting (Redis away ends the pass)."""
        try:
            spec, _ = self.store.load(job_id)
            self._send_again(job_id, segment, queue, spec.priority)
        except KeyError:  # its record expired meanwhile: nothing to send
            return False
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception:
            log.exception("could not send job %s segment %d again; a later pass retries", job_id, segment)
            return False
        log.warning("job %s segment %d was waiting with no message left (a worker died taking it); "
                    "sent again", job_id, segment)
        return True

    def _send_again(self, job_id: str, segment: int, queue: str, priority: int) -> None:
        """Send a delivery on its submitter's behalf: with tracing on, its message carries
        the trace context kept in the job's record, so the new delivery's spans join the
        job's one trace instead of starting one in this reaper's process. A job that kept
        none (submitted with tracing off) gets a trace of its own, never this reaper's."""
        kept = self.store.kept_traces([job_id]).get(job_id)
        self.send(job_id, segment, queue, priority, on_behalf=True, kept_trace=kept)
