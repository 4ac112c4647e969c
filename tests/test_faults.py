"""Fault injection against real processes: kill -9 a worker, SIGTERM it, restart valkey and
SeaweedFS, poison jobs, time limits, cancel, progress, priorities.

These tests get their own servers (restarting the session's would disturb other tests).
The broker keeps no record of delivered messages: a dead worker's job comes back through
its expired heartbeat, whose interval, TTL and reap period alone are shortened here.
"""
from __future__ import annotations

import re
import signal
import threading
import time
import uuid

import pytest
import redis

from easel.producer.embedded import EmbeddedServices, free_port
from easel.shared.jobstore import HELD_BACK
from easel.worker.holdings import Holdings
from tests.conftest import WorkerProc, png_bytes
from tests.netproxy import TcpProxy

pytestmark = pytest.mark.slow

LIVENESS = {"EASEL_HEARTBEAT_INTERVAL_S": "0.5", "EASEL_HEARTBEAT_TTL_S": "3", "EASEL_REAP_EVERY_S": "0.5"}


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory, model_root):
    svc = EmbeddedServices(tmp_path_factory.mktemp("fault-services")).start()
    env = {**svc.env(), "EASEL_MODEL_ROOT": str(model_root), "EASEL_MODELS": "tiny", **LIVENESS,
           "EASEL_TORCH_THREADS": "1",
           "EASEL_OVERLAP_FINISH": "true"}  # the GPU workers' path (see conftest.easel_env)
    yield svc, env
    svc.redis.kill()
    svc.s3.kill()


@pytest.fixture(scope="module")
def fclient(fault_env):
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    svc, env = fault_env
    return EaselClient(Settings(**{k[6:].lower(): v for k, v in env.items()}))


@pytest.fixture
def workers(fault_env, tmp_path):
    """Start workers with env overrides; all stopped (killed) at the end of the test."""
    _, env = fault_env
    started: list[WorkerProc] = []

    def start(family: str = "sd15", wait: bool = True, **overrides: str) -> WorkerProc:
        w = WorkerProc(family, {**env, **overrides}, tmp_path)
        w.n = len(started)
        started.append(w.start(wait=wait))
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL, timeout=10)


@pytest.fixture(scope="module")
def big_input(fclient):
    return fclient.storage.put_input(png_bytes((256, 256)), "png")


def job(image: str, steps: int = 30, seed: int = 1, model: str = "sd15", **extra) -> dict:
    return {"input": {"image": image}, "stages": [{"model": model, "prompt": "fault", "steps": steps,
                                                   "strength": 1.0, "seed": seed}], **extra}


def recorded_job(store, registry, image: str, seed: int, owner: str | None = None, **extra):
    """A two-step job's record written straight to ``store`` (JobSpec, plan, create): no
    admission, no message; ``owner``: the API key it belongs to. Returns (job_id, spec, plan)."""
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec

    spec = JobSpec.model_validate(job(image, steps=2, seed=seed, **extra)).with_seeds()
    plan = plan_job(spec, registry)
    job_id, _ = store.create(spec, plan, owner=owner)
    return job_id, spec, plan


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def running_at_step(client, job_id: str, step: int = 2):
    return wait_for(lambda: (st := client.status(job_id)).state.value == "running" and st.progress.step >= step,
                    60, f"job {job_id} running at step {step}")


def outputs_in_storage(client, job_id: str) -> list[str]:
    return client.storage.list(f"jobs/{job_id}/output/")


def succeeded_at_first_attempt(client, job_id: str, proxy: TcpProxy) -> None:
    """The job ends succeeded, its one delivery's work kept (no retry, no requeue), with one
    output; the proxy its worker went through is stopped after."""
    try:
        st = client.wait(job_id, timeout=180)
    finally:
        proxy.stop()
    assert st.state.value == "succeeded", st.error
    assert st.attempts == 1 and not st.note, st.note
    assert outputs_in_storage(client, job_id) == [f"jobs/{job_id}/output/0.png"]


def test_sigkill_with_an_idle_second_worker_hands_it_the_job(fclient, workers, big_input):
    """No replacement starts: the idle worker of the same family gets the job once the dead
    one's heartbeat expires (its reaper re-sends it)."""
    pair = [workers(), workers()]
    job_id = fclient.submit(job(big_input, steps=60))
    running_at_step(fclient, job_id)
    w1, w2 = sorted(pair, key=lambda w: w.hostname != fclient.status(job_id).worker)
    w1.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    assert fclient.status(job_id).state.value == "running"
    st = fclient.wait(job_id, timeout=60)
    assert st.state.value == "succeeded", st.error
    assert time.monotonic() - killed_at < 60
    assert st.attempts == 2 and st.note.startswith(f"requeued: worker {w1.hostname}")
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    attempts = fclient.result(job_id).attempts
    assert [a.worker for a in attempts] == [w1.hostname, w2.hostname]
    assert attempts[0].ended == st.note and attempts[1].ended is None


def test_a_delivered_message_leaves_nothing_in_redis_to_be_handed_out_again(fclient, workers, big_input):
    """Two workers, one long stage: while it runs, Redis holds no copy of its message (no
    unacked hash, nothing in the queue's lists) that could be handed to the idle worker, and
    the job runs once."""
    pair = [workers(), workers()]
    job_id = fclient.submit(job(big_input, steps=40, seed=3))
    running_at_step(fclient, job_id)
    r = fclient.store.r
    assert not [k for k in r.scan_iter("*unacked*")]
    assert fclient.store.queue_depth("easel.sd15", ["easel.sd15"] + [f"easel.sd15:{p}" for p in range(1, 10)]) == 0
    st = fclient.wait(job_id, timeout=240)
    assert st.state.value == "succeeded", st.error
    assert st.attempts == 1 and st.note is None
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    assert not any("dropping this copy" in w.log.read_text() for w in pair)


def test_a_message_handed_back_unacked_goes_first_in_its_queue(fclient):
    """Messages a worker holds unacked when it stops warmly (prefetched for a micro-batch) go
    back where BRPOP takes them next, ahead of those sent after them: a restart does not send
    jobs to the back of the line. One rejected with requeue goes behind the others."""
    from easel.shared.celery_app import RUN_SEGMENT, _Channel

    app, queue = fclient.celery, "faults-restore.sd15"
    for job_id in ("first", "second", "third"):
        app.send_task(RUN_SEGMENT, args=[job_id, 0], queue=queue, priority=5)

    def job_of(message) -> str:
        return message.decode()[0][0]

    with app.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(channel, _Channel)
        held = [channel.basic_get(queue, no_ack=False) for _ in range(2)]
        assert [job_of(m) for m in held] == ["first", "second"]
        channel.qos.restore_unacked_once()  # a warm shutdown's hand-back of what it holds
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        again = channel.basic_get(queue, no_ack=False)
        assert job_of(again) == "first" and again.delivery_info.get("redelivered")
        again.reject(requeue=True)
        order = [channel.basic_get(queue, no_ack=True) for _ in range(4)]
        assert [job_of(m) if m else None for m in order] == ["second", "third", "first", None]


def test_sigterm_finishes_running_stage_and_leaves_queued_job(fclient, workers, big_input):
    w = workers()
    running = fclient.submit(job(big_input, steps=40, seed=4))
    queued = fclient.submit(job(big_input, steps=2, seed=5))
    running_at_step(fclient, running)
    assert fclient.status(queued).queue_position == 0
    assert not [k for k in fclient.store.r.scan_iter("*unacked*")]  # no broker copy of the running stage
    assert w.stop(signal.SIGTERM, timeout=120) == 0
    st = fclient.status(running)
    assert st.state.value == "succeeded" and st.attempts == 1
    assert fclient.status(queued).state.value == "queued"
    workers()
    assert fclient.wait(queued, timeout=120).state.value == "succeeded"


