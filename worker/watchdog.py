"""Stage time limits.

The step callback enforces the limit cooperatively (the stage fails with a reason at the
next denoising step). A stage stuck where no callback runs (a hung kernel, a deadlock) is
caught by this thread: it records the failure and ends the process, and the launcher
starts a fresh one; the redelivered message then finds the job terminal and is a no-op.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger("easel.worker.watchdog")

STUCK_EXIT_CODE = 75


class StageTimeout(Exception):
    """A stage ran past its time limit."""


def stage_limit_s(base: float, per_mpx_step: float, steps: int, width: int, height: int, n: int) -> float:
    return base + per_mpx_step * steps * (width * height / 1e6) * n


class Watchdog:
    def __init__(self, exit_code: int = STUCK_EXIT_CODE):
        self._exit_code = exit_code
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._reason = ""
        self._on_fire: Callable[[str], None] = lambda reason: None
        threading.Thread(target=self._run, name="easel-watchdog", daemon=True).start()

    def arm(self, seconds: float, reason: str, on_fire: Callable[[str], None]) -> None:
        """Fire ``on_fire(reason)`` and end the process unless disarmed within ``seconds``."""
        with self._lock:
            self._deadline, self._reason, self._on_fire = time.monotonic() + seconds, reason, on_fire

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                fire = self._deadline is not None and time.monotonic() > self._deadline
                reason, on_fire = self._reason, self._on_fire
            if fire:
                log.error("stage stuck: %s; exiting so the launcher starts a fresh process", reason)
                try:
                    on_fire(reason)
                finally:
                    os._exit(self._exit_code)
