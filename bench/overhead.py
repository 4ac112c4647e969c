"""``python -m bench overhead``: easel's overhead over a plain diffusers loop (the limit).

N img2img jobs go producer -> valkey -> worker (``python -m easel.worker.process``, solo pool)
-> SeaweedFS (PNG out), and the same N pipeline calls (same checkpoint, image, prompt,
strength, steps, guidance and seeds) run in a plain diffusers loop in one process
(``bench.plain_runner``, started like the worker so the OS treats both alike). The
two run in alternating blocks (E P, P E, E P, ...) so machine noise hits both alike, and
the jobs are shared by ``--procs`` fresh (worker, plain loop) pairs, one after the other:
where the OS places a process (cores, caches) holds for its lifetime and can favour one
side for a whole run, so one pair's luck must not make the figure.

- ``overhead_ratio_<size>``: easel throughput / plain-loop throughput, the median over
  rounds of (plain-block time / easel-block time) for the same jobs (an easel block: first
  submit -> last job's ``succeeded`` event). The ratio of totals is in the details.
- ``call_gap_ms_<size>``: easel's recorded pipeline-call time (``denoise``) p50 less the
  plain loop's call p50: zero when the worker calls diffusers as fast as a bare loop does.
- ``cpu_ms_per_job_easel_<size>`` / ``cpu_ms_per_job_plain_<size>``: CPU time (user +
  system, all threads) per job during the blocks: for easel the worker, valkey, SeaweedFS
  and the producer (this process: submit and event watch), per process in the details;
  for the plain loop its process. Where the pipeline keeps every core busy (the CPU runs),
  extra CPU per job cannot overlap anything and costs wall time one for one.
- ``overhead_p50_ms`` / ``overhead_p95_ms``: per job, over both sizes: how long the
  worker's pipeline stands idle for it, i.e. from the previous job's pipeline call ending
  to this job's call starting (the worker's probe clock: the previous finish when it runs
  in-line, Celery's ack and fetch, the claim, the input), plus easel's per-step hook time
  inside the call. The first job of each block has no predecessor and is left out (it is
  in the throughput figures). Until 2026-11-26 16:30 UTC this was the job's cycle (time
  between consecutive ``succeeded`` events) less its own call, which agrees with the idle
  time when the finish runs in-line but reads low, even negative, with the overlapped
  finish: a block's last job is finished at once while its predecessor's finish waited
  for that job's first step (``overhead_cycle_ms`` in the details keeps that figure).
- ``overhead_mean_ms_<size>``: everything easel costs per job, from throughput: the median
  over rounds of (easel block time - plain block time) / jobs. Work moved off the idle
  window into the next call (the overlapped finish) counts here, and in ``call_gap``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from bench.common import (BenchEnv, CpuMeter, EventWatcher, PlainRunner, Target, bench_image, cpu_target, headline,
                          img2img_jobs, log, median, pct, phase_summary, pin_process, pinned_env, pinned_servers,
                          png_bytes, submit_all)

DEFAULT_N = 36
DEFAULT_PROCS = 3
DEFAULT_BLOCK = 4


def run_target(env: BenchEnv, client, target: Target, n: int, block: int, warmup: int = 2, procs: int = 1) -> dict:
    """``procs`` fresh (worker, plain loop) process pairs share the ``n`` jobs: how the OS
    places a process (cores, caches) persists for its life and can favour one side for a
    whole run, so several pairs average that out; rounds pool across pairs."""
    size, model, stage = target.label, target.model, target.stage
    ref = client.storage.put_input(png_bytes(bench_image(target.px)), "png")
    easel_blocks: list[float] = []
    plain_blocks: list[float] = []
    block_jobs: list[int] = []
    plain_calls: list[float] = []
    cycles: dict[str, float] = {}
    first_latency: list[float] = []
    job_ids: list[str] = []
    cpu: dict[str, float] = {}
    probes: list[dict] = []
    plain_phases: list[dict] = []
    seed = 0
    with pinned_servers(env, target.pin_cpus) as compute:
        for pair in range(procs):
            pair_n = n // procs + (1 if pair < n % procs else 0)
            probe_out = env.tmp / f"probe-overhead-{size}-{pair}.json"
            t0 = time.perf_counter()
            worker = env.worker(target.family, module="bench.probe_worker",
                                extra_env={**target.worker_env, "EASEL_BENCH_PROBE_OUT": str(probe_out),
                                           **pinned_env(compute)})
            if compute:
                pin_process(worker.proc.pid, compute)
            log(f"[{size}] pair {pair + 1}/{procs}: worker {target.family} ready in {time.perf_counter() - t0:.1f}s")
            t0 = time.perf_counter()
            plain = PlainRunner(env, target, extra_env=pinned_env(compute))
            if compute:
                pin_process(plain.proc.pid, compute)
            log(f"[{size}] pair {pair + 1}/{procs}: plain loop ready in {time.perf_counter() - t0:.1f}s")
            watcher = EventWatcher(env.redis_url)
            easel_cpu = CpuMeter({"worker": worker.proc.pid, **env.server_pids(), "producer": os.getpid()},
                                 shallow=("producer",))
            plain_cpu = CpuMeter({"plain": plain.proc.pid})
            try:
                # warm-up, not measured: both sides run `warmup` calls first
                ids = submit_all(client, img2img_jobs(ref, model, warmup, seed0=10_000, stage=stage))
                bad = [j for j, (_, s) in watcher.wait(ids).items() if s != "succeeded"]
                if bad:
                    raise RuntimeError(f"warm-up job failed: {client.status(bad[0]).error}\n{worker.tail()}")
                plain.run(list(range(10_000, 10_000 + warmup)))

                rounds = (pair_n + block - 1) // block
                for r in range(rounds):
                    k = min(block, pair_n - r * block)
                    seeds = list(range(seed, seed + k))
                    seed += k
                    order = ("easel", "plain") if r % 2 == 0 else ("plain", "easel")
                    for side in order:
                        if side == "easel":
                            jobs = img2img_jobs(ref, model, k, seed0=seeds[0], stage=stage)
                            c0 = easel_cpu.snapshot()
                            t_start = time.perf_counter()
                            ids = submit_all(client, jobs)
                            done = watcher.wait(ids)
                            for name, dt in CpuMeter.delta(c0, easel_cpu.snapshot()).items():
                                cpu[name] = cpu.get(name, 0.0) + dt
                            bad = [j for j, (_, s) in done.items() if s != "succeeded"]
                            if bad:
                                raise RuntimeError(f"job {bad[0]} {done[bad[0]][1]}: {client.status(bad[0]).error}")
                            ends = sorted((t, j) for j, (t, _) in done.items())
                            easel_blocks.append(ends[-1][0] - t_start)
                            block_jobs.append(k)
                            first_latency.append(ends[0][0] - t_start)
                            for (ta, _), (tb, jb) in zip(ends, ends[1:]):
                                cycles[jb] = tb - ta
                            job_ids += ids
                        else:
                            c0 = plain_cpu.snapshot()
                            t_start = time.perf_counter()
                            plain_calls += plain.run(seeds)
                            plain_blocks.append(time.perf_counter() - t_start)
                            cpu["plain"] = cpu.get("plain", 0.0) + CpuMeter.delta(c0, plain_cpu.snapshot())["plain"]
                    log(f"[{size}] pair {pair + 1}/{procs} round {r + 1}/{rounds}: easel {easel_blocks[-1]:.2f}s, "
                        f"plain {plain_blocks[-1]:.2f}s for {k} jobs")
            finally:
                watcher.close()
                worker.stop()
                plain.stop()
                plain_phases += plain.phases()[warmup:]
            probes.append(json.loads(probe_out.read_text()) if probe_out.exists() else {})

    denoise, progress, by_cycle, celery_gap, in_task, overhead = {}, {}, [], [], [], []
    for j in job_ids:
        (rec,) = client.store.records(j, 1)
        denoise[j] = json.loads(rec)["timings_s"]["denoise"]
        progress[j] = next((p[j].get("progress_s", 0.0) for p in probes if j in p), 0.0)
    for j, c in cycles.items():
        by_cycle.append(c - (denoise[j] - progress[j]))
    # worker-side breakdown from each worker's probe (one process clock each)
    for probe in probes:
        calls = sorted((p["start"], p["end"], j) for j, p in probe.items()
                       if j in denoise and "start" in p and "end" in p)
        for (_, end_a, _), (start_b, _, jb) in zip(calls, calls[1:]):
            if jb in cycles:  # consecutive in the same saturated block
                overhead.append(start_b - end_a + progress[jb])
        runs = sorted((p["prerun"], p["postrun"], j) for j, p in probe.items()
                      if j in denoise and "prerun" in p and "postrun" in p)
        for (pre_a, post_a, _), (pre_b, post_b, jb) in zip(runs, runs[1:]):
            if jb in cycles:  # consecutive in the same saturated block
                celery_gap.append(pre_b - post_a)
                in_task.append((post_b - pre_b) - denoise[jb])  # the task body outside denoise (and its hook)
    # Median of the per-round ratios: one round hit by a burst of outside load (other
    # processes on the same cores) cannot swing it, as it can a ratio of totals.
    ratio = median([p / e for p, e in zip(plain_blocks, easel_blocks)])
    res = {
        "size": size, "model": model, "n": len(job_ids), "block": block, "process_pairs": procs,
        "ratio": ratio,
        "ratio_of_totals": sum(plain_blocks) / sum(easel_blocks),
        "round_ratios": [p / e for p, e in zip(plain_blocks, easel_blocks)],
        "easel_s": sum(easel_blocks), "plain_s": sum(plain_blocks),
        "plain_call_p50_s": median(plain_calls),
        "denoise_p50_s": median(list(denoise.values())),
        "overhead_ms": [x * 1000 for x in overhead],
        "overhead_cycle_ms": [x * 1000 for x in by_cycle],
        "overhead_from_throughput_ms": (sum(easel_blocks) - sum(plain_blocks)) / len(job_ids) * 1000,
        "overhead_mean_ms": median([(e - p) / k * 1000 for e, p, k in zip(easel_blocks, plain_blocks, block_jobs)]),
        "progress_ms_p50": median(list(progress.values())) * 1000,
        "celery_gap_ms_p50": median(celery_gap) * 1000,
        "in_task_overhead_ms_p50": median(in_task) * 1000,
        "first_job_latency_s_p50": median(first_latency),
        "cpu_ms_per_job": {k: v / len(job_ids) * 1000 for k, v in cpu.items()},
    }
    if target.phases:  # where each side's call time goes (warm-up calls left out)
        easel_phases = [{k: p[j][k] for k in ("start", "steps", "end") if k in p[j]}
                        for p in probes for j in job_ids if j in p]
        res["phases"] = {"plain": phase_summary(plain_phases), "easel": phase_summary(easel_phases)}
        inproc = [r for p in probes for r in p.get("_plain_in_worker", [])[warmup:]]
        if inproc:
            res["phases"]["plain_in_worker"] = phase_summary(inproc)
        res["phases_raw"] = {"plain": plain_phases, "easel": easel_phases}
        log(f"[{size}] phases, p50 ms: " + "; ".join(f"{k}: {v}" for k, v in res["phases"].items()))
    per_job = res["cpu_ms_per_job"]
    res["cpu_ms_per_job_easel"] = sum(v for k, v in per_job.items() if k != "plain")
    res["cpu_ms_per_job_plain"] = per_job.get("plain", 0.0)
    log(f"[{size}] {res['n']} jobs: easel {res['easel_s']:.2f}s vs plain {res['plain_s']:.2f}s (ratio of totals "
        f"{res['ratio_of_totals']:.4f}); per-round ratios {', '.join(f'{x:.3f}' for x in res['round_ratios'])} "
        f"-> median {ratio:.4f}; "
        f"plain call p50 {res['plain_call_p50_s']:.3f}s, easel denoise p50 {res['denoise_p50_s']:.3f}s; "
        f"per-job overhead (idle between calls) p50 {pct(res['overhead_ms'], 50):.1f} ms p95 "
        f"{pct(res['overhead_ms'], 95):.1f} ms, as cycle less own call p50 {pct(res['overhead_cycle_ms'], 50):.1f} ms "
        f"(parts, p50 each: per-step progress calls {res['progress_ms_p50']:.1f} ms, Celery fetch/ack gap "
        f"{res['celery_gap_ms_p50']:.1f} ms, task body outside the pipeline call {res['in_task_overhead_ms_p50']:.1f} ms); "
        f"mean from throughput {res['overhead_from_throughput_ms']:.1f} ms (median over rounds "
        f"{res['overhead_mean_ms']:.1f} ms); CPU per job: easel "
        f"{res['cpu_ms_per_job_easel']:.1f} ms ({', '.join(f'{k} {v:.1f}' for k, v in per_job.items() if k != 'plain')}),"
        f" plain {res['cpu_ms_per_job_plain']:.1f} ms")
    return res


def run(env: BenchEnv, n: int = DEFAULT_N, block: int = DEFAULT_BLOCK, sizes: tuple[str, ...] = ("small", "large"),
        procs: int = DEFAULT_PROCS, device: str = "cpu", inproc_plain: bool = False) -> dict:
    """``device="cuda"``: the same tiny checkpoints on a GPU, in fp16 on both sides (the
    worker's ``auto`` dtype there), with the worker's GPU defaults (overlapped finish)."""
    client = env.client()
    results = {}
    for s in sizes:
        target = cpu_target(env, s)
        if device != "cpu":
            target = dataclasses.replace(target, device=device, dtype="float16")
        if inproc_plain:  # the plain call again inside the worker after each job; phases of all three
            target = dataclasses.replace(target, phases=True, worker_env={**target.worker_env, "EASEL_BENCH_INPROC_PLAIN":
                                         json.dumps({"px": target.px, "stage": target.stage})})
        results[s] = run_target(env, client, target, n, block, procs=procs)
    return report(results)


def call_gap_ms(res: dict) -> float:
    """easel's pipeline-call p50 less the plain loop's, in ms, for one ``run_target`` result."""
    return (res["denoise_p50_s"] - res["plain_call_p50_s"]) * 1000


def report(results: dict[str, dict], prefix: str = "", pooled: bool = True) -> dict:
    """Headline lines for per-target results: ratio per target, per-job overhead (pooled over
    targets, then per target) and the pipeline-call gap per target."""
    out: dict[str, object] = {}
    for s, r in results.items():
        out[f"{prefix}overhead_ratio_{s}"] = f"{r['ratio']:.3f}"
    if pooled:
        every = [x for r in results.values() for x in r["overhead_ms"]]
        out[f"{prefix}overhead_p50_ms"] = f"{pct(every, 50):.1f}"
        out[f"{prefix}overhead_p95_ms"] = f"{pct(every, 95):.1f}"
    for s, r in results.items():
        out[f"{prefix}overhead_p50_ms_{s}"] = f"{pct(r['overhead_ms'], 50):.1f}"
        out[f"{prefix}overhead_p95_ms_{s}"] = f"{pct(r['overhead_ms'], 95):.1f}"
    for s, r in results.items():
        out[f"{prefix}overhead_mean_ms_{s}"] = f"{r['overhead_mean_ms']:.1f}"
    for s, r in results.items():  # the pipeline call itself, easel's vs the plain loop's (p50s)
        out[f"{prefix}call_gap_ms_{s}"] = f"{call_gap_ms(r):.1f}"
    for s, r in results.items():
        if "cpu_ms_per_job_easel" in r:
            out[f"{prefix}cpu_ms_per_job_easel_{s}"] = f"{r['cpu_ms_per_job_easel']:.1f}"
            out[f"{prefix}cpu_ms_per_job_plain_{s}"] = f"{r['cpu_ms_per_job_plain']:.1f}"
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": results}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per size (and as many plain calls)")
    ap.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="jobs per alternating block")
    ap.add_argument("--procs", type=int, default=DEFAULT_PROCS,
                    help="fresh (worker, plain loop) process pairs per size, sharing the jobs")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--device", default="cpu", help="cuda: run the tiny checkpoints on the GPU (fp16)")
    ap.add_argument("--inproc-plain", action="store_true",
                    help="diagnosis: after each job the worker also makes the plain loop's call; prints the phases "
                         "of the plain process's, easel's and that in-worker call (ratio and per-job figures then "
                         "mean nothing)")


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n, block=args.block, sizes=tuple(args.sizes.split(",")), procs=args.procs,
               device=args.device, inproc_plain=args.inproc_plain)
