"""Results that expire: lifecycle rules on the real SeaweedFS bucket, the sweep where a server
takes none, hand-offs deleted when their job ends, and a status that never outlives its results."""
from __future__ import annotations

import time

import pytest
from pydantic import SecretStr, ValidationError

from easel.shared.jobstore import JobStore
from easel.shared.retention import ResultRetention
from easel.shared.settings import Settings, get_settings
from easel.shared.storage import RETAINED_PREFIXES, DeleteRefused, Storage
from tests.conftest import READER_S3_KEY
from tests.netproxy import TcpProxy


@pytest.fixture
def storage(easel_env) -> Storage:
    return Storage(get_settings())


def test_a_worker_sets_the_buckets_lifecycle_rules_once_per_period(easel_env, storage):
    s = get_settings()
    store = JobStore.from_settings(s)
    store.r.delete(f"{s.queue_prefix}:lease:retention")
    assert ResultRetention(store, storage, days=3)() == "lifecycle rules: jobs/, inputs/, uploads/ expire after 3 days"
    rules = {r["ID"]: r for r in storage.client.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]}
    assert {rules[f"easel-{p.strip('/')}"]["Filter"]["Prefix"] for p in RETAINED_PREFIXES} == set(RETAINED_PREFIXES)
    assert all(r["Expiration"]["Days"] == 3 for r in rules.values() if r["ID"].startswith("easel-"))
    # On a versioned bucket, what an expiry leaves behind goes too.
    assert all(r["NoncurrentVersionExpiration"]["NoncurrentDays"] == 1 for r in rules.values()
               if r["ID"].startswith("easel-"))
    # Another process in the same period finds the lease taken and does nothing.
    assert ResultRetention(store, storage, days=3)() is None
    # 0 = keep: the rules an earlier retention set go (they would go on deleting), no sweep,
    # and the bucket's own rules stay.
    theirs = {"ID": "their-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 30}}
    storage.client.put_bucket_lifecycle_configuration(Bucket=storage.bucket, LifecycleConfiguration={
        "Rules": [theirs, *rules.values()]})
    store.r.delete(f"{s.queue_prefix}:lease:retention")
    assert ResultRetention(store, storage, days=0)() == "lifecycle rules: none of easel's"
    left = storage.client.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]
    assert [r["ID"] for r in left] == ["their-logs"]
    assert storage.expire_after(RETAINED_PREFIXES, 0)  # nothing of easel's left to remove
    storage.client.delete_bucket_lifecycle(Bucket=storage.bucket)
    assert storage.expire_after(RETAINED_PREFIXES, 0)  # no rules at all: nothing to do
    store.r.delete(f"{s.queue_prefix}:lease:retention")
    ResultRetention(store, storage, days=s.retention_days)()  # leave the default in force


def test_retention_rides_out_an_s3_outage_and_tries_again_soon(easel_env, caplog):
    """S3 away when the hour's chore comes: one warning, no traceback, and the lease let go,
    so the farm tries again in minutes, not an hour later."""
    from easel.shared.retention import RETRY_S

    s = get_settings()
    store = JobStore.from_settings(s)
    lease = f"{s.queue_prefix}:lease:retention"
    store.r.delete(lease)
    proxy = TcpProxy(int(s.s3_endpoint_url.rsplit(":", 1)[1])).start()
    url = proxy.url
    proxy.stop()  # nothing listens there now: S3 is unreachable
    chore = ResultRetention(store, Storage(s.model_copy(update={"s3_endpoint_url": url})), days=3)
    with caplog.at_level("WARNING", logger="easel.retention"):
        assert chore() is None
    assert "S3 did not answer" in caplog.text
    assert not store.r.exists(lease)
    assert chore._next_try - time.monotonic() <= RETRY_S
    assert chore() is None  # within the retry delay: not tried again yet
    assert not store.r.exists(lease)


def test_the_sweep_deletes_only_what_is_older(storage):
    prefix = f"retention-test/{time.monotonic_ns()}/"
    storage.put(prefix + "old.png", b"old")
    time.sleep(2.5)  # S3 LastModified has one-second resolution
    storage.put(prefix + "new.png", b"new")
    assert storage.delete_older(prefix, max_age_s=1.5) == 1
    assert storage.list(prefix) == [prefix + "new.png"]


