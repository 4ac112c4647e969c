"""A delivery that lost its job changes nothing that moved on: a worker cut off from Redis
past its heartbeat, whose job another worker took over and handed on, and a chain segment
whose cancel came after its last step. Store and scheduler scripts on the session's valkey."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
import yaml

from easel.worker.holdings import Holdings

FAMILIES = ("latea", "lateb")


@pytest.fixture(scope="module")
def late_client(easel_env, tmp_path_factory):
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    path = tmp_path_factory.mktemp("late") / "models.yaml"
    sim = {"source": "sim", "latent_space": "none", "kind": "sim", "sim_step_s": 0.01}
    path.write_text(yaml.safe_dump({"models": {f: {**sim, "family": f} for f in FAMILIES}}))
    env = {**easel_env, "EASEL_MODELS": str(path)}
    return EaselClient(Settings(**{k[len("EASEL_"):].lower(): v for k, v in env.items()}))


def next_segment(late_client, spec):
    """The chain's lateb segment, as its hand-off names it."""
    from easel.shared.plan import plan_job

    return plan_job(spec, late_client.registry).segments[1]


@pytest.fixture
def chain(late_client):
    """A two-family chain job's record (latea, then lateb), claimed by instance i1; lateb
    paused, so a hand-off there waits its turn. Returns (job id, spec, queues)."""
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec

    store, sched = late_client.store, late_client.scheduler
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"}, "stages": [
        {"model": "latea", "prompt": "a", "seed": 1, "steps": 2, "strength": 1.0},
        {"model": "lateb", "prompt": "b", "seed": 2, "steps": 2, "strength": 1.0}]})
    plan = plan_job(spec, late_client.registry)
    qa, qb = (seg.queue for seg in plan.segments)
    job_id, _ = store.create(spec, plan)
    store.mark_queued(job_id, qa, 0)
    assert store.claim_many([(job_id, 0, qa)], "w1", "i1", 3)[0].outcome == "run"
    sched.pause(qb)
    yield job_id, spec, (qa, qb)
    sched.resume(qb)
    store.r.delete(store.key(job_id), *store.r.scan_iter(match=f"{store.prefix}:*late[ab]*"))


def test_a_late_retry_from_a_worker_that_lost_its_job_leaves_it_where_it_moved(late_client, chain):
    """i1 is cut off past its heartbeat; a reaper requeues the job, i2 runs the segment and
    hands it on to lateb, where it waits its turn. i1's transient error, settled once Redis
    answers again, must not queue the job back in latea (whose worker would then be sent
    lateb's segment), nor count a retry; a permanent one must not fail it."""
    from easel.shared.jobstore import DeliveryEnd
    from easel.shared.schema import JobState
    from easel.worker.policy import Delivery, fail, retry_later

    store, sched = late_client.store, late_client.scheduler
    job_id, spec, (qa, qb) = chain
    nxt = next_segment(late_client, spec)
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    again = store.claim_many([(job_id, 0, qa)], "w2", "i2", 3)[0]
    assert again.outcome == "run" and again.crashed == 1  # i1's delivery never ended
    created_at = float(store.r.hget(store.key(job_id), "created_at"))
    assert sched.hand_off(job_id, spec, created_at, DeliveryEnd(0, "i2"), nxt) == (True, 0)  # PENDING

    cut_off = SimpleNamespace(store=store, settings=late_client.settings, instance="i1")
    late = Delivery(job_id, 0, qa)
    assert retry_later(cut_off, None, late, redis.ConnectionError("Connection reset by peer")) == "superseded"
    assert fail(cut_off, late, "a permanent error") == "superseded"
    record = store.r.hmget(store.key(job_id), "state", "segment", "queue", "retries:0", "note")
    assert record[:4] == [JobState.queued.value, "1", qb, None], record
    assert store.r.zscore(f"{store.prefix}:queued:{qa}", job_id) is None  # no place left in latea
    sched.resume(qb)
    assert [j for j, _, _ in sched.dispatch({qb: "lateb"}).moved] == [job_id]


