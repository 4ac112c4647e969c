"""EaselClient.submit_many: the bulk path runs the same jobs as submit, with the same idempotency."""
from __future__ import annotations

import uuid

import kombu.exceptions
import pytest

from easel.producer.client import SubmitError
from tests.conftest import img2img_job


def _job_keys(client) -> set[str]:
    return set(client.store.r.scan_iter(f"{client.store.prefix}:job:*", count=1000))


def test_submit_many_jobs_complete_with_ids_in_input_order(client, sd15_worker, input_png):
    seeds = [11, 12, 13]
    ids = client.submit_many([img2img_job(str(input_png), seed=s) for s in seeds])
    assert len(ids) == 3 and len(set(ids)) == 3
    for job_id, seed in zip(ids, seeds):
        st = client.wait(job_id, timeout=180)
        assert st.state.value == "succeeded", st.error
        assert st.outputs == [f"s3://easel/jobs/{job_id}/output/0.png"]
        assert client.result(job_id).stages[0].seeds == [seed]


def test_submit_many_respects_idempotency_keys(client, sd15_worker, input_png):
    k_old, k_new = f"old-{uuid.uuid4().hex}", f"new-{uuid.uuid4().hex}"
    first = client.submit({**img2img_job(str(input_png), seed=1), "idempotency_key": k_old})
    jobs = [
        {**img2img_job(str(input_png), seed=2), "idempotency_key": k_old},  # seen before: first's id
        {**img2img_job(str(input_png), seed=3), "idempotency_key": k_new},
        {**img2img_job(str(input_png), seed=4), "idempotency_key": k_new},  # same key, same call
        img2img_job(str(input_png), seed=5),                                 # no key: a new job
    ]
    before = _job_keys(client)
    ids = client.submit_many(jobs)
    assert ids[0] == first
    assert ids[1] == ids[2] and ids[1] != first
    assert ids[3] not in (first, ids[1])
    # only the two new jobs got records; the losing duplicate left nothing behind
    assert _job_keys(client) - before == {client.store.key(ids[1]), client.store.key(ids[3])}
    # the key maps to the same job afterwards, through either path
    assert client.submit({**img2img_job(str(input_png), seed=6), "idempotency_key": k_new}) == ids[1]
    assert client.submit_many([{**img2img_job(str(input_png), seed=7), "idempotency_key": k_new}]) == [ids[1]]
    for job_id in {first, ids[1], ids[3]}:
        st = client.wait(job_id, timeout=180)
        assert st.state.value == "succeeded", st.error
    # the first job with each key is the one that ran (its seed, not a duplicate's)
    assert client.result(first).stages[0].seeds == [1]
    assert client.result(ids[1]).stages[0].seeds == [3]


def test_submit_many_refuses_the_whole_call_naming_the_bad_job(client, input_png):
    before = _job_keys(client)
    with pytest.raises(SubmitError, match=r"job 1: .*strength"):
        client.submit_many([img2img_job(str(input_png)), img2img_job(str(input_png), strength=2.0)])
    with pytest.raises(SubmitError, match=r"job 0: .*no-such-model"):
        client.submit_many([img2img_job(str(input_png), model="no-such-model")])
    assert _job_keys(client) == before
    assert client.submit_many([]) == []
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            client.submit_many([img2img_job(str(input_png))], batch_size=bad)
    assert _job_keys(client) == before


def test_a_batch_that_fails_to_send_names_the_jobs_queued_before_it(easel_env, input_png):
    """The broker refuses the second batch's message (its queue's key holds a string): the
    error names the first batch's job, queued, where the failure began, and the error the
    broker raised."""
    from easel.producer.client import EaselClient, PartialSubmitError
    from easel.shared.celery_app import queue_name
    from easel.shared.settings import get_settings

    prefix = f"partial{uuid.uuid4().hex[:8]}"  # queues no worker serves: the jobs stay as queued
    own = EaselClient(get_settings().model_copy(update={"queue_prefix": prefix}))
    own.celery.conf.task_publish_retry = False
    refused = queue_name("sd15-wide", prefix)
    own.store.r.mset({refused: "x", **{f"{refused}:{p}": "x" for p in range(1, 10)}})
    try:
        with pytest.raises(PartialSubmitError) as got:
            own.submit_many([img2img_job(str(input_png)), img2img_job(str(input_png), model="sd15-wide")],
                            batch_size=1)
        assert "WRONGTYPE" in str(got.value)
        (queued,) = got.value.queued_ids
        assert got.value.failed_from == 1
        assert own.status(queued).state.value == "queued"
        assert isinstance(got.value.__cause__, kombu.exceptions.OperationalError)
    finally:
        own.store.r.delete(*own.store.r.keys(f"{prefix}*"))


def test_submit_many_answers_a_retry_before_its_checks(client):
    """Calling again with the same keyed jobs returns their ids even where a new job's checks
    would fail now (their input deleted since); a job with a new key is checked."""
    from tests.conftest import png_bytes

    ref = client.storage.put_input(png_bytes((16, 16), color=(uuid.uuid4().bytes[0], 9, 9)), "png")
    run = uuid.uuid4().hex
    keyed = [{**img2img_job(ref, seed=i, steps=2), "idempotency_key": f"gone-{run}-{i}"} for i in range(3)]
    ids = client.submit_many(keyed)
    client.storage.client.delete_object(Bucket=client.storage.bucket, Key=ref.split("/", 3)[3])
    client.storage._looked_until.clear()  # as a minute later
    client.storage._fresh_until.clear()
    assert client.submit_many(keyed) == ids
    with pytest.raises(SubmitError, match=r"job 1: input image: .* does not exist"):
        client.submit_many([keyed[0], {**keyed[1], "idempotency_key": f"new-{run}"}])
    for job_id in ids:
        client.cancel(job_id)
