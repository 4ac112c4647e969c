"""Size buckets, padding and the adaptive batch size; batched and padded calls give each job
the image it gets alone (SD 1.5 and the SDXL refiner, on tiny fp32 checkpoints)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from easel.shared.jobstore import Claim, JobStore
from easel.shared.plan import plan_job
from easel.shared.registry import Registry
from easel.shared.schema import JobSpec, Stage
from easel.shared.settings import Settings
from easel.shared.storage import Storage
from easel.worker.adaptive import CallTimes, FlushPolicy, resolve_batch_size, target_size
from easel.worker.batching import batch_key, group_jobs, padded_images
from easel.worker.context import WorkerContext
from easel.worker.engine import Job
from easel.worker.pipelines import PipelineCache
from easel.worker.policy import Delivery
from easel.worker.runner import Carrier, run_stage

BUCKETS = [1, 2, 4, 8]
MODELS = {
    "sd": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae", "kind": "sd"},
    "sd-compiled": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae", "kind": "sd",
                    "optimizations": {"compile_unet": True}},
    "sd-throughput": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae", "kind": "sd",
                      "profile": "throughput"},
    "refiner": {"source": "tiny-sdxl-refiner", "family": "f", "latent_space": "sdxl-vae", "kind": "sdxl-refiner"},
    "kandinsky-compiled": {"source": "tiny-kandinsky22-decoder", "prior": "tiny-kandinsky22-prior", "family": "f",
                           "latent_space": "kandinsky-movq", "kind": "kandinsky22",
                           "optimizations": {"compile_unet": True}},
}
REGISTRY = Registry.model_validate({"models": MODELS})


# -- the adaptive batch size (pure) ------------------------------------------------------------
def test_auto_batch_size_is_the_largest_bucket_on_a_gpu_and_off_on_the_cpu():
    assert resolve_batch_size("auto", BUCKETS, "cuda") == 8
    assert resolve_batch_size("auto", BUCKETS, "cpu") == 1
    assert resolve_batch_size(3, BUCKETS, "cpu") == 3  # a hand-set size is kept
    assert Settings().batch_size == "auto"


def test_target_size_fills_the_largest_bucket_without_a_latency_target():
    assert target_size(BUCKETS, 8, {}, None) == 8
    assert target_size(BUCKETS, 4, {8: 0.1}, None) == 4  # never above the cap
    assert target_size(BUCKETS, 6, {}, None) == 6  # a hand-set cap between buckets


def test_target_size_under_a_latency_target_grows_a_bucket_at_a_time_and_stops_where_it_no_longer_fits():
    assert target_size(BUCKETS, 8, {}, 0.2) == 1  # nothing measured: start small
    assert target_size(BUCKETS, 8, {1: 0.1}, 0.2) == 2  # 1 fits: try 2
    assert target_size(BUCKETS, 8, {1: 0.1, 2: 0.15}, 0.2) == 4
    assert target_size(BUCKETS, 8, {1: 0.1, 2: 0.15, 4: 0.3}, 0.2) == 2  # 4 was measured too slow
    assert target_size(BUCKETS, 8, {1: 0.1, 2: 0.15, 4: 0.3, 8: 0.1}, 0.2) == 2  # no skipping past a slow bucket
    assert target_size(BUCKETS, 8, {1: 0.1, 2: 0.12, 4: 0.15, 8: 0.19}, 0.2) == 8
    assert target_size(BUCKETS, 8, {1: 0.5}, 0.2) == 1  # even one job is over: it still runs, alone


def test_call_times_are_an_ewma_per_size_and_drive_the_flush():
    times = CallTimes(weight=0.5)
    times.observe(1, 0.1)
    times.observe(2, 0.4)
    times.observe(2, 0.2)
    assert times.snapshot() == pytest.approx({1: 0.1, 2: 0.3})
    policy = FlushPolicy(BUCKETS, 8, latency_target_s=0.25, times=times)
    assert policy.target() == 1  # 2 costs 0.3 s on average: over the target
    assert policy.flush_now(1)  # a lone job runs at once
    times.observe(2, 0.1)  # 2 got faster (0.2 s): the target grows past it, to try 4
    assert policy.target() == 4
    assert not policy.flush_now(3) and policy.flush_now(4)
    deep = FlushPolicy(BUCKETS, 8, times=times)
    assert not deep.flush_now(7) and deep.flush_now(8)  # no target: wait for the largest bucket (or a quiet queue)


def test_bucket_settings_are_validated():
    assert Settings(batch_buckets=[8, 1, 4, 4]).batch_buckets == [1, 4, 8]
    for bad in ([2, 4], [1, 0], [1, 65]):
        with pytest.raises(ValueError):
            Settings(batch_buckets=bad)


# -- buckets and groups --------------------------------------------------------------------------
def test_only_a_compiled_model_of_a_batching_kind_is_padded_to_a_bucket():
    sd, compiled = REGISTRY.get("sd"), REGISTRY.get("sd-compiled")
    assert [padded_images(sd, BUCKETS, i, "img2img") for i in (1, 3, 5)] == [1, 3, 5]  # eager: the exact size
    assert [padded_images(compiled, BUCKETS, i, "img2img") for i in (1, 2, 3, 5, 6, 8, 9)] == [1, 2, 4, 8, 8, 8, 9]
    assert padded_images(compiled, [1, 2, 4, 6, 8], 3, "controlnet_img2img") == 3  # runs one job: never padded
    assert padded_images(REGISTRY.get("kandinsky-compiled"), [2, 4], 1, "img2img") == 1  # runs alone


def test_a_size_not_called_for_a_while_is_measured_again():
    """A slow call (a long job) must not keep a bucket over the target for good: once the size
    has not been called for ``stale_s`` it counts as unmeasured, so the policy tries it, and
    its next call starts a fresh mean."""
    now = [0.0]
    times = CallTimes(weight=0.5, stale_s=60, clock=lambda: now[0])
    times.observe(1, 0.1)
    times.observe(2, 9.0)  # one slow call
    policy = FlushPolicy(BUCKETS, 8, latency_target_s=0.5, times=times)
    assert policy.target() == 1
    now[0] = 59.0
    times.observe(1, 0.1)
    assert policy.target() == 1
    now[0] = 61.0
    assert times.snapshot() == {1: 0.1} and policy.target() == 2  # 2 is tried again
    times.observe(2, 0.3)
    assert times.snapshot() == {1: 0.1, 2: 0.3}  # not blended with the stale 9 s
    times.clear()
    assert times.snapshot() == {}


def test_a_settled_size_stays_while_the_smaller_ones_go_unmeasured():
    """A deep queue settles at a bucket and stops calling the smaller ones: their times go
    stale, which must not send the size back to 1 every minute. Only the size above, over
    the target, is tried again once it is stale."""
    now = [0.0]
    times = CallTimes(stale_s=60, clock=lambda: now[0])
    for size, seconds in ((1, 0.1), (2, 0.2), (4, 0.4), (8, 0.9)):
        times.observe(size, seconds)
    policy = FlushPolicy(BUCKETS, 8, latency_target_s=0.5, times=times)
    assert policy.target() == 4
    now[0] = 59.0
    times.observe(4, 0.4)
    now[0] = 90.0  # 1, 2 and 8 are stale, 4 is not
    assert policy.target() == 8  # 8 is tried once ...
    times.observe(8, 0.9)
    assert policy.target() == 4  # ... and the size stays at 4
    now[0] = 200.0  # everything stale: start over from the smallest
    assert policy.target() == 1


def _ctx() -> WorkerContext:
    s = Settings(redis_url="redis://127.0.0.1:1/0", batch_buckets=BUCKETS, batch_size=8)  # nothing here connects
    return WorkerContext(settings=s, registry=REGISTRY, store=JobStore.from_settings(s), storage=Storage(s),
                         cache=PipelineCache(REGISTRY, s, "f", device=torch.device("cpu")), family="f", hostname="h")


def _job(k: int, model: str, num_images: int = 1) -> Job:
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"}, "num_images": num_images,
                                   "stages": [{"model": model, "prompt": f"p{k}", "seed": k, "steps": 3}]})
    return Job(Delivery(f"j{k}", 0), Claim("run", spec, plan_job(spec, REGISTRY)))


def test_a_group_is_split_into_calls_of_the_batch_size_and_a_compiled_models_largest_bucket():
    ctx = _ctx()
    assert [len(g) for g in group_jobs(ctx, [_job(k, "sd-compiled") for k in range(11)])] == [8, 3]
    assert [len(g) for g in group_jobs(ctx, [_job(k, "sd-compiled", 2) for k in range(5)])] == [4, 1]
    # Eager: calls of the batch size, which a flush can pass with retries that came due.
    assert [len(g) for g in group_jobs(ctx, [_job(k, "sd") for k in range(11)])] == [8, 3]


def test_a_job_whose_worker_died_running_it_runs_alone():
    """If it kills the process again, only its own crash count nears the poison limit."""
    ctx = _ctx()
    fresh, crashed = _job(0, "sd"), _job(1, "sd")
    crashed.claim = dataclasses.replace(crashed.claim, crashed=1)
    assert batch_key(ctx, fresh) is not None and batch_key(ctx, crashed) is None
    assert [[j.job_id for j in g] for g in group_jobs(ctx, [fresh, crashed, _job(2, "sd")])] == [["j0", "j2"], ["j1"]]


def test_sdxl_refiner_jobs_batch():
    ctx = _ctx()
    jobs = [_job(k, "refiner") for k in range(3)]
    assert batch_key(ctx, jobs[0]) is not None
    assert [[j.job_id for j in g] for g in group_jobs(ctx, jobs)] == [["j0", "j1", "j2"]]


# -- batched and padded calls against each job alone (fp32 on the CPU) --------------------------
def _loaded(model_root, name: str):
    cache = PipelineCache(REGISTRY, Settings(model_root=model_root), "f", device=torch.device("cpu"))
    return cache.get(name)


def _input(k: int) -> Image.Image:
    rng = np.random.default_rng(k)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _run(model, stages: list[Stage], n: int, pad_to: int | None = None) -> list[np.ndarray]:
    carrier = Carrier(images=[_input(k) for k, _ in enumerate(stages) for _ in range(n)])
    out, _ = run_stage(model, stages, carrier, n=n, want_latent=False, on_step=lambda s, t: True, pad_to=pad_to)
    return [np.asarray(im).astype(int) for im in out.images]


def _stages(model: str) -> list[Stage]:
    return [Stage(model=model, prompt=f"a fox number {k}", negative_prompt="blurry" if k == 1 else None,
                  steps=3, strength=0.7, seed=10 + k) for k in range(3)]


def _assert_like_alone(model, stages: list[Stage], n: int) -> None:
    """Batched, padded by whole jobs, and (with several images a job) padded by single images."""
    alone = [img for k, st in enumerate(stages) for img in _run_alone(model, st, k, n)]
    assert not np.array_equal(alone[0], alone[n])  # the jobs' images differ: a mix-up would show
    real = len(stages) * n
    calls = [("batched", None)] + [(f"padded to {size}", size) for size in sorted({real + n, real + 1})]
    for name, got in ((name, _run(model, stages, n, pad_to=size)) for name, size in calls):
        assert len(got) == len(alone), name  # the padding's images were dropped
        for k, (a, b) in enumerate(zip(alone, got)):
            diff = np.abs(a - b).max()
            assert diff <= 2, f"{name} image {k} differs from its job run alone by up to {diff}/255"


def _run_alone(model, stage: Stage, k: int, n: int) -> list[np.ndarray]:
    carrier = Carrier(images=[_input(k)] * n)
    out, _ = run_stage(model, [stage], carrier, n=n, want_latent=False, on_step=lambda s, t: True)
    return [np.asarray(im).astype(int) for im in out.images]


def test_sd15_batched_and_padded_calls_give_each_job_its_image_alone(model_root):
    _assert_like_alone(_loaded(model_root, "sd"), _stages("sd"), n=1)


def test_sd15_padding_with_several_images_per_job(model_root):
    """Two jobs of three images: padded to 9 (a whole job) and to 7 (one image, where each
    image becomes a row of its own)."""
    _assert_like_alone(_loaded(model_root, "sd"), _stages("sd")[:2], n=3)


def test_sdxl_refiner_batched_and_padded_calls_give_each_job_its_image_alone(model_root):
    """diffusers #4297: a batched refiner call once got ``add_time_ids`` for one image only,
    which broke every image but the first; per-image generators (VAE encode and noise), the
    stacked pooled embeddings and the aesthetic-score time ids must all follow the batch."""
    _assert_like_alone(_loaded(model_root, "refiner"), _stages("refiner"), n=1)


@pytest.mark.slow
def test_the_throughput_profile_batched_at_any_bucket_gives_each_job_its_image_alone(model_root, tmp_path,
                                                                                    monkeypatch):
    """Compiled (UNet and VAE, channels_last, fused QKV) for a worker that batches: one UNet
    graph serves every batch size (its batch dimension traced as a symbol from the first
    call) and the VAE decoder two (batch 1 is a graph of its own), and each job gets the
    image it gets alone."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()  # graphs an earlier test compiled for another instance of these modules would serve
    settings = Settings(model_root=model_root, batch_size=8, batch_buckets=BUCKETS)
    model = PipelineCache(REGISTRY, settings, "f", device=torch.device("cpu")).get("sd-throughput")
    counters.clear()
    _assert_like_alone(model, _stages("sd-throughput"), n=1)  # calls of 1, 3 and 4 images
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_a_padded_call_is_timed_at_its_padded_size(model_root):
    from easel.worker.adaptive import CALL_TIMES

    model = _loaded(model_root, "sd")
    before = CALL_TIMES.snapshot().get(8)
    _run(model, _stages("sd")[:3], 1, pad_to=8)
    assert CALL_TIMES.snapshot().get(8) not in (None, before)
    before = CALL_TIMES.snapshot().get(1)
    _run(model, _stages("sd")[:1], 3, pad_to=4)  # one job of 3 images fills the 4 bucket: a call of 1 job
    assert CALL_TIMES.snapshot().get(1) not in (None, before)