@pytest.mark.parametrize("paused", [False, True])
def test_a_hand_off_replayed_after_a_lost_reply_answers_where_the_job_waits(late_client, chain, monkeypatch,
                                                                             paused):
    """redis-py sends a script again when its reply is lost. A hand-off's first run cleared
    the holder, so the replay's own state change is refused; it must still say where the
    job waits (admitted: send its message now; pending: a dispatch sends it), not that the
    delivery was taken over, which sent nothing and left the job to the lost-message sweep."""
    from easel.shared import scheduler as scheduling
    from easel.shared.jobstore import DeliveryEnd
    from easel.shared.scheduler import ADMITTED, PENDING

    store, sched = late_client.store, late_client.scheduler
    job_id, spec, (qa, qb) = chain
    nxt = next_segment(late_client, spec)
    if not paused:
        sched.resume(qb)
    attempt = int(store.r.hget(store.key(job_id), "attempts"))
    run_scripts = scheduling.run_scripts
    monkeypatch.setattr(scheduling, "run_scripts", lambda r, calls: (run_scripts(r, calls), run_scripts(r, calls))[1])
    created_at = float(store.r.hget(store.key(job_id), "created_at"))
    answer = sched.hand_off(job_id, spec, created_at, DeliveryEnd(0, "i1", attempt), nxt)
    assert answer == (True, PENDING if paused else ADMITTED)
    assert store.r.hmget(store.key(job_id), "state", "segment", "queue") == ["queued", "1", qb]
    # A delivery taken over is still refused: another claim moved the attempt on.
    monkeypatch.setattr(scheduling, "run_scripts", run_scripts)
    assert sched.hand_off(job_id, spec, created_at, DeliveryEnd(0, "i1", attempt - 1), nxt) == (False, -1)


def test_a_cancel_asked_as_a_segment_ends_ends_the_job_instead_of_its_hand_off(late_client, chain):
    """A cancel that comes after a segment's last step (while it decodes or writes its
    hand-off) finds the job held and running, so it only sets the flag: the hand-off sees
    it and hands nothing on; the delivery then ends the job cancelled, at once, instead of
    leaving it to wait its turn in lateb for a claim to cancel it."""
    from easel.shared.jobstore import DEFAULT_TENANT, DeliveryEnd
    from easel.shared.keys import pending_key
    from easel.shared.scheduler import CANCEL_ASKED
    from easel.shared.schema import JobState
    from easel.worker.policy import Delivery, cancelled

    store, sched = late_client.store, late_client.scheduler
    job_id, spec, (qa, qb) = chain
    nxt = next_segment(late_client, spec)
    assert store.request_cancel(job_id) == JobState.running
    created_at = float(store.r.hget(store.key(job_id), "created_at"))
    assert sched.hand_off(job_id, spec, created_at, DeliveryEnd(0, "i1"), nxt) == (False, CANCEL_ASKED)
    assert store.r.hmget(store.key(job_id), "state", "segment", "instance") == [JobState.running.value, "0", "i1"]
    assert store.r.zscore(pending_key(store.prefix, qb, DEFAULT_TENANT), job_id) is None
    holder = SimpleNamespace(store=store, settings=late_client.settings, instance="i1")
    assert cancelled(holder, Delivery(job_id, 0, qa)) == "cancelled"
    assert store.status(job_id).state == JobState.cancelled


def test_an_instance_a_reaper_took_the_job_from_changes_nothing_until_it_claims_again(late_client, chain):
    """i1 stalls past its heartbeat and a reaper requeues its job: before any claim, nobody
    holds it, and i1 waking to a failure (its stage's time limit, say) must not end a job
    that waits for its next delivery. A delivery i1 claims afterwards is its own again."""
    from easel.shared.schema import JobState
    from easel.worker.policy import Delivery, fail

    store = late_client.store
    job_id, _, (qa, _) = chain
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    i1 = SimpleNamespace(store=store, settings=late_client.settings, instance="i1")
    assert fail(i1, Delivery(job_id, 0, qa), "stage 0 made no progress within its time limit") == "superseded"
    assert store.status(job_id).state == JobState.queued
    assert store.claim_many([(job_id, 0, qa)], "w1", "i1", 3)[0].outcome == "run"
    assert fail(i1, Delivery(job_id, 0, qa), "a failure of this delivery") == "failed"
    assert store.status(job_id).state == JobState.failed


