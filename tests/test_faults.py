"""Fault injection against real processes: kill -9 a worker, SIGTERM it, restart valkey and
SeaweedFS, poison jobs, time limits, cancel, progress, priorities.

These tests get their own servers (restarting the session's would disturb other tests) and
a short visibility_timeout, so a message whose worker died comes back within seconds.
"""
from __future__ import annotations

import signal
import time

import pytest

from producer.embedded import EmbeddedServices, free_port
from tests.conftest import WorkerProc, png_bytes
from tests.netproxy import TcpProxy

pytestmark = pytest.mark.slow

VISIBILITY_S = 4


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory, model_root):
    svc = EmbeddedServices(tmp_path_factory.mktemp("fault-services")).start()
    env = {**svc.env(), "EASEL_MODEL_ROOT": str(model_root), "EASEL_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
           "EASEL_OVERLAP_FINISH": "true"}  # the GPU workers' path (see conftest.easel_env)
    yield svc, env
    svc.redis.kill()
    svc.s3.kill()


@pytest.fixture(scope="module")
def fclient(fault_env):
    from producer.client import EaselClient
    from shared.settings import Settings

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


def test_sigkill_mid_stage_is_redelivered_and_completes_once(fclient, workers, big_input):
    w1 = workers()
    job_id = fclient.submit(job(big_input, steps=40))
    running_at_step(fclient, job_id)
    w1.stop(signal.SIGKILL)
    assert fclient.status(job_id).state.value == "running"
    workers()  # a replacement; the unacked message comes back after the visibility timeout
    st = fclient.wait(job_id, timeout=60)  # not after kombu 5.7's default 100 s sweep period
    assert st.state.value == "succeeded", st.error
    assert st.attempts == 2
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    # Long after the visibility timeout nothing runs it again.
    time.sleep(VISIBILITY_S + 2)
    again = fclient.status(job_id)
    assert again.state.value == "succeeded" and again.attempts == 2 and again.outputs == st.outputs


def test_duplicate_delivery_after_visibility_timeout_gives_one_result(fclient, workers, big_input):
    """A stage longer than the visibility timeout is delivered to a second worker while the first
    still runs it: both finish, the result set is one and the same."""
    workers(), workers()
    job_id = fclient.submit(job(big_input, steps=60, seed=3))
    st = fclient.wait(job_id, timeout=240)
    assert st.state.value == "succeeded", st.error
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    first = fclient.storage.get(st.outputs[0])
    manifest = fclient.result(job_id)
    time.sleep(2)
    assert fclient.storage.get(st.outputs[0]) == first
    assert fclient.result(job_id).outputs == manifest.outputs


def test_sigterm_finishes_running_stage_and_leaves_queued_job(fclient, workers, big_input):
    w = workers()
    running = fclient.submit(job(big_input, steps=40, seed=4))
    queued = fclient.submit(job(big_input, steps=2, seed=5))
    running_at_step(fclient, running)
    assert fclient.status(queued).queue_position == 0
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
    wait_for(lambda: fclient.status(job_id).attempts >= 2, 60, "a retried delivery")
    assert fclient.status(job_id).state.value == "running"
    proxy.start()  # back on the same port
    st = fclient.wait(job_id, timeout=180)
    assert st.state.value == "succeeded", st.error
    assert fclient.storage.exists(st.outputs[0])
    proxy.stop()


