"""The Python client: submit jobs, follow them, fetch results.

Everything that can be known at submission is checked here, before anything is queued:
the schema, the chain plan (models, tasks, hand-offs), and local or inline images
(decoded once, then uploaded content-addressed so the broker only ever carries keys).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import redis
from pydantic import BaseModel, Field, ValidationError

from easel.shared import tracing
from easel.shared.celery_app import RUN_SEGMENT, family_queues, make_celery, send_segment
from easel.shared.images import InputError, Unresolved, check_public_url, decode_image, image_ext, parse_data_uri
from easel.shared.jobstore import JobStore, new_job_id
from easel.shared.scheduler import Scheduler
from easel.shared.plan import PlanError, plan_job
from easel.shared.registry import Registry, load_registry
from easel.shared.schema import JobSpec, JobState, JobStatus, Manifest, Plan, Progress, Stage
from easel.shared.settings import Settings, get_settings
from easel.shared.storage import Storage, handoff_prefix

log = logging.getLogger("easel.client")


def _local_path(ref: object) -> bool:
    """A client-side path to upload; URLs of any scheme (even ones the schema refuses) are not."""
    return isinstance(ref, str) and bool(ref) and not ref.startswith("data:") and not _SCHEME.match(ref)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _stand_in_for_local_paths(job: JobSpec | dict) -> tuple[JobSpec | dict, dict[str, str]]:
    """A job dict whose local paths (not valid in a queued job) are replaced by ``s3://``
    stand-ins the schema accepts, and the paths by stand-in: the job is validated and
    planned before any file is read or uploaded."""
    local_paths: dict[str, str] = {}

    def stand_in(ref: object) -> object:
        if not _local_path(ref):
            return ref
        key = f"s3://easel-local-path/{uuid.uuid4().hex}"
        local_paths[key] = ref
        return key

    if not isinstance(job, dict):
        return job, local_paths
    job = dict(job)
    if isinstance(job.get("input"), dict) and "image" in job["input"]:
        job["input"] = {**job["input"], "image": stand_in(job["input"].get("image"))}
    if isinstance(job.get("stages"), list):
        job["stages"] = [{**st, "control_image": stand_in(st.get("control_image"))}
                         if isinstance(st, dict) and "control_image" in st else st for st in job["stages"]]
    return job, local_paths


class SubmitError(ValueError):
    """The job was refused at submission; the message says why."""


class SubmitUnavailable(SubmitError):
    """Refused for now, not for good: a host name the job names did not resolve. The same job
    may be accepted in a moment."""


class PartialSubmitError(Exception):
    """``submit_many`` stopped part way: the jobs before index ``failed_from`` are queued, with
    the ids ``queued_ids``; the error that stopped it is its ``__cause__``."""

    def __init__(self, cause: Exception, queued_ids: list[str], failed_from: int):
        super().__init__(f"{type(cause).__name__}: {cause} (the jobs before job {failed_from} are queued)")
        self.queued_ids, self.failed_from = list(queued_ids), failed_from


def write_whole(path: Path, data: bytes) -> None:
    """Write beside, then rename: a file that exists is whole, whatever stopped the writer."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


class _Follower:
    """A thread's kept pub/sub connection, and whether a watch uses it. The watch holds the
    slot itself, so whichever thread ends the watch (a generator closed elsewhere) frees it."""

    def __init__(self, pubsub):
        self.pubsub, self.busy = pubsub, False


def _release_follower(slot: _Follower | None, pubsub, channels: list[str], broken: bool = False) -> None:
    """Keep a healthy kept connection for the thread's next watch (unsubscribed); close one
    that is not kept, or that failed (the thread's next watch starts a new one)."""
    if slot is not None and not broken:
        try:
            pubsub.unsubscribe(*channels)
            slot.busy = False
            return
        except Exception:
            pass
    if slot is not None:
        slot.pubsub, slot.busy = None, False
    with contextlib.suppress(Exception):
        pubsub.close()


def _timed_out(last: dict[str, JobStatus], timeout: float | None) -> None:
    going = [j for j, st in last.items() if not st.state.terminal]
    raise TimeoutError(f"job {going[0]} still {last[going[0]].state.value} after {timeout}s")


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "invalid job: " + "; ".join(parts)


