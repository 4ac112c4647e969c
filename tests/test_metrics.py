"""Prometheus endpoints of the API and of a worker, scraped over HTTP and parsed."""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from easel.producer.embedded import free_port
from tests.conftest import WorkerProc, img2img_job
from tests.test_api import PARKED, ApiServer, api, job_body, keys_env, upload, wait_state  # noqa: F401  (module-scoped API server fixture)
from easel.worker.metrics import metrics_port


def scrape(url: str) -> dict[str, list]:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families: dict, name: str, **labels) -> float:
    for fam in families.values():
        for s in fam:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not exposed")


def test_api_metrics_expose_jobs_queues_and_requests(api, sd15_worker):  # noqa: F811
    """A family with no worker has room for one message in its broker queue; a second job
    waits pending its tenant's turn, and both places show, in /metrics and /v1/queues."""
    with api.client() as http:
        done = wait_state(http, http.post("/v1/jobs", json=job_body(upload(http), steps=2)).json()["id"])
        assert done["state"] == "succeeded"
        m = scrape(f"{api.url}/metrics")
        before = value(m, "easel_queue_messages", family=PARKED, priority="7")
        pending_before = value(m, "easel_queue_pending", family=PARKED)
        # A priority-7 job for a family with no worker waits in sub-list easel.parked:7.
        body = {**job_body(upload(http), model=PARKED), "priority": 7}
        job_ids = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
        time.sleep(5.5)  # the Redis-read series are cached for 5 s
        m = scrape(f"{api.url}/metrics")
        [parked] = [q for q in http.get("/v1/queues").json() if q["family"] == PARKED]
        for job_id in job_ids:
            http.delete(f"/v1/jobs/{job_id}")
    assert value(m, "easel_queue_messages", family=PARKED, queue=f"easel.{PARKED}", priority="7") == before + 1
    assert value(m, "easel_queue_pending", family=PARKED, queue=f"easel.{PARKED}") == pending_before + 1
    assert parked["pending"] == pending_before + 1 and parked["by_priority"]["7"] == before + 1
    assert parked["waiting"] == parked["messages"] + parked["pending"]
    assert {s.labels["priority"] for s in m["easel_queue_messages"] if s.labels["family"] == "sd15"} == \
        {str(p) for p in range(10)}
    assert value(m, "easel_jobs_finished_total", state="succeeded") >= 1
    assert value(m, "easel_jobs", state="queued") >= 1  # the parked job, waiting when scraped
    assert value(m, "easel_workers", family="sd15") >= 1
    assert value(m, "easel_redis_up") == 1
    assert value(m, "easel_api_requests_total", method="POST", route="/v1/jobs", status="201") >= 2
    assert value(m, "easel_api_jobs_submitted_total", key="main") >= 2
    assert "easel_api_request_duration_seconds" in m and "easel_webhook_deliveries" in m


