"""Stage time limits.

A stage's time limit fits its work, then its measured pace:

- Before its steps are timed, the allowance comes from a cost model: ``base +
  per_mpx_step x steps x SD-equivalent megapixels x images``, where the megapixels are the
  latent area the UNet denoises (``worker.runner.denoised_area``) times 64, so the setting
  keeps its meaning for SD 1.5 (a 512 px image is 0.26) and fits the upscalers, whose
  latents are far larger than their input image's /8.
- Once its first steps are timed (``BASELINE_STEPS``), the stage may take ``slack`` times
  what they project (prologue twice, for the decode after the loop, plus every step at
  their pace), if that is more: a healthy stage is never killed by the cost model's guess,
  while a stage whose steps become far slower than its own first ones (a stall, a runaway)
  runs out of allowance.
- ``cap_s`` bounds every stage, however healthy.

The step callback enforces the limit cooperatively (the stage fails with a reason at the
next denoising step). A stage stuck where no callback runs (a hung kernel, a deadlock) is
caught by the watchdog thread: it records the failure and ends the process, and the
launcher starts a fresh one; the redelivered message then finds the job terminal.
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


BASELINE_STEPS = 3  # step intervals timed before the pace is known


def cost_limit_s(base: float, per_mpx_step: float, steps: int, denoised_area: float, images: int) -> float:
    """The cost model's allowance: ``denoised_area`` latent pixels per image and step."""
    return base + per_mpx_step * steps * (denoised_area * 64 / 1e6) * images


class StageBudget:
    """How long one stage may run: the cost model's allowance until its pace is measured."""

    def __init__(self, cost_s: float, cap_s: float, slack: float, started: float):
        self.cost_s, self.cap_s, self.slack, self.started = cost_s, cap_s, slack, started
        self.allowed_s = min(cost_s, cap_s)
        self.pace_s: float | None = None  # seconds per step, from the first steps
        self.projected_s: float | None = None  # the whole stage at that pace
        self._marks: list[float] = []

    @property
    def deadline(self) -> float:
        return self.started + self.allowed_s

    def step(self, now: float, total: int) -> bool:
        """Record a step's end; True when this step fixed the allowance from the pace."""
        if self.pace_s is not None:
            return False
        self._marks.append(now)
        if len(self._marks) < min(BASELINE_STEPS + 1, max(2, total)):
            return False
        gaps = sorted(b - a for a, b in zip(self._marks, self._marks[1:]))
        self.pace_s = gaps[len(gaps) // 2]
        prologue = self._marks[0] - self.started
        self.projected_s = 2 * prologue + total * self.pace_s
        self.allowed_s = min(self.cap_s, max(self.cost_s, self.slack * self.projected_s))
        return True

    def exceeded(self, what: str, step: int, total: int, now: float) -> str:
        """The reason a stage that ran past its allowance fails with."""
        ran = now - self.started
        if self.pace_s is None:
            basis = "the cost model's allowance for its size and steps"
        else:
            basis = (f"expected {self.pace_s:.3f}s per step from its first steps, about {self.projected_s:.1f}s "
                     f"in all; measured {ran:.1f}s so far")
        if self.allowed_s >= self.cap_s:
            hint = "EASEL_STAGE_TIMEOUT_MAX_S raises the cap"
        else:
            hint = ("EASEL_STAGE_TIMEOUT_BASE_S / EASEL_STAGE_TIMEOUT_PER_MPX_STEP_S (or the model's "
                    "timeout_per_mpx_step_s) raise the allowance")
        return f"{what} exceeded its time limit of {self.allowed_s:.1f}s at step {step}/{total} ({basis}); {hint}"


def _nothing(reason: str) -> None:
    """What a disarmed watchdog holds instead of a callback (and its jobs)."""


class Watchdog:
    def __init__(self, exit_code: int = STUCK_EXIT_CODE):
        self._exit_code = exit_code
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._reason = ""
        self._on_fire: Callable[[str], None] = _nothing
        threading.Thread(target=self._run, name="easel-watchdog", daemon=True).start()

    def arm(self, seconds: float, reason: str, on_fire: Callable[[str], None]) -> None:
        """Fire ``on_fire(reason)`` and end the process unless disarmed within ``seconds``."""
        with self._lock:
            self._deadline, self._reason, self._on_fire = time.monotonic() + seconds, reason, on_fire

    def disarm(self) -> None:
        with self._lock:  # the callback holds the call's jobs (their latents): let them go
            self._deadline, self._on_fire = None, _nothing

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
