"""The guide's memory/speed switches, set per model in the registry, reach the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from easel.shared.registry import Registry
from easel.shared.schema import Stage
from easel.shared.settings import Settings
from easel.worker.pipelines import PipelineCache
from easel.worker.runner import Carrier, run_stage


def _cache(model_root, tmp_path, **model) -> PipelineCache:
    reg = Registry.model_validate({"models": {"m": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae",
                                                    "kind": "sd", **model}}})
    return PipelineCache(reg, Settings(model_root=model_root), "f", device=torch.device("cpu"))


def test_dtype_tiling_slicing_and_classic_attention_apply_and_run(model_root, tmp_path):
    cache = _cache(model_root, tmp_path, dtype="bfloat16", optimizations={
        "sdpa": False, "vae_tiling": True, "vae_slicing": True, "attention_slicing": True})
    cache.warm()
    loaded = cache.get("m")
    pipe = loaded.pipes["img2img"]
    assert pipe.unet.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    # pipelines made from it with from_pipe (text2img) share its modules and keep its dtype
    assert {p.unet.dtype for p in loaded.pipes.values()} == {torch.bfloat16} and len(loaded.pipes) > 1
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    procs = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert procs == {"SlicedAttnProcessor"}  # attention slicing replaced the SDPA default
    out, timings = run_stage(loaded, [Stage(model="m", prompt="x", steps=2, seed=1)],
                             Carrier(images=[Image.new("RGB", (64, 64), (9, 99, 199))]), n=1, want_latent=False,
                             on_step=lambda s, t: True)
    assert out.images[0].size == (64, 64) and timings["denoise"] > 0


def test_sdpa_default_and_compile_flag(model_root, tmp_path):
    plain = _cache(model_root, tmp_path).get("m").pipes["img2img"]
    assert {type(p).__name__ for p in plain.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    compiled = _cache(model_root, tmp_path, optimizations={"compile_unet": True}).get("m").pipes["img2img"]
    assert hasattr(compiled.unet.forward.__wrapped__, "_torchdynamo_orig_callable")  # compiled lazily, on first call
    # cpu_offload is a GPU-only switch: on the CPU the pipeline simply stays on the device.
    off = _cache(model_root, tmp_path, optimizations={"cpu_offload": True}).get("m").pipes["img2img"]
    assert off.device.type == "cpu"


def test_cpu_threads_one_on_a_gpu_unless_set_and_torch_default_on_the_cpu():
    from easel.worker.device import cpu_threads

    assert cpu_threads(torch.device("cuda"), None) == 1
    assert cpu_threads(torch.device("cuda"), 3) == 3
    assert cpu_threads(torch.device("cpu"), None) == torch.get_num_threads()
    assert cpu_threads(torch.device("cpu"), 2) == 2


def test_worker_runs_with_the_torch_threads_setting(easel_env, input_png, tmp_path):
    """EASEL_TORCH_THREADS reaches the worker process (its presence record says what torch
    runs with) and a job completes with it."""
    import json

    from easel.producer.client import EaselClient
    from tests.conftest import WorkerProc, img2img_job

    env = {**easel_env, "EASEL_TORCH_THREADS": "1", "EASEL_QUEUE_PREFIX": "threads"}
    w = WorkerProc("sd15", env, tmp_path).start()
    try:
        c = EaselClient(Settings(queue_prefix="threads"))
        beat = json.loads(c.store.r.get(f"threads:worker:{w.hostname}"))
        assert beat["torch_threads"] == 1
        assert beat["peak_memory_bytes"] > 2**20  # the process's peak resident set on the CPU
        st = c.wait(c.submit(img2img_job(str(input_png), steps=3)), timeout=120)
    finally:
        w.stop()
    assert st.state.value == "succeeded", st.error
    assert len(st.outputs) == 1 and c.storage.get(st.outputs[0]).startswith(b"\x89PNG")


def test_throughput_profile_reaches_the_pipeline_and_explicit_fields_win(model_root, tmp_path):
    loaded = _cache(model_root, tmp_path, profile="throughput").get("m")
    pipes = list(loaded.pipes.values())
    pipe = loaded.pipes["img2img"]
    assert hasattr(pipe.unet.forward.__wrapped__, "_torchdynamo_orig_callable")  # compiled lazily, on the first call
    assert len({id(p.unet) for p in pipes}) == 1  # one compiled UNet for img2img, text2img, controlnet
    unet = pipe.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert all(p.fusing_unet and p.fusing_vae for p in pipes)
    assert hasattr(pipe.vae.decode.__wrapped__, "_torchdynamo_orig_callable")  # compile_vae
    # a field the model sets itself wins over its profile
    own = _cache(model_root, tmp_path, profile="throughput",
                 optimizations={"channels_last": False, "fuse_qkv": False}).get("m").pipes["img2img"]
    assert not own.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "FusedAttnProcessor2_0" not in {type(p).__name__ for p in own.unet.attn_processors.values()}


def _img2img(loaded, side=64):
    import numpy as np

    rng = np.random.default_rng(3)
    img = Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))
    out, _ = run_stage(loaded, [Stage(model="m", prompt="a fox", steps=4, seed=7, strength=1.0)],
                       Carrier(images=[img]), n=1, want_latent=False, on_step=lambda s, t: True)
    return out.images


@pytest.mark.slow
def test_compiled_channels_last_fused_pipeline_matches_the_plain_one(model_root, tmp_path, monkeypatch):
    """The throughput profile is an optimization, not a different model: same image within
    float rounding (fused matmuls and NHWC kernels sum in another order)."""
    from easel.worker.quality import ssim

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    from torch._dynamo.utils import counters

    plain = _img2img(_cache(model_root, tmp_path).get("m"))
    fast = _cache(model_root, tmp_path, profile="throughput").get("m")
    counters.clear()
    out = _img2img(fast)
    diff = np.abs(np.asarray(out[0], dtype=np.int16) - np.asarray(plain[0], dtype=np.int16))
    assert diff.max() <= 2, diff.max()  # uint8 levels
    assert ssim(plain, out) > 0.999
    graphs = counters["stats"]["unique_graphs"]
    # text2img's latents are NCHW noise where img2img's came NHWC from the channels_last VAE:
    # at the same size they run the same graphs, compiled by the img2img call.
    run_stage(fast, [Stage(task="text2img", model="m", prompt="a fox", steps=4, seed=7, width=64, height=64)],
              Carrier(), n=1, want_latent=False, on_step=lambda s, t: True)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


@pytest.mark.parametrize("limit,tiles", [(64 * 64 - 1, True), (64 * 64, False)])
def test_vae_tiles_above_the_pixel_threshold_only_for_that_call(model_root, tmp_path, limit, tiles):
    cache = PipelineCache(Registry.model_validate({"models": {"m": {"source": "tiny-sd15", "family": "f",
                                                                    "latent_space": "sd1-vae"}}}),
                          Settings(model_root=model_root, vae_tiling_above_px=limit), "f",
                          device=torch.device("cpu"))
    loaded = cache.get("m")
    vae = loaded.pipes["img2img"].vae
    seen: list[bool] = []
    run_stage(loaded, [Stage(model="m", prompt="x", steps=2, seed=1)], Carrier(images=[Image.new("RGB", (64, 64))]),
              n=1, want_latent=False, on_step=lambda s, t: seen.append(vae.use_tiling) or True)
    assert seen and set(seen) == {tiles}
    assert not vae.use_tiling  # back to untiled for the next call


def _tiny_sd(model_root, limit: int = 0):
    cache = PipelineCache(Registry.model_validate({"models": {"m": {"source": "tiny-sd15", "family": "f",
                                                                    "latent_space": "sd1-vae"}}}),
                          Settings(model_root=model_root, vae_tiling_above_px=limit), "f",
                          device=torch.device("cpu"))
    return cache.get("m")


def test_a_kept_intermediates_decode_tiles_above_the_threshold_too(model_root):
    """A latent hand-off decoded for ``keep_intermediates`` is as large as the call's output:
    it tiles under the same threshold, or a large one runs the device out of memory."""
    from easel.worker.runner import decode_latents

    loaded = _tiny_sd(model_root, limit=64 * 64 - 1)
    vae = loaded.pipes["img2img"].vae
    seen: list[bool] = []
    decode = vae.decode
    vae.decode = lambda *a, **kw: seen.append(vae.use_tiling) or decode(*a, **kw)
    try:
        images = decode_latents(loaded, torch.randn(1, 4, 8, 8))  # 64 x 64 px
    finally:
        del vae.decode
    assert seen == [True] and images[0].size == (64, 64) and not vae.use_tiling


def test_a_failed_call_leaves_the_vae_in_its_dtype(model_root):
    """Pipelines that decode an fp16 VAE in fp32 (SDXL's force_upcast) move it and move it
    back with no ``finally``: a call that fails between the two must not leave the shared
    VAE in the other dtype for the model's next calls. Here a step hook moves it and fails."""
    loaded = _tiny_sd(model_root)
    vae = loaded.pipes["img2img"].vae

    def moved_then_failed(step, total):
        vae.to(torch.float64)
        raise RuntimeError("CUDA out of memory (as a decode might)")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_stage(loaded, [Stage(model="m", prompt="x", steps=2, seed=1)],
                  Carrier(images=[Image.new("RGB", (64, 64))]), n=1, want_latent=False, on_step=moved_then_failed)
    assert vae.dtype == torch.float32
    run_stage(loaded, [Stage(model="m", prompt="x", steps=2, seed=1)], Carrier(images=[Image.new("RGB", (64, 64))]),
              n=1, want_latent=False, on_step=lambda s, t: True)  # and the next call runs


def test_peak_memory_gauge_is_positive():
    from easel.worker.metrics import WorkerMetrics

    m = WorkerMetrics("f", "h", "cpu")
    assert m.registry.get_sample_value("easel_worker_peak_memory_bytes", {"family": "f", "device": "cpu"}) > 2**20


@pytest.mark.parametrize("name", ["sd15", "sdxl-refiner", "kandinsky-2-2", "sd-x4-upscaler", "sd-x2-latent-upscaler"])
def test_a_warm_up_call_runs_the_unet_at_its_native_size(model_root, name):
    """What a compiled worker's warm-up compiles is what a job at the model's native size
    runs: each kind's UNet sees its configured sample size (uncompiled here: the call path
    is the same, only the compile is left out)."""
    from easel.shared.registry import load_registry
    from easel.worker.pipelines import WARM_TASKS, warm_up

    registry = load_registry()
    spec = registry.get(name)
    loaded = PipelineCache(registry, Settings(model_root=model_root), spec.family, device=torch.device("cpu")).get(name)
    unet = loaded.pipes[WARM_TASKS[spec.kind]].unet
    seen: list[tuple[int, ...]] = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple((args or (kwargs["sample"],))[0].shape)),
                                   with_kwargs=True)
    assert warm_up(loaded, [], [1]) > 0
    side = unet.config.sample_size
    assert seen and all(shape[-2:] == (side, side) for shape in seen), (seen, side)


