"""``python -m bench gpu --variants throughput``: easel's best GPU throughput on SD 1.5 (issue 20).

One process, four parts, run in this order while the budget (``--budget-s``) lasts; each
is skipped when what is left is under its ``NEEDS_S``. The job is ``bench gpu``'s: img2img
at 512 px, 30 steps at strength 0.8, guidance 7.5, PNG out, SD 1.5's architecture with
random weights (``bench/sd15_arch.py``).

1. ``plain``: a plain diffusers loop (``bench.plain_runner``: fp16, SDPA, eager, batch 1,
   one call after another) -> ``gpu_images_per_s_plain_eager``.
2. ``best``: an easel worker serving the registry model with ``profile: throughput``
   (compile_unet with CUDA graphs, compile_vae, channels_last, fuse_qkv) and
   ``batch_size: auto`` (the largest of ``batch_buckets`` on a GPU), its compile cache in a
   fresh ``EASEL_COMPILE_CACHE_DIR`` (so its start is a cold compile:
   ``gpu_compile_s_cold``). Unmeasured warm-up jobs at each bucket size (their CUDA graphs
   are captured on first use), then ``--tp-n`` jobs submitted at once (a deep queue); from
   the first submit to the last ``succeeded`` event -> ``gpu_images_per_s_best``,
   ``gpu_speedup_vs_plain`` (over part 1) and ``gpu_mfu`` (``bench.flops``: FLOPs per image
   of this job x images/s / the GPU's dense fp16 peak, ``bench.flops.PEAK_FLOPS`` by
   ``torch.cuda.get_device_name()``, or ``--peak-tflops``).
   Last, ``--ssim-n`` fixed-seed jobs: the reference images for part 4's SSIM.
3. ``warm_restart``: a fresh worker for part 2's model with the same compile cache folder;
   one job is queued before it starts. From its process start to that job's ``succeeded``
   event -> ``gpu_warm_restart_s`` (load + compile from the cache + the first job);
   ``gpu_compile_s_warm`` is the compile part its heartbeat reports.
4. ``stepcache``: part 2's model with ``step_cache: {interval: 3, branch: 0}`` added (compiled
   too: two UNet graphs per shape, a full pass and a cached one, new to the compile cache
   part 2 left, which holds its VAE's), warmed like part 2. ``--sc-n`` jobs at once ->
   ``gpu_images_per_s_stepcache``; then the same ``--ssim-n`` fixed-seed jobs as part 2's
   last ones, their PNGs fetched from S3 through the client -> ``gpu_stepcache_ssim`` (mean
   SSIM, ``worker.quality.ssim``, step cache vs none, same weights, seeds and batch shape).
   Last because compiling both UNet graphs cold is the longest start here.

``--tp-parts`` runs some of them (``best,stepcache`` for a second run that only wants the
step cache's figures: part 4 needs part 2's reference images).

``--arch tiny --device cpu --px 64`` runs all of it on the CPU with the tiny checkpoint (a
dry run of the code path: ``batch_size: auto`` is 1 there and the figures mean nothing).
"""
from __future__ import annotations

import argparse
import io
import json
import time

from bench import flops
from bench.common import (
    BenchEnv,
    EventWatcher,
    PlainRunner,
    Target,
    bench_image,
    headline,
    img2img_jobs,
    log,
    png_bytes,
    submit_all,
)

# Seconds a part needs at least (worker start, compile, jobs); skipped when less is left. On an
# H100 (2026-12-06) plain took 48 s, best 256 s (207 s of it the cold compile), warm_restart 58 s.
NEEDS_S = {"plain": 45, "best": 240, "warm_restart": 60, "stepcache": 180}
MODELS = {
    "tp": ("gpu-sd15-tp", "gpu-sd15-tp"),            # (model, family)
    "sc": ("gpu-sd15-sc", "gpu-sd15-sc"),
}
SSIM_SEED0 = 30_000


