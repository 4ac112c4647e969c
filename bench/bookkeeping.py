"""``python -m bench bookkeeping``: a micro-batch's Redis round trips, member by member vs pipelined.

Not part of the default run. A batch of B jobs needs, besides its pipeline call, a spec
load (to see which jobs can share a call), a claim, a cancel check and a final state per
member. ``worker.tasks.run_requests`` / ``worker.batching.run_batch`` make them as four
pipelines (``JobStore.load_many``, ``claim_many``, ``cancels_requested``,
``transition_many``); before, each member made its own calls in turn, plus a separate
end-of-delivery write. This times both patterns on the benchmark's valkey with real job
records (created fresh for each round, same spec and final-state fields), alternating.

Headlines per batch size: ``bookkeeping_b<B>_per_member_ms``, ``bookkeeping_b<B>_pipelined_ms``
(p50 per batch) and ``bookkeeping_b<B>_speedup``. The saving grows with the round trip time:
on loopback a round trip costs ~0.1-0.2 ms, across a network several times that.
"""
from __future__ import annotations

import argparse
import time

from bench.common import BenchEnv, headline, log, median
from shared.jobstore import JobStore
from shared.plan import plan_job
from shared.schema import JobSpec, JobState

NEEDS_S3 = False
NEEDS_MODELS = False

_FINAL = {"outputs": ["s3://easel/jobs/x/output/0.png"], "manifest": "s3://easel/jobs/x/manifest.json",
          "stage": 0, "step": 8, "total_steps": 8, "record:0": "{" + '"k": 1, ' * 150 + '"end": 0}', "inflight:0": 0}


def per_member(store: JobStore, ids: list[str]) -> None:
    """The pattern before: each member's calls in turn, then a separate end of delivery."""
    for j in ids:
        store.load(j)
        store.claim(j, 0, "bench", 2)
    for j in ids:
        store.r.hget(store.key(j), "cancel")  # the single-job cancel check it made
    for j in ids:
        store.transition(j, JobState.succeeded, **_FINAL)
    for j in ids:
        store.end_delivery(j, 0)


def pipelined(store: JobStore, ids: list[str]) -> None:
    """The pattern now (the final state carries the end of the delivery)."""
    store.load_many(ids)
    store.claim_many([(j, 0) for j in ids], "bench", 2)
    store.cancels_requested(ids)
    store.transition_many([(j, JobState.succeeded, _FINAL) for j in ids])


def run(env: BenchEnv, sizes: tuple[int, ...], rounds: int) -> dict:
    client = env.client()
    store = JobStore.from_url(env.redis_url, prefix="bench-bookkeeping")
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                   "stages": [{"task": "img2img", "model": "sd15", "prompt": "a cat", "seed": 1}]})
    plan = plan_job(spec, client.registry)
    out: dict[str, str] = {}
    details: dict[int, dict] = {}
    for b in sizes:
        times: dict[str, list[float]] = {"per_member": [], "pipelined": []}
        variants = [("per_member", per_member), ("pipelined", pipelined)]
        for r in range(rounds):
            for name, fn in variants if r % 2 == 0 else variants[::-1]:
                ids = [job_id for job_id, _ in store.create_many([(spec, plan)] * b)]
                t0 = time.perf_counter()
                fn(store, ids)
                times[name].append(time.perf_counter() - t0)
                store.r.delete(*[store.key(j) for j in ids])
        a, p = median(times["per_member"]) * 1000, median(times["pipelined"]) * 1000
        log(f"batch of {b}: per member {a:.2f} ms, pipelined {p:.2f} ms (p50 of {rounds} rounds each)")
        out[f"bookkeeping_b{b}_per_member_ms"] = f"{a:.2f}"
        out[f"bookkeeping_b{b}_pipelined_ms"] = f"{p:.2f}"
        out[f"bookkeeping_b{b}_speedup"] = f"{a / p:.2f}"
        details[b] = times
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": details}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes", default="4,8", help="batch sizes")
    ap.add_argument("--rounds", type=int, default=200)


def main(env: BenchEnv, args) -> dict:
    return run(env, tuple(int(x) for x in args.sizes.split(",")), args.rounds)
