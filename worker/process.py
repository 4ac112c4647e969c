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

from shared.logs import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="easel-worker-process")
    ap.add_argument("--family", required=True)
    ap.add_argument("--hostname", default=None)
    ap.add_argument("--loglevel", default=os.environ.get("EASEL_LOGLEVEL", "INFO"))
    args = ap.parse_args(argv)
    quiet_libraries()
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from shared.celery_app import queue_name
    from worker.context import WorkerContext, set_context
    from worker.finisher import Finisher, Reaper
    from worker.tasks import app, guarded, register_tasks

    hostname = args.hostname or f"{args.family}-{os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu')}-{os.getpid()}@{socket.gethostname()}"
    from worker.watchdog import Watchdog

    ctx = WorkerContext.create(args.family, hostname=hostname)
    ctx.store.r.ping()  # a wrong password or TLS setting fails here, at once, not after warming
    import torch

    from worker.device import cpu_threads

    torch.set_num_threads(cpu_threads(ctx.cache.device, ctx.settings.torch_threads))  # before any parallel work
    ctx.watchdog = Watchdog()
    try:
        ctx.storage.ensure_bucket()
    except Exception as e:  # storage may come back later; stages retry their uploads
        logging.getLogger("easel.worker").warning("storage not reachable at start: %s", e)
    load_s = ctx.cache.warm()
    logging.getLogger("easel.worker").info("family %s warm in %.2fs on %s", args.family, load_s, ctx.cache.device)
    overlap = ctx.settings.overlap_finish
    if overlap is None:
        overlap = ctx.cache.device.type == "cuda"
    if overlap and ctx.settings.batch_size == 1:
        ctx.finisher = Finisher(ctx, lambda j, seg, q, fn: guarded(ctx, app, j, seg, q, fn),
                                ctx.settings.max_pending_finishes, ctx.settings.overlap_finish_wait_s)
    set_context(ctx, app)
    register_tasks(app, ctx.settings.batch_size, ctx.settings.batch_wait_s)
    # One message at a time, unless micro-batching: then up to a batch's worth is held.
    app.conf.worker_prefetch_multiplier = ctx.settings.batch_size
    from celery.signals import worker_ready, worker_shutdown

    from worker.metrics import install as install_metrics

    mport = install_metrics(ctx, load_s)  # EASEL_METRICS_PORT; None when 0 (off)

    from worker.heartbeat import start_heartbeat

    beat = {}

    @worker_ready.connect(weak=False)
    def _ready(**_kw):
        # A job left finishing by a dead worker is re-sent after its heartbeat expires, or
        # after the visibility timeout if its worker still beats (see worker/finisher.py).
        beat["reaper"] = Reaper(ctx, app, ctx.settings.reap_every_s, ctx.settings.visibility_timeout_s).start()
        beat["stop"] = start_heartbeat(ctx.store.r, ctx.settings.queue_prefix, hostname, {
            "family": args.family, "device": str(ctx.cache.device), "load_s": round(load_s, 3),
            "models": sorted(ctx.cache.models), "metrics_port": mport, "batch_size": ctx.settings.batch_size,
            "torch_threads": torch.get_num_threads()})

    @worker_shutdown.connect(weak=False)
    def _bye(**_kw):
        if ctx.finisher is not None:
            ctx.finisher.drain()  # warm shutdown: pending finishes complete before we stop beating
        if "reaper" in beat:
            beat["reaper"].stop()
        if "stop" in beat:
            beat["stop"].set()

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
    )
    worker.start()
    if ctx.finisher is not None:
        ctx.finisher.drain()
    return worker.exitcode or 0


if __name__ == "__main__":
    sys.exit(main())
