"""``easel dev``: the embedded valkey and SeaweedFS kept running for a development loop.

``easel demo`` starts its servers in a temp folder and stops them when its jobs are done.
``easel dev`` starts the same servers (producer/embedded.py) on fixed ports with their data in
a folder that outlives the run (valkey's append-only file, SeaweedFS's volumes, filer and
master), creates the bucket, writes the tiny checkpoints once, prints the ``export`` lines
that point ``easel worker``, ``easel submit`` and ``easel api`` at them (also written to an
env file to ``source``), and stays up until Ctrl-C or SIGTERM, which stop both servers.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

DEFAULT_DATA = Path(".easel") / "dev"
REDIS_PORT = 6390  # next to Redis's 6379 (docker-compose.yml), not on it
S3_PORT = 8390  # SeaweedFS also takes the next three ports (master, volume, filer) and each +10000 (gRPC)
ENV_HEADER = "# written by `easel dev`; removed when it stops\n"


class DevError(RuntimeError):
    """Something the user can fix (a taken port, a data folder in use); no traceback."""


def _lock(data: Path):
    """Hold ``DATA/.lock`` for the life of this process: two servers on one folder would
    corrupt it. Returns the open file (closing it, or dying, releases the lock)."""
    import fcntl

    fh = open(data / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise DevError(f"another `easel dev` (pid {pid}) is using {data}; stop it first, or give another --data") from None
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def tiny_checkpoints(root: Path) -> tuple[list[str], float]:
    """Write the tiny checkpoints of every family of the bundled registry under ``root`` unless
    they are there; returns the names written and the seconds it took. What was made is noted in
    ROOT/.easel-dev.json, so a later run imports no torch unless the registry changed."""
    from easel.shared.registry import TINY, load_registry

    registry = load_registry(TINY)
    sources = sorted({src for spec in registry.models.values()
                      for src in [spec.source, *spec.controlnets.values(), spec.prior] if src})
    note = root / ".easel-dev.json"

    def complete(name: str) -> bool:  # worker.tiny.complete, without importing torch
        folder = root / name
        return (folder / "model_index.json").exists() or (
            (folder / "config.json").exists() and any(folder.glob("*.safetensors")))

    from easel.producer.extras import missing

    if missing("worker"):
        return [], 0.0  # a client-only install runs no worker here: no checkpoints needed
    try:
        known = json.loads(note.read_text())
        if known["sources"] == sources and all(complete(n) for n in known["tiny"]):
            return [], 0.0
    except (OSError, ValueError, KeyError, TypeError):
        pass
    t0 = time.perf_counter()
    from easel.worker.tiny import checkpoints_for, make_tiny_checkpoints

    names = checkpoints_for(registry, {spec.family for spec in registry.models.values()})
    missing = [n for n in names if not complete(n)]
    make_tiny_checkpoints(root, missing)
    note.write_text(json.dumps({"sources": sources, "tiny": names}))
    return missing, time.perf_counter() - t0


def api_token(data: Path) -> str:
    """A bearer token for ``easel api``, made once per data folder and kept in DATA/api-token."""
    path = data / "api-token"
    if path.exists():
        return path.read_text().strip()
    token = f"easel_dev_{secrets.token_urlsafe(24)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def dev_env(services, bucket: str, model_root: Path, token: str) -> dict[str, str]:
    """What a shell needs to use the servers: connections, the tiny registry and its checkpoints,
    an API key (admin: it sees the jobs ``easel submit`` makes too), and, for a webhook receiver
    on this machine, a webhook secret (kept with the token) and private URLs allowed."""
    sha256 = hashlib.sha256(token.encode()).hexdigest()  # what the API keeps of a key (producer/api/security.py)
    webhook_key = base64.b64encode(hashlib.sha256(f"webhook:{token}".encode()).digest()).decode()
    return {**services.env(bucket), "EASEL_MODELS": "tiny", "EASEL_MODEL_ROOT": str(model_root),
            "EASEL_API_KEYS": json.dumps([{"name": "dev", "sha256": sha256, "admin": True}],
                                         separators=(",", ":")),
            "EASEL_WEBHOOK_SECRET": f"whsec_{webhook_key}", "EASEL_ALLOW_PRIVATE_URLS": "true"}


def export_lines(env: dict[str, str]) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def run_dev(data: Path = DEFAULT_DATA, redis_port: int = REDIS_PORT, s3_port: int = S3_PORT,
            env_file: Path | None = None, bucket: str = "easel", console: Console | None = None) -> int:
    console = console or Console()
    err = Console(stderr=True)
    data = Path(data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env_file = Path(env_file).resolve() if env_file else data / "env"
    try:
        lock, svc = _claim(data, redis_port, s3_port)
    except DevError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    stopping = False

    def on_signal(signum, frame):
        if stopping:  # a second Ctrl-C while SeaweedFS takes its time: kill both now
            svc.redis.kill()
            svc.s3.kill()
            return
        raise _Stop(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = 0
    try:
        _start(svc, data, bucket, env_file, console)
        rc = _watch(svc, err)
    except _Stop:
        pass
    except Exception as e:  # a server that does not start: its log tail is in the message
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        rc = 1
    finally:
        stopping = True
        _stop(svc, env_file, console)
        for s, h in old.items():
            signal.signal(s, h)
        lock.close()
    return rc


class _Stop(Exception):
    """Ctrl-C or SIGTERM: leave the loop and stop the servers."""


def _claim(data: Path, redis_port: int, s3_port: int):
    """The data folder's lock and the (not yet started) servers, or a DevError saying why not."""
    from easel.producer.embedded import EmbeddedServices, PortInUse

    if not 0 < redis_port < 65536 or not 0 < s3_port <= 65535 - 10003:
        raise DevError(f"ports out of range: --redis-port {redis_port}, --s3-port {s3_port} (SeaweedFS also "
                       f"takes the S3 port + 1..3 and each + 10000, so at most {65535 - 10003})")
    lock = _lock(data)
    # die_with_parent: even a SIGKILLed `easel dev` leaves no server behind.
    svc = EmbeddedServices(data, redis_port=redis_port, s3_port=s3_port, die_with_parent=True)
    try:
        svc.check_ports()
    except PortInUse as e:
        lock.close()
        raise DevError(f"{e}: is another `easel dev` or a Redis/S3 server running there? Choose other ports "
                       f"with --redis-port / --s3-port (SeaweedFS takes the S3 port, the next three, "
                       f"and each of those + 10000)") from None
    return lock, svc


