"""Image similarity for judging approximate speed-ups (step caching) against exact output.

SSIM (structural similarity, Wang et al. 2004), as torchmetrics computes it: 1.0 for
identical images, lower as structure differs. Shared by the tests and the GPU benchmarks,
so a quality threshold means the same in both.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _tensor(images: list[Image.Image] | np.ndarray) -> torch.Tensor:
    """NCHW float in [0, 1] from PIL images or an NHWC array in [0, 1] (``output_type="np"``)."""
    if isinstance(images, np.ndarray):
        arr = images.astype(np.float32)
    else:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def ssim(a: list[Image.Image] | np.ndarray, b: list[Image.Image] | np.ndarray) -> float:
    """Mean SSIM of two equally sized image batches (the ``dev`` extra's torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _tensor(a), _tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return float(structural_similarity_index_measure(x, y, data_range=1.0))
