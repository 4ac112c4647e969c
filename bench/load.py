"""Load test: 10,000 queued jobs, 2 workers, tiny model, few steps.

Checks what a farm cares about under load: every job completes, none runs twice (one
delivery each, one output object each), and what the queue costs in Redis: memory with
all jobs queued, after they finish, and per job.

Headlines: ``load_jobs``, ``load_completed``, ``load_duplicates``, ``load_jobs_per_s``,
``load_redis_bytes_per_queued_job``, ``load_redis_bytes_per_finished_job``.
"""
from __future__ import annotations

import argparse
import time

from bench.common import BenchEnv, EventWatcher, headline, log, png_bytes, bench_image, submit_all

DEFAULT_N = 10_000


def run(env: BenchEnv, n: int = DEFAULT_N, workers: int = 2) -> dict:
    import redis

    client = env.client()
    r = redis.Redis.from_url(env.redis_url)
    ref = client.storage.put_input(png_bytes(bench_image(32)), "png", (32, 32))
    jobs = [{"input": {"image": ref}, "stages": [{"model": "sd15", "prompt": "load", "steps": 2, "strength": 0.5,
                                                  "guidance_scale": 1.0, "seed": i}]} for i in range(n)]
    mem0 = r.info("memory")["used_memory"]
    watcher = EventWatcher(env.redis_url)
    t0 = time.perf_counter()
    ids = []
    for i in range(0, n, 1000):
        ids += submit_all(client, jobs[i:i + 1000])
    submit_s = time.perf_counter() - t0
    mem_queued = r.info("memory")["used_memory"]
    log(f"{n} jobs queued in {submit_s:.1f}s; Redis +{(mem_queued - mem0) / 1e6:.1f} MB")
    ws = [env.worker("sd15", hostname=f"load-{k}@bench") for k in range(workers)]
    t1 = time.perf_counter()
    try:
        done = watcher.wait(ids, timeout=3600)
    finally:
        for w in ws:
            w.stop()
        watcher.close()
    run_s = max(t for t, _ in done.values()) - t1
    mem_done = r.info("memory")["used_memory"]
    states = [s for _, s in done.values()]
    completed = sum(s == "succeeded" for s in states)
    pipe = r.pipeline(transaction=False)
    for j in ids:
        pipe.hget(f"easel:job:{j}", "attempts")
    attempts = [int(a or 0) for a in pipe.execute()]
    outputs = client.storage.list("jobs/")
    per_job = {}
    for key in outputs:
        if "/output/" in key:
            jid = key.split("/")[1]
            per_job[jid] = per_job.get(jid, 0) + 1
    duplicates = sum(1 for a in attempts if a != 1) + sum(1 for c in per_job.values() if c != 1)
    out = {
        "load_jobs": n,
        "load_completed": completed,
        "load_duplicates": duplicates,
        "load_output_objects": sum(per_job.values()),
        "load_jobs_per_s": f"{n / run_s:.1f}",
        "load_submit_jobs_per_s": f"{n / submit_s:.0f}",
        "load_redis_bytes_per_queued_job": int((mem_queued - mem0) / n),
        "load_redis_bytes_per_finished_job": int((mem_done - mem0) / n),
    }
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {"run_s": run_s, "submit_s": submit_s, "workers": workers}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    ap.add_argument("--workers", type=int, default=2)


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n, workers=args.workers)
