"""The overlapped finish waits for the next pipeline call (or its wait limit) before it runs.

Against the session's real valkey: the finisher registers each pending finish there, which
is what lets another worker's reaper re-send it if this process dies.
"""
from __future__ import annotations

import threading
import time
import uuid
from types import SimpleNamespace

from worker.finisher import Finisher, finishing_key


def _finisher(client, wait_s: float) -> tuple[Finisher, list[tuple[str, float]]]:
    ran: list[tuple[str, float]] = []
    ctx = SimpleNamespace(store=client.store, hostname="test-finisher@here")
    return Finisher(ctx, guard=lambda job_id, seg, queue, body: body(), max_pending=2, wait_s=wait_s), ran


def _defer(f: Finisher, ran: list, job_id: str) -> str:
    return f.deferrer(job_id, 0, "q")(lambda: ran.append((job_id, time.monotonic())))


def test_finish_waits_for_the_next_pipeline_call(client):
    f, ran = _finisher(client, wait_s=30)
    job_id = f"fin-{uuid.uuid4().hex}"
    try:
        assert _defer(f, ran, job_id) == "finishing"
        assert client.store.r.zscore(finishing_key(client.store.prefix), job_id) is not None
        time.sleep(0.5)
        assert ran == []  # still waiting: no pipeline call started since
        t0 = time.monotonic()
        f.pipeline_started()
        f.drain()
        assert [j for j, _ in ran] == [job_id]
        assert ran[0][1] - t0 < 5
        assert client.store.r.zscore(finishing_key(client.store.prefix), job_id) is None
    finally:
        client.store.r.delete(client.store.key(job_id))


def test_finish_runs_after_its_wait_when_no_call_comes(client):
    f, ran = _finisher(client, wait_s=0.3)
    ids = [f"fin-{uuid.uuid4().hex}" for _ in range(2)]
    try:
        t0 = time.monotonic()
        for j in ids:
            _defer(f, ran, j)
        f.drain()
        assert [j for j, _ in ran] == ids  # in the order their jobs ended
        assert ran[0][1] - t0 >= 0.3
        assert ran[-1][1] - t0 < 10
    finally:
        client.store.r.delete(*(client.store.key(j) for j in ids))


def test_a_call_started_before_the_finish_was_queued_does_not_release_it(client):
    f, ran = _finisher(client, wait_s=30)
    job_id = f"fin-{uuid.uuid4().hex}"
    try:
        f.pipeline_started()  # this job's own call
        _defer(f, ran, job_id)
        time.sleep(0.3)
        assert ran == []
        threading.Timer(0.1, f.pipeline_started).start()  # the next job's call
        f.drain()
        assert [j for j, _ in ran] == [job_id]
    finally:
        client.store.r.delete(client.store.key(job_id))
