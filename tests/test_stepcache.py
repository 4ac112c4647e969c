"""Step caching (DeepCache) on a tiny SD checkpoint, through the registry and the runner."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from easel.shared.registry import Registry, load_registry
from easel.shared.schema import Stage
from easel.shared.settings import Settings
from easel.worker.pipelines import PipelineCache
from easel.worker.quality import ssim
from easel.worker.runner import Carrier, call_key, first_compile, run_stage

# Interval 3 on tiny-sd15 measured 0.9985-0.9996 (20 steps, 256 px); well under 1 - SSIM of
# unrelated images, above what a wrong cache (stale or another job's features) gives.
SSIM_MIN = 0.98
STEPS = 12


def _model(model_root, step_cache=None, source="tiny-sd15", device="cpu", **more_opts):
    opts = more_opts if step_cache is None else {"step_cache": step_cache, **more_opts}
    reg = Registry.model_validate({"models": {"m": {"source": source, "family": "f", "latent_space": "sd1-vae",
                                                    "kind": "sd", "dtype": "float32", "optimizations": opts}}})
    return PipelineCache(reg, Settings(model_root=model_root), "f", device=torch.device(device)).get("m")


def _input(side=128) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((side // 4, side // 4, 3)) * 255).astype(np.uint8)).resize((side, side))


def _run(model, seeds=(1,), strength=0.8, steps=STEPS):
    stages = [Stage(model="m", prompt=f"a red fox {s}", steps=steps, seed=s, strength=strength) for s in seeds]
    out, _ = run_stage(model, stages, Carrier(images=[_input()] * len(seeds)), n=1, want_latent=False,
                       on_step=lambda step, total: True)
    return out.images


def levels(a: Image.Image, b: Image.Image) -> int:
    """The largest difference between two images, in uint8 levels."""
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


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


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_a_compiled_unet_skips_the_same_passes_with_two_graphs(model_root, tmp_path, monkeypatch, device):
    """compile_unet with step_cache: the eager cached UNet's images within float rounding
    (not the uncached ones), from two graphs, a full pass and a cached one, however many
    passes and calls: the pass count lives outside the compiled UNet. On a GPU the two
    graphs are CUDA graphs, and the kept features must survive the other's replays."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    plain = _model(model_root, device=device)
    eager = _model(model_root, {"interval": 3, "branch": 0}, device=device)
    compiled = _model(model_root, {"interval": 3, "branch": 0}, device=device, compile_unet=True)
    unet = compiled.pipes["img2img"].unet
    assert hasattr(unet.forward.__wrapped__, "_torchdynamo_orig_callable")
    counters.clear()
    _run(compiled, (1, 2), strength=1.0, steps=1)  # one pass, a full one: the cached pass's graph is not made
    stage = Stage(model="m", prompt="a red fox", steps=STEPS, seed=1, strength=0.8)
    key = call_key(compiled, stage, Carrier(images=[_input()] * 2), 2, want_latent=False)
    assert first_compile(compiled, key)  # the first call that reaches a cached pass gets the compile allowance
    ref, out = _run(eager, (1, 2)), _run(compiled, (1, 2))
    assert not first_compile(compiled, key)
    again = _run(compiled, (1, 2))  # a second call: no new graph, the same images
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    for a, b, c, d in zip(ref, out, again, _run(plain, (1, 2)), strict=True):
        assert levels(a, b) <= 2  # float rounding (uint8 levels)
        assert levels(d, b) >= 5  # the cache did skip passes: 10-12 levels from the uncached image
        assert np.array_equal(np.asarray(b), np.asarray(c))
    assert ssim(ref, out) > 0.999
    state = unet._easel_step_cache
    assert state.full_passes == 1 + 2 * -(-int(STEPS * 0.8) // 3)


# The other UNet kinds of the bundled registry, and the task each runs from an image.
UNET_KINDS = {"sdxl-refiner": "img2img", "kandinsky-2-2": "img2img", "sd-x4-upscaler": "upscale",
              "sd-x2-latent-upscaler": "latent_upscale"}


def _bundled(model_root, name: str, step_cache: dict | None):
    spec = load_registry().get(name).model_dump(exclude={"name"})
    spec["optimizations"] = {"step_cache": step_cache} if step_cache else {}
    reg = Registry.model_validate({"models": {name: spec}})
    return PipelineCache(reg, Settings(model_root=model_root), spec["family"], device=torch.device("cpu")).get(name)


@pytest.mark.parametrize("name", list(UNET_KINDS))
def test_every_unet_kind_counts_its_passes_by_its_scheduler(model_root, name):
    """Each pipeline steps its scheduler once per UNet pass: with interval 2 the deep blocks
    compute on every other pass, and the image stays near the uncached one (SSIM 0.997-0.999;
    0.78 for the tiny Kandinsky, whose random deep features move 10-80 % a step against 10-20 %
    in the others), far nearer than another seed's (0.05-0.08)."""
    def run(model, seed=3):
        stage = Stage(task=UNET_KINDS[name], model=name, prompt="a red fox", steps=6, seed=seed, strength=0.8)
        out, _ = run_stage(model, [stage], Carrier(images=[_input(64)]), n=1, want_latent=False,
                           on_step=lambda step, total: True)
        return out.images

    plain, cached = _bundled(model_root, name, None), _bundled(model_root, name, {"interval": 2})
    unet = cached.pipes[UNET_KINDS[name]].unet
    passes, deep = [], []
    unet.register_forward_pre_hook(lambda *_: passes.append(1))
    unet.down_blocks[-1].resnets[0].register_forward_hook(lambda *_: deep.append(1))  # the deepest block
    ref, out = run(plain), run(cached)
    assert unet._easel_step_cache.passes == len(passes) >= 3  # one scheduler step per UNet pass
    assert len(deep) == -(-len(passes) // 2)  # the deep blocks ran on every other pass
    assert levels(ref[0], out[0]) > 0  # the cache changed the result
    assert ssim(ref, out) > max(0.7, 5 * ssim(ref, run(plain, seed=4)))


def test_kept_features_stay_at_one_address_per_shape(model_root):
    """A cached pass reads the kept outputs where the last full pass left them, and with CUDA
    graphs a graph reads them at the address it was recorded with: each full pass copies
    into the same buffers, call after call, so no graph is recorded again."""
    cached = _model(model_root, {"interval": 3})
    state = cached.pipes["img2img"].unet._easel_step_cache
    addresses = []
    for seeds in ((1,), (2,), (3, 4), (5,)):
        _run(cached, seeds)
        addresses.append({k: v.data_ptr() for k, v in state.outputs.items() if isinstance(v, torch.Tensor)})
    assert addresses[0] and addresses[0] == addresses[1] == addresses[3]  # batch 1, call after call
    assert addresses[2].keys() == addresses[0].keys() and addresses[2] != addresses[0]  # batch 2: its own