def registry_models(base: dict) -> dict:
    """The registry entries this benchmark adds to ``bench gpu``'s (``base``: source, dtype, ...)."""
    return {
        MODELS["tp"][0]: {**base, "family": MODELS["tp"][1], "profile": "throughput"},
        MODELS["sc"][0]: {**base, "family": MODELS["sc"][1], "profile": "throughput",
                          "optimizations": {"step_cache": {"interval": 3, "branch": 0}}},
    }


def _run_jobs(client, watcher: EventWatcher, ref: str, model: str, n: int, stage: dict, seed0: int,
              timeout: float) -> tuple[list[str], float]:
    """Submit ``n`` jobs at once; (ids, seconds from the submit to the last ``succeeded``)."""
    t0 = time.perf_counter()
    ids = submit_all(client, img2img_jobs(ref, model, n, seed0=seed0, stage=stage))
    done = watcher.wait(ids, timeout=timeout)
    bad = [j for j, (_, s) in done.items() if s != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} {model} jobs not succeeded; first: {client.status(bad[0]).error}")
    return ids, max(t for t, _ in done.values()) - t0


def _start(env: BenchEnv, family: str, wenv: dict, timeout: float):
    """A worker, waited for (a compile at start can outlast ``Worker.start``'s default 180 s)."""
    w = env.worker(family, extra_env=wenv, wait=False)
    presence = w.wait_ready(timeout=timeout)
    return w, presence


def _images(client, ids: list[str]):
    from PIL import Image

    out = []
    for j in ids:
        manifest = client.result(j)
        out.append(Image.open(io.BytesIO(client.storage.get(manifest.outputs[0]))).convert("RGB"))
    return out


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return device


