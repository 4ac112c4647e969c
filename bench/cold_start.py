"""``python -m bench cold_start``: cold start, from worker process start to first result.

One img2img job for ``sd15`` is queued first; then a fresh ``python -m easel.worker.process
--family sd15`` is spawned (what ``easel worker`` runs per GPU) and the clock runs until
that job's ``succeeded`` event. Repeated ``--reps`` times, each with a new process (the OS
file cache is warm after the first: these are warm-disk cold starts).

- ``cold_start_s``: spawn -> first job succeeded (median over reps).
- ``cold_ready_s``: spawn -> the worker's presence key (family loaded, consuming).
- ``pipeline_load_s``: one pipeline's load (``load_model`` for ``sd15``: from_pretrained
  of the img2img pipeline + the text2img/ControlNet variants built from it, device
  placement), as the worker logs it; median over reps. It is the process's first load,
  so it includes the diffusers/transformers modules imported lazily on first use.
- ``pipeline_load_after_imports_s``: the family's later loads (``comic-diffusion``,
  ``pixel-art``: same architecture, modules already imported), median.
- ``family_warm_s``: all of the family's models (the worker warms its whole family at start).
- ``cold_imports_s``: spawn -> the first model load begins (interpreter, torch/diffusers
  imports, settings, registry, bucket check), from the worker's log timestamps.
"""
from __future__ import annotations

import argparse
import re
import time
from datetime import datetime

from bench.common import BenchEnv, EventWatcher, bench_image, headline, img2img_jobs, log, median, png_bytes

DEFAULT_REPS = 3
FAMILY, MODEL = "sd15", "sd15"
_LOADED = re.compile(r"^(\S+ \S+) INFO easel\.worker\.pipelines: loaded (\S+) \((\S+)\) from \S+ in ([\d.]+)s",
                     re.M)


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run(env: BenchEnv, reps: int = DEFAULT_REPS) -> dict:
    client = env.client()
    ref = client.storage.put_input(png_bytes(bench_image()), "png")
    rows = []
    for rep in range(reps):
        watcher = EventWatcher(env.redis_url)
        (job_id,) = client.submit_many(img2img_jobs(ref, MODEL, 1, seed0=rep))
        wall0 = time.time()
        worker = env.worker(FAMILY, wait=False)
        t0 = worker.started_at
        try:
            info = worker.wait_ready()
            t_ready = time.perf_counter()
            t_done, state = watcher.wait([job_id], timeout=300)[job_id]
            if state != "succeeded":
                raise RuntimeError(f"first job {state}: {client.status(job_id).error}\n{worker.tail()}")
        finally:
            watcher.close()
            worker.stop()
        text = worker.log.read_text(errors="replace")
        loads = [(m.group(2), float(m.group(4)), _epoch(m.group(1))) for m in _LOADED.finditer(text)]
        mine = [s for name, s, _ in loads if name == MODEL]
        first_load_start = min(end - s for _, s, end in loads) if loads else float("nan")
        row = {
            "cold_start_s": t_done - t0, "ready_s": t_ready - t0, "family_warm_s": info.get("load_s"),
            "pipeline_load_s": mine[0] if mine else float("nan"),
            "later_loads_s": [s for _, s, _ in loads[1:]],
            "imports_s": first_load_start - wall0,
            "loads": [(name, s) for name, s, _ in loads],
            "denoise_s": client.result(job_id).stages[0].timings_s.get("denoise"),
        }
        rows.append(row)
        log(f"rep {rep + 1}/{reps}: first result {row['cold_start_s']:.2f}s after spawn (ready {row['ready_s']:.2f}s, "
            f"imports ~{row['imports_s']:.2f}s, family warm {row['family_warm_s']}s: "
            + ", ".join(f"{n} {s:.2f}s" for n, s in row["loads"]) + f"; first job denoise {row['denoise_s']:.2f}s)")
        if len([n for n, _ in row["loads"]]) != len({n for n, _ in row["loads"]}):
            log("WARNING: a model was loaded more than once")
    out = {
        "cold_start_s": f"{median([r['cold_start_s'] for r in rows]):.2f}",
        "cold_ready_s": f"{median([r['ready_s'] for r in rows]):.2f}",
        "pipeline_load_s": f"{median([r['pipeline_load_s'] for r in rows]):.3f}",
        "pipeline_load_after_imports_s": f"{median([x for r in rows for x in r['later_loads_s']]):.3f}",
        "family_warm_s": f"{median([r['family_warm_s'] for r in rows]):.2f}",
        "cold_imports_s": f"{median([r['imports_s'] for r in rows]):.2f}",
    }
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": rows}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reps", type=int, default=DEFAULT_REPS)


def main(env: BenchEnv, args) -> dict:
    return run(env, reps=args.reps)
