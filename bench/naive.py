"""``python -m bench naive``: easel vs the Celery task many users write first.

The naive peer (``app`` / ``img2img`` below) is a plain Celery app on the same valkey:
the input image travels through the broker as base64, the task loads the pipeline with
``from_pretrained`` on every call, runs it, and returns the PNG as base64 through the
Redis result backend; its worker is ``celery -A bench.naive worker -c 1`` (default prefork
pool, one process for the one device, like easel's one process per GPU). easel runs the
same jobs (same checkpoint, image, parameters, seeds) on a warm worker, PNG to S3.
The two alternate in blocks (E N, N E, ...).

- ``naive_speedup``: naive time / easel time for the same jobs, ``sd15`` (tiny-sd15): the
  median over rounds of (naive-block time / easel-block time).
- ``naive_speedup_large``: the same on ``sd15-wide`` (tiny-sd15-wide).

Tiny checkpoints load in well under a second once the libraries are imported; real
SD 1.5 weights take seconds, so these ratios understate the gap on real models.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time

from celery import Celery

app = Celery("naive", broker=os.environ.get("BENCH_NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("BENCH_NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_default_queue = "bench-naive"
# Harness detail, not part of the "naive" pattern: easel's app sets kombu's key separator to
# ":", and two apps with different separators on one Redis DB corrupt each other's shared
# pidbox bindings (the naive worker's start-up broadcast then breaks easel workers).
app.conf.broker_transport_options = {"sep": ":"}


@app.task(name="bench.naive.img2img")
def img2img(image_b64: str, model_path: str, prompt: str, strength: float, guidance_scale: float, steps: int,
            seed: int) -> str:
    import torch
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    pipe = AutoPipelineForImage2Image.from_pretrained(model_path)  # every task: the naive part
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")
    out = pipe(prompt=prompt, image=image, strength=strength, guidance_scale=guidance_scale,
               num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --- the benchmark -------------------------------------------------------------------
DEFAULT_N = 12
DEFAULT_BLOCK = 3


def _naive_block(env, model_path: str, image_b64: str, seeds: list[int]) -> float:
    from bench.common import STAGE

    t0 = time.perf_counter()
    results = [img2img.apply_async((image_b64, model_path, STAGE["prompt"], STAGE["strength"],
                                    STAGE["guidance_scale"], STAGE["steps"], s)) for s in seeds]
    outs = [r.get(timeout=600) for r in results]
    dt = time.perf_counter() - t0
    assert all(base64.b64decode(o)[:4] == b"\x89PNG" for o in outs)
    for r in results:
        r.forget()
    return dt


def run_size(env, client, size: str, n: int, block: int) -> dict:
    from bench.common import SIZES, EventWatcher, Worker, bench_image, img2img_jobs, log, png_bytes, submit_all

    model, family, ckpt = SIZES[size]
    model_path = str(env.models[ckpt])
    data = png_bytes(bench_image())
    ref = client.storage.put_input(data, "png")
    image_b64 = base64.b64encode(data).decode()
    url = env.redis_url
    app.conf.broker_url = app.conf.result_backend = url
    easel_w = env.worker(family)
    hostname = f"bench-naive-{size}-{os.getpid()}@{os.uname().nodename}"
    naive_w = Worker("naive", {**env.env, "BENCH_NAIVE_REDIS_URL": url}, env.logdir, hostname=hostname,
                     argv=[sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "-Q", "bench-naive",
                           "-c", "1", "-l", "WARNING", "-n", hostname],
                     ready=lambda: bool(app.control.ping(destination=[hostname], timeout=0.5))).start()
    watcher = EventWatcher(env.redis_url)
    easel_t, naive_t = [], []
    try:
        # warm-up: one job each (the naive worker's child imports torch/diffusers here)
        ids = submit_all(client, img2img_jobs(ref, model, 1, seed0=10_000))
        watcher.wait(ids)
        _naive_block(env, model_path, image_b64, [10_000])
        seed = 0
        rounds = (n + block - 1) // block
        for r in range(rounds):
            k = min(block, n - r * block)
            seeds = list(range(seed, seed + k))
            seed += k
            for side in (("easel", "naive") if r % 2 == 0 else ("naive", "easel")):
                if side == "easel":
                    t0 = time.perf_counter()
                    ids = submit_all(client, img2img_jobs(ref, model, k, seed0=seeds[0]))
                    done = watcher.wait(ids)
                    assert all(s == "succeeded" for _, s in done.values()), done
                    easel_t.append(max(t for t, _ in done.values()) - t0)
                else:
                    naive_t.append(_naive_block(env, model_path, image_b64, seeds))
            log(f"[{size}] round {r + 1}/{rounds}: easel {easel_t[-1]:.2f}s, naive {naive_t[-1]:.2f}s for {k} jobs")
    finally:
        watcher.close()
        easel_w.stop()
        naive_w.stop()
    from bench.common import median

    rounds = [nv / ev for nv, ev in zip(naive_t, easel_t)]
    speedup = median(rounds)  # robust to one round hit by outside load (see bench.overhead)
    log(f"[{size}] {n} jobs: easel {sum(easel_t):.2f}s, naive {sum(naive_t):.2f}s (ratio of totals "
        f"{sum(naive_t) / sum(easel_t):.3f}); per-round {', '.join(f'{x:.3f}' for x in rounds)} -> easel {speedup:.2f}x")
    return {"speedup": speedup, "ratio_of_totals": sum(naive_t) / sum(easel_t), "round_ratios": rounds,
            "easel_s": sum(easel_t), "naive_s": sum(naive_t), "n": n}


def run(env, n: int = DEFAULT_N, block: int = DEFAULT_BLOCK, sizes: tuple[str, ...] = ("small", "large")) -> dict:
    from bench.common import headline

    client = env.client()
    res = {s: run_size(env, client, s, n, block) for s in sizes}
    out = {}
    for s, r in res.items():
        out["naive_speedup" if s == "small" else f"naive_speedup_{s}"] = f"{r['speedup']:.2f}"
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": res}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per size and side")
    ap.add_argument("--block", type=int, default=DEFAULT_BLOCK)
    ap.add_argument("--sizes", default="small,large")


def main(env, args) -> dict:
    return run(env, n=args.n, block=args.block, sizes=tuple(args.sizes.split(",")))
