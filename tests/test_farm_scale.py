"""A farm's worth of jobs through the real control plane: 2,000 two-stage chains through 8 sim
worker processes (two families, an image hand-off through S3 between them). Nothing may be
lost or run twice, and no hand-off may be left in the bucket."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import yaml

from tests.conftest import WorkerProc, png_bytes

JOBS = 2000
WORKERS_PER_FAMILY = 4


@pytest.fixture(scope="module")
def farm(easel_env, tmp_path_factory):
    """Sim workers for families sim-a and sim-b, on a registry of their own."""
    tmp = tmp_path_factory.mktemp("farm")
    registry = tmp / "models.yaml"
    sim = {"source": "sim", "latent_space": "none", "kind": "sim", "sim_step_s": 0.002}
    registry.write_text(yaml.safe_dump({"models": {"sim-a": {**sim, "family": "sim-a"},
                                                   "sim-b": {**sim, "family": "sim-b"}}}))
    env = {**easel_env, "EASEL_MODELS": str(registry)}
    workers = [WorkerProc(family, env, tmp).start(wait=False)
               for family in ("sim-a", "sim-b") for _ in range(WORKERS_PER_FAMILY)]
    for w in workers:
        w.wait_ready()
    yield registry
    for w in workers:
        w.stop()


@pytest.mark.slow
def test_two_thousand_chains_through_eight_workers_none_lost_or_doubled(farm, easel_env):
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    client = EaselClient(Settings(**{**{k[len("EASEL_"):].lower(): v for k, v in easel_env.items()}, "models": farm}))
    ref = client.storage.put_input(png_bytes((48, 32)), "png")
    jobs = [{"input": {"image": ref}, "stages": [
        {"model": "sim-a", "prompt": "farm", "steps": 3, "strength": 1.0, "seed": i},
        {"model": "sim-b", "prompt": "farm", "steps": 3, "strength": 1.0, "seed": i}]} for i in range(JOBS)]
    ids = client.submit_many(jobs)
    assert len(set(ids)) == JOBS

    final = {}
    for status in client.watch(ids, timeout=900):
        if status.state.terminal:
            final[status.id] = status
    assert Counter(st.state.value for st in final.values()) == {"succeeded": JOBS}

    # Each segment started exactly once: no delivery was lost and run again, none doubled.
    pipe = client.store.r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.store.key(job_id), "attempts", "attempt:1", "attempt:2")
    for job_id, (attempts, first, second) in zip(ids, pipe.execute()):
        assert attempts == "2", (job_id, attempts)
        assert [json.loads(first)["segment"], json.loads(second)["segment"]] == [0, 1]
    # One output per job, and every hand-off deleted once its job ended (off the hot path).
    mine = set(ids)  # the bucket is the session's: other tests' jobs are there too
    keys = [k for k in client.storage.list("jobs/") if k.split("/")[1] in mine]
    outputs = Counter(k.split("/")[1] for k in keys if "/output/" in k)
    assert set(outputs) == mine and set(outputs.values()) == {1}
    deadline = time.monotonic() + 30
    while left := [k for k in client.storage.list("jobs/") if "/handoff/" in k and k.split("/")[1] in mine]:
        assert time.monotonic() < deadline, f"{len(left)} hand-off objects left, e.g. {left[:3]}"
        time.sleep(0.5)
