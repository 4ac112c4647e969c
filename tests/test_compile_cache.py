"""Warm restarts: a second compiled worker process loads what the first one compiled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

# One PipelineCache warm, as a GPU worker process starts (a batch size of 4 called at the
# buckets 1, 2 and 4), reporting dynamo's and inductor's own counters. Not 8: on the CPU the
# convolution backend changes at 16 images (the UNet's batch at 8 with guidance), which adds a
# graph a GPU does not have.
WARM = textwrap.dedent("""
    import json, logging, sys, torch
    from pathlib import Path
    from torch._dynamo.utils import counters
    from easel.shared.registry import Registry
    from easel.shared.settings import Settings
    from easel.worker.adaptive import CALL_TIMES
    from easel.worker.pipelines import PipelineCache

    logging.basicConfig()
    logging.getLogger("easel").setLevel(logging.INFO)

    reg = Registry.model_validate({"models": {"m": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae",
                                                    "optimizations": {"compile_unet": True}}}})
    cache = PipelineCache(reg, Settings(model_root=sys.argv[1], compile_cache_dir=sys.argv[2],
                                        compile_warm_sizes=[64], batch_size=4, batch_buckets=[1, 2, 4]),
                          "f", device=torch.device("cpu"))
    cache.warm()
    print(json.dumps({"compile_s": cache.models["m"].compile_s, "call_times": CALL_TIMES.snapshot(),
                      "call_sizes": cache.call_sizes(reg.get("m")), "graphs": counters["stats"]["unique_graphs"],
                      **counters["inductor"]}))
""")


# After a warm-up at 64 px: what a job at 96 px, a size not warmed, is allowed and teaches
# the batching policy, on its first call (which compiles) and its second.
FIRST_CALLS = textwrap.dedent("""
    import json, sys, time, torch
    from PIL import Image
    from easel.shared.registry import Registry
    from easel.shared.schema import Stage
    from easel.shared.settings import Settings
    from easel.worker.adaptive import CALL_TIMES
    from easel.worker.engine import stage_budget
    from easel.worker.pipelines import PipelineCache
    from easel.worker.runner import Carrier, run_stage

    reg = Registry.model_validate({"models": {"m": {"source": "tiny-sd15", "family": "f", "latent_space": "sd1-vae",
                                                    "optimizations": {"compile_unet": True}}}})
    settings = Settings(model_root=sys.argv[1], compile_cache_dir=sys.argv[2], compile_warm_sizes=[64])
    cache = PipelineCache(reg, settings, "f", device=torch.device("cpu"))
    cache.warm()
    model = cache.models["m"]
    stage = Stage(model="m", prompt="x", steps=3, strength=1.0, seed=0)
    carrier = lambda px: Carrier(images=[Image.new("RGB", (px, px), (9, 99, 199))])
    allowed = lambda px: stage_budget(settings, model, stage, carrier(px), 1).allowed_s
    out = {"warmed": allowed(64), "new": allowed(96), "calls": []}
    for _ in range(2):
        t0 = time.perf_counter()
        run_stage(model, [stage], carrier(96), n=1, want_latent=False, on_step=lambda step, total: True)
        out["calls"].append([time.perf_counter() - t0, CALL_TIMES.snapshot(), allowed(96)])
    print(json.dumps(out))
""")


def _warm(model_root: Path, folder: Path, log: list[str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", WARM, str(model_root), str(folder)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if log is not None:
        log.append(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_warm_loads_the_first_ones_compiled_graphs(model_root, tmp_path):
    folder = tmp_path / "compile-cache"
    logs: list[str] = []
    cold = _warm(model_root, folder, logs)
    saved = list(folder.glob("mega-cache-*.bin"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0 and "mega-cache-f-" in saved[0].name
    assert cold["call_times"] == {}  # the warm-up's compiling calls do not feed the batching policy
    # Every bucket's call (the UNet at 2 to 8 latents with guidance) runs one graph: the batch
    # dimension is a symbol from the first call, not after a second compile at the next bucket.
    assert cold["call_sizes"] == [1, 2, 4] and cold["graphs"] == 1, cold
    assert (folder / "inductor").is_dir()  # TORCHINDUCTOR_CACHE_DIR pointed into the folder
    warm = _warm(model_root, folder, logs)
    assert cold.get("fxgraph_cache_miss", 0) > 0 and cold.get("fxgraph_cache_hit", 0) == 0
    assert warm.get("fxgraph_cache_hit", 0) > 0 and warm.get("fxgraph_cache_miss", 0) == 0
    assert warm["compile_s"] < cold["compile_s"], (cold, warm)
    assert warm["graphs"] == 1, warm
    for log in logs:  # what an operator reads of it
        assert "compiled m in" in log and "1 graph(s) at call sizes [1, 2, 4]" in log, log[-2000:]
    print(f"compile warm-up: cold {cold['compile_s']:.1f}s, warm cache {warm['compile_s']:.1f}s")


@pytest.mark.slow
def test_an_unusable_cache_folder_costs_warm_restarts_not_the_worker(model_root, tmp_path):
    """A compile cache folder that cannot be made (here under a file; in a deployment a
    read-only or foreign-owned volume) is replaced by a temporary one with a warning: the
    worker compiles and starts; only a restart's warm cache is lost."""
    (tmp_path / "a-file").write_text("")
    log: list[str] = []
    warm = _warm(model_root, tmp_path / "a-file" / "compile-cache", log)
    assert warm["compile_s"] > 0
    assert "compile cache folder" in log[0] and "unusable" in log[0] and "EASEL_COMPILE_CACHE_DIR" in log[0], log[0]


@pytest.mark.slow
def test_a_call_that_compiles_on_a_job_is_given_the_time_and_not_taken_as_its_pace(model_root, tmp_path):
    """A compiled worker's job at a size its warm-up did not make compiles before its first
    step: its time limit adds EASEL_STAGE_COMPILE_ALLOWANCE_S (a compile can outlast the cost
    model's allowance, and the job failed, the watchdog restarting the worker), and the call
    does not feed the batching policy's call times. The next call at that size is a plain one."""
    out = subprocess.run([sys.executable, "-c", FIRST_CALLS, str(model_root), str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR",
                                                                               "TRITON_CACHE_DIR")})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    (compiling_s, times_after_first, allowed_after_first), (plain_s, times_after_second, allowed_after_second) = \
        got["calls"]
    assert got["new"] - allowed_after_first == pytest.approx(600.0)  # the default allowance, once
    assert allowed_after_first == allowed_after_second and got["warmed"] <= allowed_after_first
    assert compiling_s > 3 * plain_s, got  # it did compile: a call is no measure of the next
    assert times_after_first == {} and list(times_after_second) == ["1"], got  # JSON keys


def test_a_torn_save_left_by_a_killed_process_is_deleted_later(tmp_path):
    """A process killed while writing the cache leaves its temporary file (as large as the
    cache); the next save deletes one over an hour old, and leaves a younger one, which may
    be another process's write in progress."""
    import torch

    from easel.worker.compile_cache import artifacts_path, save_artifacts

    path = artifacts_path(tmp_path, torch.device("cpu"), "f")
    torn, writing = tmp_path / f".{path.name}.torn", tmp_path / f".{path.name}.writing"
    for tmp in (torn, writing):
        tmp.write_bytes(b"x" * 1000)
    os.utime(torn, (0, 0))
    save_artifacts(tmp_path, torch.device("cpu"), "f")
    assert not torn.exists() and writing.exists()
