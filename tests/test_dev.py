"""`easel dev`: servers that outlive a run, used from other processes through the printed environment."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easel.producer.embedded import stop_process
from easel.shared.settings import Settings
from tests.conftest import ROOT, WorkerProc, cli, free_dev_ports, png_bytes

pytestmark = pytest.mark.slow


class Dev:
    """One `easel dev` subprocess: its output, its environment file, the servers it started."""

    def __init__(self, tmp: Path, data: Path, redis_port: int, s3_port: int, n: int):
        self.env_file = tmp / "dev.env"
        self.out, self.err = tmp / f"dev-{n}.out", tmp / f"dev-{n}.err"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("EASEL_")}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "easel.producer.cli", "dev", "--data", str(data), "--redis-port",
                 str(redis_port), "--s3-port", str(s3_port), "--env-file", str(self.env_file)],
                env=clean, cwd=tmp, stdout=out, stderr=err)

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_ready(self, timeout: float = 180) -> dict[str, str]:
        """The environment from the env file, which appears once both servers are up."""
        deadline = time.monotonic() + timeout
        while not self.env_file.exists():
            assert self.proc.poll() is None, f"easel dev exited {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"easel dev not ready:\n{self.output()}"
            time.sleep(0.2)
        env = {}
        for line in self.env_file.read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = shlex.split(value)[0]
        # The printed lines are the file's lines.
        assert all(f"export {k}=" in self.out.read_text() for k in env)
        self.server_pids = [int(pid) for pid in re.findall(r"\(pid (\d+),", self.out.read_text())]
        assert len(self.server_pids) == 2, self.output()
        return env

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(90)
        for pid in self.server_pids:  # both servers stopped with it, not left behind
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not self.env_file.exists()  # a stale file would point at servers that are gone
        return rc


def test_easel_dev_keeps_servers_up_for_a_worker_and_the_cli_and_keeps_their_data(tmp_path):
    data = tmp_path / "data"
    redis_port, s3_port = free_dev_ports()
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes((96, 64)))
    dev = Dev(tmp_path, data, redis_port, s3_port, 1)
    worker = None
    try:
        env = dev.wait_ready()
        assert env["EASEL_REDIS_URL"] == f"redis://127.0.0.1:{redis_port}/0"
        assert env["EASEL_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
        assert env["EASEL_MODELS"] == "tiny" and Path(env["EASEL_MODEL_ROOT"]) == data / "models"
        assert {"EASEL_S3_BUCKET", "EASEL_S3_ACCESS_KEY_ID", "EASEL_S3_SECRET_ACCESS_KEY", "EASEL_API_KEYS"} <= set(env)
        assert Settings(webhook_secret=env["EASEL_WEBHOOK_SECRET"]).webhook_secret  # webhooks work under dev

        # What the README says to do in another shell: a worker, then submit, wait and fetch.
        worker = WorkerProc("sd15", env, tmp_path).start()
        r = cli("submit", "-i", str(image), "-p", "a red fox", "--steps", "2", "--seed", "3", "--wait", env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        job_id = r.stdout.splitlines()[0].strip()
        r = cli("fetch", job_id, "--out", str(tmp_path / "first"), env=env)
        assert r.returncode == 0, r.stderr
        first = (tmp_path / "first" / job_id / "output" / "0.png").read_bytes()
        worker.stop()
        worker = None

        assert dev.stop(signal.SIGINT) == 0, dev.output()  # Ctrl-C

        # A second run on the same folder: the job's record (valkey) and its image (SeaweedFS) are there.
        dev = Dev(tmp_path, data, redis_port, s3_port, 2)
        assert dev.wait_ready() == env
        assert "tiny checkpoints: wrote" not in dev.output()  # made once, kept
        r = cli("status", job_id, env=env)
        assert r.returncode == 0 and '"state": "succeeded"' in r.stdout, r.stdout + r.stderr
        r = cli("fetch", job_id, "--out", str(tmp_path / "second"), env=env)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "second" / job_id / "output" / "0.png").read_bytes() == first

        # The folder is in use, and so are the ports: said plainly, nothing started.
        other_redis, other_s3 = free_dev_ports()
        busy = subprocess.run([sys.executable, "-m", "easel.producer.cli", "dev", "--data", str(data),
                               "--redis-port", str(other_redis), "--s3-port", str(other_s3)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert busy.returncode == 2 and "another `easel dev`" in busy.stderr, busy.stderr
        busy = subprocess.run([sys.executable, "-m", "easel.producer.cli", "dev", "--data", str(tmp_path / "other"),
                               "--redis-port", str(redis_port), "--s3-port", str(s3_port)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert busy.returncode == 2 and f"port {redis_port}" in busy.stderr and "already in use" in busy.stderr, \
            busy.stderr

        assert dev.stop(signal.SIGTERM) == 0, dev.output()
    finally:
        if worker is not None:
            worker.stop()
        stop_process(dev.proc, signal.SIGKILL)  # its servers get SIGTERM when it dies (die_with_parent)
