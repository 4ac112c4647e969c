"""``python -m bench callpath``: the pipeline call as easel's runner makes it vs a plain call, in one process.

``bench overhead`` compares whole processes (a worker against a plain loop). When easel's
recorded ``denoise`` time itself is longer than the plain call, the cause is either the
call (how ``worker.runner.run_stage`` builds its arguments, the per-step hook) or the
process around it (Celery, boto3 and their threads, a larger heap for the garbage
collector). This benchmark separates the two: one process, one image, seeds shared,
variants interleaved call by call (A B C, C B A, ...):

- ``plain``: ``pipe(prompt=..., image=..., generator=...)`` on a pipeline loaded the usual way;
- ``runner``: ``run_stage`` on the same checkpoint loaded as the worker loads it
  (``worker.pipelines.load_model``), with easel's step hook (progress writes go to a
  stand-in store on the I/O pool, so no Redis is needed);
- ``runner_nohook``: ``run_stage`` with a no-op step hook.

Then the process is made to look like a worker (celery, kombu, boto3 with its S3 client,
an idle thread pool, a thread waking every 0.2 s) and ``plain`` runs again
(``plain_heavy``), and once more after ``gc.freeze()`` (``plain_frozen``).

Headlines: ``callpath_<variant>_ms`` (median per call) and ``callpath_runner_vs_plain`` =
plain / runner time (1.0 = the runner adds nothing).
"""
from __future__ import annotations

import argparse
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from bench.common import STAGE, bench_image, cuda_sync, headline, log, median, plain_call, png_bytes

NEEDS_S3 = False
NEEDS_MODELS = False


class _NullStore:
    """Stands in for ``JobStore`` in the step hook: a progress write that asks for no cancel."""

    def progress_many(self, job_ids: list[str], stage: int, step: int, total: int, instance: str,
                      check: bool = True) -> list:
        return [(False, False)] * len(job_ids)


def run(args) -> dict:
    import torch

    from bench.common import load_plain_pipeline
    from easel.shared.images import decode_image
    from easel.shared.registry import ModelSpec
    from easel.shared.schema import Stage
    from easel.shared.settings import Settings
    from easel.worker.pipelines import load_model
    from easel.worker.runner import Carrier, run_stage
    from easel.worker.engine import StepHook
    from easel.worker.watchdog import StageBudget

    from bench.sd15_arch import bench_checkpoint

    ckpt = bench_checkpoint(args.arch)
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    stage_d = {**STAGE, "steps": args.steps, "strength": args.strength}
    settings = Settings(device=args.device)
    spec = ModelSpec(name="m", source=str(ckpt), family="f", latent_space="sd1-vae", kind="sd", dtype=dtype)
    model = load_model(spec, settings, torch.device(args.device))
    pipe = load_plain_pipeline(ckpt, dtype, args.device)
    image = decode_image(png_bytes(bench_image(args.px)), settings)
    pool = ThreadPoolExecutor(4, thread_name_prefix="easel-io")

    def runner(seed: int, hook: bool) -> None:
        stage = Stage(model="m", seed=seed, **stage_d)
        ctx = SimpleNamespace(store=_NullStore(), instance="bench", control=pool, finisher=None, stops=None,
                              settings=SimpleNamespace(progress_interval_s=0.25))
        on_step = StepHook(ctx, ["job"], 0, StageBudget(3600, 3600, 3, time.monotonic())) if hook else (lambda step, total: True)
        run_stage(model, [stage], Carrier(images=[image]), n=1, want_latent=False, on_step=on_step)
        if hook:
            on_step.flush()

    calls = {
        "plain": lambda seed: plain_call(pipe, image, seed, stage_d),
        "runner": lambda seed: runner(seed, True),
        "runner_nohook": lambda seed: runner(seed, False),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}

    def timed(name: str, fn, seed: int) -> None:
        cuda_sync(args.device)
        t0 = time.perf_counter()
        fn(seed)
        cuda_sync(args.device)
        times.setdefault(name, []).append(time.perf_counter() - t0)

    for fn in calls.values():  # warm-up
        fn(10_000)
    for r in range(args.rounds):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for name in order:
            timed(name, calls[name], r)
    log("light process: " + ", ".join(f"{k} {median(v) * 1000:.1f} ms" for k, v in times.items()))

    # Now make the process look like a worker, then run the plain call again, and once more frozen.
    import boto3
    import celery  # noqa: F401
    import kombu  # noqa: F401

    from easel.shared.storage import Storage

    Storage(settings)  # a boto3 S3 client: botocore's service model in memory
    boto3.client("s3", region_name="us-east-1")
    stop = threading.Event()
    threading.Thread(target=lambda: [time.sleep(0.2) for _ in iter(stop.is_set, True)], daemon=True).start()
    for r in range(args.rounds):
        timed("plain_heavy", calls["plain"], r)
        timed("runner_heavy", calls["runner"], r)
    gc.collect()
    gc.freeze()
    for r in range(args.rounds):
        timed("plain_frozen", calls["plain"], r)
        timed("runner_frozen", calls["runner"], r)
    stop.set()
    out = {f"callpath_{k}_ms": f"{median(v) * 1000:.1f}" for k, v in times.items()}
    out["callpath_runner_vs_plain"] = f"{median(times['plain']) / median(times['runner']):.3f}"
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": times}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=8)


def main(env, args) -> dict:
    return run(args)