def test_a_worker_back_after_a_take_over_and_a_retry_leaves_the_waiting_job_alone(late_client, chain):
    """i1 stalls past its heartbeat; a reaper requeues its job; i2 claims it and meets a
    transient error, so the job waits for its retry held by nobody, and nothing of the
    record names i1 any more. i1 waking with its outputs written, or with its watchdog's
    failure, must not end the job: a later claim replaced its delivery. The retry then
    runs and ends it."""
    from easel.shared.schema import JobState
    from easel.worker.policy import Delivery, end_as, fail

    store = late_client.store
    job_id, _, (qa, _) = chain
    late = Delivery(job_id, 0, qa, attempt=int(store.r.hget(store.key(job_id), "attempts")))
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    i1, i2 = (SimpleNamespace(store=store, settings=late_client.settings, instance=i) for i in ("i1", "i2"))
    again = store.claim_many([(job_id, 0, qa)], "w2", "i2", 3)[0]
    assert again.outcome == "run" and again.attempts == late.attempt + 1
    assert end_as(i2, Delivery(job_id, 0, qa, attempt=again.attempts), JobState.queued, note="retry 1", queue=qa)
    assert fail(i1, late, "stage 0 made no progress within its time limit") == "superseded"
    assert not end_as(i1, late, JobState.succeeded, outputs=["jobs/x/output/0.png"])
    assert store.r.hmget(store.key(job_id), "state", "instance", "error") == [JobState.queued.value, None, None]
    retry = store.claim_many([(job_id, 0, qa)], "w2", "i2", 3)[0]
    assert retry.outcome == "run"
    assert end_as(i2, Delivery(job_id, 0, qa, attempt=retry.attempts), JobState.succeeded)
    assert store.status(job_id).state == JobState.succeeded


def test_the_engine_hands_each_claimed_delivery_on_with_its_claims_attempt(late_client, chain):
    """What makes a replaced delivery's end refusable: the engine's claim gives each delivery
    its claim's attempt number, and every end of it (``end_of``) carries that."""
    from easel.worker.engine import claim
    from easel.worker.policy import Delivery, end_of

    store = late_client.store
    job_id, _, (qa, _) = chain
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    ctx = SimpleNamespace(store=store, settings=late_client.settings, instance="i2", hostname="w2", stops=None,
                          on_claim=None, holding=Holdings())
    (job,) = claim(ctx, None, [Delivery(job_id, 0, qa)], {})
    assert job.delivery.attempt == job.claim.attempts == 2
    assert end_of(ctx, job.delivery) == (0, "i2", 2)


def test_a_late_end_of_an_instances_earlier_delivery_leaves_its_later_one_alone(late_client, chain):
    """i1 is taken for dead and claims its requeued job again (a second delivery); the
    first delivery's late end (its overlapped finish, say) must neither end the job nor
    drop the second delivery from i1's running set, which a reaper reads should i1 die."""
    from easel.shared.schema import JobState
    from easel.worker.policy import Delivery, end_as

    store = late_client.store
    job_id, _, (qa, _) = chain
    first = Delivery(job_id, 0, qa, attempt=int(store.r.hget(store.key(job_id), "attempts")))
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    second = store.claim_many([(job_id, 0, qa)], "w1", "i1", 3)[0]
    i1 = SimpleNamespace(store=store, settings=late_client.settings, instance="i1")
    assert not end_as(i1, first, JobState.queued, note="retry 1", queue=qa)
    assert store.r.hmget(store.key(job_id), "state", "instance") == [JobState.running.value, "i1"]
    assert store.r.sismember(store._running_prefix() + "i1", f"{job_id}:0")
    assert end_as(i1, Delivery(job_id, 0, qa, attempt=second.attempts), JobState.succeeded)
    assert not store.r.sismember(store._running_prefix() + "i1", f"{job_id}:0")


def test_a_frozen_workers_watchdog_fails_only_the_jobs_it_still_holds(late_client, chain):
    """A process frozen past its heartbeat (a kernel call that never returns, say) wakes to
    its stage watchdog firing: by then a reaper may have given its job to another worker,
    whose run the watchdog must not fail. A job it still holds fails with the reason."""
    from easel.shared.jobstore import Claim
    from easel.shared.schema import JobState
    from easel.worker.engine import Job, _arm_watchdog
    from easel.worker.policy import Delivery
    from easel.worker.watchdog import StageBudget

    store = late_client.store
    job_id, spec, (qa, _) = chain
    fired = []
    ctx = SimpleNamespace(store=store, settings=late_client.settings, instance="i1", finisher=None,
                          watchdog=SimpleNamespace(arm=lambda seconds, reason, on_fire: fired.append((reason, on_fire))))
    job = Job(Delivery(job_id, 0, qa), Claim("run", spec, store.load(job_id)[1]))
    budget = StageBudget(60.0, 600.0, 3.0, 0.0)

    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    assert store.claim_many([(job_id, 0, qa)], "w2", "i2", 3)[0].outcome == "run"
    _arm_watchdog(ctx, [job], 0, spec.stages[0], budget)
    reason, fail_all = fired[-1]
    fail_all(reason)
    assert store.r.hmget(store.key(job_id), "state", "instance") == [JobState.running.value, "i2"]

    i2 = SimpleNamespace(**{**vars(ctx), "instance": "i2"})
    _arm_watchdog(i2, [job], 0, spec.stages[0], budget)
    reason, fail_all = fired[-1]
    fail_all(reason)
    status = store.status(job_id)
    assert status.state == JobState.failed and "made no progress within its time limit" in status.error