def test_objects_the_server_refuses_to_delete_are_an_error_not_a_count(storage):
    """A multi-delete answers 200 and names the objects it kept (credentials without
    s3:DeleteObject, an object lock): the sweep and the hand-off cleanup say so, instead of
    counting them deleted while the bucket grows."""
    prefix = f"retention-test/{time.monotonic_ns()}/"
    storage.put(prefix + "old.png", b"old")
    key_id, secret = READER_S3_KEY  # may read and list the bucket, not delete from it
    reader = Storage(get_settings().model_copy(update={"s3_access_key_id": key_id, "s3_secret_access_key": SecretStr(secret)}))
    assert reader.list(prefix) == [prefix + "old.png"]
    with pytest.raises(DeleteRefused, match="refused to delete 1 of 1 objects") as refused:
        reader.delete_prefix(prefix)
    assert f"s3://{storage.bucket}/{prefix}old.png" in str(refused.value) and "AccessDenied" in str(refused.value)
    assert "need s3:DeleteObject" in str(refused.value) and refused.value.deleted == 0
    with pytest.raises(DeleteRefused) as refused:
        reader.delete_older(prefix, max_age_s=0)
    assert refused.value.deleted == 0 and len(refused.value.refused) == 1
    assert storage.list(prefix) == [prefix + "old.png"]
    assert storage.delete_prefix(prefix) == 1 and storage.list(prefix) == []


def test_a_status_may_not_outlive_its_results():
    with pytest.raises(ValidationError, match="must not outlive its results"):
        Settings(retention_days=1, job_ttl_s=2 * 86400)
    assert Settings(retention_days=0, job_ttl_s=30 * 86400).job_ttl_s == 30 * 86400  # objects kept forever
    assert Settings().job_ttl_s <= Settings().retention_days * 86400  # the defaults agree


def test_an_input_reused_with_less_life_left_than_a_job_record_is_rewritten(storage, monkeypatch):
    """A job may wait as long as its record lives, so an input given to a new job keeps at least
    ``job_ttl_s`` (less an hour's slack) before retention removes it: a copy older than that
    is rewritten on the server, a newer one is left, and with objects kept forever none is."""
    import easel.shared.storage

    data = f"input {time.monotonic_ns()}".encode()

    def written_at(settings: Settings) -> float:
        uri = Storage(settings).put_input(data, "png")
        head = storage.client.head_object(Bucket=storage.bucket, Key=uri.split("/", 3)[3])
        assert head["ContentType"] == "image/png" and storage.get(uri) == data
        return head["LastModified"].timestamp()

    first = written_at(get_settings())
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    assert written_at(get_settings()) == first  # defaults: within the hour's slack
    monkeypatch.setattr(easel.shared.storage, "INPUT_SLACK_S", 1)  # as if an hour went by
    assert written_at(get_settings()) > first  # defaults: job_ttl_s == retention_days
    second = written_at(get_settings())
    time.sleep(1.1)
    assert written_at(get_settings().model_copy(update={"job_ttl_s": 86400})) == second  # 6 days' margin left
    assert written_at(get_settings().model_copy(update={"job_ttl_s": 86400, "retention_days": 1})) > second
    third = written_at(get_settings())
    time.sleep(1.1)
    assert written_at(get_settings().model_copy(update={"retention_days": 0})) == third


