"""``python -m bench [NAME] [--n N] [--json PATH]``: run one benchmark or all of them.

All benchmarks of one run share one set of embedded servers (valkey + SeaweedFS on free
ports) and the tiny checkpoints under ``$EASEL_BENCH_MODEL_ROOT``
(default ``~/.cache/easel/bench-models``), written on first use.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

# name -> module; run in this order by `python -m bench`. The GPU run (`python -m bench gpu`)
# needs an NVIDIA GPU and runs only on request.
BENCHMARKS = {
    "submit": "bench.submit_rate",
    "cold_start": "bench.cold_start",
    "overhead": "bench.overhead",
    "naive": "bench.naive",
    "chain": "bench.chain",
    "batching": "bench.batching",
    "prompts": "bench.prompts",
}
# not part of the default run
EXTRA = {"profile": "bench.profile", "load": "bench.load", "gpu": "bench.gpu", "callpath": "bench.callpath",
         "threads": "bench.cpu_threads", "worker_env": "bench.worker_env", "farm": "bench.farm",
         "fairness": "bench.fairness", "flops": "bench.flops",
         "precompile": "bench.precompile"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "all"
    if name != "all" and name not in BENCHMARKS and name not in EXTRA:
        print(f"unknown benchmark {name!r}; known: all, {', '.join([*BENCHMARKS, *EXTRA])}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog=f"python -m bench {name}")
    ap.add_argument("--json", default=None, help="also write all results (with details) to this file")
    selected = list(BENCHMARKS) if name == "all" else [name]
    modules = {n: importlib.import_module({**BENCHMARKS, **EXTRA}[n]) for n in selected}
    if name != "all":
        modules[name].add_args(ap)
    else:
        ap.add_argument("--n", type=int, default=None, help="(single benchmark only)")
    args = ap.parse_args(argv)

    from bench.common import BenchEnv, log

    t0 = time.perf_counter()
    results = {}
    need_s3 = any(getattr(m, "NEEDS_S3", True) for m in modules.values())
    need_models = any(getattr(m, "NEEDS_MODELS", True) for m in modules.values())
    with BenchEnv(need_s3=need_s3, need_models=need_models, device=getattr(args, "device", "cpu")) as env:
        for n, mod in modules.items():
            if name == "all":
                sub = argparse.ArgumentParser()
                mod.add_args(sub)
                margs = sub.parse_args([])
            else:
                margs = args
            t1 = time.perf_counter()
            log(f"--- {n} ---")
            results[n] = mod.main(env, margs)
            log(f"--- {n} done in {time.perf_counter() - t1:.0f}s ---")
            env.flush()
    log(f"all done in {time.perf_counter() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
