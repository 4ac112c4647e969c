"""The overlapped finish waits for the next pipeline call to denoise (or its wait limit) before it runs.

Against the session's real valkey, where the finisher reads the queue the job came from.
"""
from __future__ import annotations

import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from easel.worker.finisher import Finisher


def _finisher(client, wait_s: float) -> tuple[Finisher, list[tuple[str, float]]]:
    ran: list[tuple[str, float]] = []
    return Finisher(client.store, max_pending=2, wait_s=wait_s), ran


def _defer(f: Finisher, ran: list, job_id: str) -> None:
    f.defer(lambda: ran.append((job_id, time.monotonic())), None)  # queue unknown: the wait rules alone


def test_finish_waits_for_the_next_pipeline_call(client):
    f, ran = _finisher(client, wait_s=30)
    job_id = f"fin-{uuid.uuid4().hex}"
    try:
        _defer(f, ran, job_id)
        time.sleep(0.5)
        assert ran == []  # still waiting: no pipeline call started since
        t0 = time.monotonic()
        f.denoising_started()
        f.drain()
        assert [j for j, _ in ran] == [job_id]
        assert ran[0][1] - t0 < 5
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
        f.denoising_started()  # this job's own call
        _defer(f, ran, job_id)
        time.sleep(0.3)
        assert ran == []
        threading.Timer(0.1, f.denoising_started).start()  # the next job's call
        f.drain()
        assert [j for j, _ in ran] == [job_id]
    finally:
        client.store.r.delete(client.store.key(job_id))


def test_the_step_hook_releases_a_pending_finish_at_the_first_step_only(client):
    from concurrent.futures import ThreadPoolExecutor

    from easel.worker.engine import StepHook
    from easel.worker.watchdog import StageBudget

    f, ran = _finisher(client, wait_s=30)
    released: list[int] = []

    def release() -> None:
        released.append(1)
        f.denoising_started()

    job_id = f"fin-{uuid.uuid4().hex}"
    pool = ThreadPoolExecutor(1)
    try:
        _defer(f, ran, job_id)
        ctx = SimpleNamespace(store=client.store, instance="test", control=pool, stops=None, settings=SimpleNamespace(
            progress_interval_s=0.25), finisher=SimpleNamespace(denoising_started=release))
        hook = StepHook(ctx, [f"next-{job_id}"], 0, StageBudget(60, 60, 3, time.monotonic()))
        time.sleep(0.2)
        assert ran == []  # the next call's prologue: still waiting
        assert hook(1, 10) and hook(2, 10)
        hook.flush()
        f.drain()
        assert [j for j, _ in ran] == [job_id] and released == [1]
    finally:
        pool.shutdown()
        client.store.r.delete(client.store.key(job_id), client.store.key(f"next-{job_id}"))


@pytest.mark.parametrize("release", ["denoising_started", "task_ended"])
def test_a_started_next_task_holds_the_finish_past_the_wait_until_it_denoises_or_ends(client, release):
    """A next task in its fetch, claim or prologue holds the finish past ``wait_s``; its
    first denoising step releases it, and so does its end without one (a duplicate
    delivery of a finished job, a failure, a hand-off)."""
    f, ran = _finisher(client, wait_s=0.1)
    job_id = f"fin-{uuid.uuid4().hex}"
    try:
        f.task_started()  # the task that defers its finish
        _defer(f, ran, job_id)
        f.task_ended()
        f.task_started()  # the next job's task
        time.sleep(0.5)
        assert ran == []  # well past wait_s
        getattr(f, release)()
        f.drain()
        assert [j for j, _ in ran] == [job_id]
    finally:
        client.store.r.delete(client.store.key(job_id))


@pytest.mark.parametrize("queued", [0, 1])
def test_a_job_that_leaves_its_queue_empty_finishes_at_once(client, queued):
    """The last job of a burst has nothing to overlap with: its finish runs without waiting
    for a next call, while a message waiting in the worker's queue (any priority list)
    holds it as before."""
    from easel.shared.metrics import priority_lists

    queue = f"test-fin-q-{uuid.uuid4().hex}"
    r = client.store.r
    lists = [name for _, name in priority_lists(queue)]
    if queued:
        r.rpush(lists[3], "a message")  # a priority-3 job waits
    ran: list[tuple[str, float]] = []
    f = Finisher(client.store, max_pending=2, wait_s=30)
    job_id = f"fin-{uuid.uuid4().hex}"
    try:
        f.defer(lambda: ran.append((job_id, time.monotonic())), queue)
        time.sleep(0.5)
        assert [j for j, _ in ran] == ([] if queued else [job_id])
        f.denoising_started()  # the next job's call
        f.drain()
        assert [j for j, _ in ran] == [job_id]
    finally:
        r.delete(client.store.key(job_id), *lists)


def test_a_failed_upload_is_raised_only_once_the_attempts_other_uploads_have_ended():
    """A retry is sent when the error is raised: an upload of this attempt still running then
    could land on the retry's objects."""
    from concurrent.futures import ThreadPoolExecutor

    from easel.worker.context import wait_all

    ended: list[str] = []

    def fail_now():
        raise ConnectionError("SlowDown")

    def upload_slowly():
        time.sleep(0.5)
        ended.append("image 1")

    with ThreadPoolExecutor(2) as io:
        uploads = [io.submit(fail_now), io.submit(upload_slowly)]
        with pytest.raises(ConnectionError, match="SlowDown"):
            wait_all(uploads)
        assert ended == ["image 1"]
