"""``python -m bench threads``: why a GPU worker runs torch's CPU ops on one thread.

A pipeline call on a GPU still does some tensor work on the CPU: diffusers' image
processor turns the input PIL image into a normalised tensor and the output back into a
PIL image. torch runs such ops on its intra-op pool (a thread per core by default), and a
parallel region ends only when its slowest thread does: when any core is busy with other
work (the finisher encoding and uploading the previous job's PNG, valkey or SeaweedFS on
the same host, another GPU's worker), the region waits for the OS to schedule that thread,
and the GPU waits with it. Hence ``Settings.torch_threads`` (``worker.device.cpu_threads``):
one thread on a GPU unless set.

Measured in one process, on whatever CPU runs it: the pre- and postprocessing of one
``--px`` image (``VaeImageProcessor``) at torch's default thread count and at one thread,
with the other cores quiet and with one thread encoding PNGs beside it (as the finisher
does; Pillow's encoder releases the GIL, so it takes a core, not the interpreter).
Headlines: ``threads_cpu_ops_ms_{default,one}_{quiet,busy}`` (p50) and ``..._p90``,
``threads_busy_slowdown_default`` (busy / quiet p50 at the default) and
``threads_one_vs_default_busy`` (default / one-thread p50 with the busy thread: above 1,
one thread is the faster choice when the cores are shared).
"""
from __future__ import annotations

import argparse
import io
import threading
import time

from bench.common import bench_image, headline, log, pct

NEEDS_S3 = False
NEEDS_MODELS = False


def _busy_png(img, stop: threading.Event) -> None:
    while not stop.is_set():
        img.save(io.BytesIO(), "PNG", compress_level=1)


def run(px: int, reps: int) -> dict:
    import torch
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    img = bench_image(px)
    out = torch.rand(1, 3, px, px, dtype=torch.float16) * 2 - 1  # a decoded output as the VAE gives it

    def cpu_ops() -> None:
        proc.preprocess([img])
        proc.postprocess(out, output_type="pil")

    default = torch.get_num_threads()
    res: dict[str, list[float]] = {}
    for label, threads in (("default", default), ("one", 1)):
        torch.set_num_threads(threads)
        for load in ("quiet", "busy"):
            stop = threading.Event()
            th = threading.Thread(target=_busy_png, args=(img.copy(), stop), daemon=True) if load == "busy" else None
            if th:
                th.start()
            try:
                for _ in range(3):
                    cpu_ops()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    cpu_ops()
                    times.append(time.perf_counter() - t0)
            finally:
                stop.set()
                if th:
                    th.join()
            res[f"{label}_{load}"] = [t * 1000 for t in times]
    torch.set_num_threads(default)
    log(f"torch default threads {default}; {px} px; {reps} reps each")
    lines: dict[str, str] = {}
    for k, v in res.items():
        lines[f"threads_cpu_ops_ms_{k}"] = f"{pct(v, 50):.2f}"
        lines[f"threads_cpu_ops_ms_{k}_p90"] = f"{pct(v, 90):.2f}"
    lines["threads_busy_slowdown_default"] = f"{pct(res['default_busy'], 50) / pct(res['default_quiet'], 50):.2f}"
    lines["threads_one_vs_default_busy"] = f"{pct(res['default_busy'], 50) / pct(res['one_busy'], 50):.2f}"
    for k, v in lines.items():
        headline(k, v)
    return {"headline": lines, "details": {"default_threads": default, "px": px, "ms": res}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--reps", type=int, default=40)


def main(env, args) -> dict:
    return run(args.px, args.reps)