def test_a_shape_that_ran_out_of_memory_is_held_to_half_its_padded_size_for_a_while():
    """After a call of n images (padded to a bucket) ran out of memory, calls of its shape hold
    at most half the padded size, always fewer than n (a split makes progress, whatever the
    buckets), for HOLD_S; a later failure lowers it further, never raises it."""
    from easel.worker.fits import CallFits

    now = [0.0]
    fits = CallFits(hold_s=600, clock=lambda: now[0])
    assert fits.most("a") is None
    assert fits.ran_out("a", images=5, padded=8) == 4  # 5 jobs padded to 8: calls of 4
    assert fits.ran_out("b", images=2, padded=8) == 1  # buckets [1, 8]: half of 8 would not split 2
    assert fits.ran_out("a", images=8) == 4 and fits.ran_out("a", images=3, padded=4) == 2
    assert fits.most("a") == 2 and fits.ran_out("a", images=8) == 2  # never raised again by a larger call
    now[0] = 599.0
    assert fits.most("a") == 2
    now[0] = 601.0
    assert fits.most("a") is None and fits.most("b") is None  # memory comes back: the full batch again


def test_the_input_cache_counts_the_memory_pillow_holds():
    """Pillow keeps an RGB pixel in 4 bytes: a 1 MiB cache holds four 256 px RGB images, not five."""
    from easel.worker.input_cache import InputCache

    cache = InputCache(1, "easel")
    for k in range(6):
        cache.get(f"s3://easel/inputs/{k:064x}.png", lambda: Image.new("RGB", (256, 256)))
    assert len(cache._lru) == 4 and cache._lru.currsize == 4 * 256 * 256 * 4