def test_redis_restart_loses_no_accepted_job(fault_env, fclient, workers, big_input):
    svc, _ = fault_env
    w = workers()
    ids = [fclient.submit(job(big_input, steps=12, seed=10 + i)) for i in range(5)]
    running_at_step(fclient, ids[0], 1)
    svc.redis.stop()
    time.sleep(1)
    svc.redis.start()
    late = fclient.submit(job(big_input, steps=2, seed=99))  # the producer reconnects by itself
    for j in ids + [late]:
        st = fclient.wait(j, timeout=180)
        assert st.state.value == "succeeded", (j, st.error)
    assert w.proc.poll() is None  # the same worker process reconnected


def test_s3_outage_is_retried_until_storage_is_back(fault_env, fclient, workers, big_input):
    svc, _ = fault_env
    proxy = TcpProxy(svc.s3.port).start()
    workers(EASEL_S3_ENDPOINT_URL=proxy.url)
    proxy.stop()  # storage unreachable for the worker
    job_id = fclient.submit(job(big_input, steps=2, seed=21))
    waiting = []  # statuses seen while a retry waits out its backoff
    scores = []  # its place in the queue's waiting set meanwhile

    def retried():
        st = fclient.status(job_id)
        if st.state.value == "queued" and st.attempts:
            waiting.append(st)
            scores.append(fclient.store.r.zscore(fclient.store._queued_key("easel.sd15"), job_id))
        return st.attempts >= 2 and waiting

    wait_for(retried, 90, "a retry seen waiting out its backoff, and a second delivery")
    assert re.fullmatch(r"retry \d of 8 after EndpointConnectionError: .+, sent again in \d+\.\ds", waiting[0].note)
    assert waiting[0].queue_position is not None and not waiting[0].error
    assert scores[0] >= HELD_BACK  # holding no room in the queue while it waits
    proxy.start()  # back on the same port
    st = fclient.wait(job_id, timeout=180)
    assert st.state.value == "succeeded", st.error
    assert fclient.storage.exists(st.outputs[0])
    proxy.stop()


def test_an_s3_outage_after_the_denoise_is_ridden_out_with_the_images_in_hand(fault_env, fclient, workers, big_input):
    """Storage goes away as the results are written, for far longer than boto3's own tries
    (a few seconds at most; its releases change how long): the worker keeps trying the writes
    for ``RESULT_WRITE_PATIENCE_S``, and the GPU work is not done again."""
    svc, _ = fault_env
    proxy = TcpProxy(svc.s3.port).start()
    w = workers(EASEL_S3_ENDPOINT_URL=proxy.url)
    job_id = fclient.submit(job(big_input, steps=8, seed=22))
    running_at_step(fclient, job_id, 1)  # the input was read through the proxy
    proxy.stop()
    wait_for(lambda: f"{job_id}'] denoised" in w.log.read_text(), 60, "the pipeline call done")
    time.sleep(20)
    assert fclient.status(job_id).state.value == "running"
    assert "S3 write failed (EndpointConnectionError" in w.log.read_text()
    proxy.start()  # back on the same port
    succeeded_at_first_attempt(fclient, job_id, proxy)


def test_an_api_started_before_its_redis_records_the_keys_shares_once_redis_is_up(fault_env, fclient):
    """A fresh deploy's API may start before Redis answers: the keys' weights and hold caps
    are written once it does, not left at weight 1 and uncapped until the API restarts."""
    import hashlib

    from fastapi.testclient import TestClient

    from easel.producer.api import state
    from easel.producer.api.app import create_app
    from easel.shared.keys import cap_key
    from easel.shared.settings import ApiKey

    svc, _ = fault_env
    proxy = TcpProxy(svc.redis.port, listen_port=free_port())  # not listening yet: Redis away
    prefix = f"shares{uuid.uuid4().hex[:8]}"
    key = ApiKey(name="bulk", sha256=hashlib.sha256(b"tok-bulk").hexdigest(), weight=3, over_cap="hold",
                 max_in_flight=7)
    settings = fclient.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}/0",
                                                   "api_keys": [key], "queue_prefix": prefix})
    r = fclient.store.r
    with TestClient(create_app(settings, webhooks=False)):
        assert r.hget(f"{prefix}:weights", "bulk") is None
        proxy.start()
        try:
            wait_for(lambda: r.hget(f"{prefix}:weights", "bulk") == "3.0", state.KEY_SHARES_RETRY_S + 30,
                     "the weight recorded")
            assert r.get(cap_key(prefix, "bulk")) == "7"
        finally:
            proxy.stop()


def test_a_job_whose_end_redis_lost_is_sent_again_by_the_live_worker_that_held_it(fault_env, fclient, workers,
                                                                                    big_input):
    """Redis loses its last second of writes (``appendfsync everysec`` and its host lost, or a
    failover): a job's final state goes with them, and the job reads ``running`` under a
    worker that is alive and beating, so no reaper takes it. That worker finds it holds the
    job no more and sends it again."""
    w = workers()
    job_id = fclient.submit(job(big_input, steps=2, seed=24))
    assert fclient.wait(job_id, timeout=120).state.value == "succeeded"
    instance = fclient.result(job_id).attempts[0].instance
    r, key = fclient.store.r, fclient.store.key(job_id)
    running = f"{fclient.store.prefix}:running:{instance}"
    r.hset(key, mapping={"state": "running", "instance": instance, "segment": 0})  # as before the lost write
    r.hdel(key, "outputs", "manifest")
    r.sadd(running, f"{job_id}:0")
    st = fclient.wait(job_id, timeout=120)
    assert st.state.value == "succeeded", st.error
    assert st.attempts == 2 and "no longer held the job" in st.note, st.note
    # A job of a family no worker serves here, claimed as that instance's in Redis only: sent
    # again, it waits in its queue, and the instance's running set lists it no more.
    spec, plan = fclient.prepare_and_plan(job(big_input, steps=2, seed=25, model="sd15-wide"))
    parked, _ = fclient.store.create(spec, plan)
    (claimed,) = fclient.store.claim_many([(parked, 0, None)], w.hostname, instance, 2)
    assert claimed.outcome == "run" and f"{parked}:0" in r.smembers(running)
    try:
        wait_for(lambda: fclient.status(parked).state.value == "queued", 60, "the parked job sent again")
        assert "no longer held the job" in fclient.status(parked).note
        assert f"{parked}:0" not in r.smembers(running)
    finally:
        fclient.cancel(parked)
    assert w.proc.poll() is None


def test_a_final_state_that_waits_out_a_redis_failover_is_written_not_denoised_again(fault_env, fclient, workers,
                                                                                     big_input):
    """Redis away for longer than the worker's client retries (a managed Redis's failover
    takes 30-60 s) as a job's outputs are written: its final state is written once Redis
    answers, from the heartbeat, and the segment is not sent to be denoised again."""
    svc, _ = fault_env
    proxy = TcpProxy(svc.redis.port).start()
    w = workers(EASEL_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
    job_id = fclient.submit(job(big_input, steps=12, seed=26))
    running_at_step(fclient, job_id, 1)
    proxy.stop()
    try:
        wait_for(lambda: "final state not" in w.log.read_text(), 150, "the final write given up for now")
    finally:
        proxy.start()
    succeeded_at_first_attempt(fclient, job_id, proxy)
    assert w.proc.poll() is None


def test_a_redis_refusing_writes_for_a_while_fails_no_job(fault_env, fclient, workers, big_input):
    """Redis full (maxmemory under noeviction: OOM on every write that needs memory) when a
    chain hands off to its next family: the hand-off is retried once writes work again, and
    the job succeeds; nothing ends failed for good."""
    svc, _ = fault_env
    w = workers()
    workers("sd15-wide")
    admin = redis.Redis.from_url(svc.redis.url)
    chain = {"input": {"image": big_input}, "stages": [
        {"model": "sd15", "prompt": "one", "steps": 6, "strength": 1.0, "seed": 23},
        {"model": "sd15-wide", "prompt": "two", "steps": 2, "strength": 0.5}]}
    job_id = fclient.submit(chain)
    running_at_step(fclient, job_id, 1)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] // 2)  # every such write refused
    try:
        wait_for(lambda: re.search(rf"job {job_id} segment 0 (failed|ended)", w.log.read_text()), 60,
                 "the hand-off met a full Redis")
    finally:
        admin.config_set("maxmemory", 0)
    st = fclient.wait(job_id, timeout=120)
    assert st.state.value == "succeeded", st.error
    assert fclient.storage.exists(st.outputs[0])


