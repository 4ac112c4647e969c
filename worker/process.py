"""One worker process: pinned to one device, one family's pipelines loaded, one Celery solo worker.

The solo pool runs the task in this very process, so the warm pipelines stay in this
process's memory (a prefork child would have to load them again, and a fork after CUDA
init is unsafe). Cancellation therefore goes through Redis flags, not Celery revoke.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from easel.shared.logs import configure_logging, install_celery_logging, quiet_libraries, set_process_fields


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="easel-worker-process")
    ap.add_argument("--family", required=True)
    ap.add_argument("--hostname", default=None)
    ap.add_argument("--loglevel", default=os.environ.get("EASEL_LOGLEVEL", "INFO"))
    args = ap.parse_args(argv)
    quiet_libraries()
    hostname = args.hostname or f"{args.family}-{os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu')}-{os.getpid()}@{socket.gethostname()}"
    from easel.shared.settings import get_settings

    set_process_fields(worker=hostname, family=args.family)  # on every record; job_id/segment while a task runs
    log_format = configure_logging(args.loglevel, get_settings().log_format)  # EASEL_LOG_FORMAT

    from easel.shared.celery_app import queue_name, send_segment
    from easel.shared.keys import backlog_channel
    from easel.shared.liveness import Heartbeat, Reaper
    from easel.shared.retention import ResultRetention
    from easel.worker.feeding import DRAINED_EXIT, Drain, Feeder
    from easel.worker.context import WorkerContext, set_context
    from easel.worker.finisher import Finisher
    from easel.worker.policy import settle_later
    from easel.worker.tasks import app, register_tasks

    install_celery_logging(app)  # Celery keeps this logging; each task binds its job to its records
    from easel.worker.watchdog import Watchdog

    ctx = WorkerContext.create(args.family, hostname=hostname)
    from easel.shared import tracing

    tracing.setup(ctx.settings, "easel-worker")  # EASEL_TRACING; a missing extra fails here, at once
    ctx.store.ping()  # a wrong password or TLS setting fails here, at once, not after warming
    import torch

    from easel.worker.device import cpu_threads

    torch.set_num_threads(cpu_threads(ctx.cache.device, ctx.settings.torch_threads))  # before any parallel work
    ctx.watchdog = Watchdog()
    try:
        ctx.storage.ensure_bucket()
    except Exception as e:  # storage may come back later; stages retry their uploads
        logging.getLogger("easel.worker").warning("storage not reachable at start: %s", e)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # its loading bars would be stray lines in the log
    except ImportError:
        pass
    load_s = ctx.cache.warm()
    logging.getLogger("easel.worker").info("family %s warm in %.2fs on %s", args.family, load_s, ctx.cache.device)
    overlap = ctx.settings.overlap_finish
    if overlap is None:
        overlap = ctx.cache.device.type == "cuda"
    if overlap:
        ctx.finisher = Finisher(ctx.store, ctx.settings.max_pending_finishes, ctx.settings.overlap_finish_wait_s)
    from easel.worker.stops import StopListener

    ctx.stops = StopListener(ctx.store.r, ctx.store.stops_channel())  # started below, before the first claim
    set_context(ctx, app)
    from easel.worker.adaptive import resolve_idle_s

    bs = ctx.settings
    batch_size = ctx.cache.batch_cap()
    register_tasks(app, batch_size, bs.batch_wait_s, buckets=bs.batch_buckets,
                   latency_target_s=bs.batch_latency_target_s, idle_s=resolve_idle_s(bs.batch_idle_s, bs.batch_size))
    # One message at a time, unless micro-batching: then up to a batch's worth is held.
    app.conf.worker_prefetch_multiplier = batch_size
    from celery.signals import worker_ready, worker_shutdown

    from easel.worker.metrics import install as install_metrics

    mport = install_metrics(ctx, load_s)  # EASEL_METRICS_PORT; None when 0 (off)

    s = ctx.settings
    from easel.worker.metrics import peak_memory_bytes

    def after_beat() -> None:
        beat.presence["peak_memory_bytes"] = peak_memory_bytes(ctx.cache.device)  # sent with the next beat
        settle_later(ctx, app)
        feeder.feed()
        drain.check()

    beat = Heartbeat(ctx.store, ctx.instance, hostname, {
        "family": args.family, "device": str(ctx.cache.device), "load_s": round(load_s, 3),
        "models": sorted(ctx.cache.models), "metrics_port": mport, "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(), "peak_memory_bytes": peak_memory_bytes(ctx.cache.device),
        "compile_s": {n: round(m.compile_s, 3) for n, m in ctx.cache.models.items() if m.compile_s}},
        s.heartbeat_interval_s, s.heartbeat_ttl_s,
        after_beat=after_beat)
    feeder = Feeder(ctx, app, args.family, beat.presence)
    ctx.on_claim = feeder.after_claim
    ctx.store.on_slot_freed = feeder.after_slot_freed
    ctx.stops.on(backlog_channel(ctx.store.prefix), feeder.heard_backlog).start()
    drain = Drain(ctx.store, hostname, beat.presence)
    reaper = Reaper(ctx.store, lambda *a, **kw: send_segment(app, *a, **kw), s.reap_every_s,
                    s.heartbeat_ttl_s, [queue_name(args.family, s.queue_prefix)],
                    chores=[ResultRetention(ctx.store, ctx.storage, s.retention_days)])

    @worker_ready.connect(weak=False)
    def _ready(**_kw):
        beat.start()  # before the first claim: a claim records this instance as the holder
        reaper.start()
        feeder.feed()

    @worker_shutdown.connect(weak=False)
    def _bye(**_kw):
        if ctx.finisher is not None:
            ctx.finisher.drain()  # warm shutdown: pending finishes complete before we retire
        reaper.stop()
        beat.retire()
        tracing.shutdown()  # flush the spans still batched

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


if __name__ == "__main__":
    sys.exit(main())
