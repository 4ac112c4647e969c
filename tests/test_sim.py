"""The simulated GPU (registry kind ``sim``): a real worker whose pipeline sleeps per step.

Benchmarks and scale tests rely on it taking the real path around the pipeline call:
progress, cancel and the S3 finish, as a diffusers pipeline does."""
from __future__ import annotations

import time

import pytest
from PIL import Image

from tests.conftest import WorkerProc, img2img_job


@pytest.fixture(scope="module")
def sim_worker(easel_env, tmp_path_factory):
    w = WorkerProc("sim", easel_env, tmp_path_factory.mktemp("sim-logs")).start()
    yield w
    w.stop()


def test_sim_job_sleeps_per_step_and_writes_its_outputs(client, sim_worker, input_png, tmp_path):
    job = img2img_job(str(input_png), model="sim", steps=10, strength=1.0, seed=3)
    job["num_images"] = 2
    job_id = client.submit(job)
    status = client.wait(job_id, timeout=60)
    assert status.state.value == "succeeded", status.error
    paths = client.fetch(job_id, tmp_path)
    images = [Image.open(p) for p in paths if p.suffix == ".png"]
    assert [im.size for im in images] == [(96, 64), (96, 64)]
    assert images[0].getpixel((0, 0)) != images[1].getpixel((0, 0))  # one seed each
    stage = client.result(job_id).stages[0]
    assert stage.seeds == [3, 4]
    assert stage.timings_s["denoise"] >= 10 * 0.05  # the bundled sim model sleeps 0.05 s a step


def test_sim_job_reports_progress_and_cancels_mid_stage(client, sim_worker, input_png):
    job_id = client.submit(img2img_job(str(input_png), model="sim", steps=400, strength=1.0))
    deadline = time.monotonic() + 30
    while client.status(job_id).progress.step < 3:
        assert time.monotonic() < deadline, client.status(job_id)
        time.sleep(0.1)
    t0 = time.monotonic()
    client.cancel(job_id)
    status = client.wait(job_id, timeout=30)
    assert status.state.value == "cancelled"
    assert time.monotonic() - t0 < 5  # stopped at a step, not after the 20 s stage


def test_wait_follows_events_instead_of_polling(client, sim_worker, input_png):
    """A 2 s job followed by ``wait``: its progress arrives by pub/sub, and the record is read
    only on state changes, not ten times a second."""
    import redis

    r = redis.Redis.from_url(client.settings.redis_url)
    job_id = client.submit(img2img_job(str(input_png), model="sim", steps=40, strength=1.0))
    before = r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
    updates = []
    status = client.wait(job_id, timeout=60, on_update=updates.append)
    reads = r.info("commandstats")["cmdstat_hgetall"]["calls"] - before
    assert status.state.value == "succeeded"
    assert any(u.state.value == "running" and u.progress.step > 0 for u in updates)  # progress events
    assert reads <= 4, reads  # first read, running, succeeded (+1 resync at most)
