"""``easel worker``: one process per GPU, each pinned with CUDA_VISIBLE_DEVICES.

The launcher only supervises: it turns SIGTERM and SIGINT into one SIGTERM for each child (a
warm shutdown: each finishes its running stage) and restarts a child that dies, so a crash
costs one stage's redelivery and never the pool; once a stop is asked, nothing restarts.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from easel.shared.children import die_with_parent_hook
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
    """One process per GPU (``gpus``, else those detected; the CPU where none), restarted
    when it dies (with ``RestartBackoff``) until a stop is asked; returns the exit code."""
    gpus = gpus if gpus is not None else detect_gpus()
    slots = list(dict.fromkeys(gpus)) or ["cpu"]  # a GPU named twice still gets one process
    host = os.uname().nodename
    procs: dict[str, subprocess.Popen] = {}
    started: dict[str, float] = {}
    restart_at: dict[str, float] = {}  # slots waiting out their backoff
    stopping = False

    def spawn(slot: str) -> None:
        env = {**os.environ, **(extra_env or {})}
        env["CUDA_VISIBLE_DEVICES"] = "" if slot == "cpu" else slot
        # A session of its own: a terminal's Ctrl-C reaches the launcher alone, which asks each
        # child once (a second SIGINT makes Celery shut down cold). SIGTERM should the
        # launcher die, even by SIGKILL: a launcher started again finds its GPUs free.
        procs[slot] = subprocess.Popen(child_command(family, f"{family}-{slot}@{host}"), env=env,
                                       start_new_session=True, preexec_fn=die_with_parent_hook())
        started[slot] = time.monotonic()
        if stopping:  # the stop came while it started: it is asked too
            procs[slot].send_signal(signal.SIGTERM)

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        restart_at.clear()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # a warm shutdown: each finishes its running stage

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in slots:
        spawn(slot)
    backoff = RestartBackoff()
    while True:
        for slot, p in list(procs.items()):
            rc = p.poll()
            if rc is None or slot in restart_at:
                continue
            if rc == DRAINED_EXIT:
                log.warning("easel worker: %s on %s drained; not restarted", family, slot)
                del procs[slot]
            elif not stopping and restart:
                delay = backoff.delay(slot, time.monotonic() - started[slot])
                log.warning("easel worker: %s on %s exited with %s; restarting in %.0fs", family, slot, rc, delay,
                            extra={"family": family, "slot": slot, "exit_code": rc})
                restart_at[slot] = time.monotonic() + delay
        for slot, at in list(restart_at.items()):
            # (a stop clears restart_at from its signal handler, at any point of this loop)
            if time.monotonic() >= at and restart_at.pop(slot, None) is not None and not stopping:
                spawn(slot)
        if not restart_at and all(p.poll() is not None for p in procs.values()):
            return exit_code([p.returncode for p in procs.values()], stopping)
        time.sleep(0.5)


def exit_code(returncodes: list[int], stopped: bool) -> int:
    """The launcher's exit code: the worst of its processes', a death by a signal counted as
    a shell shows it (128 + the signal), and one by the SIGTERM of a stop asked as a clean end
    (a process still loading its model has no handler for it yet)."""
    codes = [0 if rc == -signal.SIGTERM and stopped else 128 - rc if rc < 0 else rc for rc in returncodes]
    return max(codes, default=0)
