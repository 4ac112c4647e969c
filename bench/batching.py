"""``python -m bench batching``: micro-batching through easel vs one job at a time.

For each image size and batch size B (``EASEL_BATCH_SIZE``), a fresh worker starts, runs
one batch of warm-up jobs (first calls at a new batch shape pay one-off kernel selection),
then N identical-shape img2img jobs (different seeds and prompts) are submitted at once and
the clock runs from the submit to the last ``succeeded`` event. Configurations alternate
in rounds (1 4 8, 8 4 1, ...) so drift hits all alike; times are summed over rounds.

Headlines: ``batch<B>_speedup_<size>px`` = time at batch 1 / time at batch B.
"""
from __future__ import annotations

import argparse
import time

from bench.common import BenchEnv, EventWatcher, bench_image, headline, log, png_bytes, submit_all

DEFAULT_N = 24
SIZES_PX = (64, 256)
BATCHES = (1, 4, 8)
STAGE = {"steps": 10, "strength": 0.8, "guidance_scale": 7.5}


def _jobs(ref: str, model: str, stage: dict, n: int, seed0: int) -> list[dict]:
    return [{"input": {"image": ref}, "stages": [{**stage, "model": model, "prompt": f"astronaut {i % 3}",
                                                  "seed": seed0 + i}]} for i in range(n)]


def _wait_ok(client, watcher: EventWatcher, ids: list[str]) -> float:
    done = watcher.wait(ids)
    bad = [j for j, (_, s) in done.items() if s != "succeeded"]
    if bad:
        raise RuntimeError(f"job {bad[0]} {done[bad[0]][1]}: {client.status(bad[0]).error}")
    return max(t for t, _ in done.values())


def run(env: BenchEnv, n: int = DEFAULT_N, sizes=SIZES_PX, batches=BATCHES, rounds: int = 2, model: str = "sd15",
        family: str = "sd15", stage: dict | None = None, worker_env: dict | None = None, client=None,
        prefix: str = "") -> dict:
    client = client or env.client()
    stage = stage or STAGE
    watcher = EventWatcher(env.redis_url)
    times: dict[tuple[int, int], float] = {}
    try:
        for px in sizes:
            ref = client.storage.put_input(png_bytes(bench_image(px)), "png")
            for rnd in range(rounds):
                for b in (batches if rnd % 2 == 0 else tuple(reversed(batches))):
                    w = env.worker(family, extra_env={**(worker_env or {}), "EASEL_BATCH_SIZE": str(b),
                                                      "EASEL_BATCH_WAIT_S": "0.05"})
                    try:
                        _wait_ok(client, watcher, submit_all(client, _jobs(ref, model, stage, b, 90_000 + b)))
                        t0 = time.perf_counter()
                        end = _wait_ok(client, watcher,
                                       submit_all(client, _jobs(ref, model, stage, n, rnd * 1000 + b * 100)))
                    finally:
                        w.stop()
                    dt = end - t0
                    times[(px, b)] = times.get((px, b), 0.0) + dt
                    log(f"{prefix}{px}px batch {b}: {n} jobs in {dt:.2f}s ({n / dt:.2f} jobs/s)")
    finally:
        watcher.close()
    out = {}
    for px in sizes:
        for b in batches:
            out[f"{prefix}batch{b}_images_per_s_{px}px"] = f"{n * rounds / times[(px, b)]:.2f}"
        for b in batches:
            if b > 1:
                out[f"{prefix}batch{b}_speedup_{px}px"] = f"{times[(px, 1)] / times[(px, b)]:.2f}"
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {f"{px}px_batch{b}_s": t for (px, b), t in times.items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per configuration and round")
    ap.add_argument("--rounds", type=int, default=2)


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n, rounds=args.rounds)