def test_worker_dying_while_finishing_is_rerun_by_another_worker(fault_env, fclient, workers, big_input):
    """With overlap_finish the message is acked once the pipeline call is done and the
    outputs are still being written: a worker killed then leaves no message to redeliver.
    Its missing heartbeat lets another worker's reaper re-send the job, which ends with one
    result."""
    svc, _ = fault_env
    proxy = TcpProxy(svc.s3.port).start()
    w1 = workers(EASEL_S3_ENDPOINT_URL=proxy.url)
    job_id = fclient.submit(job(big_input, steps=12, seed=31))
    running_at_step(fclient, job_id, 1)  # the input was read through the proxy
    proxy.hold()  # from now on the worker's uploads hang
    finishing = f"{fclient.store.prefix}:finishing"
    wait_for(lambda: fclient.store.r.zscore(finishing, job_id) is not None, 60, "job registered as finishing")
    time.sleep(0.5)
    assert fclient.status(job_id).state.value == "running"
    w1.stop(signal.SIGKILL)
    proxy.stop()
    w2 = workers(EASEL_REAP_EVERY_S="1")  # direct to S3; notices w1's heartbeat is gone (TTL 30 s)
    st = fclient.wait(job_id, timeout=120)
    assert st.state.value == "succeeded", st.error
    assert st.attempts == 2
    assert outputs_in_storage(fclient, job_id) == [f"jobs/{job_id}/output/0.png"]
    assert fclient.store.r.zscore(finishing, job_id) is None
    assert "left finishing by" in w2.log.read_text()


def test_transient_errors_stop_after_the_retry_cap(fclient, workers, big_input):
    dead = f"http://127.0.0.1:{free_port()}"
    workers("sd15-wide", EASEL_S3_ENDPOINT_URL=dead, EASEL_MAX_RETRIES="2")
    job_id = fclient.submit(job(big_input, steps=2, model="sd15-wide"))
    st = fclient.wait(job_id, timeout=120)
    assert st.state.value == "failed"
    assert st.error.startswith("gave up after 2 retries: EndpointConnectionError")


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
    workers()
    st = fclient.wait(poison, timeout=120)
    assert st.state.value == "failed"
    assert st.error.startswith("poison job: the worker died 2 times while running segment 0")
    good = fclient.submit(job(big_input, steps=2, seed=32))
    assert fclient.wait(good, timeout=120).state.value == "succeeded"


def test_stage_time_limit_fails_the_job_and_worker_keeps_serving(fclient, workers, big_input):
    workers("sd15-wide", EASEL_STAGE_TIMEOUT_BASE_S="0.5", EASEL_STAGE_TIMEOUT_PER_MPX_STEP_S="0")
    slow = fclient.submit(job(big_input, steps=200, model="sd15-wide"))
    st = fclient.wait(slow, timeout=120)
    assert st.state.value == "failed"
    assert "exceeded its time limit of 0.5s" in st.error
    quick = fclient.submit(job(fclient.storage.put_input(png_bytes((16, 16)), "png"), steps=1, model="sd15-wide"))
    assert fclient.wait(quick, timeout=60).state.value == "succeeded"


def test_stuck_stage_is_failed_by_the_watchdog(fclient, workers):
    w = workers("sd15-wide", EASEL_STAGE_TIMEOUT_BASE_S="0.01", EASEL_STAGE_TIMEOUT_PER_MPX_STEP_S="0",
                EASEL_STAGE_STUCK_GRACE_S="0.05")
    huge = fclient.storage.put_input(png_bytes((2048, 2048)), "png")  # the VAE encode alone outlasts the limit
    st = fclient.wait(fclient.submit(job(huge, steps=1, model="sd15-wide")), timeout=120)
    assert st.state.value == "failed" and "made no progress" in st.error
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


def test_progress_queue_position_and_priority_order(fclient, workers, big_input):
    blocker = fclient.submit(job(big_input, steps=40, seed=50))
    low = [fclient.submit(job(big_input, steps=2, seed=51 + i, priority=9)) for i in range(2)]
    high = fclient.submit(job(big_input, steps=2, seed=60, priority=0))
    # Priority 0 goes ahead of the default 5 (blocker) and of the 9s, which keep their order.
    assert [fclient.status(j).queue_position for j in [high, blocker, *low]] == [0, 1, 2, 3]
    workers()
    steps_seen = set()
    wait_for(lambda: steps_seen.add(fclient.status(blocker).progress.step) or fclient.status(blocker).state.terminal,
             120, "blocker done")
    assert len(steps_seen - {0}) >= 3  # step-level progress was visible while it ran
    done = {j: fclient.wait(j, timeout=120) for j in [high, *low]}
    assert all(s.state.value == "succeeded" for s in done.values())
    assert done[high].started_at < fclient.status(blocker).started_at < min(done[j].started_at for j in low)