def test_the_input_cache_keeps_only_its_own_buckets_content_addressed_inputs():
    """Another bucket's ``inputs/<sha256>`` key may be overwritten by its owner: read each time."""
    from easel.worker.input_cache import InputCache

    cache, loads = InputCache(1, "easel"), []

    def load():
        loads.append(1)
        return Image.new("RGB", (8, 8))

    for ref in [f"s3://easel/inputs/{7:064x}.png", f"s3://theirs/inputs/{7:064x}.png"] * 2:
        cache.get(ref, load)
    assert len(loads) == 3 and cache.hits == 1


def test_a_failed_batchs_call_is_let_go_before_its_jobs_run_alone(monkeypatch):
    """A batch that fails (out of GPU memory, say) re-runs its jobs one by one; the failed
    call's tensors, held by the error's traceback, must be gone by then, or each job alone
    runs short of the memory they hold."""
    import weakref

    from easel.worker import engine

    held, alive_when_alone = [], []

    class Activations:  # stands for the failed call's tensors
        pass

    def run_stages(ctx, jobs):
        if len(jobs) > 1:
            activations = Activations()
            held.append(weakref.ref(activations))
            raise RuntimeError("out of memory in the batched call")
        alive_when_alone.append(held[0]() is not None)
        raise ValueError("each job alone: stops here")

    monkeypatch.setattr(engine, "run_stages", run_stages)
    monkeypatch.setattr(engine, "settle_error", lambda ctx, app, d, exc: type(exc).__name__)
    monkeypatch.setattr(engine, "_ended", lambda ctx, d, outcome, outcomes, job=None: outcomes.__setitem__(d, outcome))
    monkeypatch.setattr(engine.CrashCounts, "_set", lambda self, jobs, started: None)  # no Redis here
    outcomes: dict = {}
    jobs, ctx = [_job(k, "sd") for k in range(3)], _ctx()
    engine.run_group(ctx, None, jobs, outcomes, engine.CrashCounts(ctx, [jobs], outcomes))
    assert alive_when_alone == [False, False, False]
    assert sorted(outcomes.values()) == ["ValueError"] * 3


def test_a_calls_shape_is_the_size_it_runs_at():
    """Out-of-memory holds are per shape: a stage resized to 256 px is not the shape of a
    64 px input run at 64 px, and latents of two sizes are two shapes."""
    from easel.worker.engine import call_shape

    def job(carrier: Carrier, **stage) -> Job:
        spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                       "stages": [{"model": "sd", "prompt": "p", "seed": 1, **stage}]})
        return dataclasses.replace(Job(Delivery("j", 0), Claim("run", spec, plan_job(spec, REGISTRY))),
                                   carrier=carrier)

    small = Carrier(images=[Image.new("RGB", (64, 64))])
    assert call_shape(job(small))[2] == (64, 64)
    assert call_shape(job(small, width=256, height=256))[2] == (256, 256)
    shapes = {call_shape(job(Carrier(latents=torch.zeros(1, 4, side, side)))) for side in (8, 16)}
    assert len(shapes) == 2
