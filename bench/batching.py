"""Benchmark 3: micro-batching through easel vs one job at a time.

For each image size, N identical-shape img2img jobs (different seeds and prompts) are queued
first, then a worker is started with ``EASEL_BATCH_SIZE`` = 1, 4 or 8 and the clock runs
from its ready moment to the last ``succeeded`` event. Configurations alternate in two
rounds (1 4 8, 8 4 1) so drift hits all alike.

Headlines: ``batch<B>_speedup_<size>px`` = time at batch 1 / time at batch B.
"""
from __future__ import annotations

import argparse
import time

from bench.common import BenchEnv, EventWatcher, bench_image, headline, log, png_bytes, submit_all

DEFAULT_N = 24
SIZES_PX = (64, 256)
BATCHES = (1, 4, 8)


def _jobs(ref: str, n: int, seed0: int) -> list[dict]:
    return [{"input": {"image": ref}, "stages": [{"model": "sd15", "prompt": f"astronaut {i % 3}", "steps": 10,
                                                  "strength": 0.8, "guidance_scale": 7.5, "seed": seed0 + i}]}
            for i in range(n)]


def run(env: BenchEnv, n: int = DEFAULT_N, sizes=SIZES_PX, batches=BATCHES) -> dict:
    client = env.client()
    watcher = EventWatcher(env.redis_url)
    times: dict[tuple[int, int], float] = {}
    try:
        for px in sizes:
            ref = client.storage.put_input(png_bytes(bench_image(px)), "png")
            for rnd, order in enumerate((batches, tuple(reversed(batches)))):
                for b in order:
                    ids = submit_all(client, _jobs(ref, n, seed0=rnd * 1000 + b * 100))
                    w = env.worker("sd15", extra_env={"EASEL_BATCH_SIZE": str(b), "EASEL_BATCH_WAIT_S": "0.05"})
                    t0 = time.perf_counter()
                    done = watcher.wait(ids)
                    dt = max(t for t, _ in done.values()) - t0
                    w.stop()
                    assert all(s == "succeeded" for _, s in done.values()), done
                    times[(px, b)] = times.get((px, b), 0.0) + dt
                    log(f"{px}px batch {b}: {n} jobs in {dt:.2f}s ({n / dt:.1f} jobs/s)")
    finally:
        watcher.close()
    out = {}
    for px in sizes:
        for b in batches:
            if b > 1:
                out[f"batch{b}_speedup_{px}px"] = f"{times[(px, 1)] / times[(px, b)]:.2f}"
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {f"{px}px_batch{b}_s": t for (px, b), t in times.items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per configuration and round")


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n)
