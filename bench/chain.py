"""Issue 3's chain benchmark: a 3-stage same-latent-space img2img chain (sd15 -> comic ->
pixel, the seed guide's image-to-image-to-image) three ways, in one run, alternating:

- ``latent``: one easel job; easel hands latents between stages inside one task.
- ``decode``: the same easel job with ``handoff: image`` (decode to pixels and VAE-encode
  again between stages; still one task on one warm worker).
- ``naive``: three separate jobs on the naive Celery peer of bench.naive (pipeline loaded
  per job, images as base64 through the broker), each stage's PNG fed to the next.

Headlines: ``chain_latent_vs_decode`` = decode time / latent time; ``chain_vs_naive`` =
naive time / latent time (speed-up ratios, medians over rounds; > 1 means easel's latent
chain is faster).
"""
from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time

from bench.common import BenchEnv, EventWatcher, Worker, bench_image, headline, log, png_bytes, submit_all

DEFAULT_N = 6
STEPS = 10
MODELS = [("sd15", "tiny-sd15", "astronaut in a jungle"), ("comic-diffusion", "tiny-sd15-comic", "charliebo artstyle"),
          ("pixel-art", "tiny-sd15-pixel", "pixelartstyle")]


def chain_job(ref: str, seed: int, handoff: str) -> dict:
    return {"input": {"image": ref}, "handoff": handoff,
            "stages": [{"model": m, "prompt": p, "steps": STEPS, "strength": 0.8, "seed": seed + k}
                       for k, (m, _, p) in enumerate(MODELS)]}


def _naive_chain(env: BenchEnv, image_b64: str, seed: int) -> str:
    from bench.naive import img2img

    for k, (_, ckpt, prompt) in enumerate(MODELS):
        image_b64 = img2img.apply_async((image_b64, str(env.models[ckpt]), prompt, 0.8, 7.5, STEPS, seed + k)).get(
            timeout=600)
    return image_b64


def run(env: BenchEnv, n: int = DEFAULT_N) -> dict:
    from bench.naive import app as naive_app

    client = env.client()
    data = png_bytes(bench_image())
    ref = client.storage.put_input(data, "png")
    image_b64 = base64.b64encode(data).decode()
    naive_app.conf.broker_url = naive_app.conf.result_backend = env.redis_url
    easel_w = env.worker("sd15")
    hostname = f"bench-naive-chain-{os.getpid()}@{os.uname().nodename}"
    naive_w = Worker("naive", {**env.env, "BENCH_NAIVE_REDIS_URL": env.redis_url}, env.logdir, hostname=hostname,
                     argv=[sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "-Q", "bench-naive",
                           "-c", "1", "-l", "WARNING", "-n", hostname],
                     ready=lambda: bool(naive_app.control.ping(destination=[hostname], timeout=0.5))).start()
    watcher = EventWatcher(env.redis_url)
    times: dict[str, list[float]] = {"latent": [], "decode": [], "naive": []}
    last: dict[str, str] = {}
    try:
        for handoff in ("auto", "image"):  # warm-up
            watcher.wait(submit_all(client, [chain_job(ref, 90_000, handoff)]))
        _naive_chain(env, image_b64, 90_000)
        orders = [("latent", "decode", "naive"), ("naive", "decode", "latent"), ("decode", "naive", "latent")]
        for i in range(n):
            for side in orders[i % len(orders)]:
                t0 = time.perf_counter()
                if side == "naive":
                    _naive_chain(env, image_b64, i * 10)
                    times[side].append(time.perf_counter() - t0)
                else:
                    ids = submit_all(client, [chain_job(ref, i * 10, "auto" if side == "latent" else "image")])
                    last[side] = ids[0]
                    done = watcher.wait(ids)
                    assert all(s == "succeeded" for _, s in done.values()), done
                    times[side].append(max(t for t, _ in done.values()) - t0)
            log(f"chain {i + 1}/{n}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        assert [s.handoff_in for s in client.result(last["latent"]).stages] == ["image", "latent", "latent"]
        assert [s.handoff_in for s in client.result(last["decode"]).stages] == ["image", "image", "image"]
    finally:
        watcher.close()
        easel_w.stop()
        naive_w.stop()
    # Median of per-round ratios: each round runs the three back to back, so a burst of
    # outside load spoils one round, not the figure.
    total = {k: sum(v) for k, v in times.items()}
    rounds = range(len(times["latent"]))
    vs_decode = statistics.median(times["decode"][i] / times["latent"][i] for i in rounds)
    vs_naive = statistics.median(times["naive"][i] / times["latent"][i] for i in rounds)
    out = {"chain_latent_vs_decode": f"{vs_decode:.2f}", "chain_vs_naive": f"{vs_naive:.2f}"}
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {"seconds": total, "n": n, "steps": STEPS}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="chains per variant")


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n)
