"""``easel demo``: the whole path on one machine, with nothing configured.

Starts an embedded valkey and SeaweedFS unless EASEL_REDIS_URL / EASEL_S3_ENDPOINT_URL are
set, writes tiny checkpoints if absent, starts one worker per family the jobs need,
submits an img2img job and a chain job, follows them, downloads the results, stops what
it started.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console


def demo_image(size: int) -> Image.Image:
    """A procedural input (gradient sky, sun, hills) so nothing is downloaded."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (40 + 120 * y // size, 80 + 100 * x // size, 200 - 120 * y // size)
    d = ImageDraw.Draw(img)
    d.ellipse([size * 0.6, size * 0.1, size * 0.85, size * 0.35], fill=(250, 220, 90))
    d.polygon([(0, size), (size * 0.3, size * 0.55), (size * 0.6, size), ], fill=(40, 120, 60))
    d.polygon([(size * 0.4, size), (size * 0.75, size * 0.6), (size, size)], fill=(30, 90, 50))
    return img


def demo_jobs(input_path: str, steps: int) -> dict[str, dict]:
    return {
        "img2img": {"input": {"image": input_path},
                    "stages": [{"task": "img2img", "model": "sd15", "steps": steps, "strength": 0.75, "seed": 42,
                                "guidance_scale": 7.5, "negative_prompt": "blurry, low quality",
                                "prompt": "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"}]},
        "chain": {"input": {"image": input_path}, "output": {"keep_intermediates": True},
                  "stages": [
                      {"model": "sd15", "prompt": "Astronaut in a jungle, detailed", "steps": steps, "seed": 1},
                      {"model": "comic-diffusion", "prompt": "Astronaut in a jungle, charliebo artstyle",
                       "steps": steps, "seed": 2},
                      {"model": "pixel-art", "prompt": "Astronaut in a jungle, pixelartstyle", "steps": steps,
                       "seed": 3}]},
    }


def run_demo(out: Path, steps: int = 10, size: int = 256, console: Console | None = None) -> int:
    console = console or Console()
    # SIGTERM (a timeout, a container stop) and SIGHUP (its terminal closed) unwind like
    # Ctrl-C: the servers and workers we started are stopped instead of being orphaned.
    # A signal ignored (SIGHUP under nohup) stays ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        env = _services(stack, console)
        os.environ.update(env)
        os.environ["EASEL_MODELS"] = "tiny"  # its jobs name the bundled tiny models, whatever registry the shell names
        from easel.shared.settings import get_settings

        get_settings.cache_clear()
        settings = get_settings()
        from easel.producer.client import EaselClient
        from easel.worker.tiny import checkpoints_for, make_tiny_checkpoints

        client = EaselClient(settings)
        families = sorted({client.registry.get(s["model"]).family
                           for job in demo_jobs("", steps).values() for s in job["stages"]})
        t0 = time.perf_counter()
        made = make_tiny_checkpoints(settings.model_root, checkpoints_for(client.registry, families))
        console.print(f"checkpoints: {len(made)} tiny models under {settings.model_root} "
                      f"({time.perf_counter() - t0:.1f}s)")
        logdir = Path(tempfile.mkdtemp(prefix="easel-demo-logs-"))
        t_start = time.perf_counter()
        # Logs for a person to read (a failing worker's tail is shown): text unless asked otherwise.
        env = {"EASEL_LOG_FORMAT": "text", **os.environ, "HF_HUB_OFFLINE": "1"}
        procs = {fam: stack.enter_context(_worker(fam, env, logdir / f"worker-{fam}.log")) for fam in families}
        console.print(f"workers: {', '.join(families)} starting (logs in {logdir})")
        if not _wait_ready(client, procs, logdir, console):
            return 1
        console.print(f"workers ready in {time.perf_counter() - t_start:.1f}s")

        input_path = out / "input.png"
        demo_image(size).save(input_path)
        from easel.producer.progress import follow

        ids = {name: client.submit(job) for name, job in demo_jobs(str(input_path), steps).items()}
        done = follow(client, list(ids.values()), label={j: n for n, j in ids.items()}, timeout=600, console=console)
        rc = 0
        for name, job_id in ids.items():
            st = done[job_id]
            if st.state.value != "succeeded":
                console.print(f"[red]{name} {job_id}: {st.state.value}: {st.error}[/red]")
                rc = 1
                continue
            paths = client.fetch(job_id, out)
            m = client.result(job_id)
            console.print(f"[green]{name}[/green] {job_id}: {len(m.stages)} stage(s), "
                          f"hand-offs {[s.handoff_in for s in m.stages]}, total {m.timings_s['total']:.2f}s", soft_wrap=True)
            for s in m.stages:
                console.print(f"  stage {s.index} {s.task} {s.model}: seed {s.seeds[0]}, "
                              + ", ".join(f"{k} {v:.3f}s" for k, v in s.timings_s.items()), soft_wrap=True)
            for p in paths:
                console.print(f"  {p}", soft_wrap=True, highlight=False)
        return rc


def _wait_ready(client, procs: dict, logdir: Path, console: Console, timeout: float = 300) -> bool:
    """Wait for each family's presence key; a worker that exits fails the demo with its log."""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for fam, proc in procs.items():
            if proc.poll() is not None:
                tail = (logdir / f"worker-{fam}.log").read_text(errors="replace")[-2000:]
                console.print(f"[red]worker {fam} exited with {proc.returncode}[/red]\n{tail}")
                return False
        ready = {w.get("family") for w in client.store.presences()}
        if set(procs) <= ready:
            return True
        time.sleep(0.1)
    console.print(f"[red]workers not ready after {timeout}s (logs in {logdir})[/red]")
    return False


def _services(stack: contextlib.ExitStack, console: Console) -> dict[str, str]:
    env = {}
    if not os.environ.get("EASEL_REDIS_URL") or not os.environ.get("EASEL_S3_ENDPOINT_URL"):
        from easel.producer.embedded import EmbeddedServices

        # die_with_parent: even a SIGKILLed demo leaves no server behind.
        svc = EmbeddedServices(appendonly=True, die_with_parent=True)
        if not os.environ.get("EASEL_REDIS_URL"):
            svc.redis.start()
            stack.callback(svc.redis.kill)
            env["EASEL_REDIS_URL"] = svc.redis.url
            console.print(f"redis: embedded valkey-server at {svc.redis.url}")
        if not os.environ.get("EASEL_S3_ENDPOINT_URL"):
            svc.s3.start()
            stack.callback(svc.stop)
            env.update({k: v for k, v in svc.env().items() if k != "EASEL_REDIS_URL"})
            console.print(f"s3: embedded SeaweedFS at {svc.s3.url}")
        else:
            stack.callback(svc._tmp.cleanup)
    return env


@contextlib.contextmanager
def _worker(family: str, env: dict, log: Path):
    from easel.shared.children import die_with_parent_hook

    # As the servers do, the worker gets SIGTERM when the demo dies, even by SIGKILL.
    preexec = die_with_parent_hook()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "easel.worker.process", "--family", family], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, preexec_fn=preexec)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
