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
