"""The guide's memory/speed switches, set per model in the registry, reach the pipeline."""
from __future__ import annotations

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
    assert type(compiled.unet).__name__ == "OptimizedModule"  # torch.compile wrapper (compiled lazily on first call)
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
        st = c.wait(c.submit(img2img_job(str(input_png), steps=3)), timeout=120)
    finally:
        w.stop()
    assert st.state.value == "succeeded", st.error
    assert len(st.outputs) == 1 and c.storage.get(st.outputs[0]).startswith(b"\x89PNG")