def run(env: BenchEnv, client, args, ckpt, dtype: str, stage: dict, wenv: dict, left) -> tuple[dict, dict]:
    """Headlines and details of the four parts (see the module doc)."""
    out: dict[str, object] = {}
    details: dict[str, object] = {}
    timeout = max(60.0, min(900.0, left()))
    ref = client.storage.put_input(png_bytes(bench_image(args.px)), "png")
    cache = env.tmp / "compile-cache"  # fresh: the first compiled worker compiles cold
    batching = {"EASEL_BATCH_SIZE": str(args.batch_size), "EASEL_BATCH_BUCKETS": json.dumps(args.buckets)}
    tp_env = {**wenv, **batching, "EASEL_COMPILE_CACHE_DIR": str(cache), "EASEL_COMPILE_WARM_SIZES": json.dumps([args.px])}

    def emit(name: str, value) -> None:
        out[name] = value
        headline(name, value)

    def fits(part: str) -> bool:
        if left() < NEEDS_S[part]:
            log(f"throughput: skipping {part}: {left():.0f}s of the budget left, it needs ~{NEEDS_S[part]}s")
            return False
        return True

    def guarded(part: str, fn) -> None:
        if not fits(part):
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (one part's failure must not lose the others' figures)
            log(f"throughput {part} failed: {type(e).__name__}: {e}")
            details[part] = {"error": f"{type(e).__name__}: {e}"}
        log(f"--- throughput {part} done in {time.perf_counter() - t0:.0f}s; {left():.0f}s of the budget left ---")
        env.flush()

    def warm_buckets(model: str, presence: dict, watcher: EventWatcher) -> tuple[list[int], list[float]]:
        """Each bucket's CUDA graphs are captured on its first call: one unmeasured round per
        bucket, largest first. Returns the buckets and each round's seconds per image."""
        buckets = sorted({b for b in args.buckets if b <= int(presence.get("batch_size") or 1)}, reverse=True)
        t1 = time.perf_counter()
        per_image = [_run_jobs(client, watcher, ref, model, b, stage, 20_000, timeout)[1] / b for b in buckets]
        log(f"{model}: warm-up rounds at {buckets} in {time.perf_counter() - t1:.1f}s")
        return buckets, per_image

    ssim_refs: list = []  # part 2's fixed-seed images: what part 4's step cache is compared with

    # 1. the plain diffusers loop, eager, batch 1
    def plain_part() -> None:
        t = Target(label="plain_eager", model=MODELS["tp"][0], family=MODELS["tp"][1], checkpoint=ckpt, px=args.px,
                   stage=stage, dtype=dtype, device=args.device)
        t0 = time.perf_counter()
        plain = PlainRunner(env, t)
        try:
            log(f"plain loop ready in {time.perf_counter() - t0:.1f}s")
            plain.run([10_000, 10_001])  # warm-up
            t0 = time.perf_counter()
            calls = plain.run(list(range(args.plain_n)))
            dt = time.perf_counter() - t0
        finally:
            plain.stop()
        details["plain"] = {"n": args.plain_n, "s": dt, "calls_s": calls}
        emit("gpu_images_per_s_plain_eager", f"{args.plain_n / dt:.3f}")

    # 2. the throughput profile, batch auto, deep queue
    def best_part() -> None:
        model = MODELS["tp"][0]
        t0 = time.perf_counter()
        w, presence = _start(env, MODELS["tp"][1], tp_env, timeout)
        watcher = EventWatcher(env.redis_url)
        try:
            start_s = time.perf_counter() - t0
            compile_s = presence.get("compile_s", {}).get(model, 0.0)
            log(f"throughput worker ready in {start_s:.1f}s (compile {compile_s}s, batch_size "
                f"{presence.get('batch_size')})")
            emit("gpu_compile_s_cold", f"{compile_s:.1f}")
            buckets, per_image = warm_buckets(model, presence, watcher)
            # what is left of the budget caps the deep queue (a slow compile must not cost the later parts
            # everything); the best warm-up round's seconds per image over-estimate a full batch's
            n = args.tp_n
            if per_image and min(per_image) > 0:
                fit = int((left() - 30) / min(per_image))
                n = max(2 * max(buckets), min(n, fit - fit % max(buckets)))
                if n < args.tp_n:
                    log(f"deep queue cut to {n} jobs to fit the budget ({left():.0f}s left)")
            _, dt = _run_jobs(client, watcher, ref, model, n, stage, 0, timeout)
            ips = n / dt
            emit("gpu_images_per_s_best", f"{ips:.3f}")
            try:  # part 4's reference; its failure costs part 4 only
                ref_ids, _ = _run_jobs(client, watcher, ref, model, args.ssim_n, stage, SSIM_SEED0, timeout)
                ssim_refs[:] = _images(client, ref_ids)  # fetched now: the flush after each part drops the records
            except Exception as e:  # noqa: BLE001
                log(f"throughput best: the SSIM reference jobs failed: {type(e).__name__}: {e}")
        finally:
            watcher.close()
            w.stop()
        if "gpu_images_per_s_plain_eager" in out:
            emit("gpu_speedup_vs_plain", f"{ips / float(out['gpu_images_per_s_plain_eager']):.3f}")
        fpi = flops.job_flops(args.px, args.steps, args.strength)["total"]
        name = _device_name(args.device)
        peak = flops.peak_flops(name, args.peak_tflops)
        m = flops.mfu(ips, fpi, peak)
        if m is None:
            log(f"no dense fp16 peak known for {name!r} (pass --peak-tflops): gpu_mfu = nan")
        emit("gpu_mfu", "nan" if m is None else f"{m:.4f}")
        details["best"] = {"n": n, "s": dt, "start_s": start_s, "presence": presence, "device_name": name,
                           "peak_flops": peak, "flops_per_image": fpi, "buckets_warmed": buckets}

    # 3. warm restart from the compile cache part 2 left
    def warm_part() -> None:
        if not cache.exists():
            raise RuntimeError(f"no compile cache at {cache}: the best part did not run")
        model = MODELS["tp"][0]
        watcher = EventWatcher(env.redis_url)
        try:
            ids = submit_all(client, img2img_jobs(ref, model, 1, seed0=40_000, stage=stage))  # waits in the queue
            w = env.worker(MODELS["tp"][1], extra_env=tp_env, wait=False)
            try:
                done = watcher.wait(ids, timeout=timeout)
                (t_done, state), = done.values()
                if state != "succeeded":
                    raise RuntimeError(f"warm-restart job {state}: {client.status(ids[0]).error}\n{w.tail()}")
                restart_s = t_done - w.started_at
                presence = w.wait_ready(timeout=30)
            finally:
                w.stop()
        finally:
            watcher.close()
        emit("gpu_warm_restart_s", f"{restart_s:.1f}")
        emit("gpu_compile_s_warm", f"{presence.get('compile_s', {}).get(model, 0.0):.1f}")
        details["warm_restart"] = {"s": restart_s, "presence": presence}

    # 4. step cache: part 2's model with step caching, throughput and SSIM vs part 2's images
    def stepcache_part() -> None:
        if not ssim_refs:
            raise RuntimeError("no reference images: the best part did not finish")
        sc = MODELS["sc"][0]
        w, presence = _start(env, MODELS["sc"][1], tp_env, timeout)
        watcher = EventWatcher(env.redis_url)
        try:
            log(f"step-cache worker ready (compile {presence.get('compile_s', {}).get(sc, 0.0)}s)")
            warm_buckets(sc, presence, watcher)
            _, dt = _run_jobs(client, watcher, ref, sc, args.sc_n, stage, 0, timeout)
            emit("gpu_images_per_s_stepcache", f"{args.sc_n / dt:.3f}")
            sc_ids, _ = _run_jobs(client, watcher, ref, sc, args.ssim_n, stage, SSIM_SEED0, timeout)
        finally:
            watcher.close()
            w.stop()
        from easel.worker.quality import ssim

        per = [ssim([x], [y]) for x, y in zip(ssim_refs, _images(client, sc_ids))]
        emit("gpu_stepcache_ssim", f"{sum(per) / len(per):.4f}")
        details["stepcache"] = {"n": args.sc_n, "s": dt, "presence": presence, "ssim": per}

    for part, fn in (("plain", plain_part), ("best", best_part), ("warm_restart", warm_part),
                     ("stepcache", stepcache_part)):
        if part in args.tp_parts:
            guarded(part, fn)
    return out, details


