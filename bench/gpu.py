"""``python -m bench gpu``: the overhead and batching benchmarks on a GPU, with SD 1.5's full architecture.

``python -m bench gpu`` on a machine with an NVIDIA GPU. The checkpoint is SD 1.5's
published architecture with random weights (``bench/sd15_arch.py``, fp16 safetensors,
written once under the bench model root); nothing is downloaded. Jobs are img2img at
512 px, 30 steps at strength 0.8 (24 denoising steps), guidance 7.5, PNG out.

Variants, run in this order while the time budget (``--budget-s``) lasts:

- ``eager``: fp16, SDPA (diffusers' default attention on torch 2), output writes
  overlapped with the next job (the GPU default). Overhead vs a plain diffusers loop
  (``bench.overhead.run_target``: same checkpoint, dtype, image, seeds), its jobs shared
  by ``--procs`` (3) fresh process pairs: eager SD 1.5 is launch-bound, and on a shared
  host whole stretches of steps run slower for whichever process is unlucky.
- ``compile``: ``eager`` with ``torch.compile(unet, mode="reduce-overhead", fullgraph=True)``
  on both sides (registry ``optimizations.compile_unet``; the plain loop compiles the same
  way); one process pair (each compiles for about a minute).
- ``batching``: ``bench batching`` at 512 px, batch 1 / 4 / 8 (eager).
- ``eager-pinned`` (on request): ``eager`` with valkey and SeaweedFS on one core (and its
  hyperthread sibling) and the worker and the plain loop on the others
  (``bench.common.cpu_split``); it did not remove the slow stretches (bench/RESULTS.md).
- ``eager-sync`` (on request): ``eager`` with overlapped output writes off
  (``EASEL_OVERLAP_FINISH=false``), to show what the overlap buys.
- ``throughput`` (on request; issue 20): the throughput profile with adaptive batching on a
  deep queue vs a plain eager loop, MFU, step caching's speed and SSIM, and a warm restart
  from the compile cache (``bench/gpu_throughput.py``). Headlines ``gpu_images_per_s_best``,
  ``gpu_images_per_s_plain_eager``, ``gpu_speedup_vs_plain``, ``gpu_mfu``,
  ``gpu_images_per_s_stepcache``, ``gpu_stepcache_ssim``, ``gpu_warm_restart_s``.
  On an H100 (2026-12-06), ``--variants throughput --budget-s 525`` ran plain, best and the
  warm restart in 363 s and left the step cache out (137 s left, it needs ~180 s);
  ``--tp-parts best,stepcache`` should get its figures in a second 10-minute command (untried;
  the step cache compiles its own UNet graphs cold, and its ``NEEDS_S`` is an estimate).
- ``diag`` (on request): where easel's pipeline call loses time to the plain loop's. Each
  call is split at its step callbacks (prologue, per step, epilogue) on three sides: the
  plain process, easel's call in the worker, and the plain call made inside the worker
  after each job (``bench.probe_worker``). Headlines ``gpu_diag_<side>_<phase>_ms``.

Headlines are prefixed ``gpu_``; images/s are easel's and the plain loop's throughput over
the measured blocks. With ``--phases`` (default) both sides record each call's step
timestamps (``bench.common.phase_summary``), which adds ``gpu_clean_call_gap_ms_<variant>``
(easel's call less the plain loop's, over calls free of slow stretches) and the share of
slow steps on each side, and keeps the raw phases in the ``--json`` details. ``--arch tiny --device cpu --px 64`` runs the whole script on the CPU
with the tiny checkpoint (a dry run of the code path, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from bench import batching, gpu_throughput, overhead
from bench.common import BenchEnv, Target, headline, log
from bench.sd15_arch import bench_checkpoint

NEEDS_MODELS = False  # makes its own checkpoint
VARIANTS = ("eager", "compile", "batching")  # default order; "eager-pinned", "eager-sync", "diag", "throughput" on request
# Seconds a variant needs at least (worker start, warm-up, compile); skipped when less is left.
NEEDS_S = {"eager": 150, "eager-pinned": 60, "compile": 150, "batching": 90, "eager-sync": 45, "diag": 60,
           "throughput": min(gpu_throughput.NEEDS_S.values())}  # its parts skip themselves


def _registry(env: BenchEnv, ckpt: Path, dtype: str) -> Path:
    base = {"source": str(ckpt), "latent_space": "sd1-vae", "kind": "sd", "dtype": dtype}
    reg = {"models": {
        "gpu-sd15": {**base, "family": "gpu-sd15"},
        "gpu-sd15-compiled": {**base, "family": "gpu-sd15-compiled", "optimizations": {"compile_unet": True}},
        **gpu_throughput.registry_models(base),
    }}
    path = env.tmp / "gpu-models.yaml"
    path.write_text(yaml.safe_dump(reg))
    return path


def run(env: BenchEnv, args) -> dict:
    from easel.producer.client import EaselClient

    t_start = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - t_start)  # noqa: E731
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    t0 = time.perf_counter()
    ckpt = bench_checkpoint(args.arch)
    log(f"checkpoint {ckpt} ready in {time.perf_counter() - t0:.1f}s")
    reg = _registry(env, ckpt, dtype)
    client = EaselClient(env.settings(models=reg))
    # A compile on the first call can outlast the default stage limit; the watchdog must not fire.
    wenv = {"EASEL_MODELS": str(reg), "EASEL_STAGE_TIMEOUT_BASE_S": "1800", "EASEL_STAGE_STUCK_GRACE_S": "600"}
    # The overhead variants run batch 1, as the plain loop each is compared with (a GPU
    # worker's default, "auto", would batch a block's jobs).
    batch1 = {**wenv, "EASEL_BATCH_SIZE": "1"}
    stage = {"task": "img2img", "prompt": "astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
             "strength": args.strength, "guidance_scale": 7.5, "steps": args.steps}
    common = dict(checkpoint=ckpt, px=args.px, stage=stage, dtype=dtype, device=args.device, phases=args.phases)
    targets = {
        "eager": Target(label="eager", model="gpu-sd15", family="gpu-sd15", worker_env=batch1, **common),
        "compile": Target(label="compile", model="gpu-sd15-compiled", family="gpu-sd15-compiled", compile_unet=True,
                          worker_env=batch1, **common),
        "eager-pinned": Target(label="eager_pinned", model="gpu-sd15", family="gpu-sd15", worker_env=batch1,
                               pin_cpus=True, **common),
        "eager-sync": Target(label="eager_sync", model="gpu-sd15", family="gpu-sd15",
                             worker_env={**batch1, "EASEL_OVERLAP_FINISH": "false"}, **common),
        # Where the call gap lives: phases of every call on three sides (plain process, easel's
        # call, the plain call made inside the worker after each job); overlap off so that no
        # finish runs beside either call in the worker. Its ratio means nothing (the worker
        # makes two calls per job), so it reports phases only.
        "diag": Target(label="diag", model="gpu-sd15", family="gpu-sd15", **{**common, "phases": True, "worker_env": {
            **batch1, "EASEL_OVERLAP_FINISH": "false",
            "EASEL_BENCH_INPROC_PLAIN": json.dumps({"px": args.px, "stage": stage})}}),
    }
    out: dict[str, str] = {}
    details: dict[str, object] = {}
    for variant in args.variants.split(","):
        if left() < NEEDS_S[variant]:
            log(f"skipping {variant}: {left():.0f}s of the budget left, it needs ~{NEEDS_S[variant]}s")
            continue
        t0 = time.perf_counter()
        try:
            if variant == "throughput":
                lines, det = gpu_throughput.run(env, client, args, ckpt, dtype, stage, wenv, left)
                out.update(lines)
                details[variant] = det
            elif variant == "batching":
                res = batching.run(env, n=args.batch_n, sizes=(args.px,), batches=tuple(args.batches), rounds=1,
                                   model="gpu-sd15", family="gpu-sd15", stage=stage, worker_env=wenv, client=client,
                                   prefix="gpu_")
                out.update(res["headline"])
                details[variant] = res["details"]
            else:
                t = targets[variant]
                # Several fresh process pairs average out the host's slow stretches (eager is
                # launch-bound, so they hit it 1:1); compiling once per pair would cost a minute each.
                procs = 1 if variant == "compile" else args.procs
                r = overhead.run_target(env, client, t, args.n, args.block, procs=procs)
                if variant == "diag":
                    lines = {}
                    more = {f"gpu_diag_{side}_{k}" + ("" if k in ("slow_step_pct", "clean_calls") else "_ms"): v
                            for side, ph in r["phases"].items() for k, v in ph.items() if k != "calls"}
                else:
                    lines = overhead.report({t.label: r}, prefix="gpu_", pooled=False)["headline"]
                    more = {f"gpu_images_per_s_{t.label}": f"{r['n'] / r['easel_s']:.2f}",
                            f"gpu_plain_images_per_s_{t.label}": f"{r['n'] / r['plain_s']:.2f}"}
                    if "phases" in r:  # the call gap over calls free of slow stretches (``phase_summary``)
                        ph = r["phases"]
                        more[f"gpu_clean_call_gap_ms_{t.label}"] = f"{ph['easel']['clean_call'] - ph['plain']['clean_call']:.1f}"
                        more[f"gpu_slow_step_pct_easel_{t.label}"] = ph["easel"]["slow_step_pct"]
                        more[f"gpu_slow_step_pct_plain_{t.label}"] = ph["plain"]["slow_step_pct"]
                for k, v in more.items():
                    headline(k, v)
                out.update(lines, **more)
                details[variant] = r
        except Exception as e:  # one variant's failure must not lose the others' figures
            log(f"{variant} failed: {type(e).__name__}: {e}")
            details[variant] = {"error": f"{type(e).__name__}: {e}"}
        log(f"--- gpu {variant} done in {time.perf_counter() - t0:.0f}s; {left():.0f}s of the budget left ---")
        env.flush()
    return {"headline": out, "details": details}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--n", type=int, default=24, help="jobs per overhead variant (and as many plain calls)")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--procs", type=int, default=3,
                    help="fresh (worker, plain loop) pairs sharing each variant's jobs (compile: always 1)")
    ap.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                    help="record each call's step timestamps on both sides (a no-op step callback in the plain loop)")
    ap.add_argument("--batch-n", type=int, default=16, help="jobs per batch size")
    ap.add_argument("--batches", type=_batches, default=[1, 4, 8], help="batch sizes; 1 is the speedups' base")
    ap.add_argument("--variants", type=_variants, default=",".join(VARIANTS), help=f"some of {', '.join(NEEDS_S)}")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip variants that would not fit in what is left")
    gpu_throughput.add_args(ap)


def _variants(text: str) -> str:
    """Refused before anything runs, not after the first variants' minutes."""
    unknown = [v for v in text.split(",") if v not in NEEDS_S]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(NEEDS_S)}")
    return text


def _batches(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",")]
    if 1 not in sizes:
        raise argparse.ArgumentTypeError("the batch sizes must include 1: each speedup is over batch 1")
    return sizes


def main(env: BenchEnv, args) -> dict:
    return run(env, args)