def test_an_input_named_by_its_uri_is_kept_alive_for_the_new_job(easel_env, storage, monkeypatch):
    """A client that uploads once and submits the returned ``s3://`` URI for days gets the
    same care as one that uploads each time: an object with less life left than a new job's
    record is rewritten on the server when a job names it, once per process per minute at
    most; one that is not there is refused, looked for again at each submission."""
    import easel.shared.storage
    from easel.producer.client import EaselClient, SubmitError
    from tests.conftest import img2img_job, png_bytes

    uri = storage.put_input(f"input {time.monotonic_ns()}".encode(), "png")
    key = uri.split("/", 3)[3]

    def written_at() -> float:
        return storage.client.head_object(Bucket=storage.bucket, Key=key)["LastModified"].timestamp()

    client = EaselClient(get_settings())
    first = written_at()
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    client.prepare(img2img_job(uri))
    assert written_at() == first  # plenty of life left
    monkeypatch.setattr(easel.shared.storage, "INPUT_SLACK_S", 1)  # as if an hour went by
    client.prepare(img2img_job(uri))
    assert written_at() == first  # this process looked less than a minute ago
    client.storage._looked_until.clear()  # a minute later
    client.storage._fresh_until.clear()
    client.prepare(img2img_job(uri))
    assert written_at() > first
    late = f"inputs/uploaded-late-{time.monotonic_ns()}.png"  # refused, and looked for again next time
    for _ in range(2):
        with pytest.raises(SubmitError, match=f"{late} does not exist"):
            client.prepare(img2img_job(f"s3://easel/{late}"))
    storage.put(late, png_bytes((8, 8)))
    assert client.prepare(img2img_job(f"s3://easel/{late}")).input.image == f"s3://easel/{late}"

    # S3 answering nothing: a submission waits one short try, then not again for a minute.
    proxy = TcpProxy(int(get_settings().s3_endpoint_url.rsplit(":", 1)[1])).start()
    held = EaselClient(get_settings().model_copy(update={"s3_endpoint_url": proxy.url}))
    try:
        proxy.hold()
        t0 = time.monotonic()
        held.prepare(img2img_job(uri))
        assert time.monotonic() - t0 < 9  # connect 2 s at most, read 5 s, one attempt
        t0 = time.monotonic()
        held.prepare(img2img_job(uri))
        assert time.monotonic() - t0 < 0.5
    finally:
        proxy.stop()



def test_writes_after_a_job_record_expired_leave_no_key_without_a_ttl(client):
    """A record can expire while a worker, a cancel or a webhook delivery still writes to it:
    their plain HSETs make a new hash without a TTL, which Redis would keep for good. Whoever
    meets such a hash next (the stage's claim or state change, a requeue) deletes it; a
    cancel and a webhook write delete what they made themselves."""
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec, JobState

    store = client.store
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                   "stages": [{"model": "sd15", "prompt": "x", "seed": 1}]})
    plan = plan_job(spec, client.registry)

    def expired() -> str:
        job_id, _ = store.create(spec, plan)
        store.r.delete(store.key(job_id))  # its TTL ran out
        return job_id

    for end in ("claim", "transition", "requeue"):
        job_id = expired()
        store.progress_many([job_id], 0, 3, 10, "inst-a", check=False)
        store.save_records(job_id, {0: "{}"})
        assert store.r.ttl(store.key(job_id)) == -1  # the leftover: a hash that never expires
        if end == "claim":
            assert store.claim_many([(job_id, 0, None)], "w", "inst-b", 3)[0].outcome == "unknown"
        elif end == "transition":
            assert not store.transition(job_id, JobState.succeeded, end=(0, "inst-a"))
        else:
            assert store.requeue(job_id, 0, "inst-a", "heartbeat expired") is None
        assert not store.r.exists(store.key(job_id)), end

    job_id = expired()
    store.exists = lambda _: True  # expires between the cancel's check and its write
    try:
        with pytest.raises(KeyError):
            store.request_cancel(job_id)
    finally:
        del store.exists
    assert not store.r.exists(store.key(job_id))

    job_id = expired()
    assert store.webhook_first(job_id, "started") is True
    store.webhook_attempt(job_id)
    store.webhook_state(job_id, "delivered")
    assert not store.r.exists(store.key(job_id))
    # A record that is there keeps what they write.
    job_id, _ = store.create(spec, plan)
    assert store.webhook_first(job_id, "started") and not store.webhook_first(job_id, "started")
    assert store.webhook_attempt(job_id) == 1 and store.webhook_attempt(job_id) == 2
    store.webhook_state(job_id, "pending", "HTTP 500")
    assert store.r.hmget(store.key(job_id), "webhook_state", "webhook_last_error") == ["pending", "HTTP 500"]
    assert store.r.ttl(store.key(job_id)) > 0