def test_worker_dying_while_finishing_is_rerun_after_a_restart_under_the_same_hostname(
        fault_env, fclient, workers, big_input):
    """With overlap_finish the message is acked once the pipeline call is done, while the
    outputs are still being written: a worker killed then leaves no message to redeliver.
    Restarted under the same hostname, its new instance does not speak for the dead one:
    the dead instance's heartbeat expires and the job runs again, with one result set."""
    svc, _ = fault_env
    proxy = TcpProxy(svc.s3.port).start()
    w1 = workers(EASEL_S3_ENDPOINT_URL=proxy.url)
    job_id = fclient.submit(job(big_input, steps=12, seed=31))
    running_at_step(fclient, job_id, 1)  # the input was read through the proxy
    proxy.hold()  # from now on the worker's uploads hang
    wait_for(lambda: f"{job_id}'] denoised" in w1.log.read_text(), 60, "the pipeline call done")
    time.sleep(0.5)
    assert fclient.status(job_id).state.value == "running"
    w1.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    proxy.stop()
    w1.env = {**w1.env, "EASEL_S3_ENDPOINT_URL": svc.s3.url}
    w1.start(same_hostname=True)
    st = fclient.wait(job_id, timeout=60)
    assert st.state.value == "succeeded", st.error
    assert time.monotonic() - killed_at < 60
    assert st.attempts == 2 and "stopped beating" in st.note
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    assert [a.worker for a in fclient.result(job_id).attempts] == [w1.hostname, w1.hostname]


def test_transient_errors_stop_after_the_retry_cap(fclient, workers, big_input):
    dead = f"http://127.0.0.1:{free_port()}"
    w = workers("sd15-wide", EASEL_S3_ENDPOINT_URL=dead, EASEL_MAX_RETRIES="2")
    job_id = fclient.submit(job(big_input, steps=2, model="sd15-wide"))
    st = fclient.wait(job_id, timeout=120)
    assert st.state.value == "failed"
    assert st.error.startswith("gave up after 2 retries: EndpointConnectionError")
    # the worker's log says so too, not only the warnings of each retry
    assert f"job {job_id} segment 0 failed: gave up after 2 retries" in w.log.read_text()


def test_an_object_store_throttling_for_longer_than_boto3_retries_is_retried_like_an_outage(
        fclient, workers, big_input):
    from tests.test_api import refusing_s3

    s3 = refusing_s3(503, "SlowDown")
    try:
        workers("sd15-wide", EASEL_S3_ENDPOINT_URL=f"http://127.0.0.1:{s3.server_address[1]}", EASEL_MAX_RETRIES="1")
        st = fclient.wait(fclient.submit(job(big_input, steps=2, model="sd15-wide")), timeout=120)
    finally:
        s3.shutdown()
    assert st.state.value == "failed"
    assert st.error.startswith("gave up after 1 retries: ClientError") and "SlowDown" in st.error, st.error


def test_permanent_storage_error_fails_with_reason(fclient, workers):
    workers()
    st = fclient.wait(fclient.submit(job("s3://no-such-bucket/input.png", steps=2)), timeout=60)
    assert st.state.value == "failed" and "s3://no-such-bucket/input.png does not exist" in st.error


def test_poison_job_stops_after_repeated_worker_deaths(fclient, workers, big_input):
    poison = fclient.submit(job(big_input, steps=60, seed=31))
    for _ in range(2):
        w = workers()
        running_at_step(fclient, poison, 1)
        w.stop(signal.SIGKILL)
        # Forget the killed run's progress, so the next wait sees the next delivery's steps.
        fclient.store.r.hset(fclient.store.key(poison), "step", 0)
    last = workers()
    st = fclient.wait(poison, timeout=120)
    assert st.state.value == "failed"
    assert st.error.startswith("poison job: the worker died 2 times while running segment 0")
    assert f"job {poison} segment 0 failed: poison job" in last.log.read_text()
    good = fclient.submit(job(big_input, steps=2, seed=32))
    assert fclient.wait(good, timeout=120).state.value == "succeeded"


def test_stage_time_limit_fails_the_job_and_worker_keeps_serving(fclient, workers, big_input):
    workers("sd15-wide", EASEL_STAGE_TIMEOUT_MAX_S="0.5")  # the cap holds however healthy the stage
    slow = fclient.submit(job(big_input, steps=200, model="sd15-wide"))
    st = fclient.wait(slow, timeout=120)
    assert st.state.value == "failed"
    assert "exceeded its time limit of 0.5s" in st.error and "EASEL_STAGE_TIMEOUT_MAX_S" in st.error
    quick = fclient.submit(job(fclient.storage.put_input(png_bytes((16, 16)), "png"), steps=1, model="sd15-wide"))
    assert fclient.wait(quick, timeout=60).state.value == "succeeded"


def test_stuck_stage_is_failed_by_the_watchdog(fclient, workers):
    w = workers("sd15-wide", EASEL_STAGE_TIMEOUT_BASE_S="0.01", EASEL_STAGE_TIMEOUT_PER_MPX_STEP_S="0",
                EASEL_STAGE_STUCK_GRACE_S="0.05")
    huge = fclient.storage.put_input(png_bytes((2048, 2048)), "png")  # the VAE encode alone outlasts the limit
    job_id = fclient.submit(job(huge, steps=1, model="sd15-wide"))
    st = fclient.wait(job_id, timeout=120)
    assert st.state.value == "failed" and "made no progress" in st.error
    assert wait_for(lambda: w.proc.poll() is not None, 30, "worker exit") and w.proc.returncode == 75
    assert f"job {job_id} segment 0 failed: stage 0" in w.log.read_text()  # from the watchdog's thread


DECODE_HANG = """
import os
import time

from diffusers import AutoencoderKL

_decode = AutoencoderKL.decode


def decode(self, *args, **kwargs):  # a hung kernel while the flag file exists: no step callback runs
    if os.path.exists(os.environ["EASEL_TEST_DECODE_HANG"]):
        time.sleep(3600)
    return _decode(self, *args, **kwargs)


AutoencoderKL.decode = decode
"""


def test_a_decode_stuck_outside_the_pipeline_call_is_failed_by_the_watchdog(fclient, workers, big_input, tmp_path):
    """An intermediate kept between two stages that share latents is decoded after the first
    stage's call, where no step callback runs. Stuck there (a hung kernel), the job fails
    and the worker restarts, as for a stage stuck inside its call; the heartbeat would
    otherwise keep the job running forever."""
    (tmp_path / "sitecustomize.py").write_text(DECODE_HANG)
    flag = tmp_path / "decode-hangs"
    flag.write_text("")
    w = workers(PYTHONPATH=str(tmp_path), EASEL_TEST_DECODE_HANG=str(flag), EASEL_STAGE_TIMEOUT_BASE_S="3",
                EASEL_STAGE_STUCK_GRACE_S="1")
    chain = {"input": {"image": big_input}, "output": {"keep_intermediates": True}, "stages": [
        {"model": "sd15", "prompt": "a", "steps": 4, "strength": 1.0, "seed": 1},
        {"model": "sd15", "prompt": "b", "steps": 4, "strength": 0.5, "seed": 2}]}
    st = fclient.wait(fclient.submit(chain), timeout=90)
    assert st.state.value == "failed" and "stage 0's intermediate made no progress" in st.error, st.error
    assert wait_for(lambda: w.proc.poll() is not None, 30, "worker exit") and w.proc.returncode == 75


def test_cancel_queued_and_running_jobs(fclient, workers, big_input):
    workers()
    running = fclient.submit(job(big_input, steps=300, seed=41))
    queued = fclient.submit(job(big_input, steps=2, seed=42))
    running_at_step(fclient, running, 2)
    assert fclient.cancel(queued).value == "cancelled"
    t0 = time.monotonic()
    fclient.cancel(running)
    st = fclient.wait(running, timeout=30)
    assert st.state.value == "cancelled" and st.error == "cancelled while running"
    assert time.monotonic() - t0 < 10
    assert st.progress.step < 300
    after = fclient.submit(job(big_input, steps=2, seed=43))
    assert fclient.wait(after, timeout=60).state.value == "succeeded"
    q = fclient.status(queued)
    assert q.state.value == "cancelled" and q.attempts == 0 and not q.outputs


