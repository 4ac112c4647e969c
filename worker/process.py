"""One worker process: pinned to one device, one family's pipelines loaded, one Celery solo worker.

The solo pool runs the task in this very process, so the warm pipelines stay in this
process's memory (a prefork child would have to load them again, and a fork after CUDA
init is unsafe). Cancellation therefore goes through Redis flags, not Celery revoke.

Start order matters: logging before anything that logs; the cheap checks (registry, Redis,
the tracing extra) before the minutes of loading and compiling; the heartbeat only once
Celery is ready to claim, since a claim records this instance as the job's holder.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from easel.shared.logs import configure_logging, install_celery_logging, quiet_libraries, set_process_fields

if TYPE_CHECKING:
    from celery import Celery

    from easel.worker.context import WorkerContext
    from easel.worker.feeding import Drain

log = logging.getLogger("easel.worker")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    quiet_libraries()
    hostname = args.hostname or f"{args.family}-{os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu')}-{os.getpid()}@{socket.gethostname()}"
    from easel.shared.settings import get_settings

    set_process_fields(worker=hostname, family=args.family)  # on every record; job_id/segment while a task runs
    log_format = configure_logging(args.loglevel, get_settings().log_format)  # EASEL_LOG_FORMAT
    from easel.shared.celery_app import queue_name
    from easel.worker.feeding import DRAINED_EXIT
    from easel.worker.tasks import app

    install_celery_logging(app)  # Celery keeps this logging; each task binds its job to its records
    ctx = _checked_context(args.family, hostname)
    load_s = ctx.cache.warm()
    log.info("family %s warm in %.2fs on %s", args.family, load_s, ctx.cache.device)
    batch_size = _install_engine(ctx, app)
    drain = _start_services(ctx, app, load_s, batch_size)
    worker = app.Worker(
        hostname=hostname,
        queues=[queue_name(args.family, ctx.settings.queue_prefix)],
        pool="solo",
        concurrency=1,
        loglevel=args.loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
        quiet=log_format == "json",  # no banner: every line of a json log is an object
    )
    worker.start()
    if ctx.finisher is not None:
        ctx.finisher.drain()
    return DRAINED_EXIT if drain.asked else (worker.exitcode or 0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="easel-worker-process")
    ap.add_argument("--family", required=True)
    ap.add_argument("--hostname", default=None)
    ap.add_argument("--loglevel", default=os.environ.get("EASEL_LOGLEVEL", "INFO"))
    return ap.parse_args(argv)


def _checked_context(family: str, hostname: str) -> "WorkerContext":
    """The worker's context, with every setting that can be wrong checked at once, before
    the pipelines load: the registry and family, the tracing extra, Redis's password or TLS."""
    from easel.shared import tracing
    from easel.worker.context import WorkerContext
    from easel.worker.device import cpu_threads
    from easel.worker.watchdog import Watchdog

    ctx = WorkerContext.create(family, hostname=hostname)
    tracing.setup(ctx.settings, "easel-worker")  # EASEL_TRACING; a missing extra fails here
    ctx.store.ping()
    import torch

    torch.set_num_threads(cpu_threads(ctx.cache.device, ctx.settings.torch_threads))  # before any parallel work
    ctx.watchdog = Watchdog()
    try:
        ctx.storage.ensure_bucket()
    except Exception as e:  # storage may come back later; stages retry their uploads
        log.warning("storage not reachable at start: %s", e)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # its loading bars would be stray lines in the log
    except ImportError:
        pass
    return ctx


