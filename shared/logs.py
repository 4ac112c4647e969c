"""Process-wide logging defaults shared by the CLI and the workers."""
from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Library chatter (progress bars, torchvision notices) drowns easel's own output."""
    for k, v in {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