def test_a_cancel_after_the_last_step_ends_the_job_cancelled_without_outputs(fclient, workers, big_input):
    """A cancel heard after a job's last denoising step, while its overlapped finish waits for
    the next job's call to denoise (its prologue and first step, on a 512 px input), ends it
    cancelled, its outputs unwritten, not succeeded."""
    workers()
    done = fclient.submit(job(big_input, steps=2, seed=45))
    slow = fclient.submit(job(fclient.storage.put_input(png_bytes((512, 512)), "png"), steps=30, seed=46))
    wait_for(lambda: fclient.status(slow).state.value == "running", 60, "the next job claimed")
    assert fclient.status(done).state.value == "running"  # denoised, its finish waiting
    fclient.cancel(done)
    st = fclient.wait(done, timeout=30)
    assert st.state.value == "cancelled" and not st.outputs, st
    assert not outputs_in_storage(fclient, done)
    fclient.cancel(slow)  # the next job is not what this test is about: it stops at its first step
    assert fclient.wait(slow, timeout=120).state.value == "cancelled"


def test_a_cancel_is_pushed_to_the_running_stage_between_progress_writes(fclient, workers, big_input):
    """Progress is written once a minute here, so no progress write reads the cancel flag
    while the job runs: it stops within seconds because the cancel is pushed to the worker
    (pub/sub) and every denoising step looks for it in memory."""
    workers(EASEL_PROGRESS_INTERVAL_S="60")
    running = fclient.submit(job(big_input, steps=300, seed=44))
    # No progress is written for a minute: the claim's state says it runs; its denoising
    # starts within a second or two on this input.
    wait_for(lambda: fclient.status(running).state.value == "running", 60, f"job {running} running")
    time.sleep(2.0)
    t0 = time.monotonic()
    fclient.cancel(running)
    st = fclient.wait(running, timeout=60)
    assert st.state.value == "cancelled" and st.error == "cancelled while running"
    assert time.monotonic() - t0 < 10


def test_progress_queue_position_and_priority_order(fclient, workers, big_input):
    # No worker left over from another test: with none alive, one job goes to the broker.
    wait_for(lambda: fclient.scheduler.family("sd15").live == 0, 30, "no live sd15 worker")
    blocker = fclient.submit(job(big_input, steps=40, seed=50))
    low = [fclient.submit(job(big_input, steps=2, seed=51 + i, priority=9)) for i in range(2)]
    high = fclient.submit(job(big_input, steps=2, seed=60, priority=0))
    # With no worker alive, one job (the blocker) is already in the broker; of the jobs that
    # wait their turn, priority 0 goes ahead of the 9s, which keep their order.
    assert [fclient.status(j).queue_position for j in [blocker, high, *low]] == [0, 1, 2, 3]
    workers()
    steps_seen = set()
    wait_for(lambda: steps_seen.add(fclient.status(blocker).progress.step) or fclient.status(blocker).state.terminal,
             120, "blocker done")
    assert len(steps_seen - {0}) >= 3  # step-level progress was visible while it ran
    done = {j: fclient.wait(j, timeout=120) for j in [high, *low]}
    assert all(s.state.value == "succeeded" for s in done.values())
    # The 0 starts before the 9s. (It may start before the blocker too: once the worker has
    # room, it is dispatched, and the broker serves priority 0 before the blocker's 5.)
    assert done[high].started_at < min(done[j].started_at for j in low)
    assert done[low[0]].started_at < done[low[1]].started_at


def _presence(fclient, hostname: str) -> dict | None:
    return next((p for p in fclient.store.presences() if p["hostname"] == hostname), None)


def test_sigkill_mid_chain_with_the_launcher_restarting_the_process(fault_env, fclient, big_input, tmp_path):
    """`easel worker` restarts a SIGKILLed process under the same hostname; the chain it was
    running completes once, within 60 s of the kill, and its manifest lists both attempts."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, env = fault_env
    log = open(tmp_path / "launcher.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "worker", "--family", "sd15"],
                                env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    hostname = f"sd15-cpu@{os.uname().nodename}"
    try:
        first = wait_for(lambda: _presence(fclient, hostname), 120, "the launcher's worker")
        chain = {"input": {"image": big_input}, "stages": [
            {"model": "sd15", "prompt": "one", "steps": 10, "strength": 1.0, "seed": 5},
            {"model": "comic-diffusion", "prompt": "two", "steps": 10, "strength": 0.9},
            {"model": "pixel-art", "prompt": "three", "steps": 10, "strength": 0.9}]}
        job_id = fclient.submit(chain)
        wait_for(lambda: (st := fclient.status(job_id)).progress.stage == 1 and st.progress.step >= 1, 120,
                 "stage 1 running")
        os.kill(first["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        st = fclient.wait(job_id, timeout=60)
        assert st.state.value == "succeeded", st.error
        assert time.monotonic() - killed_at < 60
        second = _presence(fclient, hostname)
        assert second["pid"] != first["pid"] and second["instance"] != first["instance"]
        manifest = fclient.result(job_id)
        assert [a.instance for a in manifest.attempts] == [first["instance"], second["instance"]]
        assert manifest.attempts[0].ended == st.note and "stopped beating" in st.note
        assert [s.handoff_in for s in manifest.stages] == ["image", "latent", "latent"]
        assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0


GPU_FAULT = """
import os

import torch
from diffusers import UNet2DConditionModel

_forward = UNet2DConditionModel.forward


def forward(self, *args, **kwargs):  # a CUDA error while the flag file exists: its text names it
    if os.path.exists(os.environ["EASEL_TEST_GPU_FAULT"]):
        fault = open(os.environ["EASEL_TEST_GPU_FAULT"]).read()
        if fault.startswith("oom above "):  # only a UNet batch over that many samples runs out
            batch = kwargs.get("sample", args[0] if args else None).shape[0]
            if batch <= int(fault.split()[-1]):
                return _forward(self, *args, **kwargs)
            with open(os.environ["EASEL_TEST_GPU_FAULT"] + ".hits", "a") as hits:
                hits.write(f"{batch}\\n")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        if fault == "host":  # the host out of memory: torch's own CPU allocator failing, for real
            torch.empty(1 << 58, dtype=torch.uint8)
        if fault == "cublas":  # cuBLAS's own allocation failing: out of memory too, not a torch OOM
            raise torch.AcceleratorError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return _forward(self, *args, **kwargs)


UNet2DConditionModel.forward = forward
"""


def test_a_lost_gpu_restarts_the_process_and_the_job_runs_again(fclient, workers, big_input, tmp_path):
    """A CUDA error that leaves the device unusable is not the job's fault: the worker exits
    with its delivery held instead of failing the job (and every job after it); restarted,
    the job runs again and succeeds. The fault is injected into the real UNet's forward by
    a sitecustomize module on the worker's path."""
    (tmp_path / "sitecustomize.py").write_text(GPU_FAULT)
    flag = tmp_path / "gpu-broken"
    flag.touch()
    w = workers(PYTHONPATH=str(tmp_path), EASEL_TEST_GPU_FAULT=str(flag))
    job_id = fclient.submit(job(big_input, steps=3, seed=29))
    wait_for(lambda: w.proc.poll() is not None, 60, "the worker's exit")
    assert w.proc.returncode == 76
    assert "the GPU failed (AcceleratorError: CUDA error: an illegal memory access" in w.log.read_text()
    assert fclient.status(job_id).state.value == "running"  # held by the dead instance, not failed
    flag.unlink()
    w.start(same_hostname=True)  # as `easel worker` restarts a dead child
    st = fclient.wait(job_id, timeout=90)
    assert st.state.value == "succeeded", st.error
    assert len(fclient.result(job_id).attempts) == 2