def test_a_jobs_webhook_is_registered_once(late_client, chain):
    """A second registration (an idempotent replay racing the request it replays) leaves
    the first as it is: a delivered webhook is not sent again."""
    store = late_client.store
    job_id, _, _ = chain
    store.set_webhook(job_id, "https://93.184.216.34/first", ["succeeded", "failed", "cancelled"], passing=False)
    store.webhook_state(job_id, "delivered")
    store.set_webhook(job_id, "https://93.184.216.34/second", ["succeeded", "failed", "cancelled"], passing=False)
    assert store.r.hmget(store.key(job_id), "webhook_url", "webhook_state") == ["https://93.184.216.34/first",
                                                                               "delivered"]


def test_a_requeue_cut_short_leaves_the_job_to_the_lost_message_sweep(late_client, chain):
    """A reaper that requeues a dead instance's job and is cut off right after (Redis gone
    before its next command, the reaper's process ending) leaves the job where the
    lost-message sweep looks: waiting in its queue's position set, with no message, so it
    is sent. (The instance, if it was only stalled, can no longer end it itself.)"""
    import time

    from easel.shared.liveness import Reaper
    from easel.shared.schema import JobState

    store = late_client.store
    job_id, _, (qa, _) = chain
    sent = []

    def cut_off(*args, **kw):
        raise redis.ConnectionError("Connection closed by server.")

    store.mark_queued = cut_off  # the first command after the requeue script
    try:
        with pytest.raises(redis.ConnectionError):
            Reaper(store, lambda *a, **kw: None, every_s=1, ttl_s=1).requeue("i1", job_id, 0, "heartbeat expired")
    finally:
        del store.mark_queued
    assert store.status(job_id).state == JobState.queued and store.queue_position(job_id) is not None
    time.sleep(0.2)
    reaper = Reaper(store, lambda *a, **kw: sent.append(a), every_s=1, ttl_s=0.1, queues=[qa])
    assert reaper.sweep_lost(qa) == [job_id] and sent[0][:3] == (job_id, 0, qa)


def test_a_refused_final_write_tells_its_own_lost_reply_from_a_take_over(late_client, chain):
    """A finish's final write whose reply was lost is sent again by redis-py and refused
    (the job is already succeeded): that success is this delivery's own, reported as such,
    while the same refusal on an instance that does not hold the job says why."""
    from easel.shared.jobstore import Claim
    from easel.shared.schema import JobState
    from easel.worker.engine import Job, _refused
    from easel.worker.policy import Delivery

    store = late_client.store
    job_id, spec, (qa, _) = chain
    change = [(job_id, JobState.succeeded, {})]
    assert store.transition_many(change, ends=[(0, "i1")]) == [True]
    assert store.transition_many(change, ends=[(0, "i1")]) == [False]  # the replay
    dropped = []
    outcomes = {}
    for instance, want in (("i1", "succeeded"), ("i2", "already succeeded")):
        ctx = SimpleNamespace(store=store, settings=late_client.settings, instance=instance,
                              io=SimpleNamespace(submit=lambda *a: dropped.append(a)), holding=Holdings())
        job = Job(Delivery(job_id, 0, qa), Claim("run", spec, store.load(job_id)[1]))
        _refused(ctx, [job], outcomes)
        assert outcomes[job.delivery] == want, (instance, outcomes)
    assert len(dropped) == 2  # an ended chain job's hand-offs are dropped either way


