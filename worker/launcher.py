"""``easel worker``: one process per GPU, each pinned with CUDA_VISIBLE_DEVICES.

The launcher only supervises: it forwards SIGTERM/SIGINT (a warm shutdown: each child
finishes its running stage) and restarts a child that dies, so a crash costs one stage's
redelivery and never the pool.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from easel.worker.feeding import DRAINED_EXIT

log = logging.getLogger("easel.worker.launcher")


def detect_gpus() -> list[str]:
    """The GPUs this launcher sees, each as its child's CUDA_VISIBLE_DEVICES: the entries of
    the launcher's own CUDA_VISIBLE_DEVICES where it has one (Slurm and shared hosts set it,
    and an ordinal there would name another physical GPU), else ordinals."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        return []
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


class RestartBackoff:
    """Delay before restarting a slot's process: 1 s doubling to 60 s while it keeps dying
    young, back to 1 s once a process has run ``healthy_s`` (a crash after a day of service
    is not a crash loop)."""

    def __init__(self, first_s: float = 1.0, max_s: float = 60.0, healthy_s: float = 120.0):
        self.first_s, self.max_s, self.healthy_s = first_s, max_s, healthy_s
        self._next: dict[str, float] = {}

    def delay(self, slot: str, ran_s: float) -> float:
        """The wait before restarting ``slot``, whose process ran ``ran_s`` before it died."""
        delay = self.first_s if ran_s >= self.healthy_s else self._next.get(slot, self.first_s)
        self._next[slot] = min(delay * 2, self.max_s)
        return delay


def child_command(family: str, hostname: str) -> list[str]:
    return [sys.executable, "-m", "easel.worker.process", "--family", family, "--hostname", hostname]


def run_workers(family: str, gpus: list[str] | None = None, restart: bool = True, extra_env: dict | None = None) -> int:
    gpus = gpus if gpus is not None else detect_gpus()
    slots = gpus or ["cpu"]
    host = os.uname().nodename
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def spawn(slot: str) -> subprocess.Popen:
        env = {**os.environ, **(extra_env or {})}
        env["CUDA_VISIBLE_DEVICES"] = "" if slot == "cpu" else slot
        return subprocess.Popen(child_command(family, f"{family}-{slot}@{host}"), env=env)

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started: dict[str, float] = {}
    for slot in slots:
        procs[slot], started[slot] = spawn(slot), time.monotonic()
    backoff = RestartBackoff()
    while True:
        alive = False
        for slot, p in list(procs.items()):
            rc = p.poll()
            if rc is None:
                alive = True
            elif rc == DRAINED_EXIT:
                log.warning("easel worker: %s on %s drained; not restarted", family, slot)
                del procs[slot]
            elif not stopping and restart:
                delay = backoff.delay(slot, time.monotonic() - started[slot])
                log.warning("easel worker: %s on %s exited with %s; restarting in %.0fs", family, slot, rc, delay,
                            extra={"family": family, "slot": slot, "exit_code": rc})
                time.sleep(delay)
                procs[slot], started[slot] = spawn(slot), time.monotonic()
                alive = True
        if not alive:
            return max(((p.returncode or 0) for p in procs.values()), default=0)
        time.sleep(0.5)