@pytest.mark.parametrize("fault, error", [
    ("oom", "OutOfMemoryError: CUDA out of memory."),
    ("cublas", "AcceleratorError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED"),
    ("host", "RuntimeError: [enforce fail at alloc_cpu.cpp"),
])
def test_a_job_too_large_for_the_gpu_fails_after_two_retries(fclient, workers, big_input, tmp_path, fault, error):
    """Out of memory (torch's GPU allocator, a CUDA library's own, or the host's) is retried:
    other work may have held the memory. A job that runs out every time fails after two
    retries with what to change, not after eight, nor at once as an error of its own."""
    (tmp_path / "sitecustomize.py").write_text(GPU_FAULT)
    flag = tmp_path / "gpu-full"
    flag.write_text(fault)
    workers(PYTHONPATH=str(tmp_path), EASEL_TEST_GPU_FAULT=str(flag))
    job_id = fclient.submit(job(big_input, steps=3, seed=31))
    st = fclient.wait(job_id, timeout=60)
    assert st.state.value == "failed" and st.attempts == 3, (st.attempts, st.error)
    assert st.error.startswith(f"out of memory again after 2 retries ({error}")
    assert "vae_tiling" in st.error


@pytest.mark.parametrize("fits, batch_sizes, ran_out", [
    (4, [2] * 4, ["8"]),  # a batch of 4 (8 samples with guidance) runs as 2 + 2
    (2, [1] * 4, ["8", "4"]),  # halved twice; the second half of 2 is split before it runs
])
def test_a_batch_out_of_memory_runs_in_halves_and_the_next_of_its_shape_is_split_first(
        fclient, workers, big_input, tmp_path, fits, batch_sizes, ran_out):
    """A micro-batch that runs out of GPU memory runs again in halves (halved again while
    they run out), not a job at a time, and the worker remembers: a later call of that
    shape is split before it runs, not after another failed call. Here a UNet batch over
    ``fits`` samples runs out (raised from the real UNet's forward)."""
    (tmp_path / "sitecustomize.py").write_text(GPU_FAULT)
    flag = tmp_path / "gpu-small"
    flag.write_text(f"oom above {fits}")
    w = workers(PYTHONPATH=str(tmp_path), EASEL_TEST_GPU_FAULT=str(flag), EASEL_BATCH_SIZE="4",
                EASEL_BATCH_WAIT_S="2")
    for first_seed in (71, 75):
        ids = fclient.submit_many([job(big_input, steps=2, seed=first_seed + k) for k in range(4)])
        done = [fclient.wait(job_id, timeout=90) for job_id in ids]
        assert [(st.state.value, st.attempts) for st in done] == [("succeeded", 1)] * 4, [st.error for st in done]
        assert [fclient.result(job_id).stages[0].batch_size for job_id in ids] == batch_sizes
    assert (tmp_path / "gpu-small.hits").read_text().split() == ran_out  # UNet batches that ran out
    # Split after the first round's failed call, and before the second round's call ran.
    assert w.log.read_text().count("4 jobs run at most") == 2


def test_retries_waiting_out_their_backoff_do_not_hold_a_batching_workers_slots(fclient, workers, big_input):
    """A micro-batching worker holds a retry's message until its countdown is due; those
    held messages must not use up what it may fetch (Celery's own strategy raises its
    prefetch for each, celery-batches does not): a new job sent after two of them, with the
    worker's batch size of two, runs before they are due."""
    from easel.shared.celery_app import send_segment

    workers(EASEL_BATCH_SIZE="2")
    held = []
    for seed in (51, 52):
        job_id, spec, plan = recorded_job(fclient.store, fclient.registry, big_input, seed)
        fclient.store.mark_queued(job_id, plan.segments[0].queue, spec.priority, due_at=time.time() + 25)
        send_segment(fclient.celery, job_id, 0, plan.segments[0].queue, spec.priority, countdown=25)
        held.append(job_id)
    time.sleep(1)  # fetched and held by the worker
    fresh = fclient.submit(job(big_input, steps=2, seed=53))
    st = fclient.wait(fresh, timeout=60)
    assert st.state.value == "succeeded", st.error
    assert fclient.store.states_of(held) == ["queued", "queued"]  # still waiting out their countdown
    for job_id in held:
        assert fclient.wait(job_id, timeout=60).state.value == "succeeded"


def test_preemption_storm_every_job_succeeds_exactly_once(fclient, workers):
    """3 workers run 200 jobs while one of them is SIGKILLed every few seconds and restarted
    under its hostname. A job may be hit more than once, so the poison limit is raised
    here; everything else is the default path."""
    import random

    rng = random.Random(7)
    pool = [workers(EASEL_MAX_CRASH_DELIVERIES="20") for _ in range(3)]
    image = fclient.storage.put_input(png_bytes((96, 96)), "png")
    ids = fclient.submit_many([job(image, steps=6, seed=1000 + i) for i in range(200)])
    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill on until every job has ended
        time.sleep(rng.uniform(2, 4))
        if all(s in ("succeeded", "failed", "cancelled") for s in fclient.store.states_of(ids)):
            break
        victim = rng.choice(pool)
        victim.stop(signal.SIGKILL)
        victim.start(wait=False, same_hostname=True)
        kills += 1
    done = {j: fclient.wait(j, timeout=300) for j in ids}
    assert kills >= 5
    failed = {j: st.error for j, st in done.items() if st.state.value != "succeeded"}
    assert not failed, failed
    for j in ids:
        assert outputs_in_storage(fclient, j) == [f"jobs/{j}/output/0.png"]
        attempts = fclient.result(j).attempts
        assert len([a for a in attempts if a.ended is None]) == 1, attempts  # one delivery ran it to the end
    assert sum(len(fclient.result(j).attempts) > 1 for j in ids) >= 1  # the storm did hit running jobs


def test_a_queued_job_whose_message_was_lost_is_sent_again(fclient, workers, big_input):
    """A worker that pops a message and dies before its claim takes the message with it. Here
    the job is recorded and marked queued with no message at all, while the queue is busy (a
    long job runs, another waits behind it): once it has waited a heartbeat TTL, held by no
    worker and in none of the queue's lists, a reaper sends it again, at its own priority, so
    it starts before the job that waited in the list at a lower one."""

    w = workers()
    running = fclient.submit(job(big_input, steps=250, seed=76))  # outlasts the TTL and a reap
    running_at_step(fclient, running)
    behind = fclient.submit(job(big_input, steps=2, seed=78, priority=9))
    lost, spec, plan = recorded_job(fclient.store, fclient.registry, big_input, 77, priority=0)
    fclient.store.mark_queued(lost, plan.segments[0].queue, spec.priority)
    assert fclient.wait(lost, timeout=120).state.value == "succeeded"
    assert fclient.wait(behind, timeout=120).state.value == "succeeded"
    assert "no message left" in w.log.read_text()
    assert fclient.status(lost).started_at < fclient.status(behind).started_at
    assert fclient.result(lost).attempts and len(fclient.result(lost).attempts) == 1


def test_a_retry_waiting_out_its_backoff_is_not_sent_again_early(fclient, big_input):
    """A retry's message waits in its worker's memory for its countdown (up to 30 s, longer
    than the TTL): the lost-message sweep counts the job's wait from when it is due, so it
    does not send it early; once due and still nowhere, it does."""
    from easel.shared.liveness import Reaper
    from easel.shared.schema import JobState

    job_id, spec, plan = recorded_job(fclient.store, fclient.registry, big_input, 79)
    queue = plan.segments[0].queue
    fclient.store.mark_queued(job_id, queue, spec.priority, due_at=time.time() + 2.0)
    sent = []
    reaper = Reaper(fclient.store, lambda *a, **kw: sent.append(a), every_s=0.5, ttl_s=0.5, queues=[queue])
    try:
        time.sleep(1.0)  # past the TTL since its record was written, not past its due time
        assert job_id not in reaper.sweep_lost(queue) and not sent
        time.sleep(2.0)
        assert job_id in reaper.sweep_lost(queue) and sent == [(job_id, 0, queue, spec.priority)]
    finally:
        fclient.store.transition(job_id, JobState.cancelled, error="test over")