@pytest.fixture
def own_store(late_client):
    """A store with a prefix of its own (no other test's instances for its reaps), and a
    function that makes a one-stage latea job queued there. Returns (store, make, queue)."""
    from easel.shared.jobstore import JobStore
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec

    store = JobStore(late_client.store.r, prefix="latestore")
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"}, "stages": [
        {"model": "latea", "prompt": "a", "seed": 1, "steps": 2, "strength": 1.0}]})
    plan = plan_job(spec, late_client.registry)
    queue = plan.segments[0].queue

    def make() -> str:
        job_id, _ = store.create(spec, plan)
        store.mark_queued(job_id, queue, 0)
        return job_id

    yield store, make, queue
    keys = list(store.r.scan_iter(match="latestore:*"))
    if keys:
        store.r.delete(*keys)


def test_a_delivery_whose_record_expired_as_it_ran_leaves_its_running_set(own_store):
    """A job claimed near its record's TTL (a backlog nearly that old) can see its record
    expire while it runs: its end still takes the delivery out of the instance's running
    set, or the running count stays one too high for as long as the worker lives."""
    from easel.shared.schema import JobState

    store, make, queue = own_store
    job_id = make()
    assert store.claim_many([(job_id, 0, queue)], "w", "i1", 3)[0].outcome == "run"
    running = store._running_prefix() + "i1"
    assert store.r.sismember(running, f"{job_id}:0")
    store.r.delete(store.key(job_id))  # its TTL runs out
    assert not store.transition(job_id, JobState.succeeded, end=(0, "i1"))
    assert not store.r.sismember(running, f"{job_id}:0")
    assert not store.r.exists(store.key(job_id))


def test_a_claim_of_an_expired_job_leaves_no_place_in_its_queue(own_store):
    """A message whose job's record expired is dropped at its claim, and the job's place in
    the queue's position set goes with it: left there, it would count against the queue's
    room for dispatch until a sweep reached it."""
    store, make, queue = own_store
    job_id = make()
    store.r.delete(store.key(job_id))  # its TTL ran out while its message waited
    assert store.claim_many([(job_id, 0, queue)], "w", "i1", 3)[0].outcome == "unknown"
    assert store.r.zscore(f"latestore:queued:{queue}", job_id) is None


def test_an_instance_that_claims_its_requeued_job_again_stays_reapable(own_store):
    """i1 stalls past its heartbeat; a reaper leases it and requeues its job; i1, back, takes
    the re-sent message and claims the job again before the reaper forgets it. Forgetting
    must leave that delivery in i1's running set and i1 among the instances: should i1 then
    die for good, the next reap finds the job, instead of it staying running forever."""
    store, make, queue = own_store
    job_id = make()
    assert store.claim_many([(job_id, 0, queue)], "w", "i1", 3)[0].outcome == "run"
    store.r.zadd(store.instances_key(), {"i1": 1})  # its heartbeat expired long ago
    leased, dead = store.reap_dead(lease_s=30)
    assert dead["i1"][1] == [(job_id, 0)]
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    assert store.claim_many([(job_id, 0, queue)], "w", "i1", 3)[0].outcome == "run"  # i1 is back
    store.forget_instance("i1", dead["i1"][1], leased)
    assert store.r.sismember(store._running_prefix() + "i1", f"{job_id}:0")
    assert store.r.zscore(store.instances_key(), "i1") is not None
    store.r.zadd(store.instances_key(), {"i1": 1})  # i1 dies for good: the next reap finds the job
    leased, dead = store.reap_dead(lease_s=30)
    assert dead["i1"][1] == [(job_id, 0)]
    assert store.requeue(job_id, 0, "i1", "heartbeat expired")
    store.forget_instance("i1", dead["i1"][1], leased)
    assert store.r.zscore(store.instances_key(), "i1") is None
    assert not store.r.exists(store._running_prefix() + "i1")