def _install_engine(ctx: "WorkerContext", app: "Celery") -> int:
    """Hand the warm context to the tasks and register them for this worker's batch size
    (returned): the finisher where finishes overlap the next call, the stops listener."""
    from easel.worker.adaptive import resolve_idle_s
    from easel.worker.context import set_context
    from easel.worker.finisher import Finisher
    from easel.worker.stops import StopListener
    from easel.worker.tasks import register_tasks

    s = ctx.settings
    overlap = s.overlap_finish if s.overlap_finish is not None else ctx.cache.device.type == "cuda"
    if overlap:
        ctx.finisher = Finisher(ctx.store, s.max_pending_finishes, s.overlap_finish_wait_s)
    ctx.stops = StopListener(ctx.store.r, ctx.store.stops_channel())  # started before the first claim
    set_context(ctx, app)
    batch_size = ctx.cache.batch_cap()
    register_tasks(app, batch_size, s.batch_wait_s, buckets=s.batch_buckets,
                   latency_target_s=s.batch_latency_target_s, idle_s=resolve_idle_s(s.batch_idle_s, s.batch_size))
    # One message at a time, unless micro-batching: then up to a batch's worth is held.
    app.conf.worker_prefetch_multiplier = batch_size
    return batch_size


def _start_services(ctx: "WorkerContext", app: "Celery", load_s: float, batch_size: int) -> "Drain":
    """The threads beside the task: heartbeat (and, after each beat, settling, feeding and the
    drain check), reaper with the retention sweep, metrics; started when Celery is ready and
    stopped on its shutdown. Returns the drain watch, which says how the process should exit."""
    from celery.signals import worker_ready, worker_shutdown

    from easel.shared import tracing
    from easel.shared.celery_app import queue_name, send_segment
    from easel.shared.keys import backlog_channel
    from easel.shared.liveness import Heartbeat, Reaper
    from easel.shared.retention import ResultRetention
    from easel.worker.feeding import Drain, Feeder
    from easel.worker.holdings import OrphanCheck
    from easel.worker.metrics import install as install_metrics
    from easel.worker.metrics import peak_memory_bytes
    from easel.worker.policy import settle_later

    s, device, hostname = ctx.settings, ctx.cache.device, ctx.hostname
    metrics_port = install_metrics(ctx, load_s)  # EASEL_METRICS_PORT; None when 0 (off)

    def after_beat() -> None:  # what changed, sent with the next beat
        beat.presence["peak_memory_bytes"] = peak_memory_bytes(device)
        beat.presence.update(models=sorted(ctx.cache.models), models_failed=dict(ctx.cache.unloaded))
        settle_later(ctx, app)
        feeder.feed()
        drain.check()
        orphans()

    import torch

    beat = Heartbeat(ctx.store, ctx.instance, hostname, {
        "family": ctx.family, "device": str(device), "load_s": round(load_s, 3),
        "models": sorted(ctx.cache.models), "models_failed": dict(ctx.cache.unloaded),
        "metrics_port": metrics_port, "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(), "peak_memory_bytes": peak_memory_bytes(device),
        "compile_s": {n: round(m.compile_s, 3) for n, m in ctx.cache.models.items() if m.compile_s}},
        s.heartbeat_interval_s, s.heartbeat_ttl_s, after_beat=after_beat)
    feeder = Feeder(ctx, app, ctx.family, beat.presence)
    ctx.on_claim = feeder.after_claim
    ctx.store.on_slot_freed = feeder.after_slot_freed
    ctx.stops.on(backlog_channel(ctx.store.prefix), feeder.heard_backlog).start()
    drain = Drain(ctx.store, hostname, beat.presence)
    reaper = Reaper(ctx.store, lambda *a, **kw: send_segment(app, *a, **kw), s.reap_every_s,
                    s.heartbeat_ttl_s, [queue_name(ctx.family, s.queue_prefix)],
                    chores=[ResultRetention(ctx.store, ctx.storage, s.retention_days)])
    orphans = OrphanCheck(ctx.store, ctx.instance, ctx.holding, 2 * s.heartbeat_ttl_s, reaper.requeue)

    @worker_ready.connect(weak=False)
    def _ready(**_kw):
        beat.start()  # before the first claim: a claim records this instance as the holder
        reaper.start()
        feeder.feed()

    @worker_shutdown.connect(weak=False)
    def _bye(**_kw):
        if ctx.finisher is not None:
            ctx.finisher.drain()  # warm shutdown: pending finishes complete before we retire
        settle_later(ctx, app)  # ends not recorded yet (Redis was away): recorded now if it answers
        reaper.stop()
        beat.retire()
        tracing.shutdown()  # flush the spans still batched

    return drain


if __name__ == "__main__":
    sys.exit(main())