def test_the_lost_message_sweep_is_leased_per_queue(fclient, big_input):
    """Each queue gets its sweep every period: another family's reaper taking its own
    queue's lease first does not keep this queue's reaper from sending a lost job again,
    and a second reaper of the same queue in the same period sends nothing more."""
    from easel.shared.jobstore import JobStore
    from easel.shared.liveness import Reaper

    store = JobStore(fclient.store.r, prefix="lease-per-queue")  # no other test's instances or jobs
    job_id, spec, _ = recorded_job(store, fclient.registry, big_input, 81)
    store.mark_queued(job_id, "lease-test.b", spec.priority)  # waiting, its message nowhere
    sent: dict[str, list] = {"a": [], "b": [], "b2": []}

    def reaper(name: str, queue: str) -> Reaper:
        return Reaper(store, lambda *a, **kw: sent[name].append(a), every_s=30, ttl_s=0.2, queues=[queue])

    a, b, b2 = reaper("a", "lease-test.a"), reaper("b", "lease-test.b"), reaper("b2", "lease-test.b")
    time.sleep(0.5)  # in contact, and the job waiting, for over the TTL
    for r in (a, b, b2):
        r.tick()
    assert sent == {"a": [], "b": [(job_id, 0, "lease-test.b", spec.priority)], "b2": []}


def test_a_job_the_reaper_cannot_read_strands_none_of_the_others(fclient, big_input):
    """A dead instance's jobs are requeued one by one, and the lost-message sweep sends its
    jobs one by one: a record this reaper cannot read (here: a spec that is not JSON, as a
    newer build's field would be to an older reaper) fails alone, the rest are sent, and
    the instance that still holds the unread job stays to be reaped again."""
    from easel.shared.jobstore import JobStore
    from easel.shared.liveness import Reaper
    from easel.shared.schema import JobState

    store = JobStore(fclient.store.r, prefix="unreadable")  # no other test's instances or jobs
    jobs = [recorded_job(store, fclient.registry, big_input, 90 + k) for k in range(6)]
    ids, queue = [job_id for job_id, _, _ in jobs], jobs[0][2].segments[0].queue
    for job_id, spec, _ in jobs:
        store.mark_queued(job_id, queue, spec.priority)
    store.beat("dead-1", "dead-host", {"family": "sd15"}, ttl_s=0.1)
    assert [c.outcome for c in store.claim_many([(j, 0, queue) for j in ids], "dead-host", "dead-1", 3)] == ["run"] * 6
    store.r.hset(store.key(ids[2]), "spec", "{not json")
    sent = []
    reaper = Reaper(store, lambda *a, **kw: sent.append(a[0]), every_s=30, ttl_s=0.0, queues=[queue])
    time.sleep(0.3)  # the heartbeat expired
    assert sorted(reaper.sweep()) == sorted(sent) == sorted(ids[:2] + ids[3:])
    assert store.r.zscore(store.instances_key(), "dead-1") is not None  # kept: it still holds the unread job
    assert store.r.smembers(store._running_prefix() + "dead-1") == {f"{ids[2]}:0"}

    # The same job waiting with no message, among others: the sweep sends the others.
    assert store.transition(ids[2], JobState.queued, end=(0, "dead-1"), queue=queue)
    store.mark_queued(ids[2], queue, jobs[2][1].priority)
    assert ids[2] in [job_id for job_id, _, _ in store.waiting_since(queue)]
    sent.clear()
    assert sorted(reaper.sweep_lost(queue)) == sorted(sent) == sorted(ids[:2] + ids[3:])
    for job_id in ids:
        store.transition(job_id, JobState.cancelled, error="test over")


def test_a_stale_copy_leaves_the_next_segments_place_and_the_sweep_its_queue(fclient, big_input):
    """A reaper requeued segment 0 of a job whose stalled worker then handed it off to
    segment 1: the stale copy of segment 0, claimed from the first queue, drops the job's
    left-over place there and not its place in the second queue, where segment 1 waits.
    A left-over place is also dropped by the first queue's sweep, which never sends
    segment 1 to a queue that is not its own."""
    from easel.shared.jobstore import JobStore
    from easel.shared.liveness import Reaper
    from easel.shared.schema import JobState

    store = JobStore(fclient.store.r, prefix="stale-copy")  # no other test's instances or jobs
    job_id, spec, _ = recorded_job(store, fclient.registry, big_input, 82)
    qa, qb = "stale-test.a", "stale-test.b"

    def waits_in(queue: str) -> bool:
        return store.r.zscore(store._queued_key(queue), job_id) is not None

    store.mark_queued(job_id, qa, spec.priority)
    assert store.claim_many([(job_id, 0, qa)], "w1", "i1", 3)[0].outcome == "run"
    store.mark_queued(job_id, qa, spec.priority)  # the reaper's requeue of segment 0
    store.mark_queued(job_id, qb, spec.priority)  # the stalled worker's hand-off
    assert store.transition(job_id, JobState.running, end=(0, "i1"), segment=1)
    stale = store.claim_many([(job_id, 0, qa)], "w2", "i2", 3)[0]
    assert (stale.outcome, stale.detail) == ("stale", "1")
    assert waits_in(qb) and not waits_in(qa)

    store.mark_queued(job_id, qa, spec.priority)  # a left-over place, as a lost copy leaves it
    store.mark_queued(job_id, qb, spec.priority)
    sent = []
    reaper = Reaper(store, lambda *a, **kw: sent.append(a), every_s=30, ttl_s=0.0, queues=[qa, qb])
    assert reaper.sweep_lost(qa) == [] and not waits_in(qa)
    assert reaper.sweep_lost(qb) == [job_id] and sent == [(job_id, 1, qb, spec.priority)]
    store.transition(job_id, JobState.cancelled, error="test over")