class EaselClient:
    def __init__(self, settings: Settings | None = None, registry: Registry | None = None,
                 store: JobStore | None = None):
        self.settings = settings or get_settings()
        self.registry = registry or load_registry(self.settings.models)
        self.store = store or JobStore.from_settings(self.settings)
        # A capped tenant's job that ends here (a cancel) frees its slot: dispatch its next.
        self.store.on_slot_freed = self._slot_freed
        self.scheduler = Scheduler(self.store, self.registry)
        self.storage = Storage(self.settings)
        self.celery = make_celery(self.settings)
        tracing.setup(self.settings, "easel-producer")
        self._follow = threading.local()  # each thread's pub/sub connection for ``watch``
        self._follow_jobs: JobStore | None = None

    def _slot_freed(self, tenants: set[str], queues: set[str]) -> None:
        """Dispatch the queues where ``tenants`` (whose cap slots a cancel freed) wait, and
        ``queues`` (where a cancelled job left room). Best effort, and without riding out a
        broker outage (a cancel must not hang on one): a job moved and not sent is sent again
        by the lost-message sweep, and a worker's next claim or heartbeat dispatches what
        this could not."""
        every = family_queues(self.registry.families(), self.settings.queue_prefix)
        send = functools.partial(send_segment, self.celery, retry=False)
        try:
            if tenants:
                self.scheduler.feed(every, send, tenants)
            if room := {queue: every[queue] for queue in queues if queue in every}:
                self.scheduler.feed(room, send)
        except Exception as e:
            log.warning("could not dispatch pending jobs after a cancel (%s)", e)

    # -- submission ---------------------------------------------------------------------
    def validate(self, job: JobSpec | dict) -> JobSpec:
        """A job checked against the schema; a JobSpec is checked again (pydantic does not
        check assignments, so one edited after it was made may break any limit)."""
        try:
            return JobSpec.model_validate(job.model_dump() if isinstance(job, JobSpec) else job)
        except ValidationError as e:
            raise SubmitError(_format_validation(e)) from None

    def _upload_ref(self, ref: str | None, what: str) -> str | None:
        """Local paths and data: URIs are decoded (refused if unreadable) and uploaded; an
        ``s3://`` object of ours is kept alive for the job (``Storage.keep_for_a_job``), and
        refused when it is not there."""
        if ref is None:
            return ref
        if ref.startswith("s3://"):
            if not self.storage.keep_for_a_job(ref):
                raise SubmitError(f"{what}: {ref} does not exist (upload it first: easel submit with a local "
                                  "path, POST /v1/uploads, or a presigned upload that has finished)")
            return ref
        if ref.startswith(("https://", "http://")):
            try:
                check_public_url(ref, self.settings)
            except Unresolved as e:
                raise SubmitUnavailable(f"{what}: {e}") from None
            except InputError as e:
                raise SubmitError(f"{what}: {e}") from None
            return ref
        try:
            if ref.startswith("data:"):
                data = parse_data_uri(ref)
            else:
                path = Path(ref).expanduser()
                if not path.is_file():
                    where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
                    raise InputError(f"no such file {ref!r}{where}")
                if path.stat().st_size > self.settings.max_input_bytes:
                    raise InputError(f"{ref} is over the {self.settings.max_input_bytes}-byte limit")
                data = path.read_bytes()
            size = decode_image(data, self.settings, what).size
        except InputError as e:
            msg = str(e)
            raise SubmitError(msg if msg.startswith(what) else f"{what}: {msg}") from None
        except (OSError, RuntimeError, ValueError) as e:  # unreadable local path: too long, no such ~user...
            raise SubmitError(f"{what}: cannot read {ref[:100]!r}: {getattr(e, 'strerror', None) or e}") from None
        return self.storage.put_input(data, image_ext(data), size)

    def prepare(self, job: JobSpec | dict) -> JobSpec:
        """Validate, plan, upload local/inline images, fix seeds. Raises SubmitError naming the problem."""
        return self.prepare_and_plan(job)[0]

    def prepare_and_plan(self, job: JobSpec | dict) -> tuple[JobSpec, Plan]:
        """``prepare`` and the chain plan: everything checked before a job is queued. A chain
        that cannot run is said before any image is read, uploaded or looked up."""
        job, local_paths = _stand_in_for_local_paths(job)
        spec = self.validate(job)
        try:
            plan = plan_job(spec, self.registry, self.settings.queue_prefix)
        except PlanError as e:
            raise SubmitError(str(e)) from None

        def upload(ref: str | None, what: str) -> str | None:
            return self._upload_ref(local_paths.get(ref, ref), what)

        image = upload(spec.input.image, "input image")
        stages = [st.model_copy(update={"control_image": upload(st.control_image, f"stage {i} control image")})
                  if st.control_image else st for i, st in enumerate(spec.stages)]
        spec = spec.model_copy(update={"input": spec.input.model_copy(update={"image": image}), "stages": stages})
        return spec.with_seeds(), plan

    def submit(self, job: JobSpec | dict) -> str:
        """Queue one job; returns its id (an idempotency key seen before: that job's id)."""
        return self.submit_as(job, owner=None)[0]

    def submit_as(self, job: JobSpec | dict, owner: str | None) -> tuple[str, bool]:
        """``submit`` for ``owner`` (the HTTP API's key name, stored in the job's record by the
        script that creates it, so that no job is ever without its owner). Returns (job id,
        created): created is False when an idempotency key gave an earlier job."""
        if owner is None and (earlier := self._replays([job])[0]) is not None:
            return earlier, False
        with tracing.span("easel.submit") as span:
            spec, plan = self.prepare_and_plan(job)
            job_id = new_job_id()
            traces = {job_id: tracing.carrier()} if tracing.enabled() else {}
            queue = plan.segments[0].queue
            with tracing.span("easel.enqueue", {"easel.job_id": job_id, "messaging.destination.name": queue},
                              producer=True):
                (got,) = self.scheduler.submit_many([(job_id, spec, plan)], traces, owner)
                if got.created:
                    self._send_admitted([(job_id, queue, spec.priority)] if got.admitted else [],
                                        {queue: plan.segments[0].family} if got.room else {})
            if span is not tracing.NO_SPAN:
                span.set_attributes(_job_attributes(got.job_id, spec, plan, got.created))
            return got.job_id, got.created

    def _send(self, *args, **kw) -> None:
        send_segment(self.celery, *args, **kw)

    def _send_admitted(self, admitted: list[tuple[str, str, int]], pended: dict[str, str], producer=None,
                       carriers: dict[str, dict] | None = None) -> None:
        """Send the first messages of the jobs admitted now; a job whose message cannot be sent
        ends failed ("could not enqueue"), not stuck, lets go of its idempotency key, and the
        error is raised (not when every such job was claimed meanwhile: the send reached
        Redis, and a caller told it failed would submit it again). Then, when some
        jobs wait in pending sets of queues with room, dispatch those queues (``pended``:
        queue -> family) and send what it moved (in a full queue a dispatch moves nothing:
        the claim that makes room dispatches). That is best effort: a job it could not move
        or send still waits its turn, and the next dispatch (a worker's claim or heartbeat,
        or the lost-message sweep) moves or sends it."""
        try:
            if producer is None:
                for job_id, queue, priority in admitted:
                    send_segment(self.celery, job_id, 0, queue, priority)
            elif admitted:
                self._send_batch(producer, admitted, carriers or {})
        except Exception as e:
            failed = False
            for job_id, _, _ in admitted:
                # The send may have reached Redis with only its reply lost: a job a worker
                # has claimed since runs on, and keeps its key.
                if self.store.fail_unsent(job_id, f"could not enqueue: {e}"):
                    self.store.unmark_queued(job_id)
                    self.store.release_idempotency(job_id)  # a retry with the same key queues it anew
                    failed = True
            if failed:
                raise
            log.warning("sending the jobs' messages raised (%s), but each job was claimed since: they run", e)
        if not pended:
            return
        try:
            if producer is None:
                self.scheduler.feed(pended, self._send)
            elif (done := self.scheduler.dispatch(pended)).moved:
                self._send_batch(producer, done.moved, self.store.kept_traces([j for j, _, _ in done.moved]),
                                 done.segments)
        except Exception as e:
            log.warning("could not dispatch pending jobs now (%s); they wait for the next dispatch", e)

    def submit_many(self, jobs: Iterable[JobSpec | dict], batch_size: int = 500) -> list[str]:
        """Submit many jobs; returns their ids in input order.

        Every job is prepared and planned exactly as ``submit`` does, all of them before
        anything is queued, so one bad job refuses the whole call (``SubmitError`` naming its
        index) and queues nothing. Then, per batch of ``batch_size`` jobs: the job records and
        their admissions in one pipeline (one script per job), a dispatch where jobs wait
        their tenant's turn, and the Celery messages of the jobs sent now through one kombu
        producer in one pipeline. If sending a batch's messages fails, the jobs that were
        to be sent then end failed ("could not enqueue") and let go of their idempotency
        keys; the batch's jobs that wait their tenant's turn stay queued, as do earlier
        batches. An error after a batch was queued is raised as ``PartialSubmitError``, the
        error its ``__cause__``: ``queued_ids`` are the ids of the jobs before
        ``failed_from``, the failed batch's first index (an error in the first batch is
        raised as it is). With idempotency keys, calling again
        with the same jobs returns every job's id and queues only the failed ones anew;
        without, resubmit only ``jobs[failed_from:]`` (its jobs that waited their tenant's
        turn are queued twice then).

        Idempotency keys behave as in ``submit``: a key seen before, or earlier in this same
        call, gives the first job's id and queues nothing.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        jobs = list(jobs)
        ids: list[str | None] = self._replays(jobs)  # retries answered before any check
        prepared: list[tuple[int, JobSpec, Plan]] = []
        for i, job in enumerate(jobs):
            if ids[i] is not None:
                continue
            try:
                prepared.append((i, *self.prepare_and_plan(job)))
            except SubmitError as e:
                raise type(e)(f"job {i}: {e}") from None
        if not prepared:
            return ids
        # A connection of our own whose Redis client does not replay timed-out commands:
        # kombu only pipelines publishes (Producer.batch) when a replay cannot duplicate them.
        with tracing.span("easel.submit_many", {"easel.jobs": len(prepared)}) as call, \
                self.celery.connection_for_write(transport_options={"retry_on_timeout": False}) as conn:
            producer = self.celery.amqp.Producer(conn)
            for start in range(0, len(prepared), batch_size):
                batch = prepared[start:start + batch_size]
                try:
                    got = self._submit_batch([(spec, plan) for _, spec, plan in batch], producer, call)
                except Exception as e:
                    if start == 0:  # nothing queued before it: the error itself, as from submit
                        raise
                    failed_from = batch[0][0]
                    raise PartialSubmitError(e, ids[:failed_from], failed_from) from e
                for (i, _, _), job_id in zip(batch, got):
                    ids[i] = job_id
        return ids

    def _replays(self, jobs: list[JobSpec | dict]) -> list[str | None]:
        """Per job, the job its idempotency key made before (None: none, or no key), in one
        read. Looked up before any check: a retry gets its job even where a new job's checks
        would fail now (its input deleted since, a DNS blip). (The HTTP API looks up its
        per-key names itself.)"""
        keys = [j.idempotency_key if isinstance(j, JobSpec) else (j.get("idempotency_key") if isinstance(j, dict)
                                                                  else None) for j in jobs]
        asked = [i for i, key in enumerate(keys) if isinstance(key, str) and key]
        found: list[str | None] = [None] * len(jobs)
        if asked:
            for i, job_id in zip(asked, self.store.idempotent_jobs([keys[i] for i in asked])):
                found[i] = job_id
        return found

    def _submit_batch(self, items: list[tuple[JobSpec, Plan]], producer, call=tracing.NO_SPAN) -> list[str]:
        """Records and admissions in one round trip, then the messages of the jobs admitted."""
        new = [(new_job_id(), spec, plan) for spec, plan in items]
        carriers = self._submit_spans(new, call)
        replies = self.scheduler.submit_many(new, carriers)
        admitted = [(job_id, plan.segments[0].queue, spec.priority)
                    for (job_id, spec, plan), got in zip(new, replies) if got.created and got.admitted]
        pended = {plan.segments[0].queue: plan.segments[0].family
                  for (_, spec, plan), got in zip(new, replies) if got.created and got.room}
        self._send_admitted(admitted, pended, producer, carriers)
        return [got.job_id for got in replies]

    @staticmethod
    def _submit_spans(new: list[tuple[str, JobSpec, Plan]], call) -> dict[str, dict]:
        """One trace per job (tracing on): a root span of its own, linked to the submit_many
        call; returns each job's context, to keep with it for whoever sends its message."""
        if not tracing.enabled():
            return {}
        carriers = {}
        for job_id, spec, plan in new:
            with tracing.span("easel.submit", _job_attributes(job_id, spec, plan, True), root=True, producer=True,
                              links=[call]):
                carriers[job_id] = tracing.carrier()
        return carriers

    def _send_batch(self, producer, moved: list[tuple[str, str, int]], kept: dict[str, dict],
                    segments: dict[str, int] | None = None) -> None:
        """The first messages of the dispatched jobs, through one kombu producer, each with the
        trace context kept for it.

        retry=False: inside a batch a publish only buffers (nothing to retry); the flush at the
        end of the block is one pipeline, which kombu never replays. (A kombu without
        Producer.batch publishes one LPUSH per message instead.) Each queue is declared (bound
        in Redis) with its first message of the call; the rest skip kombu's per-message
        declare check, which copies the queue entity."""
        batch = getattr(producer, "batch", None)
        declared: set[str] = set()
        with batch(max_size=len(moved) + 1) if batch else contextlib.nullcontext():
            for job_id, queue, priority in moved:
                once = {"declare": []} if queue in declared else {}
                segment = (segments or {}).get(job_id, 0)  # a hand-off that waited its turn: not the first
                self.celery.send_task(RUN_SEGMENT, args=[job_id, segment], queue=queue, priority=priority,
                                      producer=producer, retry=False, argsrepr=repr([job_id, segment]), kwargsrepr="{}",
                                      headers=tracing.headers_from(kept.get(job_id)), **once)
                declared.add(queue)

    def submit_img2img(self, image: str, prompt: str, model: str = "sd15", **stage: object) -> str:
        output = {k: stage.pop(k) for k in ("format", "keep_intermediates") if k in stage}
        extra = {k: stage.pop(k) for k in ("idempotency_key", "priority", "num_images") if k in stage}
        job = {"input": {"image": image}, "stages": [{"task": "img2img", "model": model, "prompt": prompt, **stage}],
               "output": output, **extra}
        return self.submit(job)

    # -- following ----------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        """The job's status; while it waits, with its place in line and ETA, or why it cannot
        start. Raises KeyError for a job that does not exist (or whose record expired)."""
        return self.scheduler.status_of(self.store.view(job_id))

    def watch(self, job_ids: list[str], timeout: float | None = None, resync_s: float = 5.0) -> Iterator[JobStatus]:
        """Each job's status as it changes, until every job has ended; raises TimeoutError after
        ``timeout`` seconds, whether or not Redis answers meanwhile.

        Follows the jobs' event channels instead of polling: a progress event updates the last
        status in memory, a state event re-reads the job's record. Every ``resync_s`` the jobs
        still going are re-read, so an event missed across a reconnect only delays an update.
        While Redis is away the watch waits and tries again (with no ``timeout``, for as long
        as it takes), then re-reads every job still going."""
        if not job_ids:  # nothing to follow (a SUBSCRIBE needs a channel)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        channels = {self.store.events_channel(j): j for j in job_ids}
        jobs = self.follow_store()
        slot, pubsub = self._follower()
        last: dict[str, JobStatus] = {}
        broken = read = False
        try:
            while not read:  # subscribed before the first read: no change falls in between
                try:
                    pubsub.subscribe(*channels)
                    last, read, broken = {j: jobs.status(j, position=False) for j in job_ids}, True, False
                except (redis.ConnectionError, redis.TimeoutError):
                    broken = True
                    self._wait_out_redis(deadline, timeout, job_ids, last)
            yield from last.values()
            synced = time.monotonic()
            while any(not st.state.terminal for st in last.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    _timed_out(last, timeout)
                try:
                    msg = pubsub.get_message(timeout=min(resync_s, left if left is not None else resync_s))
                    job_id = channels.get(msg["channel"]) if msg is not None and msg["type"] == "message" else None
                    if job_id is not None:  # (None: a late event of an earlier watch on this connection)
                        if not last[job_id].state.terminal:
                            last[job_id] = self._apply_event(jobs, job_id, last[job_id], msg["data"])
                            yield last[job_id]
                    if time.monotonic() - synced >= resync_s:
                        synced = time.monotonic()
                        for job_id in [j for j, st in last.items() if not st.state.terminal]:
                            last[job_id] = jobs.status(job_id, position=False)
                            yield last[job_id]
                    broken = False
                except (redis.ConnectionError, redis.TimeoutError):
                    broken, synced = True, 0.0  # once back: re-read what it may have missed
                    self._wait_out_redis(deadline, timeout, job_ids, last)
        finally:
            _release_follower(slot, pubsub, list(channels), broken)

    @staticmethod
    def _wait_out_redis(deadline: float | None, timeout: float | None, job_ids: list[str],
                        last: dict[str, JobStatus]) -> None:
        """Redis did not answer a watch: wait a little before trying again, or, past the
        deadline, raise TimeoutError."""
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            if last:
                _timed_out(last, timeout)
            raise TimeoutError(f"Redis did not answer about job {job_ids[0]} within {timeout}s")
        time.sleep(min(1.0, left) if left is not None else 1.0)

    def follow_store(self) -> JobStore:
        """A job store on connections with short timeouts (3 s a try) and no retries: what
        ``watch``, ``wait`` and ``easel batch`` read job records through, so that they keep
        their deadlines (overshooting by one try at most) while Redis is away or silent, and
        try again themselves. The client's ``store`` rides out ~30 s or more per call."""
        if self._follow_jobs is None:
            self._follow_jobs = JobStore.from_url(self.settings.redis_url, self.store.prefix, self.store.ttl_s,
                                                  reply_within_s=3, retries=0, **self.settings.redis_ssl_kwargs())
        return self._follow_jobs

    def _follower(self) -> tuple["_Follower | None", object]:
        """(slot, pub/sub): this thread's connection for following jobs, kept between calls
        so that a submit-and-wait loop does not connect twice per job (closing a pub/sub
        connection drops it from the pool); a fresh one with no slot while this thread's is
        in use (a watch inside another)."""
        r = self.follow_store().r
        slot = getattr(self._follow, "slot", None)
        if slot is None or slot.pubsub is None:
            slot = self._follow.slot = _Follower(r.pubsub(ignore_subscribe_messages=True))
        if slot.busy:
            return None, r.pubsub(ignore_subscribe_messages=True)
        slot.busy = True
        return slot, slot.pubsub

    def _apply_event(self, jobs: JobStore, job_id: str, status: JobStatus, data: str) -> JobStatus:
        event = json.loads(data)
        if "state" in event:
            return jobs.status(job_id, position=False)
        progress = Progress(**{k: event[k] for k in ("stage", "step", "total_steps") if k in event})
        return status.model_copy(update={"progress": progress})

    def wait(self, job_id: str, timeout: float | None = None,
             on_update: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Follow one job until it ends (``watch``); returns its final status. Raises
        TimeoutError when ``timeout`` seconds pass first, KeyError for an unknown job."""
        for status in self.watch([job_id], timeout):
            if on_update:
                on_update(status)
        return status

    def result(self, job_id: str) -> Manifest:
        """The manifest of a job that succeeded (parameters, seeds, timings, output URIs);
        RuntimeError naming the state (and error) of a job that did not, KeyError for an
        unknown job."""
        return Manifest.model_validate_json(self._stored_manifest(job_id))

    def _stored_manifest(self, job_id: str) -> bytes:
        """The manifest object of a job that succeeded, as the worker wrote it."""
        st = self.status(job_id)
        if st.state != JobState.succeeded:
            raise RuntimeError(f"job {job_id} is {st.state.value}" + (f": {st.error}" if st.error else ""))
        return self.storage.get(st.manifest)

    def fetch(self, job_id: str, out_dir: Path) -> list[Path]:
        """Download the job's images and manifest into ``out_dir/<job_id>/``; raises as
        ``result`` does for a job that did not succeed. Each file is whole once it has its
        name, and the manifest (as stored, every field kept) comes last: a folder with a
        ``manifest.json`` holds the whole result, whatever stopped an earlier fetch."""
        raw = self._stored_manifest(job_id)
        manifest = Manifest.model_validate_json(raw)
        target = Path(out_dir) / job_id
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for uri in manifest.outputs + [u for s in manifest.stages for u in s.intermediates]:
            rel = uri.split(f"jobs/{job_id}/", 1)[1]
            p = target / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            write_whole(p, self.storage.get(uri))
            paths.append(p)
        mp = target / "manifest.json"
        write_whole(mp, raw)
        return paths + [mp]

    def cancel(self, job_id: str) -> JobState:
        """Cancel: a job no worker holds ends now, a running one at its next denoising step.
        Returns its state after the request."""
        state = self.store.request_cancel(job_id)
        if state == JobState.cancelled and self.store.segment_of(job_id) > 0:
            # It waited for a later stage: no worker will claim it and drop its hand-offs.
            try:
                self.storage.delete_prefix(handoff_prefix(job_id))
            except Exception as e:  # best effort: the bucket's retention removes what is left
                log.warning("job %s: could not delete its hand-offs: %s", job_id, e)
        return state

    def queues(self) -> list[QueueInfo]:
        """Per family: jobs waiting (in the broker, and pending their tenant's turn), live
        workers, their recent seconds per job, and whether the queue is paused."""
        from easel.shared.celery_app import queue_name
        from easel.shared.metrics import queue_depths

        prefix = self.settings.queue_prefix
        depths = queue_depths(self.store.r, self.registry.families(), prefix)
        out = []
        for family, waiting in sorted(depths.items()):
            queue = queue_name(family, prefix)
            view = self.scheduler.family(family)
            out.append(QueueInfo(family=family, queue=queue, messages=waiting.messages,
                                 pending=waiting.pending, live_workers=view.live,
                                 job_s=view.job_s, paused=self.scheduler.paused(queue)))
        return out

    def pause(self, family: str) -> None:
        """Stop dispatching the family's pending jobs; they keep their order until ``resume``."""
        self.scheduler.pause(self._queue_of(family))

    def resume(self, family: str) -> None:
        queue = self._queue_of(family)
        self.scheduler.resume(queue)
        self.scheduler.feed({queue: family}, self._send)

    def drain(self, hostname: str) -> None:
        """Ask worker ``hostname`` to finish its running stage and exit (its launcher leaves it
        stopped); picked up at its next heartbeat."""
        self.store.r.set(f"{self.settings.queue_prefix}:drain:{hostname}", 1, ex=86400)

    def _queue_of(self, family: str) -> str:
        from easel.shared.celery_app import queue_name

        if family not in self.registry.families():
            raise KeyError(f"unknown family {family!r}; known: {', '.join(sorted(self.registry.families()))}")
        return queue_name(family, self.settings.queue_prefix)


class QueueInfo(BaseModel):
    family: str
    queue: str
    messages: int = Field(description="messages in the broker (sent, waiting for a worker)")
    pending: int = Field(description="jobs waiting for their tenant's turn (fair share)")
    live_workers: int
    job_s: float | None = Field(description="the live workers' recent mean seconds per job")
    paused: bool


def _job_attributes(job_id: str, spec: JobSpec, plan: Plan, created: bool) -> dict:
    return {"easel.job_id": job_id, "easel.stages": len(spec.stages), "easel.segments": len(plan.segments),
            "easel.priority": spec.priority, "easel.created": created,
            "messaging.destination.name": plan.segments[0].queue}


__all__ = ["EaselClient", "PartialSubmitError", "SubmitError", "SubmitUnavailable", "Stage"]