def _start(svc, data: Path, bucket: str, env_file: Path, console: Console) -> None:
    """Start both servers, make the bucket and checkpoints, then publish the environment."""
    t0 = time.perf_counter()
    svc.redis.start()
    svc.s3.start()
    token = api_token(data)
    env = dev_env(svc, bucket, data / "models", token)
    _create_bucket(env)
    say = functools.partial(console.print, highlight=False, soft_wrap=True)
    say(f"valkey     {svc.redis.url}  (pid {svc.redis.proc.pid}, append-only file in {svc.redis.workdir})")
    say(f"SeaweedFS  {svc.s3.url}  (pid {svc.s3.proc.pid}, bucket {bucket}, data in {svc.s3.workdir})")
    say(f"ready in {time.perf_counter() - t0:.1f}s; data kept in {data} across runs (delete it to start afresh)")
    made, secs = tiny_checkpoints(data / "models")
    if made:
        say(f"tiny checkpoints: wrote {len(made)} under {data / 'models'} ({secs:.1f}s)")
    lines = export_lines(env)
    tmp = env_file.with_name(env_file.name + ".tmp")
    tmp.write_text(ENV_HEADER + "\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(env_file)  # appears whole, and only once everything is up
    say(f"\nIn another shell: [bold]source {shlex.quote(str(env_file))}[/bold], or paste:\n")
    for line in lines:
        say(line, markup=False)
    say("\nthen:\n"
        "  easel worker --family sd15\n"
        "  easel submit -i photo.png -p \"a red fox\" --steps 4 --wait\n"
        "  easel api        # clients send: Authorization: Bearer " + token + "\n"
        "\nCtrl-C stops both servers.", markup=False)


def _watch(svc, err: Console) -> int:
    """Until a signal (``_Stop``); 1 if a server exits by itself."""
    while True:
        time.sleep(0.5)
        for s in (svc.redis, svc.s3):
            if not s.alive():
                tail = s.log.read_text(errors="replace")[-2000:] if s.log and s.log.exists() else ""
                err.print(f"[red]error:[/red] {s.name} exited with {s.proc.returncode} (log {s.log}):\n"
                          + escape(tail), highlight=False, soft_wrap=True)
                return 1


def _stop(svc, env_file: Path, console: Console) -> None:
    with contextlib.suppress(OSError):
        if env_file.read_text().startswith(ENV_HEADER):  # ours: the servers it names are going away
            env_file.unlink()
    console.print("\nstopping (SeaweedFS takes ~15 s; Ctrl-C again to kill it now)", highlight=False)
    svc.stop()
    console.print("stopped", highlight=False)


def _create_bucket(env: dict[str, str]) -> None:
    from easel.shared.settings import Settings
    from easel.shared.storage import Storage

    Storage(Settings(**{k.removeprefix("EASEL_").lower(): v for k, v in env.items()
                        if k.startswith("EASEL_S3_")})).ensure_bucket()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_dev())