def _requests_by_process(folder, route: str) -> dict[int, float]:
    """pid -> the route's GET requests in that server process's multiprocess counter file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out = {}
    for f in folder.glob("counter_*.db"):
        pid = int(f.stem.split("_")[-1])
        for fam in MultiProcessCollector.merge([str(f)]):
            for smp in fam.samples:
                if smp.name == "easel_api_requests_total" and smp.labels.get("route") == route \
                        and smp.labels.get("method") == "GET":
                    out[pid] = out.get(pid, 0) + smp.value
    return out


def test_api_with_several_workers_counts_every_process_once(easel_env, tmp_path):
    """`easel api --workers 2`: each scrape (answered by either process) counts the requests
    both processes served, the Redis-read series appear once, and every log line is JSON."""
    # TMPDIR puts the server's own multiprocess folder where the test can look into it.
    env = {**easel_env, "EASEL_API_KEYS": keys_env(), "TMPDIR": str(tmp_path), "EASEL_LOG_FORMAT": "json"}
    server = ApiServer(env, tmp_path, workers=2, log_level="info").start()
    auth = {"Authorization": "Bearer tok-main"}
    route, sent = "/v1/queues", 0
    try:
        [folder] = tmp_path.glob("easel-api-metrics-*")
        from concurrent.futures import ThreadPoolExecutor

        def one(_):  # a connection of its own: either process may accept it
            return httpx.get(f"{server.url}{route}", headers=auth, timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            for _ in range(30):  # until both processes have served some
                assert set(pool.map(one, range(8))) == {200}
                sent += 8
                if len(_requests_by_process(folder, route)) >= 2:
                    break
        by_pid = _requests_by_process(folder, route)
        assert len(by_pid) == 2, by_pid
        deadline = time.monotonic() + 10
        while sum(_requests_by_process(folder, route).values()) < sent:  # counted once each response is out
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(6):  # the scrapes, too, go to either process
            m = scrape(f"{server.url}/metrics")
            assert value(m, "easel_api_requests_total", method="GET", route=route, status="200") == sent
            series = [(smp.name, tuple(sorted(smp.labels.items()))) for fam in m.values() for smp in fam]
            assert len(series) == len(set(series)), "a series appears twice"
            assert [smp.value for smp in m["easel_redis_up"]] == [1]  # the serving process's, not summed
            assert len([smp for smp in m["easel_workers"] if smp.labels == {"family": "sd15"}]) == 1
            assert len(m["easel_queue_messages"]) == 10 * len({smp.labels["family"] for smp in m["easel_queue_messages"]})
            assert [smp.value for smp in m["easel_api_sse_streams"]] == [0]  # livesum: one series
    finally:
        server.stop()
    assert not folder.exists()  # removed when the server stops
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    assert {"Started server process", "Application startup complete."} <= {ln["message"].split(" [")[0] for ln in lines}
    access = [ln for ln in lines if ln["logger"] == "uvicorn.access" and ln.get("path") == route]
    assert len(access) == sent and {ln["status"] for ln in access} == {200}
    assert len({ln["message"] for ln in lines if ln["message"].startswith("Started server process")}) == 2


def test_an_operators_multiprocess_folder_is_emptied_first(tmp_path, monkeypatch):
    from easel.producer.api.metrics import MULTIPROC_ENV, multiprocess_metrics

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with multiprocess_metrics(1) as path:
        assert path is None and MULTIPROC_ENV not in os.environ  # one process: plain in-process metrics
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_12345.db").write_bytes(b"an earlier run")
    (folder / "keep.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))
    with multiprocess_metrics(4) as path:
        assert path == str(folder) and sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert folder.exists()  # the operator's folder stays


def test_live_gauges_of_dead_processes_are_forgotten(tmp_path):
    import subprocess
    import sys

    from easel.producer.api.metrics import forget_dead_processes

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    for name in (f"gauge_livesum_{pid}.db", f"counter_{pid}.db", f"gauge_livesum_{os.getpid()}.db"):
        (tmp_path / name).write_bytes(b"")
    forget_dead_processes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"counter_{pid}.db", f"gauge_livesum_{os.getpid()}.db"]


class IsolatedWorker(WorkerProc):
    """A worker on a queue prefix of its own (EASEL_QUEUE_PREFIX in its env): only this test's
    jobs reach it; WorkerProc waits for the presence key under that prefix."""


@pytest.fixture(scope="module")
def metrics_worker(easel_env, tmp_path_factory):
    port = free_port()
    env = {**easel_env, "EASEL_METRICS_PORT": str(port), "EASEL_QUEUE_PREFIX": "mtest"}
    w = IsolatedWorker("sd15", env, tmp_path_factory.mktemp("mlogs")).start()
    w.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield w
    w.stop()


def test_worker_metrics_after_a_job(metrics_worker, easel_env, input_png):
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    c = EaselClient(Settings(queue_prefix="mtest"))
    beat = json.loads(c.store.r.get(f"mtest:worker:{metrics_worker.hostname}"))
    assert beat["metrics_port"] == int(metrics_worker.metrics_url.split(":")[2].split("/")[0])
    job = img2img_job(str(input_png), steps=3)
    job["num_images"] = 2
    st = c.wait(c.submit(job), timeout=120)
    assert st.state.value == "succeeded", st.error
    time.sleep(0.3)  # postrun runs right after the task returns
    m = scrape(metrics_worker.metrics_url)
    assert value(m, "easel_worker_segments_total", family="sd15", outcome="succeeded") == 1
    assert value(m, "easel_segment_duration_seconds_count", family="sd15", outcome="succeeded") == 1
    lab = dict(family="sd15", model="sd15", task="img2img")
    assert value(m, "easel_stage_duration_seconds_count", phase="denoise", **lab) == 1
    assert value(m, "easel_stage_duration_seconds_sum", phase="denoise", **lab) > 0
    # Buckets fit minute-long stages: fine steps to a minute, coarse ones to an hour.
    les = {s.labels["le"] for s in m["easel_stage_duration_seconds"] if s.name.endswith("_bucket")}
    assert {"30.0", "60.0", "120.0", "600.0", "3600.0"} <= les
    assert value(m, "easel_batch_size_sum", family="sd15") == 2
    assert value(m, "easel_pipeline_load_seconds", family="sd15", model="sd15") > 0
    assert value(m, "easel_family_warm_seconds", family="sd15") > 0
    assert value(m, "easel_queue_messages", family="sd15", queue="mtest.sd15", priority="0") == 0
    assert value(m, "easel_worker_busy", family="sd15") == 0
    assert "easel_gpu_memory_bytes" in m  # samples only on a CUDA device; declared everywhere
    assert value(m, "process_resident_memory_bytes") > 0


def test_metrics_port_follows_the_pinned_gpu():
    assert metrics_port(9100, "") == 9100
    assert metrics_port(9100, "3") == 9103
    assert metrics_port(9100, "0,1") == 9100
    assert os.environ.get("EASEL_METRICS_PORT") in (None, "", "0")  # off by default in tests


def test_a_scrape_reads_live_workers_without_scanning_the_keyspace(easel_env):
    """Live workers per family come from their heartbeats in one read per family: a scrape
    (every few seconds, by every API and worker process) never walks the keyspace, which
    holds every job record of the last days."""
    import uuid

    import redis as redis_py

    from easel.shared.jobstore import JobStore
    from easel.shared.metrics import RedisStateCollector

    r = redis_py.Redis.from_url(easel_env["EASEL_REDIS_URL"], decode_responses=True)
    store = JobStore(r, f"scan{uuid.uuid4().hex[:8]}")
    for i in range(3):
        store.beat(f"inst-{i}", f"host-{i}", {"family": "f", "hostname": f"host-{i}"}, ttl_s=30)
    store.retire("inst-2", "host-2", "f")

    def scans() -> int:
        return int(r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    before = scans()
    got = {s.labels["family"]: s.value for fam in RedisStateCollector(r, ["f", "g"], store.prefix, jobs=True,
                                                                        cache_s=0).collect()
           if fam.name == "easel_workers" for s in fam.samples}
    assert got == {"f": 2, "g": 0}
    assert scans() == before