@pytest.mark.parametrize("calls", ["two batch keys", "one batch split to fit in memory"])
def test_a_tasks_deliveries_waiting_behind_another_call_are_not_counted_as_started(late_client, calls):
    """A task's deliveries run as calls one after another (here a 100-step job, then a
    2-step one: two batch keys; or two 100-step jobs of one micro-batch that the worker
    splits, a call of its shape having run out of memory). While the first call runs, the
    second job's crash count is what it was before its claim: had the first call killed
    the process, the second job, which never ran, would not come back a crash nearer the
    poison limit (two and it fails). Its count is set as its own call starts and cleared
    when it ends."""
    import threading
    import time

    from easel.shared.celery_app import make_celery
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec
    from easel.worker.context import WorkerContext
    from easel.worker.engine import run_deliveries
    from easel.worker.policy import Delivery
    from tests.conftest import png_bytes

    store = late_client.store
    ref = late_client.storage.put_input(png_bytes(), "png")
    ids = []
    for steps in ((100, 2) if calls == "two batch keys" else (100, 100)):
        spec = JobSpec.model_validate({"input": {"image": ref}, "stages": [
            {"model": "latea", "prompt": "a", "seed": 1, "steps": steps, "strength": 1.0}]})
        plan = plan_job(spec, late_client.registry)
        job_id, _ = store.create(spec, plan)
        store.mark_queued(job_id, plan.segments[0].queue, 0)
        ids.append(job_id)
    queue = plan.segments[0].queue
    ctx = WorkerContext.create("latea", late_client.settings.model_copy(update={"batch_size": 2}),
                               hostname="crash-counts@test")
    if calls != "two batch keys":
        ctx.fits.most = lambda shape: 1  # a call of its shape ran out of memory lately: one image a call
    done: list = []
    runner = threading.Thread(target=lambda: done.append(run_deliveries(
        ctx, make_celery(late_client.settings), [Delivery(j, 0, queue) for j in ids])))
    runner.start()
    seen = []  # (first's state and step, both crash counts) while the first runs its steps
    while runner.is_alive():
        pipe = store.r.pipeline(transaction=True)  # both records at one moment
        for j in ids:
            pipe.hmget(store.key(j), "state", "step", "inflight:0")
        first, second = pipe.execute()
        if first[0] == "running" and int(first[1] or 0) > 0:
            seen.append((first[2], second[2]))
        time.sleep(0.02)
    runner.join()
    ctx.io.shutdown()
    ctx.control.shutdown()
    assert done == [["succeeded", "succeeded"]]
    assert seen, "the first job's steps were never seen"
    assert all(counts == ("1", "0") for counts in seen), seen
    assert [store.r.hget(store.key(j), "inflight:0") for j in ids] == ["0", "0"]
    assert [store.status(j).state.value for j in ids] == ["succeeded", "succeeded"]


def test_the_stops_listener_outlives_a_failing_handler_and_a_message_that_is_not_text(late_client):
    """A handler that raises, or bytes that are not UTF-8 on a channel it listens on, cost
    that one message: the listener's thread goes on, so later stops and notices are heard."""
    import json

    import time

    from easel.shared.jobstore import JobStore, redis_client
    from easel.worker.stops import StopListener

    store = JobStore(redis_client(late_client.settings.redis_url), prefix="stops-live")
    heard: list[str | None] = []

    def handler(text: str | None) -> None:
        heard.append(text)
        if text == "boom":
            raise RuntimeError("a handler's bug")

    listener = StopListener(store.r, store.stops_channel()).on("stops-live:notices", handler).start()
    try:
        deadline = time.monotonic() + 10
        while not (listener.connected and heard == [None]) and time.monotonic() < deadline:
            time.sleep(0.02)
        for data in ("boom", b"\xff\xfe not text"):
            store.r.publish("stops-live:notices", data)
        while listener.stop_for("j1", "any") is None and time.monotonic() < deadline + 10:
            store.r.publish(store.stops_channel(), json.dumps({"job_id": "j1", "stop": "cancel"}))
            time.sleep(0.2)  # (a reply the client could not read costs a new subscription)
        assert listener.stop_for("j1", "any") == "cancel" and heard[:2] == [None, "boom"]
    finally:
        listener.close()


def test_a_heard_stop_is_kept_an_hour_from_when_it_was_last_heard(monkeypatch):
    """The stops a worker hears (cancels, take-overs: the farm's, as a mass cancel sends one a
    job) are kept for KEEP_S from their last hearing and then forgotten, oldest first, each
    once (a cancel of 100,000 jobs must not cost each new stop a walk over all of them)."""
    import json
    from types import SimpleNamespace

    from easel.worker import stops

    now = [0.0]
    monkeypatch.setattr(stops, "time", SimpleNamespace(monotonic=lambda: now[0]))
    listener = stops.StopListener(None, "unused")

    def hear(job_id: str, kind: str = "cancel", instance: str | None = None) -> None:
        listener._note(json.dumps({"job_id": job_id, "stop": kind, "instance": instance}))

    hear("a")
    now[0] = 10.0
    hear("b", "taken", "i1")
    now[0] = 20.0
    hear("a")  # heard again: kept from now
    now[0] = stops.KEEP_S + 15.0
    hear("c")
    assert [listener.stop_for(j, "i1") for j in "abc"] == ["cancel", None, "cancel"]
    assert list(listener._heard) == ["a", "c"]
