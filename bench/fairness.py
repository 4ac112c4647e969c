"""A shared farm: how long a new tenant waits behind another's backlog, and how good ETAs are.

Sim workers (registry kind ``sim``) serve one family; everything around the pipeline call
is the real path (fair-share dispatch included).

- Fairness: tenant A submits ``--a-jobs`` jobs, then tenant B submits 20, one at a time.
  ``fair_b_wait_jobs`` is B's worst wait from submission to start, in job durations (the
  workers' measured seconds per job); the issue's bound is 20 / workers + 2.
- Work: tenant ``long`` submits jobs of 4 x ``--steps`` steps, tenant ``short`` four times
  as many of ``--steps``, both at once. ``fair_work_time_ratio`` is long's GPU time (the
  sum of its jobs' start-to-finish) over short's, among the jobs that started while both
  had jobs left to start, after long's first 25 (while the workers fill): 1.0 if the work
  estimate (``shared.plan.segment_work``) caught every cost, about 3 when sharing by jobs.
  ``fair_work_jobs_ratio``: short's jobs over long's in that window (by work: their works'
  ratio, (4 + 40) / (4 + 10) = 3.14; by jobs: 1).
- ETA: one tenant submits a steady stream at 1.25x what the workers can do, so a queue
  builds; each job's ETA is read right after its submission and compared with its actual
  wait. ``eta_error_p50`` is the median of |ETA - wait| / wait over the jobs that waited at
  least one job duration.
"""
from __future__ import annotations

import argparse
import time

import yaml

from bench.common import BenchEnv, bench_image, headline, log, png_bytes

FAMILY = "fairbench"


def registry(env: BenchEnv, step_s: float) -> str:
    path = env.tmp / "fair-models.yaml"
    path.write_text(yaml.safe_dump({"models": {FAMILY: {
        "source": "sim", "family": FAMILY, "latent_space": "none", "kind": "sim", "sim_step_s": step_s}}}))
    return str(path)


def job(ref: str, tenant: str, seed: int, steps: int) -> dict:
    return {"tenant": tenant, "input": {"image": ref},
            "stages": [{"model": FAMILY, "prompt": tenant, "steps": steps, "strength": 1.0, "seed": seed}]}


def times(client, ids: list[str], fields: tuple[str, ...] = ("created_at", "started_at")) -> list[tuple[float, ...]]:
    pipe = client.store.r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.store.key(job_id), *fields)
    return [tuple(float(v) for v in row) for row in pipe.execute()]


def wait(client, ids: list[str]) -> None:
    for _ in client.watch(ids, timeout=1800):
        pass


def job_seconds(client) -> float:
    while (job_s := client.scheduler.family(FAMILY).job_s) is None:
        time.sleep(0.2)
    return job_s


def fairness(client, ref: str, workers: int, a_jobs: int, steps: int) -> dict:
    a_ids = client.submit_many([job(ref, "tenant-a", i, steps) for i in range(a_jobs)])
    time.sleep(2)
    b_ids = [client.submit(job(ref, "tenant-b", i, steps)) for i in range(20)]
    wait(client, b_ids)
    job_s = job_seconds(client)
    worst = max(s - c for c, s in times(client, b_ids))
    log(f"B's worst wait {worst:.2f}s = {worst / job_s:.1f} job durations ({job_s * 1000:.0f} ms each); "
        f"bound {20 / workers + 2:.0f}")
    wait(client, a_ids)
    return {"fair_b_wait_jobs": round(worst / job_s, 2), "fair_b_wait_bound_jobs": 20 / workers + 2}


def work_share(client, ref: str, steps: int, long_jobs: int = 100) -> dict:
    ids = {"long": client.submit_many([job(ref, "long", i, 4 * steps) for i in range(long_jobs)]),
           "short": client.submit_many([job(ref, "short", i, steps) for i in range(4 * long_jobs)])}
    wait(client, ids["long"] + ids["short"])
    runs = {who: times(client, got, ("started_at", "finished_at")) for who, got in ids.items()}
    both_until = min(max(start for start, _ in rows) for rows in runs.values())
    since = sorted(start for start, _ in runs["long"])[25]
    window = {who: [end - start for start, end in rows if since <= start < both_until] for who, rows in runs.items()}
    gpu_s = {who: sum(took) for who, took in window.items()}
    count = {who: len(took) for who, took in window.items()}
    log(f"work share: long {count['long']} jobs, {gpu_s['long']:.1f} s; short {count['short']} jobs, "
        f"{gpu_s['short']:.1f} s, while both had jobs to start")
    return {"fair_work_time_ratio": round(gpu_s["long"] / gpu_s["short"], 2),
            "fair_work_jobs_ratio": round(count["short"] / count["long"], 2)}


def eta_accuracy(client, ref: str, workers: int, seconds: float, steps: int) -> dict:
    job_s = job_seconds(client)
    rate = 1.25 * workers / job_s
    ids, etas, t0 = [], [], time.perf_counter()
    for i in range(int(rate * seconds)):
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        job_id = client.submit(job(ref, "stream", 10_000 + i, steps))
        ids.append(job_id)
        etas.append(client.status(job_id).eta_s)
    wait(client, ids)
    errors = sorted(abs(eta - (s - c)) / (s - c) for eta, (c, s) in zip(etas, times(client, ids))
                    if eta is not None and s - c >= job_s)
    p50 = errors[len(errors) // 2] if errors else float("nan")
    log(f"ETA: {len(errors)} of {len(ids)} jobs waited over a job duration; median relative error {p50:.2f}")
    return {"eta_error_p50": round(p50, 3), "eta_jobs_measured": len(errors)}


def main(env: BenchEnv, args) -> dict:
    from easel.producer.client import EaselClient

    models = registry(env, args.step_ms / 1000)
    procs = [env.worker(FAMILY, hostname=f"fair-{k}@bench", extra_env={"EASEL_MODELS": models})
             for k in range(args.workers)]
    try:
        client = EaselClient(env.settings(models=models))
        # 512 x 512, a unit of work's size: a sim step sleeps the same whatever the size, as
        # a real one at the size fair share counts its unit of work at.
        ref = client.storage.put_input(png_bytes(bench_image(512)), "png", (512, 512))
        out = {**fairness(client, ref, args.workers, args.a_jobs, args.steps),
               **eta_accuracy(client, ref, args.workers, args.eta_seconds, args.steps),
               **work_share(client, ref, args.steps)}  # last: its long jobs move the family's seconds per job
    finally:
        for p in procs:
            p.stop()
    for k, v in out.items():
        headline(k, v)
    return {"headline": out}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--a-jobs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--eta-seconds", type=float, default=15.0)


NEEDS_MODELS = False
