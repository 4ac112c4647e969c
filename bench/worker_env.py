"""``python -m bench worker_env``: A/B of the worker's environment on ``bench overhead``.

Runs ``bench.overhead.run_target`` (easel vs the plain loop, blocks alternating) once per
variant and repetition, the variants alternating (A B, B A, ...), each with a fresh worker
started with the variant's extra environment; the plain loop always runs with this
process's environment. For settings that only a process's start can take: libgomp's
``GOMP_SPINCOUNT`` (read when torch loads), ``EASEL_OVERLAP_FINISH``, thread counts.

``--variants 'GOMP_SPINCOUNT=300000;GOMP_SPINCOUNT=10000'`` (``;`` between variants, ``,``
between a variant's variables; an empty variant is the inherited environment).
Headlines per variant ``worker_env_<k>_*`` (k = 1, 2, ... in the order given, its
variables on stderr): ``ratio`` (median over its runs of the per-run ratio), ``ratio_totals``,
``overhead_p50_ms`` (pooled over its runs), ``overhead_mean_ms`` (median over its runs) and
``call_gap_ms`` (median over its runs).
"""
from __future__ import annotations

import argparse
import dataclasses

from bench.common import BenchEnv, cpu_target, headline, log, median, pct
from bench.overhead import call_gap_ms, run_target


def parse_variants(text: str) -> list[dict[str, str]]:
    out = []
    for variant in text.split(";"):
        pairs = [p.strip() for p in variant.split(",") if p.strip()]
        bad = [p for p in pairs if "=" not in p]
        if bad:
            raise SystemExit(f"--variants: {bad[0]!r} is not NAME=VALUE")
        out.append(dict(p.split("=", 1) for p in pairs))
    return out


def run(env: BenchEnv, variants: list[dict[str, str]], size: str, reps: int, n: int, block: int) -> dict:
    client = env.client()
    runs: list[list[dict]] = [[] for _ in variants]
    for r in range(reps):
        order = list(range(len(variants)))
        for k in order if r % 2 == 0 else order[::-1]:
            target = dataclasses.replace(cpu_target(env, size), worker_env=variants[k])
            res = run_target(env, client, target, n, block, procs=1)
            runs[k].append(res)
            log(f"variant {k + 1} {variants[k] or '(inherited)'} rep {r + 1}/{reps}: ratio {res['ratio']:.3f}, "
                f"overhead p50 {pct(res['overhead_ms'], 50):.1f} ms, mean {res['overhead_mean_ms']:.1f} ms, call gap "
                f"{call_gap_ms(res):.1f} ms")
    out: dict[str, str] = {}
    for k, results in enumerate(runs, 1):
        log(f"variant {k}: {variants[k - 1] or '(inherited environment)'}")
        out[f"worker_env_{k}_ratio"] = f"{median([x['ratio'] for x in results]):.3f}"
        out[f"worker_env_{k}_ratio_totals"] = (
            f"{sum(x['plain_s'] for x in results) / sum(x['easel_s'] for x in results):.3f}")
        out[f"worker_env_{k}_overhead_p50_ms"] = f"{pct([v for x in results for v in x['overhead_ms']], 50):.1f}"
        out[f"worker_env_{k}_overhead_mean_ms"] = f"{median([x['overhead_mean_ms'] for x in results]):.1f}"
        out[f"worker_env_{k}_call_gap_ms"] = f"{median([call_gap_ms(x) for x in results]):.1f}"
    for key, value in out.items():
        headline(key, value)
    return {"headline": out, "details": {"variants": variants, "runs": runs}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variants", default="GOMP_SPINCOUNT=300000;GOMP_SPINCOUNT=10000")
    ap.add_argument("--size", default="small", choices=("small", "large"))
    ap.add_argument("--reps", type=int, default=3, help="runs per variant")
    ap.add_argument("--n", type=int, default=12, help="jobs per run (and as many plain calls)")
    ap.add_argument("--block", type=int, default=4)


def main(env: BenchEnv, args) -> dict:
    return run(env, parse_variants(args.variants), args.size, args.reps, args.n, args.block)