def test_a_failed_publish_is_retried_and_one_that_cannot_be_retried_stays_held(fault_env, fclient, big_input):
    """Celery's publish (a hand-off's or a retry's message) raises kombu's OperationalError
    once its own retries give up. That is Redis away, as a lost connection is: the segment
    is retried, not failed. When the retry's message cannot be sent either, the delivery
    waits in the worker's unsettled list for its heartbeat to settle it."""
    import queue as queue_mod
    import types

    import kombu.exceptions

    from easel.shared.celery_app import make_celery, queued_deliveries
    from easel.shared.jobstore import JobStore
    from easel.shared.metrics import priority_lists
    from easel.shared.schema import JobState
    from easel.shared.settings import Settings
    from easel.worker.policy import Delivery, settle_error

    _, env = fault_env
    settings = Settings(**{k[6:].lower(): v for k, v in env.items()})
    store = JobStore(fclient.store.r, prefix="publish-fail")  # no other test's instances or jobs
    ctx = types.SimpleNamespace(store=store, settings=settings, instance="i1", unsettled=queue_mod.SimpleQueue(),
                                holding=Holdings())
    job_id, spec, _ = recorded_job(store, fclient.registry, big_input, 83)
    q = "publish-test.a"  # no worker serves it
    lists = [name for _, name in priority_lists(q)]
    d = Delivery(job_id, 0, q)
    away = kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    try:
        store.mark_queued(job_id, q, spec.priority)
        assert store.claim_many([(job_id, 0, q)], "w1", "i1", 3)[0].outcome == "run"
        assert settle_error(ctx, make_celery(settings), d, away) == "retrying"
        assert store.status(job_id).state != JobState.failed
        assert (job_id, 0) in queued_deliveries(store.r, lists)  # the retry's message

        store.r.delete(*lists)
        assert store.claim_many([(job_id, 0, q)], "w1", "i1", 3)[0].outcome == "run"
        dead = make_celery(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
        dead.conf.task_publish_retry = False  # the default rides out a minute; what comes after is tested
        assert settle_error(ctx, dead, d, away) == "error"
        assert ctx.unsettled.get_nowait() == (d, away, None)

        # Taken over meanwhile (i1 stalled past its TTL, i2 claimed the job): i1's retry is
        # refused, counts nothing, and leaves no place in the queue behind.
        store.r.delete(*lists)
        assert store.claim_many([(job_id, 0, q)], "w1", "i1", 3)[0].outcome == "run"
        assert store.claim_many([(job_id, 0, q)], "w2", "i2", 3)[0].outcome == "run"
        retries = store.retries_of(job_id, 0)
        assert settle_error(ctx, make_celery(settings), d, away) == "superseded"
        assert store.retries_of(job_id, 0) == retries and store.queue_position(job_id) is None
        assert not queued_deliveries(store.r, lists)
    finally:
        store.r.delete(*lists)
        store.transition(job_id, JobState.cancelled, error="test over")


def test_a_reaped_instance_that_comes_back_keeps_what_it_claims_since(fclient, big_input):
    """A worker that stalled past its heartbeat TTL is reaped. If it comes back and claims a
    new job while the reaper requeues what it held, forgetting it must not drop that job:
    should the worker then die for good, the next reap finds it. Once everything it held is
    requeued and it stops beating, it is forgotten."""
    from easel.shared.jobstore import JobStore
    from easel.shared.schema import JobState

    store = JobStore(fclient.store.r, prefix="comeback")  # no other test's instances or jobs
    q, ids = "comeback-test.a", []

    def queued_job(seed: int) -> str:
        job_id, spec, _ = recorded_job(store, fclient.registry, big_input, seed)
        store.mark_queued(job_id, q, spec.priority)
        ids.append(job_id)
        return job_id

    def beat() -> None:
        store.beat("x", "host-x", {"family": "comeback"}, 0.2)

    try:
        first = queued_job(84)
        beat()
        assert store.claim_many([(first, 0, q)], "w", "x", 3)[0].outcome == "run"
        time.sleep(0.4)  # it stalls past its TTL
        leased, dead = store.reap_dead(lease_s=30)
        assert dead["x"][1] == [(first, 0)]
        beat()  # it comes back ...
        second = queued_job(85)
        assert store.claim_many([(second, 0, q)], "w", "x", 3)[0].outcome == "run"  # ... and claims anew
        assert store.requeue(first, 0, "x", "test") is not None
        store.forget_instance("x", dead["x"][1], leased)
        time.sleep(0.4)  # it dies for good
        leased, dead = store.reap_dead(lease_s=30)
        assert dead["x"][1] == [(second, 0)]
        assert store.requeue(second, 0, "x", "test") is not None
        store.forget_instance("x", dead["x"][1], leased)
        assert store.r.zscore(store.instances_key(), "x") is None
        assert not store.r.exists(store._running_prefix() + "x")
    finally:
        for job_id in ids:
            store.transition(job_id, JobState.cancelled, error="test over")


def test_a_retiring_worker_waits_for_its_beat_in_flight(fault_env, fclient):
    """A clean exit while a heartbeat is on its way to Redis: the retirement goes after it,
    so the beat cannot land last and bring the instance back to life (and into its family's
    capacity) for a whole TTL. The beat is held in the network until the retirement began."""
    import re

    from easel.shared.jobstore import JobStore
    from easel.shared.keys import family_capacity_key
    from easel.shared.liveness import Heartbeat

    svc, _ = fault_env
    proxy = TcpProxy(svc.redis.port, count=re.compile(rb"EVALSHA|\$4\r\nTIME\r\n|MULTI")).start()
    store = JobStore(redis.Redis(port=proxy.port, decode_responses=True), prefix="retiring")
    beat = Heartbeat(store, "r1", "host-r1", {"family": "retiring", "batch_size": 2}, every_s=3600, ttl_s=15)
    try:
        pool = store.r.connection_pool  # two connections open, so requests are counted as they are sent
        for conn in [pool.get_connection() for _ in range(2)]:
            pool.release(conn)
        proxy.hold()
        beat.start()
        wait_for(lambda: proxy.requests == 1, 10, "the beat sent")  # and held
        retiring = threading.Thread(target=beat.retire)
        retiring.start()
        time.sleep(0.5)
        assert proxy.requests == 1  # the retirement waits for the beat, sending nothing yet
        proxy.release()
        retiring.join(10)
        assert not retiring.is_alive() and proxy.requests >= 2
        assert fclient.store.r.zscore(store.instances_key(), "r1") == 0  # gone, not alive for another TTL
        assert not fclient.store.r.exists(family_capacity_key("retiring", "retiring"))
    finally:
        proxy.release()
        proxy.stop()
        fclient.store.r.delete(*fclient.store.r.scan_iter(match="retiring:*"))


def test_a_finish_refused_after_a_take_over_is_not_counted_as_a_success(fault_env, fclient, big_input):
    """A worker that stalled past its TTL while it wrote a job's outputs finds, at its final
    state write, that another instance has taken the job over: the write is refused, the
    job stays the new holder's, and this delivery ends superseded, not succeeded (which the
    worker's metrics and logs would count). A job that ended meanwhile ends it as
    "already" that state."""
    import types
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from easel.shared.jobstore import JobStore
    from easel.shared.schema import JobState
    from easel.shared.settings import Settings
    from easel.worker.engine import Job, finish
    from easel.worker.policy import Delivery
    from easel.worker.runner import Carrier

    _, env = fault_env
    store = JobStore(fclient.store.r, prefix="refused-finish")  # no other test's instances or jobs
    ctx = types.SimpleNamespace(store=store, storage=fclient.storage, instance="i1", hostname="w1", finisher=None,
                                stops=None, settings=Settings(**{k[6:].lower(): v for k, v in env.items()}),
                                io=ThreadPoolExecutor(2), holding=Holdings())
    ids = []

    def finished_by_i1(seed: int, meanwhile) -> tuple[str, str]:
        job_id, _, plan = recorded_job(store, fclient.registry, big_input, seed)
        ids.append(job_id)
        d = Delivery(job_id, 0, plan.segments[0].queue)
        claim = store.claim_many([(job_id, 0, d.queue)], "w1", "i1", 3)[0]  # i1 never beats: dead to others
        meanwhile(job_id, d)
        outcomes = {}
        finish(ctx, None, [Job(d, claim, carrier=Carrier(images=[Image.new("RGB", (64, 64))]))], outcomes)
        return outcomes[d], store.status(job_id).state

    try:
        taken = lambda job_id, d: store.claim_many([(job_id, 0, d.queue)], "w2", "i2", 3)[0].outcome  # noqa: E731
        assert finished_by_i1(86, taken) == ("superseded", JobState.running)
        assert store.r.hget(store.key(ids[-1]), "instance") == "i2"
        ended = lambda job_id, d: store.transition(job_id, JobState.failed, error="failed meanwhile")  # noqa: E731
        assert finished_by_i1(87, ended) == ("already failed", JobState.failed)
        unharmed = lambda job_id, d: None  # noqa: E731
        assert finished_by_i1(88, unharmed) == ("succeeded", JobState.succeeded)
    finally:
        ctx.io.shutdown()
        for job_id in ids:
            store.transition(job_id, JobState.cancelled, error="test over")


def test_with_default_liveness_settings_a_killed_job_completes_within_a_minute(fclient, workers, big_input):
    """What users run: heartbeat every 3 s, dead after 15 s, reaping every 5 s (the module's
    shortened intervals put back to their defaults)."""
    from easel.shared.settings import Settings

    d = Settings()
    defaults = {"EASEL_HEARTBEAT_INTERVAL_S": str(d.heartbeat_interval_s),
                "EASEL_HEARTBEAT_TTL_S": str(d.heartbeat_ttl_s), "EASEL_REAP_EVERY_S": str(d.reap_every_s)}
    assert set(defaults) == set(LIVENESS)
    pair = [workers(**defaults), workers(**defaults)]
    job_id = fclient.submit(job(big_input, steps=60, seed=91))
    running_at_step(fclient, job_id)
    victim = next(w for w in pair if w.hostname == fclient.status(job_id).worker)
    victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    st = fclient.wait(job_id, timeout=90)
    assert st.state.value == "succeeded", st.error
    assert time.monotonic() - killed_at < 60
    assert st.attempts == 2 and "stopped beating" in st.note
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]


