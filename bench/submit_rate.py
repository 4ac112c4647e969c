"""``python -m bench submit``: how fast the producer enqueues jobs.

The same img2img job (input already in storage as an ``s3://`` reference, so no upload is
timed) is submitted N times with ``EaselClient.submit`` (one at a time) and N times with
``EaselClient.submit_many`` (bulk), in alternating rounds on the same valkey. Each submit
does the full producer work: schema validation, seed fixing, chain planning, the job
record, its queue position, and the Celery message. No worker runs, so nothing competes
for the CPU; the queue is emptied between rounds.

- ``submit_jobs_per_s``: bulk (``submit_many``), total jobs / total time over its rounds.
- ``submit_single_jobs_per_s``: one ``submit`` per job, same.
- ``submit_idem_jobs_per_s``: bulk with a distinct idempotency key on every job.
"""
from __future__ import annotations

import argparse
import time

from bench.common import BenchEnv, headline, log

NEEDS_S3 = False  # the jobs name an object of another bucket: not looked up at submission, never fetched
NEEDS_MODELS = False
DEFAULT_N = 4000
DEFAULT_ROUNDS = 4


def _job(i: int, idem: str | None = None) -> dict:
    job = {"input": {"image": "s3://bench-never-read/inputs/0123456789abcdef.png"},
           "stages": [{"task": "img2img", "model": "sd15", "prompt": "astronaut in a jungle", "strength": 0.8,
                       "guidance_scale": 7.5, "steps": 10, "seed": i}]}
    if idem:
        job["idempotency_key"] = idem
    return job


def run(env: BenchEnv, n: int = DEFAULT_N, rounds: int = DEFAULT_ROUNDS) -> dict:
    client = env.client()
    per_round = max(1, n // rounds)
    variants = {
        "bulk": lambda jobs: client.submit_many(jobs),
        "single": lambda jobs: [client.submit(j) for j in jobs],
        "bulk_idem": lambda jobs: client.submit_many(jobs),
    }
    totals = {k: [0, 0.0] for k in variants}
    # warm-up (connections, queue declaration, imports)
    client.submit_many([_job(i) for i in range(50)])
    client.submit(_job(0))
    env.flush()
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            jobs = [_job(i, f"bench-{r}-{i}" if name == "bulk_idem" else None) for i in range(per_round)]
            t0 = time.perf_counter()
            ids = variants[name](jobs)
            dt = time.perf_counter() - t0
            assert len(set(ids)) == per_round
            totals[name][0] += per_round
            totals[name][1] += dt
            env.flush()
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {totals[k][0] / totals[k][1]:.0f} jobs/s so far"
                                                    for k in variants))
    rate = {k: c / t for k, (c, t) in totals.items()}
    out = {
        "submit_jobs_per_s": f"{rate['bulk']:.0f}",
        "submit_single_jobs_per_s": f"{rate['single']:.0f}",
        "submit_idem_jobs_per_s": f"{rate['bulk_idem']:.0f}",
        "submit_bulk_speedup": f"{rate['bulk'] / rate['single']:.2f}",
    }
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {k: {"jobs": c, "seconds": t} for k, (c, t) in totals.items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per variant, over all rounds")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n, rounds=args.rounds)
