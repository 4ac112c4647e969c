"""A simulated GPU: the registry kind ``sim``, whose pipeline sleeps a set time per step.

It is for benchmarks and scale tests of the control plane (Redis, Celery, S3, the engine):
everything around the pipeline call is the real path, claims, progress, cancel, the finish
and the S3 writes included, while the "GPU" costs no CPU. Its images are small, flat and
seed-coloured, so outputs stay cheap to encode and still differ per job.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from easel.shared.registry import ModelSpec


@dataclass
class SimOutput:
    images: list[Image.Image]


class SimPipeline:
    """Takes a diffusers pipeline's arguments and honours ``callback_on_step_end`` (progress,
    cancel and time limits work as on a real pipeline)."""

    def __init__(self, step_s: float, size: tuple[int, int] = (64, 64)):
        self.step_s = step_s
        self.size = size
        self.num_timesteps = 0

    def set_progress_bar_config(self, **_kw) -> None:
        pass

    def to(self, _device) -> "SimPipeline":
        return self

    def __call__(self, *, prompt: list[str], num_inference_steps: int, generator: list, image=None,
                 strength: float = 1.0, width: int | None = None, height: int | None = None,
                 callback_on_step_end=None, output_type: str = "pil", **_unused) -> SimOutput:
        steps = max(1, int(num_inference_steps * strength)) if image is not None else num_inference_steps
        self.num_timesteps = steps
        for step in range(steps):
            time.sleep(self.step_s)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, step, {})
        size = (width, height) if width and height else (image[0].size if image else self.size)
        return SimOutput(images=[_flat(size, g.initial_seed()) for g in generator])


def _flat(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.new("RGB", size, (seed % 251, (seed // 251) % 241, (seed // 60491) % 239))


def load_sim(spec: ModelSpec, source: str, kw: dict, settings) -> tuple[dict, dict]:
    pipe = SimPipeline(spec.sim_step_s)
    return {"img2img": pipe, "text2img": pipe}, {}