def _parts(text: str) -> list[str]:
    parts = text.split(",")
    unknown = [p for p in parts if p not in NEEDS_S]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}: choose from {list(NEEDS_S)}")
    return parts


def add_args(ap) -> None:
    ap.add_argument("--tp-parts", type=_parts, default=list(NEEDS_S),
                    help="throughput: the parts to run (stepcache needs best: its SSIM reference)")
    ap.add_argument("--plain-n", type=int, default=12, help="throughput: plain-loop calls measured")
    ap.add_argument("--tp-n", type=int, default=96, help="throughput: jobs submitted at once to the compiled worker")
    ap.add_argument("--sc-n", type=int, default=64, help="throughput: jobs submitted at once to the step-cache worker")
    ap.add_argument("--ssim-n", type=int, default=4, help="throughput: fixed-seed jobs per side for the SSIM")
    ap.add_argument("--buckets", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8],
                    help="throughput: the workers' EASEL_BATCH_BUCKETS (each is warmed before measuring)")
    ap.add_argument("--batch-size", default="auto",
                    help="throughput: the workers' EASEL_BATCH_SIZE (auto: the largest bucket on a GPU, 1 on the CPU; "
                         "a number exercises batching in a CPU dry run)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="throughput: the GPU's dense fp16 TFLOPS for gpu_mfu (default: bench.flops.PEAK_FLOPS)")