def test_a_worker_rides_out_redis_going_silent_without_closing_its_connections(fault_env, fclient, workers,
                                                                               big_input):
    """A Redis host that vanishes without closing its connections (a failover, a NAT or
    firewall dropping the flow) leaves every connection a worker has open silent: no error,
    no reply. With default settings the worker's commands and its hand-off's publish time
    out and go again on new connections, and its consumer drops the silent BRPOP: it takes
    the next chain within about half a minute and hands it on, and no reaper takes it for
    dead meanwhile (its heartbeat goes on). A
    thread waiting on such a connection without a timeout waits for good here (the proxy
    keeps it open) and for the kernel's ~15 min in the field."""
    from easel.shared.settings import Settings

    svc, _ = fault_env
    d = Settings()
    defaults = {"EASEL_HEARTBEAT_INTERVAL_S": str(d.heartbeat_interval_s),
                "EASEL_HEARTBEAT_TTL_S": str(d.heartbeat_ttl_s), "EASEL_REAP_EVERY_S": str(d.reap_every_s)}
    sim = workers("sim", **defaults)  # the chains' second family, on Redis itself: also a reaper that would
    proxy = TcpProxy(svc.redis.port).start()  # take the silenced worker for dead

    def chain(seed: int) -> dict:  # its hand-off to sim is a publish on the worker's broker connections
        return {"input": {"image": big_input}, "stages": [
            {"model": "sd15", "prompt": "silent", "steps": 2, "strength": 1.0, "seed": seed},
            {"model": "sim", "prompt": "silent", "steps": 2, "strength": 0.5}]}

    try:
        worker = workers(**defaults, EASEL_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
        first = fclient.wait(fclient.submit(chain(95)), timeout=60)
        assert first.state.value == "succeeded", first.error
        proxy.silence()
        silenced_at = time.monotonic()
        job_id = fclient.submit(chain(96))
        st = fclient.wait(job_id, timeout=120)
        took = time.monotonic() - silenced_at
        assert st.state.value == "succeeded", st.error
        attempts = [(a.segment, a.worker, a.ended) for a in fclient.result(job_id).attempts]
        assert attempts == [(0, worker.hostname, None), (1, sim.hostname, None)] and not st.note  # never reaped
        assert took < 60, took
        assert worker.proc.poll() is None
        print(f"job done {took:.1f} s after the worker's connections went silent")
    finally:
        proxy.stop()


def test_the_stops_listener_replaces_a_subscription_gone_silent(fault_env, fclient):
    """A quiet subscription says nothing of its connection: the listener asks Redis for a
    word after PING_AFTER_S of quiet, keeps a connection that answers, and replaces one that
    leaves its PING unanswered; stops are heard again at once (until then, stages read the
    flags back themselves every READ_EVERY_S)."""
    import json

    from easel.shared.jobstore import JobStore, redis_client
    from easel.shared.quiet import PING_AFTER_S, SILENT_S
    from easel.worker.stops import StopListener

    svc, _ = fault_env
    proxy = TcpProxy(svc.redis.port).start()
    store = JobStore(redis_client(f"redis://127.0.0.1:{proxy.port}/0"), prefix="silent-stops")
    listener = StopListener(store.r, store.stops_channel()).start()
    try:
        wait_for(lambda: listener.connected, 10, "subscribed")
        time.sleep(SILENT_S + 2)
        assert listener.epoch == 1 and listener.connected  # quiet but answering: kept
        proxy.silence()
        silenced_at = time.monotonic()
        wait_for(lambda: listener.epoch == 2 and listener.connected, SILENT_S + 15, "subscribed again")
        assert time.monotonic() - silenced_at <= SILENT_S + PING_AFTER_S + 5  # (at 1 s polls, then resubscribed)
        fclient.store.r.publish(store.stops_channel(), json.dumps({"job_id": "j1", "stop": "cancel"}))
        wait_for(lambda: listener.stop_for("j1", "any") == "cancel", 5, "the stop heard")
    finally:
        listener.close()
        proxy.stop()


def test_an_event_stream_replaces_a_subscription_gone_silent(fault_env, fclient, big_input):
    """An SSE stream whose pub/sub connection goes silent (the API's Redis connections cut at
    the network, kept open) drops it and subscribes again: progress published afterwards
    reaches the client within seconds, and the stream ends with `done` when the job ends.
    Otherwise only `done` would arrive (the record is re-read every few seconds), no
    progress."""
    import json as _json

    from fastapi.testclient import TestClient

    from easel.producer.api.app import create_app
    from easel.producer.api.events import RECHECK_S
    from easel.shared.jobstore import REPLY_WITHIN_S
    from easel.shared.quiet import SILENT_S
    from easel.shared.schema import JobState
    from easel.shared.settings import ApiKey
    from tests.test_api import keys_env

    svc, _ = fault_env
    proxy = TcpProxy(svc.redis.port).start()
    job_id, _, _ = recorded_job(fclient.store, fclient.registry, big_input, 92, owner="main")
    settings = fclient.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{proxy.port}/0",
                                                   "api_keys": [ApiKey(**k) for k in _json.loads(keys_env())]})
    events: list[tuple[float, str]] = []
    try:
        with TestClient(create_app(settings, webhooks=False)) as c:
            def follow() -> None:
                with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": "Bearer tok-main"}) as s:
                    events.extend((time.monotonic(), ln) for ln in s.iter_lines() if ln.startswith("event:"))

            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            wait_for(lambda: [e for _, e in events] == ["event: status"], 30, "the stream's first event")
            proxy.silence()
            silenced_at = time.monotonic()
            step = 0
            while not any(e == "event: progress" for _, e in events) and time.monotonic() - silenced_at < 60:
                step += 1
                fclient.store.r.publish(fclient.store.events_channel(job_id),
                                        _json.dumps({"stage": 0, "step": step, "total_steps": 1000}))
                time.sleep(0.5)
            heard = [t for t, e in events if e == "event: progress"]
            # (its periodic re-read may first wait out a silent connection: RECHECK_S + REPLY_WITHIN_S)
            assert heard and heard[0] - silenced_at < SILENT_S + RECHECK_S + REPLY_WITHIN_S + 10, events
            fclient.store.transition(job_id, JobState.cancelled, error="test over")
            reader.join(30)
            assert not reader.is_alive() and events[-1][1] == "event: done", events
    finally:
        proxy.stop()
        fclient.store.transition(job_id, JobState.cancelled, error="test over")


def test_an_event_stream_outlives_a_redis_restart_and_gives_back_its_connection(fault_env, fclient, big_input):
    """An SSE stream open while Redis restarts goes on following: it waits, reconnects and
    re-reads the job, and sends `done` when the job ends after the restart. Once it ends,
    no connection of the API's async pool is left in use (an unsubscribe that raised while
    Redis was away used to keep one for good)."""
    import json as _json

    from fastapi.testclient import TestClient

    from easel.producer.api.app import create_app
    from easel.shared.schema import JobState
    from easel.shared.settings import ApiKey
    from tests.test_api import keys_env

    svc, _ = fault_env
    job_id, _, _ = recorded_job(fclient.store, fclient.registry, big_input, 91, owner="main")
    settings = fclient.settings.model_copy(update={"api_keys": [ApiKey(**k) for k in _json.loads(keys_env())]})
    app = create_app(settings, webhooks=False)
    api, events = app.state.api, []
    with TestClient(app) as c:
        def follow() -> None:
            with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": "Bearer tok-main"}) as s:
                events.extend(line for line in s.iter_lines() if line.startswith("event:"))

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        wait_for(lambda: events == ["event: status"], 30, "the stream's first event")
        svc.redis.stop()
        time.sleep(1)
        svc.redis.start()
        fclient.store.transition(job_id, JobState.cancelled, error="test over")  # after the restart
        reader.join(40)
        assert not reader.is_alive() and events[-1] == "event: done", events
        pool = api.aredis.connection_pool
        assert wait_for(lambda: not pool._in_use_connections, 10, "the stream's connection given back")
