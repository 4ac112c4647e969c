"""Which device and dtype this process runs on (the launcher pins one GPU per process)."""
from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on a GPU and fp32 on the CPU (half precision on CPU is slow and lossy)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def cpu_threads(device: torch.device, requested: int | None) -> int:
    """torch's intra-op CPU threads for a worker on ``device`` (``Settings.torch_threads``).

    On a GPU the CPU-side tensor work of a pipeline call is small (one image's pre- and
    postprocessing), and each parallel region waits for its slowest thread: with a thread
    per core, any core busy with something else (the finisher's PNG encode and uploads,
    valkey or SeaweedFS on the same host, the worker of the next GPU) stalls the call that
    the launching thread is waiting on (``python -m bench threads`` shows it). One thread is
    what torchrun gives each process by default for the same reason.
    """
    if requested:
        return requested
    return 1 if device.type == "cuda" else torch.get_num_threads()
