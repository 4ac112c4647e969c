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


def test_progress_is_written_once_an_interval_has_passed_then_at_most_that_often(client, sim_worker, input_png):
    """Default ``progress_interval_s`` (0.25 s): a stage shorter than that writes no progress
    (its claim and final state say all there is), a 2 s one writes every 0.25 s or so,
    starting 0.25 s after its first step. Each write is two Redis commands per job."""
    import json

    import redis

    r = redis.Redis.from_url(client.settings.redis_url, decode_responses=True)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.psubscribe("easel:events:*")
    short = client.submit(img2img_job(str(input_png), model="sim", steps=3, strength=1.0))  # 0.15 s
    assert client.wait(short, timeout=60).state.value == "succeeded"
    long = client.submit(img2img_job(str(input_png), model="sim", steps=40, strength=1.0))  # 2 s
    assert client.wait(long, timeout=60).state.value == "succeeded"
    steps: dict[str, list[int]] = {short: [], long: []}
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:  # read until the channel has been quiet a second
        if (m := sub.get_message(timeout=0.2)) is None:
            continue
        quiet_since = time.monotonic()
        job_id, event = m["channel"].rsplit(":", 1)[1], json.loads(m["data"])
        if job_id in steps and "state" not in event:
            steps[job_id].append(event["step"])
    sub.close()
    assert steps[short] == [] and client.status(short).progress.step == 3  # the final state records it
    st = client.status(long)
    ran_s = st.finished_at - st.started_at  # 2 s of steps, more on a loaded machine
    assert 3 <= len(steps[long]) <= ran_s / 0.25 + 1, (steps[long], ran_s)
    assert steps[long] == sorted(steps[long]) and steps[long][0] >= 4  # 0.25 s in at 0.05 s a step


def test_watching_no_jobs_yields_nothing_and_the_next_wait_follows_its_job(client, sim_worker, input_png):
    """``watch([])`` (``watch(submit_many([]))``) ends at once, and leaves the thread's kept
    follower connection as it was: no error reply of an empty SUBSCRIBE waits on it."""
    assert list(client.watch([])) == []
    job = img2img_job(str(input_png), model="sim", steps=1, strength=1.0)
    assert client.wait(client.submit(job), timeout=60).state.value == "succeeded"


def test_a_submit_and_wait_loop_keeps_its_connections(client, sim_worker, input_png):
    """Following a job takes a pub/sub connection; the client keeps it (and its pooled one)
    for the next job instead of connecting again for each."""
    import redis

    r = redis.Redis.from_url(client.settings.redis_url)
    job = img2img_job(str(input_png), model="sim", steps=2, strength=1.0)
    client.wait(client.submit(job), timeout=60)  # this thread's follower connection, made once
    before = r.info("stats")["total_connections_received"]
    for seed in range(4):
        assert client.wait(client.submit({**job, "stages": [{**job["stages"][0], "seed": seed}]}),
                           timeout=60).state.value == "succeeded"
    # Connecting per job made 8 here (2 a job); other clients may connect meanwhile.
    assert r.info("stats")["total_connections_received"] - before < 4


def test_a_one_stage_job_costs_redis_at_most_20_commands(client, sim_worker, input_png):
    """The control plane's cost per job (docs/performance.md): a one-stage job shorter than the
    progress interval, default settings, is at most 20 Redis commands from its submission to
    its end, those its scripts run counted: submit (script), message, claim (script), end
    (script). Counted from MONITOR: each command that names the job, with the commands of a
    script called with it. Not the job's: the worker's fetch (a BRPOP an idle worker sends
    anyway), the lost-message sweep's read of waiting jobs (every 5 s, whatever the jobs) and
    this test's own reads of the job's state."""
    import collections
    import threading

    import redis

    url = client.settings.redis_url
    ref = client.storage.put_input(input_png.read_bytes(), "png")
    job = img2img_job(ref, model="sim", steps=1, strength=1.0)  # 0.05 s, well under the 0.25 s interval
    assert client.wait(client.submit(job), timeout=60).state.value == "succeeded"  # connections made
    poll = redis.Redis.from_url(url, decode_responses=True, single_connection_client=True)
    own_port = poll.client_info()["addr"].rsplit(":", 1)[1]
    seen: list[dict] = []

    def monitor() -> None:  # until it sees the test's closing ECHO: nothing before it is left unread
        with redis.Redis.from_url(url, decode_responses=True).monitor() as m:
            for c in m.listen():
                seen.append(c)
                if c["command"] == "ECHO monitor-done":
                    return

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not any(c["command"] == "ECHO monitor-ready" for c in list(seen)):  # MONITOR is on
        assert time.monotonic() < deadline and t.is_alive()
        poll.echo("monitor-ready")
        time.sleep(0.1)
    job_id = client.submit({**job, "stages": [{**job["stages"][0], "seed": 8}]})
    deadline = time.monotonic() + 60
    key = client.store.key(job_id)
    while poll.hget(key, "state") not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    poll.echo("monitor-done")
    t.join(30)
    assert not t.is_alive()
    sweep_read = f"HMGET {key} state segment updated_at instance due_at queue"
    names, in_job_script = collections.Counter(), False
    for c in seen:
        if c.get("client_type") == "lua":
            if in_job_script:
                names["lua " + c["command"].split()[0]] += 1
            continue
        in_job_script = False
        if c["client_port"] == own_port or job_id not in c["command"] or c["command"] == sweep_read:
            continue
        in_job_script = c["command"].startswith("EVALSHA")
        names[c["command"].split()[0]] += 1
    assert names["EVALSHA"] == 3 and names["LPUSH"] == 1, names  # submit, claim, end; the message
    assert sum(names.values()) <= 20, names
