"""Everything a worker process holds for its lifetime: connections, registry, warm pipelines."""
from __future__ import annotations

import queue
import socket
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from celery import Celery

from easel.shared.jobstore import JobStore
from easel.shared.liveness import new_instance_id
from easel.shared.registry import Registry, load_registry
from easel.shared.scheduler import Scheduler
from easel.shared.settings import Settings, get_settings
from easel.shared.storage import Storage
from easel.worker.finisher import Finisher
from easel.worker.fits import CallFits
from easel.worker.holdings import Holdings
from easel.worker.input_cache import InputCache
from easel.worker.pipelines import PipelineCache
from easel.worker.stops import StopListener
from easel.worker.watchdog import Watchdog

# How long each result or hand-off write keeps trying through an S3 outage (refused
# connections, 5xx, throttling) with the images in hand, where a failed write would send the
# segment again to denoise from the start. A server that takes connections and never answers
# costs a try its 60 s read timeout on top.
RESULT_WRITE_PATIENCE_S = 90.0


@dataclass
class WorkerContext:
    settings: Settings
    registry: Registry
    store: JobStore
    storage: Storage
    cache: PipelineCache
    family: str
    hostname: str
    scheduler: Scheduler | None = None  # fair share: hand-offs take their tenant's turn too
    instance: str = field(default_factory=new_instance_id)  # this process's own id (liveness)
    watchdog: Watchdog | None = None
    finisher: Finisher | None = None  # set by the worker process when overlap_finish is on
    inputs: InputCache = field(default_factory=lambda: InputCache(0, ""))
    # S3 transfers of one job run side by side (boto3 clients are thread-safe).
    io: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="easel-io"))
    # Progress writes and the cancel reads they carry, on a thread of their own: behind the
    # previous job's uploads on ``io`` (an overlapped finish), a stage's end would wait for
    # them at its last progress write.
    control: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="easel-progress"))
    stops: StopListener | None = None  # cancels and take-overs pushed to this process (worker.stops)
    # Called after each claim: room opened in the queue (``worker.feeding``).
    on_claim: Callable[[], None] | None = None
    # The most images a call of each shape may hold, learned from running out of memory.
    fits: CallFits = field(default_factory=CallFits)
    # Deliveries whose end could not be recorded (Redis away): the heartbeat settles them later.
    unsettled: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # The deliveries claimed and not yet ended, against what Redis says this instance runs.
    holding: Holdings = field(default_factory=Holdings)

    @classmethod
    def create(cls, family: str, settings: Settings | None = None, hostname: str | None = None) -> "WorkerContext":
        s = settings or get_settings()
        if s.models is None:  # never serve random weights by accident
            raise SystemExit("easel worker: no model registry: set EASEL_MODELS to your registry YAML "
                             "(EASEL_MODELS=tiny serves the bundled tiny random-weight checkpoints, as the demo does)")
        reg = load_registry(s.models)
        reg.family_models(family)  # refuse an unknown family before loading anything
        store = JobStore.from_settings(s)
        return cls(settings=s, registry=reg, store=store, scheduler=Scheduler(store, reg),
                   storage=Storage(s, write_patience_s=RESULT_WRITE_PATIENCE_S), cache=PipelineCache(reg, s, family), family=family,
                   hostname=hostname or f"{family}@{socket.gethostname()}",
                   inputs=InputCache(s.input_cache_mb, s.s3_bucket))


def wait_all(uploads: list[Future]) -> None:
    """Until every upload has ended, then raise the first one's error: a retry sent while
    another of this attempt's uploads still runs could have its objects overwritten by it."""
    wait(uploads)
    for u in uploads:
        u.result()


_CTX: WorkerContext | None = None
_APP: Celery | None = None


def set_context(ctx: WorkerContext, app: Celery) -> None:
    global _CTX, _APP
    _CTX, _APP = ctx, app


def get_context() -> tuple[WorkerContext, Celery]:
    if _CTX is None or _APP is None:
        raise RuntimeError("worker context not initialised; start workers with `easel worker`")
    return _CTX, _APP
