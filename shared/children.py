"""Child processes that do not outlive whoever started them (servers of ``easel dev`` and
the demo, the GPU processes of ``easel worker``)."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has a child get SIGTERM when its parent dies (Linux; None elsewhere)."""
    return _die_with_parent if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the process that started it dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