def test_a_unet_config_without_a_sample_size_leaves_the_warm_up_to_the_settings(model_root):
    """A converted checkpoint may leave ``sample_size`` out (null): the worker still starts,
    and warms at the sizes it is given."""
    from easel.shared.registry import load_registry
    from easel.worker.pipelines import warm_up

    loaded = PipelineCache(load_registry(), Settings(model_root=model_root), "upscalers",
                           device=torch.device("cpu")).get("sd-x2-latent-upscaler")
    loaded.pipes["latent_upscale"].unet.register_to_config(sample_size=None)
    assert warm_up(loaded, [], [1]) == 0.0
    assert warm_up(loaded, [32], [1]) > 0


@pytest.mark.slow
def test_a_compiled_kandinsky_unet_takes_its_latents_by_keyword(model_root, tmp_path, monkeypatch):
    """Kandinsky 2.2's pipelines call the UNet with ``sample=``: a compiled UNet takes the
    latents either way, and the call gives the uncompiled call's image."""
    from easel.shared.registry import load_registry

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    spec = load_registry().get("kandinsky-2-2").model_dump(exclude={"name"})
    outputs = []
    for compiled in (False, True):
        reg = Registry.model_validate({"models": {"k": {**spec, "optimizations": {"compile_unet": compiled}}}})
        loaded = PipelineCache(reg, Settings(model_root=model_root), spec["family"], device=torch.device("cpu")).get("k")
        out, _ = run_stage(loaded, [Stage(model="k", prompt="a fox", steps=3, seed=7, strength=1.0)],
                           Carrier(images=[Image.new("RGB", (64, 64), (90, 40, 200))]), n=1, want_latent=False,
                           on_step=lambda s, t: True)
        outputs.append(np.asarray(out.images[0], dtype=np.int16))
    assert np.abs(outputs[0] - outputs[1]).max() <= 2
