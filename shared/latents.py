"""Latents between families travel as safetensors blobs in storage, never through the broker."""
from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def dump_latents(latents: torch.Tensor, latent_space: str) -> bytes:
    t = latents.detach().to("cpu").contiguous()
    return st_save({"latents": t}, metadata={"latent_space": latent_space, "dtype": str(t.dtype).replace("torch.", ""),
                                             "shape": "x".join(map(str, t.shape))})


def load_latents(data: bytes, expected_space: str) -> torch.Tensor:
    from safetensors import safe_open  # noqa: F401  (metadata read below via header)
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    if meta.get("latent_space") != expected_space:
        raise ValueError(f"latent hand-off is in space {meta.get('latent_space')!r}, this stage needs {expected_space!r}")
    return st_load(data)["latents"]
