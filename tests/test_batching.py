"""Micro-batching: compatible queued jobs share one pipeline call; results are split per job."""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from tests.conftest import WorkerProc, img2img_job, png_bytes
from tests.test_api import api, job_body, sse_events, upload, wait_state  # noqa: F401  (module-scoped API server fixture)


def _pixels(client, uri):
    return np.asarray(Image.open(io.BytesIO(client.storage.get(uri)))).astype(int)


def test_compatible_jobs_run_as_one_batch_and_match_unbatched_results(client, easel_env, input_png, tmp_path):
    jobs = [img2img_job(str(input_png), model="sd15-wide", seed=100 + i, prompt=f"prompt {i}") for i in range(4)]
    odd = img2img_job(str(input_png), model="sd15-wide", seed=200, steps=3)  # other steps: runs alone
    ids = [client.submit(j) for j in jobs] + [client.submit(odd)]
    batcher = WorkerProc("sd15-wide", {**easel_env, "EASEL_BATCH_SIZE": "4", "EASEL_BATCH_WAIT_S": "0.5"},
                         tmp_path).start()
    try:
        done = [client.wait(j, timeout=180) for j in ids]
    finally:
        batcher.stop()
    assert all(st.state.value == "succeeded" for st in done), [st.error for st in done]
    sizes = [client.result(j).stages[0].batch_size for j in ids]
    assert sizes == [4, 4, 4, 4, 1]
    for j in ids[:4]:
        m = client.result(j)
        assert len(m.outputs) == 1 and m.stages[0].output_size == (96, 64)
    batched = [_pixels(client, st.outputs[0]) for st in done[:4]]
    assert not np.array_equal(batched[0], batched[1])  # per-job prompts and seeds were kept apart

    single = WorkerProc("sd15-wide", easel_env, tmp_path).start()
    try:
        again = client.wait(client.submit(jobs[2]), timeout=120)
    finally:
        single.stop()
    assert again.state.value == "succeeded"
    diff = np.abs(_pixels(client, again.outputs[0]) - batched[2])
    assert diff.max() <= 2, f"batched result differs from the job run alone by up to {diff.max()}"


def test_a_bad_job_in_a_batch_fails_alone(client, easel_env, input_png, tmp_path):
    good = [img2img_job(str(input_png), model="sd15-wide", seed=300 + i) for i in range(2)]
    bad = img2img_job(client.storage.put_input(b"no image here", "png"), model="sd15-wide", seed=302)
    dropped = img2img_job(str(input_png), model="sd15-wide", seed=303)
    ids = [client.submit(good[0]), client.submit(bad), client.submit(dropped), client.submit(good[1])]
    assert client.cancel(ids[2]).value == "cancelled"  # still queued: its delivery in the batch is a no-op
    w = WorkerProc("sd15-wide", {**easel_env, "EASEL_BATCH_SIZE": "4", "EASEL_BATCH_WAIT_S": "0.5"}, tmp_path).start()
    try:
        done = [client.wait(j, timeout=180) for j in ids]
    finally:
        w.stop()
    assert [st.state.value for st in done] == ["succeeded", "failed", "cancelled", "succeeded"]
    assert "input image is not a readable image" in done[1].error
    assert [client.result(j).stages[0].batch_size for j in (ids[0], ids[3])] == [2, 2]
    # Every delivery that ran was counted once and recorded as ended (no phantom crash left
    # for a redelivery to count against the job); the cancelled one never started.
    for j in (ids[0], ids[1], ids[3]):
        h = client.store.r.hgetall(client.store.key(j))
        assert (h.get("attempts"), h.get("inflight:0")) == ("1", "0"), h
    assert "attempts" not in client.store.r.hgetall(client.store.key(ids[2]))


def _batcher(easel_env, tmp_path, **env) -> WorkerProc:
    return WorkerProc("sd15-wide", {**easel_env, "EASEL_BATCH_SIZE": "4", "EASEL_BATCH_WAIT_S": "0.5", **env},
                      tmp_path).start()


def test_cancelling_one_member_of_a_running_batch_stops_it_and_the_others_finish(client, easel_env, tmp_path):
    image = client.storage.put_input(png_bytes((64, 64)), "png")
    jobs = [img2img_job(image, model="sd15-wide", seed=400 + i, steps=150, strength=1.0) for i in range(3)]
    ids = [client.submit(j) for j in jobs]
    w = _batcher(easel_env, tmp_path)
    try:
        victim = ids[1]
        deadline = time.monotonic() + 120
        while client.status(victim).progress.step < 3:
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.05)
        client.cancel(victim)
        st = client.wait(victim, timeout=60)
        others_then = [client.status(j).state.value for j in (ids[0], ids[2])]
        done = [client.wait(j, timeout=180) for j in (ids[0], ids[2])]
    finally:
        w.stop()
    assert st.state.value == "cancelled" and st.error == "cancelled while running"
    assert st.progress.step < 150 and not st.outputs
    assert others_then == ["running", "running"]  # stopped while its batch-mates still ran
    assert [d.state.value for d in done] == ["succeeded", "succeeded"], [d.error for d in done]
    # the call was made again for the two left, which got the images they get alone
    assert [client.result(j).stages[0].batch_size for j in (ids[0], ids[2])] == [2, 2]
    assert "denoised; outputs are written beside the next job" in w.log.read_text()  # the overlapped finish


def test_sse_progress_events_arrive_for_batched_jobs(api, client, easel_env, tmp_path):  # noqa: F811
    w = _batcher(easel_env, tmp_path)
    try:
        with api.client() as http:
            image = upload(http)
            ids = [http.post("/v1/jobs", json=job_body(image, model="sd15-wide", steps=40, strength=1.0,
                                                       seed=500 + i)).json()["id"] for i in range(2)]
            events = sse_events(http, ids[1])
            first = wait_state(http, ids[0])
    finally:
        w.stop()
    steps = [d["step"] for n, d in events if n == "progress"]
    assert len(steps) >= 2 and steps == sorted(steps), events
    assert events[-1][0] == "done" and events[-1][1]["state"] == "succeeded"
    assert first["state"] == "succeeded"
    assert [client.result(j).stages[0].batch_size for j in ids] == [2, 2]


def test_a_lone_job_runs_when_the_queue_goes_quiet_and_a_burst_fills_the_batch(client, easel_env, input_png,
                                                                                tmp_path):
    """With the quiet-queue flush on, a lone job does not wait out a long batch interval, and
    jobs queued together still share one call."""
    w = _batcher(easel_env, tmp_path, EASEL_BATCH_WAIT_S="10", EASEL_BATCH_IDLE_S="0.1")
    try:
        lone = client.wait(client.submit(img2img_job(str(input_png), model="sd15-wide", seed=600, steps=2)),
                           timeout=60)
        burst = client.submit_many([img2img_job(str(input_png), model="sd15-wide", seed=601 + i, steps=2)
                                    for i in range(4)])
        done = [client.wait(j, timeout=60) for j in burst]
    finally:
        w.stop()
    assert lone.state.value == "succeeded" and all(st.state.value == "succeeded" for st in done)
    waited = [st.started_at - st.created_at for st in [lone, *done]]
    assert max(waited) < 5, f"jobs waited {waited} s to start: the 10 s batch interval, not the quiet queue"
    assert [client.result(j).stages[0].batch_size for j in burst] == [4] * 4
