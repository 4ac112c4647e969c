"""``python -m bench.probe_worker --family F --hostname H``: a real worker, plus timestamps.

Runs ``easel.worker.process.main`` unchanged, with three read-only observers that cost a few
microseconds per job and write nothing to Redis or S3 while jobs run:

- Celery ``task_prerun`` / ``task_postrun``: when each task started and ended in this
  process (the gap between one task's end and the next one's start is Celery's own
  fetch/ack cost);
- a wrapper around ``worker.engine.StepHook.__call__``: the time the denoising loop
  spends in easel's per-step hook (``callback_on_step_end``: time limit, progress and
  cancel), which sits inside the ``denoise`` timing easel records; the benchmark moves it
  to the overhead side. (The hook's Redis round trips run on the worker's I/O pool, so
  only what the loop itself waits for is counted.) It also keeps each step's timestamp,
  and a wrapper around ``run_stage`` the call's start and end (``phase_summary``).
- with ``EASEL_BENCH_INPROC_PLAIN`` (JSON ``{"px", "stage"}``): after each task, the plain
  loop's own call (``bench.common.plain_call``) on the worker's loaded pipeline, in this
  process, with its phases: tells a slower call inside the worker apart from a slower
  process around it.

Everything is dumped as JSON to ``$EASEL_BENCH_PROBE_OUT`` when the worker exits.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time


def install(out_path: str) -> None:
    from celery.signals import task_postrun, task_prerun

    from easel.worker import engine

    jobs: dict[str, dict] = {}
    orig_call = engine.StepHook.__call__

    def timed_call(self, step, total):
        t = time.perf_counter()
        try:
            return orig_call(self, step, total)
        finally:
            rec = jobs.setdefault(self.job_ids[0], {})
            rec["progress_s"] = rec.get("progress_s", 0.0) + (time.perf_counter() - t)
            rec["progress_calls"] = rec.get("progress_calls", 0) + 1
            rec.setdefault("steps", []).append(t)  # a step's end, as the plain loop's phases see it

    engine.StepHook.__call__ = timed_call
    orig_run_stage = engine.run_stage

    def timed_run_stage(model, stage, carrier, **kw):
        hook = kw.get("on_step")
        rec = jobs.setdefault((getattr(hook, "job_ids", None) or [""])[0], {})
        rec["start"] = time.perf_counter()  # includes run_stage's argument building (<1 ms)
        try:
            return orig_run_stage(model, stage, carrier, **kw)
        finally:
            rec["end"] = time.perf_counter()

    engine.run_stage = timed_run_stage
    inproc = json.loads(os.environ.get("EASEL_BENCH_INPROC_PLAIN", "null"))
    plain_phases: list[dict] = []

    @task_prerun.connect(weak=False)
    def _pre(task_id=None, args=None, **_kw):
        if args:
            jobs.setdefault(args[0], {})["prerun"] = time.perf_counter()

    @task_postrun.connect(weak=False)
    def _post(task_id=None, args=None, retval=None, **_kw):
        if args:
            rec = jobs.setdefault(args[0], {})
            rec["postrun"] = time.perf_counter()
            rec["retval"] = retval
        if inproc is not None:
            _plain_in_worker(20_000 + len(plain_phases))

    def _plain_in_worker(seed: int) -> None:
        """The plain loop's call, made here, on the worker's own pipeline, after each job."""
        from bench.common import bench_image, plain_call, png_bytes
        from easel.shared.images import decode_image
        from easel.worker.context import get_context

        ctx, _ = get_context()
        if "image" not in inproc:
            inproc["image"] = decode_image(png_bytes(bench_image(inproc["px"])), ctx.settings)
        model = next(iter(ctx.cache.models.values()))
        plain_call(model.pipes["img2img"], inproc["image"], seed, inproc["stage"], plain_phases)

    def dump() -> None:
        with open(out_path, "w") as fh:
            json.dump({**jobs, "_plain_in_worker": plain_phases}, fh)

    atexit.register(dump)


def main() -> int:
    out = os.environ.get("EASEL_BENCH_PROBE_OUT")
    if out:
        install(out)
    from easel.worker.process import main as worker_main

    return worker_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
