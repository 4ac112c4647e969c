"""Step caching (DeepCache) on a tiny SD checkpoint, through the registry and the runner."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from easel.shared.registry import Registry
from easel.shared.schema import Stage
from easel.shared.settings import Settings
from easel.worker.pipelines import PipelineCache
from easel.worker.quality import ssim
from easel.worker.runner import Carrier, run_stage

# Interval 3 on tiny-sd15 measured 0.9985-0.9996 (20 steps, 256 px); well under 1 - SSIM of
# unrelated images, above what a wrong cache (stale or another job's features) gives.
SSIM_MIN = 0.98
STEPS = 12


def _model(model_root, step_cache=None, source="tiny-sd15"):
    opts = {} if step_cache is None else {"step_cache": step_cache}
    reg = Registry.model_validate({"models": {"m": {"source": source, "family": "f", "latent_space": "sd1-vae",
                                                    "kind": "sd", "optimizations": opts}}})
    return PipelineCache(reg, Settings(model_root=model_root), "f", device=torch.device("cpu")).get("m")


def _input(side=128) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((side // 4, side // 4, 3)) * 255).astype(np.uint8)).resize((side, side))


def _run(model, seeds=(1,), strength=0.8, steps=STEPS):
    stages = [Stage(model="m", prompt=f"a red fox {s}", steps=steps, seed=s, strength=strength) for s in seeds]
    out, _ = run_stage(model, stages, Carrier(images=[_input()] * len(seeds)), n=1, want_latent=False,
                       on_step=lambda step, total: True)
    return out.images


class PassCounter:
    """Counts the passes in which the UNet's mid block really computed (its first resnet ran)."""

    def __init__(self, unet):
        self.n = 0
        unet.mid_block.resnets[0].register_forward_hook(self._hit)

    def _hit(self, *_):
        self.n += 1


@pytest.fixture(scope="module")
def plain(model_root):
    return _model(model_root)


def test_interval_one_is_exactly_the_uncached_output(model_root, plain):
    cached = _model(model_root, {"interval": 1})
    for a, b in zip(_run(plain, (1, 2)), _run(cached, (1, 2)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_interval_three_skips_deep_passes_and_stays_close(model_root, plain):
    cached = _model(model_root, {"interval": 3, "branch": 0})
    full, part = PassCounter(plain.pipes["img2img"].unet), PassCounter(cached.pipes["img2img"].unet)
    ref, out = _run(plain, (1, 2)), _run(cached, (1, 2))
    steps = int(STEPS * 0.8)
    assert full.n == steps and part.n == -(-steps // 3)  # one full pass in three
    assert not np.array_equal(np.asarray(ref[0]), np.asarray(out[0]))  # the cache did change the result
    score = ssim(ref, out)
    assert SSIM_MIN < score < 1.0, score


def test_each_call_starts_with_a_full_pass(model_root, plain):
    """A new job never reuses the last job's features, whatever the strength or batch size:
    the pass count restarts with every call (the scheduler's set_timesteps)."""
    cached = _model(model_root, {"interval": 3})
    counter = PassCounter(cached.pipes["img2img"].unet)
    _run(cached, (1, 2), strength=0.9)
    first = counter.n
    alone = _run(_model(model_root, {"interval": 3}), (7,), strength=0.5)
    after = _run(cached, (7,), strength=0.5)  # same job, after another call on the same UNet
    assert np.array_equal(np.asarray(alone[0]), np.asarray(after[0]))
    assert counter.n - first == -(-int(STEPS * 0.5) // 3)


def test_wider_unet_and_branch_one(model_root):
    """A three-block UNet caches at branch 1 (only its outermost two block pairs recompute)."""
    plain = _model(model_root, source="tiny-sd15-wide")
    cached = _model(model_root, {"interval": 2, "branch": 1}, source="tiny-sd15-wide")
    assert SSIM_MIN < ssim(_run(plain, steps=6), _run(cached, steps=6)) < 1.0
    with pytest.raises(ValueError, match="branch 2 out of range"):
        _model(model_root, {"interval": 2, "branch": 2}, source="tiny-sd15-wide")


def test_step_cache_and_compile_exclude_each_other():
    with pytest.raises(ValueError, match="step_cache and compile_unet"):
        Registry.model_validate({"models": {"m": {"source": "x", "family": "f", "latent_space": "l",
                                                  "profile": "throughput", "optimizations": {"step_cache": {}}}}})
