"""A real img2img job end to end: client -> valkey -> Celery worker (diffusers) -> SeaweedFS."""
from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from easel.producer.client import SubmitError
from easel.producer.embedded import free_port
from easel.shared.schema import JobSpec
from tests.conftest import cli, img2img_job


def _image(client, uri: str) -> Image.Image:
    return Image.open(io.BytesIO(client.storage.get(uri)))


def test_img2img_job_completes_with_requested_size_and_format(client, sd15_worker, input_png):
    job = img2img_job(str(input_png))
    job["output"] = {"format": "webp"}
    job_id = client.submit(job)
    st = client.wait(job_id, timeout=120)
    assert st.state.value == "succeeded", st.error
    assert st.outputs == [f"s3://easel/jobs/{job_id}/output/0.webp"]
    img = _image(client, st.outputs[0])
    assert img.format == "WEBP"
    assert img.size == (96, 64)
    assert st.manifest == f"s3://easel/jobs/{job_id}/manifest.json"


def test_manifest_records_seed_parameters_and_timings(client, sd15_worker, input_png):
    job_id = client.submit(img2img_job(str(input_png), seed=1234, strength=0.5, guidance_scale=3.0,
                                       negative_prompt="blurry"))
    assert client.wait(job_id, timeout=120).state.value == "succeeded"
    m = client.result(job_id)
    (stage,) = m.stages
    assert stage.seeds == [1234]
    assert stage.params["strength"] == 0.5 and stage.params["guidance_scale"] == 3.0
    assert stage.params["negative_prompt"] == "blurry" and stage.params["prompt"] == "a red fox"
    assert stage.model == "sd15" and stage.model_source.endswith("tiny-sd15")
    assert stage.timings_s["denoise"] > 0 and m.timings_s["total"] > 0
    assert stage.batch_size == 1 and "batch_size" not in stage.timings_s  # every timing is seconds
    raw = json.loads(client.storage.get(f"jobs/{job_id}/manifest.json"))
    assert raw["spec"]["stages"][0]["seed"] == 1234
    assert "secret" not in json.dumps(raw).lower()
    # A newer worker's manifest, with fields this client does not know, still reads.
    from easel.shared.schema import Manifest

    newer = {**raw, "carbon_g": 0.1, "stages": [{**raw["stages"][0], "gpu": "H200"}],
             "attempts": [{**a, "zone": "b"} for a in raw["attempts"]]}
    assert Manifest.model_validate(newer).stages[0].seeds == [1234]


def test_same_seed_same_image_and_other_seed_differs(client, sd15_worker, input_png):
    ids = [client.submit(img2img_job(str(input_png), seed=s)) for s in (99, 99, 100)]
    arrays = []
    for j in ids:
        st = client.wait(j, timeout=120)
        assert st.state.value == "succeeded", st.error
        arrays.append(np.asarray(_image(client, st.outputs[0])))
    assert np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], arrays[2])


def test_unset_seed_is_fixed_at_submission_and_recorded(client, sd15_worker, input_png):
    job_id = client.submit(img2img_job(str(input_png), seed=None))
    spec, _ = client.store.load(job_id)
    assert spec.stages[0].seed is not None
    assert client.wait(job_id, timeout=120).state.value == "succeeded"
    assert client.result(job_id).stages[0].seeds == [spec.stages[0].seed]


def test_num_images_gives_one_output_per_seed(client, sd15_worker, input_png):
    job = img2img_job(str(input_png), seed=5)
    job["num_images"] = 2
    st = client.wait(client.submit(job), timeout=120)
    assert st.state.value == "succeeded", st.error
    assert len(st.outputs) == 2
    a, b = (np.asarray(_image(client, u)) for u in st.outputs)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"strength": 1.5}, "strength"),
    ({"steps": 0}, "steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
])
def test_invalid_stage_refused_at_submission(client, input_png, change, message):
    def waiting():
        return [(q.queue, q.messages, q.pending) for q in client.queues()]

    before = waiting()
    with pytest.raises(SubmitError, match=message):
        client.submit(img2img_job(str(input_png), **change))
    assert waiting() == before


