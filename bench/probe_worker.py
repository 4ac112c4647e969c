"""``python -m bench.probe_worker --family F --hostname H``: a real worker, plus timestamps.

Runs ``worker.process.main`` unchanged, with three read-only observers that cost a few
microseconds per job and write nothing to Redis or S3 while jobs run:

- Celery ``task_prerun`` / ``task_postrun``: when each task started and ended in this
  process (the gap between one task's end and the next one's start is Celery's own
  fetch/ack cost);
- a wrapper around ``worker.segment.StepHook.__call__``: the time the denoising loop
  spends in easel's per-step hook (``callback_on_step_end``: time limit, progress and
  cancel), which sits inside the ``denoise`` timing easel records; the benchmark moves it
  to the overhead side. (The hook's Redis round trips run on the worker's I/O pool, so
  only what the loop itself waits for is counted.)

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

    from worker import segment

    jobs: dict[str, dict] = {}
    orig_call = segment.StepHook.__call__

    def timed_call(self, step, total):
        t = time.perf_counter()
        try:
            return orig_call(self, step, total)
        finally:
            rec = jobs.setdefault(self.job_id, {})
            rec["progress_s"] = rec.get("progress_s", 0.0) + (time.perf_counter() - t)
            rec["progress_calls"] = rec.get("progress_calls", 0) + 1

    segment.StepHook.__call__ = timed_call

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

    def dump() -> None:
        with open(out_path, "w") as fh:
            json.dump(jobs, fh)

    atexit.register(dump)


def main() -> int:
    out = os.environ.get("EASEL_BENCH_PROBE_OUT")
    if out:
        install(out)
    from worker.process import main as worker_main

    return worker_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