def test_a_job_spec_edited_after_it_was_made_is_checked_again(client):
    spec = JobSpec.model_validate(img2img_job("s3://easel/inputs/none.png"))
    spec.stages[0].steps = 10**6
    with pytest.raises(SubmitError, match="stages.0.steps"):
        client.submit(spec)
    spec.stages[0].steps = 3
    spec.stages.extend([spec.stages[0]] * 40)
    with pytest.raises(SubmitError, match="stages"):
        client.submit(spec)


def test_unreadable_image_refused_at_submission(client, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(SubmitError, match="input image.*not a readable image"):
        client.submit(img2img_job(str(bad)))
    with pytest.raises(SubmitError, match="no such file"):
        client.submit(img2img_job(str(tmp_path / "missing.png")))
    with pytest.raises(SubmitError, match=r"no such file 'missing\.png' \(looked for /.*/missing\.png\)"):
        client.submit(img2img_job("missing.png"))  # a relative path: where it was looked for


def test_a_missing_s3_image_is_refused_and_an_unreadable_one_fails_its_job_alone(client, sd15_worker, input_png):
    with pytest.raises(SubmitError, match=r"input image: s3://easel/inputs/does-not-exist.png does not exist"):
        client.submit(img2img_job("s3://easel/inputs/does-not-exist.png"))
    with pytest.raises(SubmitError, match=r"stage 0 control image: s3://easel/inputs/no-control.png does not"):
        client.submit({"input": {"image": str(input_png)}, "stages": [
            {"task": "controlnet_img2img", "model": "sd15", "control_image": "s3://easel/inputs/no-control.png"}]})
    bad = client.submit(img2img_job(client.storage.put_input(b"no image here", "png")))
    st = client.wait(bad, timeout=120)
    assert st.state.value == "failed"
    assert "input image is not a readable image" in st.error
    good = client.wait(client.submit(img2img_job(str(input_png))), timeout=120)
    assert good.state.value == "succeeded"
    assert sd15_worker.proc.poll() is None


def test_idempotency_key_returns_the_same_job(client, sd15_worker, input_png):
    job = img2img_job(str(input_png))
    job["idempotency_key"] = "foundation-idem-1"
    a, b = client.submit(job), client.submit(job)
    assert a == b
    assert client.wait(a, timeout=120).state.value == "succeeded"


def test_a_job_that_could_not_be_enqueued_lets_its_idempotency_key_go(easel_env, sd15_worker, input_png):
    """The broker away when its message is sent: the job ends failed ("could not enqueue"),
    the error is raised, and a retry with the same idempotency key queues the job anew
    instead of answering with the failed one."""
    import kombu.exceptions

    from easel.producer.client import EaselClient
    from easel.producer.embedded import free_port
    from easel.shared.celery_app import make_celery
    from easel.shared.schema import JobState
    from easel.shared.settings import get_settings

    own = EaselClient(get_settings())  # its broker is swapped below: not the session's client
    broker = own.celery
    away = make_celery(get_settings().model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    away.conf.task_publish_retry = False  # the default rides out a minute first
    r = own.store.r

    def submit_unsent(job: dict) -> str:
        own.celery = away
        with pytest.raises(kombu.exceptions.OperationalError):
            own.submit(job)
        own.celery = broker
        (failed,) = [k for k in r.scan_iter(f"{own.store.prefix}:job:*", count=1000)
                     if job["idempotency_key"] in (r.hget(k, "spec") or "")]
        assert r.hget(failed, "state") == "failed" and r.hget(failed, "error").startswith("could not enqueue")
        return failed

    job = {**img2img_job(str(input_png)), "idempotency_key": f"enqueue-{time.monotonic_ns()}"}
    failed = submit_unsent(job)
    again = own.submit(job)
    assert own.store.key(again) != failed
    assert own.wait(again, timeout=120).state.value == "succeeded"
    # The failing write's reply lost and the write sent again (redis-py replays a timed-out
    # command): the replay finds the job failed already, and the key still goes.
    write = own.store.transition
    own.store.transition = lambda *a, **kw: (write(*a, **kw), write(*a, **kw))[1]
    job = {**job, "idempotency_key": f"enqueue-replayed-{time.monotonic_ns()}"}
    failed = submit_unsent(job)
    own.store.transition = write
    again = own.submit(job)
    assert own.store.key(again) != failed
    own.cancel(again)
    # A send whose reply was lost may have reached Redis, and a worker claimed the job since:
    # the producer's failure path leaves that job running.
    spec, plan = own.prepare_and_plan(img2img_job(str(input_png)))
    claimed, _ = own.store.create(spec, plan)
    (c,) = own.store.claim_many([(claimed, 0, None)], "test-worker", "test-instance", 2)
    assert c.outcome == "run"
    # A copy of its message reaching the same holder is a duplicate, not a second run.
    (copy,) = own.store.claim_many([(claimed, 0, None)], "test-worker", "test-instance", 2)
    assert (copy.outcome, copy.detail) == ("duplicate", "test-instance")
    assert not own.store.transition(claimed, JobState.failed, error="could not enqueue: x", never_claimed=True)
    assert own.store.status(claimed).state.value == "running"
    own.store.transition(claimed, JobState.cancelled, end=(0, "test-instance"))


def test_a_send_that_raised_after_reaching_the_broker_is_a_queued_job(easel_env, sd15_worker, input_png, monkeypatch):
    """The message reached Redis but its send raised (the reply lost, retries spent): the job
    a worker claimed since is running, so ``submit`` returns its id instead of an error that
    tells the caller to submit it again."""
    import kombu.exceptions

    from easel.producer import client as client_module
    from easel.producer.client import EaselClient
    from easel.shared.settings import get_settings

    own = EaselClient(get_settings())
    send = client_module.send_segment

    def send_and_lose_the_reply(app, job_id, *args, **kw):
        send(app, job_id, *args, **kw)
        deadline = time.monotonic() + 60
        while own.status(job_id).state.value == "queued" and time.monotonic() < deadline:
            time.sleep(0.05)
        raise kombu.exceptions.OperationalError("reply lost")

    monkeypatch.setattr(client_module, "send_segment", send_and_lose_the_reply)
    job_id = own.submit(img2img_job(str(input_png)))
    monkeypatch.setattr(client_module, "send_segment", send)
    st = own.wait(job_id, timeout=120)
    assert st.state.value == "succeeded" and st.attempts == 1, st.error


def test_cli_submit_wait_status_fetch(easel_env, sd15_worker, input_png, tmp_path):
    r = cli("submit", "--image", str(input_png), "--prompt", "a castle", "--steps", "3", "--seed", "11",
            "--format", "jpeg", "--tenant", "interactive")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    r = cli("wait", job_id, "--timeout", "120")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "succeeded"
    r = cli("status", job_id)
    assert json.loads(r.stdout)["outputs"][0].endswith("/output/0.jpeg")
    r = cli("fetch", job_id, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / job_id / "output" / "0.jpeg")
    assert img.format == "JPEG" and img.size == (96, 64)
    manifest = json.loads((tmp_path / job_id / "manifest.json").read_text())
    assert manifest["stages"][0]["seeds"] == [11] and manifest["spec"]["tenant"] == "interactive"
    (tmp_path / "a-file").write_text("")
    r = cli("fetch", job_id, "--out", str(tmp_path / "a-file" / "sub"))  # a folder that cannot be made
    said = " ".join(r.stderr.split())
    assert r.returncode == 1 and "cannot write to" in said and "Traceback" not in r.stderr, r.stderr
    r = cli("status", "[/x]")  # a user's text in an error is shown as typed, not read as markup
    assert r.returncode == 1 and "no job [/x]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    from easel.shared.settings import Settings
    from easel.shared.storage import Storage

    Storage(Settings()).delete_prefix(f"jobs/{job_id}/output/")  # gone, as retention would take it
    r = cli("fetch", job_id, "--out", str(tmp_path / "again"))
    said = " ".join(r.stderr.split())  # rich wraps long lines
    assert r.returncode == 1 and f"job {job_id}: " in said and "/output/0.jpeg does not exist" in said, said
    r = cli("queues")
    assert r.returncode == 0 and "easel.sd15\t" in r.stdout
    # Operator commands that did nothing say so, in a line and an exit code.
    r = cli("cancel", job_id)
    assert r.returncode == 1 and r.stdout.strip() == "succeeded" and "nothing to cancel" in r.stderr
    r = cli("cancel", job_id, "no-such-job")  # several: each one's state after its id, every error said
    assert r.returncode == 1 and r.stdout.splitlines() == [f"{job_id}\tsucceeded", "no-such-job\tunknown"]
    assert "nothing to cancel" in r.stderr and "no job no-such-job" in r.stderr, r.stderr
    r = cli("drain", "no-such-worker@nowhere")
    assert r.returncode == 2 and "no live worker is called" in r.stderr and "Traceback" not in r.stderr
    r = cli("api-key", "bad name")
    assert r.returncode == 2 and "key name 'bad name'" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_bad_strength_with_clear_message(easel_env, input_png):
    r = cli("submit", "--image", str(input_png), "--strength", "1.5")
    assert r.returncode == 2
    assert "stages.0.strength" in r.stderr and "less than or equal to 1" in r.stderr
    # A bad setting names its variable and value, in a line, before anything is contacted.
    r = cli("queues", env={"EASEL_BATCH_SIZE": "abc"})
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert "EASEL_BATCH_SIZE='abc': Input should be a valid integer" in r.stderr, r.stderr
    r = cli("queues", env={"EASEL_WEBHOOK_SECRET": "whsec_!!hunter2"})  # a secret's value is never echoed
    assert r.returncode == 2 and "EASEL_WEBHOOK_SECRET: " in r.stderr and "hunter2" not in r.stderr, r.stderr
    r = cli("status", "x", env={"EASEL_HEARTBEAT_TTL_S": "1"})
    assert r.returncode == 2 and "settings: heartbeat_ttl_s (1.0) must be more than twice" in r.stderr, r.stderr
    # The object store out of reach: one line and exit 3, as for Redis.
    r = cli("submit", "--image", str(input_png), env={"EASEL_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "error: object storage at http://127.0.0.1:" in r.stderr and "EndpointConnectionError" in r.stderr


def test_cli_submit_job_file(easel_env, client, sd15_worker, input_png, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{image: {input_png}}}\nstages:\n  - {{model: sd15, prompt: hi, steps: 2, seed: 1}}\n")
    r = cli("submit", "--job", str(job), "--wait")
    assert r.returncode == 0, r.stderr
    # --priority and --idempotency-key apply on top of the file.
    first = cli("submit", "--job", str(job), "--priority", "0", "--idempotency-key", f"file-{job}")
    again = cli("submit", "--job", str(job), "--idempotency-key", f"file-{job}")
    assert first.returncode == again.returncode == 0 and first.stdout == again.stdout, first.stderr + again.stderr
    assert client.store.load(first.stdout.strip())[0].priority == 0


def test_a_queue_name_with_a_colon_is_refused_where_it_is_configured(tmp_path):
    """The broker finds a popped message's queue by the last ':' of its list's name, so a
    queue named with one would hand every priority-0 message back to its own list forever:
    the queue prefix (a setting) and a family (the registry) are refused with a reason."""
    from pydantic import ValidationError

    from easel.shared.registry import Registry
    from easel.shared.settings import Settings

    with pytest.raises(ValidationError, match="queue_prefix 'prod:easel' cannot name a queue"):
        Settings(queue_prefix="prod:easel")
    assert Settings(queue_prefix="prod-easel.v2").queue_prefix == "prod-easel.v2"
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m:\n    source: x\n    family: 'gpu:sd15'\n    latent_space: sd\n")
    with pytest.raises(ValidationError, match="family 'gpu:sd15' cannot name a queue"):
        Registry.load(path)
    path.write_text("models:\n  m:\n    source: x\n    family: gpu-sd15\n    latent_space: sd\n")
    assert Registry.load(path).get("m").family == "gpu-sd15"


def test_a_quiet_check_pings_after_quiet_and_calls_dead_only_an_unanswered_ping(monkeypatch):
    """shared.quiet on a clock of its own: quiet alone is never dead (a PING goes first),
    any word (a PING's answer too) keeps the connection, and a PING left unanswered for
    REPLY_WITHIN_S is dead; a thread stalled past the window pings before it judges."""
    from easel.shared import quiet
    from easel.shared.jobstore import REPLY_WITHIN_S

    now = [100.0]
    monkeypatch.setattr(quiet.time, "monotonic", lambda: now[0])
    check = quiet.QuietCheck()

    def at(t: float, got: bool = False):
        now[0] = 100.0 + t
        return check.after_read(got)

    ping_after = quiet.PING_AFTER_S
    assert at(ping_after - 0.5) is None
    assert at(ping_after) == "ping"
    assert at(ping_after + 0.1, got=True) is None  # answered
    assert at(2 * ping_after - 0.5) is None  # quiet again, for less than PING_AFTER_S
    assert at(2 * ping_after + 0.2) == "ping"
    assert at(2 * ping_after + 0.2 + REPLY_WITHIN_S - 0.5) is None
    assert at(2 * ping_after + 0.2 + REPLY_WITHIN_S + 0.1) == "dead"
    stalled = quiet.QuietCheck()  # a thread that comes back after long past the window
    now[0] += 60
    assert stalled.after_read(False) == "ping"


def test_a_reply_that_timed_out_drops_the_pools_idle_connections_too(client):
    """Redis goes silent (connections kept open, nothing answered; new ones answered, as
    after a failover): the command that waits out its reply timeout goes again on a new
    connection, and the pool's idle connections, which lead to the same silent server, are
    dropped with it, so the next caller on another connection does not wait it out again."""
    from easel.shared.jobstore import REPLY_WITHIN_S, redis_client
    from tests.netproxy import TcpProxy

    proxy = TcpProxy(int(client.settings.redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    r = redis_client(f"redis://127.0.0.1:{proxy.port}/0")
    pool = r.connection_pool
    try:
        idle = [pool.get_connection() for _ in range(3)]  # three open connections, idle in the pool
        for conn in idle:
            pool.release(conn)
        proxy.silence()
        t0 = time.monotonic()
        assert r.ping()
        assert time.monotonic() - t0 >= REPLY_WITHIN_S  # waited out, then answered on a new connection
        first, other = pool.get_connection(), pool.get_connection()  # the one that answered, and another
        try:
            t0 = time.monotonic()
            other.send_command("PING")
            assert other.read_response() == "PONG"
            assert time.monotonic() - t0 < 1  # not a silent one: it was dropped and opened again
        finally:
            pool.release(first)
            pool.release(other)
    finally:
        r.close()
        proxy.stop()


def test_a_redis_that_refuses_writes_is_one_line_and_exit_3(easel_env, input_png, tmp_path):
    """A replica during a failover answers writes with READONLY (a full Redis with OOM): the
    CLI says which Redis refused and why, exit 3 as for one out of reach, no traceback."""
    import redis

    from easel.producer.embedded import Valkey

    replica = Valkey(tmp_path / "replica", appendonly=False).start()
    try:
        redis.Redis.from_url(replica.url).execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary gone
        r = cli("submit", "-i", str(input_png), "-m", "sd15", "-p", "x",
                env={**easel_env, "EASEL_REDIS_URL": replica.url})
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
        assert f"Redis at {replica.url} (EASEL_REDIS_URL) failed the command" in r.stderr
        assert "ReadOnlyError" in r.stderr and "read only replica" in r.stderr
    finally:
        replica.kill()


def test_progress_bars_show_labels_and_errors_as_typed():
    """A job's error quotes users' URLs and keys, and ``easel batch`` labels bars with its rows'
    names: text such as ``[/key]`` is shown as it is, not read as markup (which raised)."""
    import io

    from rich.console import Console

    from easel.producer.progress import job_progress

    out = io.StringIO()
    with job_progress(Console(file=out, width=200)) as bar:
        bar.add_task("row [/b]", total=1, detail="failed: s3://b/[/key].png does not exist")
    assert "row [/b]" in out.getvalue() and "s3://b/[/key].png does not exist" in out.getvalue()


def test_a_wait_keeps_its_timeout_while_redis_is_silent_or_away(client, input_png):
    """``wait`` raises TimeoutError at its deadline when Redis stops answering (a network gone
    quiet, as in a failover whose old address goes dark) or refuses connections, instead of
    waiting out the client's ~30 s of retries or the kernel's socket timeout; and
    ``easel wait --timeout`` says so in one line, exit 124."""
    import threading

    from easel.producer.client import EaselClient
    from easel.shared.plan import plan_job
    from tests.netproxy import TcpProxy

    spec = client.prepare(img2img_job(str(input_png), model="sd15-wide"))  # no worker serves it: it stays queued
    job_id, _ = client.store.create(spec, plan_job(spec, client.registry))
    proxy = TcpProxy(int(client.settings.redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    follower = EaselClient(client.settings.model_copy(update={"redis_url": proxy.url.replace("http", "redis") + "/0"}))
    try:
        for cut in (proxy.hold, proxy.stop):  # silent, then refusing
            outcome: list = []

            def wait_briefly() -> None:
                t0 = time.monotonic()
                try:
                    follower.wait(job_id, timeout=3)
                except Exception as e:  # noqa: BLE001 - the test checks which
                    outcome.append((type(e).__name__, time.monotonic() - t0))

            cut()
            t = threading.Thread(target=wait_briefly, daemon=True)
            t.start()
            t.join(30)
            assert outcome and outcome[0][0] == "TimeoutError" and outcome[0][1] < 12, (cut.__name__, outcome)
        r = cli("wait", job_id, "--timeout", "5")  # the bar's hint is read while the deadline is 3 s away
        assert r.returncode == 124 and "still queued after 5.0s" in r.stderr and "Traceback" not in r.stderr
        # Why, not only how long: in the bar while it waits, and in the timeout's message.
        assert r.stderr.count("no live worker serves family sd15-wide") == 2, r.stderr
    finally:
        proxy.stop()
        client.cancel(job_id)


def test_easel_wait_keeps_its_timeout_while_redis_is_away(easel_env):
    """--timeout is the most `easel wait` takes, Redis answering or not: exit 124, the job
    goes on (before, its first read rode out Redis's absence for ~30 s and exited 3)."""
    t0 = time.monotonic()
    r = cli("wait", "0" * 32, "--timeout", "4", env={"EASEL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
            timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 124 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert took < 20, took  # 4 s, one quick try past it, and the interpreter's start


def test_a_retry_with_its_idempotency_key_gets_its_job_after_the_input_is_gone(client):
    """A retry is answered before any check: its input deleted since (retention, a cleanup)
    does not turn the retry of an accepted job into a refusal."""
    ref = client.storage.put_input(b"\x89PNG retry " + uuid.uuid4().bytes, "png")
    # sd15: a message left there is dropped by the session's worker (cancelled), not taken
    # into another test's batch as sd15-wide's would be
    job = {**img2img_job(ref), "idempotency_key": f"retry-{uuid.uuid4().hex}"}
    first = client.submit(job)
    client.storage.client.delete_object(Bucket=client.storage.bucket, Key=ref.split("/", 3)[3])
    assert client.submit(job) == first
    client.storage._looked_until.clear()  # a minute later: this process looks again
    client.storage._fresh_until.clear()
    with pytest.raises(SubmitError, match="does not exist"):
        client.submit({**job, "idempotency_key": f"new-{uuid.uuid4().hex}"})
    client.cancel(first)


def test_a_model_that_will_not_load_leaves_its_family_serving(easel_env, tmp_path):
    """One model of a family whose weights are not there (an empty folder): the worker still
    starts and serves the family's other model; the broken model's jobs fail with the
    loader's reason, and `easel workers` names the model it could not load."""
    import yaml

    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings
    from tests.conftest import WorkerProc, png_bytes

    (tmp_path / "empty").mkdir()
    sd = {"family": "mixed", "latent_space": "sd1-vae", "kind": "sd"}
    registry = tmp_path / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": {"mixed-ok": {**sd, "source": "tiny-sd15"},
                                                   "mixed-broken": {**sd, "source": str(tmp_path / "empty")}}}))
    env = {**easel_env, "EASEL_MODELS": str(registry)}
    worker = WorkerProc("mixed", env, tmp_path).start()
    try:
        client = EaselClient(Settings(**{k[len("EASEL_"):].lower(): v for k, v in env.items()}))
        ref = client.storage.put_input(png_bytes((64, 64)), "png")
        ok, broken = (client.submit(img2img_job(ref, model=m, steps=2, strength=1.0)) for m in ("mixed-ok", "mixed-broken"))
        assert client.wait(ok, timeout=120).state.value == "succeeded"
        st = client.wait(broken, timeout=120)
        assert st.state.value == "failed" and str(tmp_path / "empty") in st.error, st.error
        assert worker.proc.poll() is None
        rows = [line.split("\t") for line in cli("workers", env=env).stdout.splitlines()]
        assert [row[-1] for row in rows if row[4] == worker.hostname] == ["mixed-broken"], rows
    finally:
        worker.stop()
