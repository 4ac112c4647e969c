"""A shared farm: fair share between tenants, ETAs, feasibility, pause/resume and drain, with sim
workers (registry kind ``sim``) on the session's real valkey and SeaweedFS."""
from __future__ import annotations

import time

import pytest
import yaml

from tests.conftest import WorkerProc, png_bytes

STEP_S = 0.01  # sim seconds per step: a 5-step job is ~50 ms of "GPU"
FAMILIES = ("fair", "fairw", "fairp", "fairnone", "fairn", "fairr", "fairc", "fairh", "fairs")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    path = tmp_path_factory.mktemp("fair") / "models.yaml"
    sim = {"source": "sim", "latent_space": "none", "kind": "sim", "sim_step_s": STEP_S}
    path.write_text(yaml.safe_dump({"models": {f: {**sim, "family": f} for f in FAMILIES}}))
    return path


@pytest.fixture(scope="module")
def farm_env(easel_env, registry):
    return {**easel_env, "EASEL_MODELS": str(registry)}


@pytest.fixture(scope="module")
def fair_client(farm_env):
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    return EaselClient(Settings(**{k[len("EASEL_"):].lower(): v for k, v in farm_env.items()}))


@pytest.fixture(scope="module")
def ref(fair_client):
    return fair_client.storage.put_input(png_bytes((32, 32)), "png")


def workers(farm_env, tmp_path_factory, family: str, n: int) -> list[WorkerProc]:
    procs = [WorkerProc(family, farm_env, tmp_path_factory.mktemp(f"{family}-logs")).start(wait=False)
             for _ in range(n)]
    for w in procs:
        w.wait_ready()
    return procs


def jobs(ref: str, family: str, tenant: str, n: int, steps: int = 5) -> list[dict]:
    return [{"tenant": tenant, "input": {"image": ref},
             "stages": [{"model": family, "prompt": tenant, "steps": steps, "strength": 1.0, "seed": i}]}
            for i in range(n)]


def times(client, ids: list[str]) -> list[tuple[float, float, float]]:
    pipe = client.store.r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(client.store.key(job_id), "created_at", "started_at", "finished_at")
    return [tuple(float(v) for v in row) for row in pipe.execute()]


def job_seconds(client, family: str) -> float:
    """The family's measured seconds per job (each worker publishes its own with its heartbeat)."""
    deadline = time.monotonic() + 10
    while (job_s := client.scheduler.family(family).job_s) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return job_s


def broker_lists(family: str) -> list[str]:
    """The Redis lists holding the family queue's messages (a test's cancels dispatch and send)."""
    from easel.shared.metrics import priority_lists

    return [name for _, name in priority_lists(f"easel.{family}")]


def pending_in(client, family: str) -> int:
    """Jobs pending their tenant's turn in the family's queue, as `easel queues` shows them."""
    return {q.family: q.pending for q in client.queues()}[family]


def wait_all(client, ids: list[str], timeout: float = 600) -> None:
    states = {st.id: st.state.value for st in client.watch(ids, timeout) if st.state.terminal}
    assert set(states.values()) == {"succeeded"}, states


@pytest.mark.slow
def test_a_new_tenant_is_not_stuck_behind_another_tenants_backlog(fair_client, ref, farm_env, tmp_path_factory):
    procs = workers(farm_env, tmp_path_factory, "fair", 4)
    try:
        a_ids = fair_client.submit_many(jobs(ref, "fair", "tenant-a", 2000))
        time.sleep(2)  # A's backlog is running
        b_ids = [fair_client.submit(job) for job in jobs(ref, "fair", "tenant-b", 20)]
        wait_all(fair_client, b_ids)
        job_s = job_seconds(fair_client, "fair")
        waits = [started - created for created, started, _ in times(fair_client, b_ids)]
        bound = (20 / 4 + 2) * job_s
        assert max(waits) <= bound, (max(waits), bound, job_s)
        assert pending_in(fair_client, "fair") > 1000  # A was still backlogged
        wait_all(fair_client, a_ids)
    finally:
        for w in procs:
            w.stop()


def test_a_tenant_pays_for_the_input_its_worker_reads_not_what_was_guessed(fair_client, farm_env,
                                                                          tmp_path_factory):
    """A job's work is charged at its dispatch, from what is known then: a 128 x 128 input
    uploaded by easel names its size in its key, one that names none counts as 512 x 512.
    The worker that reads the input settles the difference onto the tenant's pass, once."""
    from easel.shared.scheduler import Settlement

    store, r = fair_client.store, fair_client.store.r
    image = png_bytes((128, 128), color=(1, 2, 3))
    unsized = fair_client.storage.put_input(image, "png")  # as a presigned upload or a URL would be
    sized = fair_client.storage.put_input(image, "png", (128, 128))  # as the client, CLI and API upload
    fair_client.pause("fairs")
    fair_client.scheduler.set_weight("settled", 2)  # its pass moves by work / 2
    ids = [fair_client.submit({"tenant": "settled", "input": {"image": ref}, "stages": [
        {"model": "fairs", "prompt": "s", "steps": 8, "strength": 1.0, "seed": seed}]})
        for seed, ref in enumerate([unsized, sized, unsized])]
    # 8 steps under CFG, 16 passes at 512 x 512, 1 at 128 x 128; 4 more for the delivery.
    assert [float(r.hget(store.key(j), "work")) for j in ids] == [20 / 48, 5 / 48, 20 / 48]
    start = r.zscore(f"{store.prefix}:active:easel.fairs", "settled")
    procs = workers(farm_env, tmp_path_factory, "fairs", 1)
    try:
        fair_client.resume("fairs")  # dispatched as room opens: charged 45/48 in all
        wait_all(fair_client, ids)
        assert [float(r.hget(store.key(j), "charged:0")) for j in ids] == [5 / 48] * 3
        passes = f"{store.prefix}:passes:easel.fairs"
        assert float(r.hget(passes, "settled")) == pytest.approx(start + 3 * 5 / 48 / 2)
        # Once: a rerun of a delivery (a retry, a requeue) that read the old charge settles
        # nothing; nor does a delivery taken over (another instance holds the job).
        holder = r.hget(store.key(ids[0]), "instance")
        for instance in (holder, "another-instance"):
            assert fair_client.scheduler.settle([
                Settlement(ids[0], 0, instance, "settled", "easel.fairs", 20 / 48, 5 / 48)]) == 0
        assert fair_client.scheduler.settle([
            Settlement(ids[0], 0, "another-instance", "settled", "easel.fairs", 5 / 48, 20 / 48)]) == 0
        # A job sent straight to an idle queue (no tenant waiting) was charged nothing: nothing to settle.
        alone = fair_client.submit({"tenant": "settled", "input": {"image": unsized}, "stages": [
            {"model": "fairs", "prompt": "s", "steps": 8, "strength": 1.0, "seed": 3}]})
        wait_all(fair_client, [alone])
        assert r.hget(store.key(alone), "charged:0") is None
        assert float(r.hget(passes, "settled")) == pytest.approx(start + 3 * 5 / 48 / 2)
    finally:
        for w in procs:
            w.stop()
        r.hdel(f"{store.prefix}:weights", "settled")


@pytest.mark.slow
def test_a_chains_later_stages_take_their_tenants_turn(fair_client, ref, farm_env, tmp_path_factory):
    """A tenant's chains hand their second stage to a family another tenant uses too: the
    hand-offs wait in their tenant's pending set like new jobs, so the other tenant's jobs
    there take turns with them instead of waiting behind every one."""
    procs = workers(farm_env, tmp_path_factory, "fairc", 1)
    chains = fair_client.submit_many([{"tenant": "chainer", "input": {"image": ref}, "stages": [
        {"model": "fairc", "prompt": "c", "steps": 1, "strength": 1.0, "seed": i},
        {"model": "fairh", "prompt": "h", "steps": 5, "strength": 1.0}]} for i in range(12)])
    try:
        def handed_off() -> bool:
            rows = [fair_client.store.r.hmget(fair_client.store.key(j), "state", "segment") for j in chains]
            return all(row == ["queued", "1"] for row in rows)

        deadline = time.monotonic() + 120
        while not handed_off():  # every chain waits for fairh, which has no worker yet
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Each waits to be charged fairh's work (5 steps under CFG: 10 passes), not fairc's, at
        # the size handed on (fairc's 32 x 32 output), not 512 x 512.
        works = {float(fair_client.store.r.hget(fair_client.store.key(j), "work")) for j in chains}
        assert works == {(4 + 10 * 32 * 32 / 512**2) / 48}, works
        # One of them cancelled while it waits its turn: no worker will see it, its hand-off goes now.
        gone = chains.pop()
        assert fair_client.storage.list(f"jobs/{gone}/handoff/")
        assert fair_client.cancel(gone).value == "cancelled"
        assert fair_client.storage.list(f"jobs/{gone}/handoff/") == []
        others = fair_client.submit_many(jobs(ref, "fairh", "other", 3))
        procs += workers(farm_env, tmp_path_factory, "fairh", 1)
        wait_all(fair_client, chains + others)
        chain_ends = sorted(finished for _, _, finished in times(fair_client, chains))
        last_other = max(finished for _, _, finished in times(fair_client, others))
        assert last_other < chain_ends[-5], (last_other, chain_ends)  # not behind all eleven
        assert [len(fair_client.result(j).stages) for j in chains] == [2] * 11
    finally:
        for w in procs:
            w.stop()


@pytest.mark.slow
def test_weighted_tenants_share_the_farm_by_their_weights(fair_client, ref, farm_env, tmp_path_factory):
    fair_client.scheduler.set_weight("heavy", 2)
    fair_client.scheduler.set_weight("light", 1)
    heavy = fair_client.submit_many(jobs(ref, "fairw", "heavy", 300))
    light = fair_client.submit_many(jobs(ref, "fairw", "light", 300))
    procs = workers(farm_env, tmp_path_factory, "fairw", 2)
    try:
        wait_all(fair_client, heavy + light)
    finally:
        for w in procs:
            w.stop()
    done = sorted([(f, "heavy") for _, _, f in times(fair_client, heavy)] +
                  [(f, "light") for _, _, f in times(fair_client, light)])
    window = [who for _, who in done[20:320]]  # both backlogged throughout
    ratio = window.count("heavy") / window.count("light")
    assert 1.8 <= ratio <= 2.2, ratio


def test_no_live_worker_is_said_plainly_and_a_paused_queue_keeps_its_order(fair_client, ref, farm_env,
                                                                            tmp_path_factory):
    job_id = fair_client.submit(jobs(ref, "fairnone", "t", 1)[0])
    status = fair_client.status(job_id)
    assert status.state.value == "queued" and status.eta_s is None
    assert status.waiting_for == "no live worker serves family fairnone (none seen yet)"
    fair_client.cancel(job_id)

    (proc,) = workers(farm_env, tmp_path_factory, "fairp", 1)
    try:
        fair_client.pause("fairp")
        ids = [fair_client.submit(job) for job in jobs(ref, "fairp", "t", 8)]
        time.sleep(2)
        assert {fair_client.status(j).state.value for j in ids} == {"queued"}
        assert fair_client.status(ids[-1]).waiting_for == "the fairp queue is paused"
        (row,) = [q for q in fair_client.queues() if q.family == "fairp"]
        assert row.paused and row.pending == 8 and row.live_workers == 1
        fair_client.resume("fairp")
        wait_all(fair_client, ids)
        starts = [started for _, started, _ in times(fair_client, ids)]
        assert starts == sorted(starts)  # one worker, one tenant: submission order kept
        # A queued job behind others gets an ETA once the family's job time is measured.
        job_seconds(fair_client, "fairp")
        more = [fair_client.submit(job) for job in jobs(ref, "fairp", "t", 6, steps=40)]
        eta = fair_client.status(more[-1]).eta_s
        assert eta is not None and eta > 0
        wait_all(fair_client, more)
    finally:
        proc.stop()
    time.sleep(0.5)
    status = fair_client.status(fair_client.submit(jobs(ref, "fairp", "t", 1)[0]))
    assert status.waiting_for.startswith("no live worker serves family fairp (none for ")
    fair_client.cancel(status.id)


def test_a_drained_worker_finishes_its_job_and_exits(fair_client, ref, farm_env, tmp_path_factory):
    from easel.worker.feeding import DRAINED_EXIT

    (proc,) = workers(farm_env, tmp_path_factory, "fairp", 1)
    job_id = fair_client.submit(jobs(ref, "fairp", "t", 1, steps=300)[0])  # ~3 s
    deadline = time.monotonic() + 30
    while fair_client.status(job_id).state.value != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fair_client.drain(proc.hostname)
    assert proc.proc.wait(60) == DRAINED_EXIT
    assert fair_client.status(job_id).state.value == "succeeded"


def test_jobs_whose_records_expired_while_pending_hold_no_place(fair_client, ref, farm_env, tmp_path_factory):
    """A pending job whose record expired (job_ttl_s) is dropped at dispatch: it neither gets a
    message nor takes a place in the queue that the next jobs would wait behind forever."""
    (proc,) = workers(farm_env, tmp_path_factory, "fairp", 1)
    try:
        fair_client.pause("fairp")
        gone = [fair_client.submit(job) for job in jobs(ref, "fairp", "t", 5)]
        fair_client.store.r.delete(*[fair_client.store.key(j) for j in gone])  # as if their TTL ran out
        fair_client.resume("fairp")
        survivor = fair_client.submit(jobs(ref, "fairp", "t", 1)[0])
        wait_all(fair_client, [survivor])
        assert pending_in(fair_client, "fairp") == 0
        assert not any(fair_client.store.exists(j) for j in gone)  # not brought back by the dispatch
        assert fair_client.store.r.zcard("easel:queued:easel.fairp") == 0
    finally:
        proc.stop()


def test_expired_pending_entries_are_popped_a_bounded_number_a_dispatch(fair_client, ref):
    """A tenant held back for longer than job_ttl_s leaves pending entries whose records are
    gone. One dispatch pops a bounded number of them (100 a tenant), so one script never
    blocks Redis for a million, and another tenant's job is served in the same dispatch;
    the next dispatches go on until the held tenant's live job moves."""
    from easel.shared.keys import pending_key

    store, sched, queue = fair_client.store, fair_client.scheduler, "easel.fairn"
    fair_client.pause("fairn")
    try:
        live = fair_client.submit(jobs(ref, "fairn", "gone", 1)[0])
        pending = pending_key(store.prefix, queue, "gone")
        first = store.r.zrange(pending, 0, 0, withscores=True)[0][1]
        store.r.zadd(pending, {f"expired-{k}": first - 1 - k for k in range(1500)})  # ahead of the live job
        other = fair_client.submit(jobs(ref, "fairn", "other", 1)[0])
        store.r.delete("easel:paused:easel.fairn")
        passes = f"{store.prefix}:active:{queue}"
        store.r.zadd(passes, {"gone": 1.0, "other": 5.0})  # "gone" well ahead in turns
        done = sched.dispatch({queue: "fairn"})
        assert done.moved == [(other, queue, 5)] and queue in done.waiting
        assert store.r.zcard(pending) == 1401
        assert store.r.zscore(passes, "gone") == 1.0  # expired entries used no turn: it keeps its lead
        fair_client.cancel(other)  # its place in the queue: room for the next dispatches
        for _ in range(20):
            before = store.r.zcard(pending)
            moved = sched.dispatch({queue: "fairn"}).moved
            assert before - store.r.zcard(pending) <= 100
            if moved:
                break
        assert moved == [(live, queue, 5)] and store.r.zcard(pending) == 0
    finally:
        store.r.delete(pending)
        fair_client.resume("fairn")
        fair_client.cancel(live)
        fair_client.cancel(other)


def test_a_backlog_that_starts_is_announced_and_feeders_dispatch_until_none_waits(fair_client, ref):
    """Claims read nothing about the backlog: a worker's feeder dispatches after its claims
    while a dispatch says tenants wait, and hears on the backlog channel when the first job
    of a new backlog starts waiting (family ``fairn`` has no worker; its queue is paused so
    that its jobs wait in the pending sets)."""
    from types import SimpleNamespace

    from celery.signals import task_postrun, task_prerun

    from easel.shared.keys import backlog_channel, pending_key
    from easel.worker.feeding import Feeder
    from easel.worker.stops import StopListener

    store = fair_client.store
    feeder = Feeder(SimpleNamespace(store=store, scheduler=fair_client.scheduler, settings=fair_client.settings,
                                    registry=fair_client.registry), fair_client.celery, "fairn", {})
    listener = StopListener(store.r, store.stops_channel()).on(backlog_channel(store.prefix), feeder.heard_backlog)
    listener.start()

    def until(what, why: str) -> None:
        deadline = time.monotonic() + 5
        while not what():
            assert time.monotonic() < deadline, why
            time.sleep(0.02)

    fair_client.pause("fairn")
    try:
        until(lambda: feeder._notices > 0, "not subscribed")  # notices may have been missed: assume a backlog
        assert feeder._backlog
        assert feeder.feed() == 0 and not feeder._backlog  # the dispatch said no tenant waits
        first = fair_client.submit(jobs(ref, "fairn", "t", 1)[0])
        until(lambda: feeder._backlog, "the first waiting job was not announced")
        assert feeder.feed() == 0 and feeder._backlog  # paused, and a tenant still waits
        # Open with room and no dispatch yet: another tenant's new job still waits its turn.
        store.r.delete("easel:paused:easel.fairn")
        other = fair_client.submit(jobs(ref, "fairn", "u", 1)[0])
        assert store.r.zscore(pending_key(store.prefix, "easel.fairn", "u"), other) is not None
        fair_client.cancel(other)
        fair_client.pause("fairn")
        fair_client.cancel(first)
        fair_client.resume("fairn")  # its dispatch finds the tenant's set empty and drops it
        assert feeder.feed() == 0 and not feeder._backlog
        fair_client.pause("fairn")
        second = fair_client.submit(jobs(ref, "fairn", "t", 1)[0])
        until(lambda: feeder._backlog, "a new backlog was not announced")
        fair_client.cancel(second)
    finally:
        fair_client.resume("fairn")
        listener.close()
        task_prerun.disconnect(feeder._prerun)
        task_postrun.disconnect(feeder._postrun)


def test_an_earlier_versions_scores_caps_and_waiting_tenants_are_adopted(fair_client, ref):
    """A rolling upgrade: pending jobs scored the earlier way (priority x 1e13 + sequence)
    keep their priority when dispatched, caps kept in the earlier hash move to their keys,
    and tenants already waiting set the flag admission reads."""
    from easel.shared.keys import cap_key, pending_key, tenants_waiting_key

    store, sched, queue = fair_client.store, fair_client.scheduler, "easel.fairn"
    fair_client.pause("fairn")
    try:
        job_id = fair_client.submit({**jobs(ref, "fairn", "old", 1)[0], "priority": 3})
        store.r.zadd(pending_key(store.prefix, queue, "old"), {job_id: 3 * 10**13 + 42})  # the earlier form
        store.r.delete(tenants_waiting_key(store.prefix, queue))  # an earlier version never set it
        store.r.hset("easel:caps", "capped", 2)
        sched.adopt_earlier_keys(queue)
        assert store.r.exists(tenants_waiting_key(store.prefix, queue))
        assert store.r.get(cap_key(store.prefix, "capped")) == "2" and not store.r.exists("easel:caps")
        store.r.delete("easel:paused:easel.fairn")
        assert sched.dispatch({queue: "fairn"}).moved == [(job_id, queue, 3)]
        assert not store.r.exists(tenants_waiting_key(store.prefix, queue))  # nothing waits now
    finally:
        fair_client.resume("fairn")
        store.r.delete(cap_key(store.prefix, "capped"))
        fair_client.cancel(job_id)


def test_a_waiting_job_asks_for_a_dispatch_only_where_one_can_move_something(fair_client, ref):
    """Admission tells the submitter whether its queue has room (a dispatch now may move a
    job) or is full (the claim that makes room dispatches); so does a replay of a submit
    whose reply was lost."""
    from easel.shared.jobstore import new_job_id
    from easel.shared.keys import family_capacity_key

    store, sched, queue = fair_client.store, fair_client.scheduler, "easel.fairr"
    queued = f"{store.prefix}:queued:{queue}"
    calls = {}

    def submit(tenant: str, job_id: str | None = None):
        """A new job's submit, or the same call again for ``job_id`` (a replay)."""
        if job_id is None:
            job_id = new_job_id()
            calls[job_id] = fair_client.prepare_and_plan(jobs(ref, "fairr", tenant, 1)[0])
        (got,) = sched.submit_many([(job_id, *calls[job_id])])
        return got

    store.r.set(family_capacity_key(store.prefix, "fairr"), 1)  # one live worker's worth: room for 1 + margin 1
    made = []
    try:
        made += [submit("a"), submit("a")]
        assert [(g.admitted, g.room) for g in made] == [(True, False), (True, False)]
        full = submit("a")  # the queue holds capacity + margin: no room
        made.append(full)
        assert (full.admitted, full.room) == (False, False)
        again = submit("a", made[0].job_id)  # the first call's reply lost: its message is still to send
        assert (again.job_id, again.created, again.admitted) == (made[0].job_id, True, True)
        store.r.zrem(queued, made[0].job_id)  # a claim took one out
        waits = submit("b")  # tenants wait, so it waits its turn too, in a queue with room now
        made.append(waits)
        assert (waits.admitted, waits.room) == (False, True)
        for job_id in (waits.job_id, full.job_id):  # a waiting job's replay answers by the room now
            again = submit("", job_id)
            assert (again.job_id, again.created, again.admitted, again.room) == (job_id, True, False, True)
        done = sched.dispatch({queue: "fairr"})
        assert [job_id for job_id, _, _ in done.moved] == [full.job_id] and queue in done.waiting
    finally:
        for got in made:
            fair_client.cancel(got.job_id)
        store.r.delete(family_capacity_key(store.prefix, "fairr"), *store.r.scan_iter(match=f"{store.prefix}:*{queue}*"))


def test_the_end_of_a_capped_tenants_job_frees_its_slot_and_says_so(fair_client, ref):
    """A job dispatched under its tenant's cap leaves the tenant's in-flight set with its
    final state, and the store tells its ``on_slot_freed`` listener (a worker dispatches the
    tenant's next job at once); other jobs' ends do not."""
    from easel.shared.jobstore import JobStore
    from easel.shared.keys import cap_key, family_capacity_key
    from easel.shared.schema import JobState

    client_store, sched, queue = fair_client.store, fair_client.scheduler, "easel.fairr"
    store = JobStore(client_store.r, client_store.prefix)  # a worker's: its own listener
    freed = []
    store.on_slot_freed = lambda tenants, queues: freed.append(tenants)
    flight = f"{store.prefix}:flight:capped"
    store.r.set(family_capacity_key(store.prefix, "fairr"), 5)
    store.r.set(cap_key(store.prefix, "capped"), 1)
    fair_client.pause("fairr")  # both wait in the pending set, so dispatch decides
    first = second = free = ""
    try:
        first, second = (fair_client.submit(j) for j in jobs(ref, "fairr", "capped", 2))
        free = fair_client.submit(jobs(ref, "fairr", "free", 1)[0])
        sched.resume(queue)  # (the client's resume would dispatch and send them)
        moved = {job_id for job_id, _, _ in sched.dispatch({queue: "fairr"}).moved}
        assert moved == {first, free}  # the capped tenant's second waits for its first
        assert store.r.zrange(flight, 0, -1) == [first]
        assert sched.dispatch({queue: "fairr"}).moved == []

        assert store.transition(free, JobState.succeeded) and freed == []
        assert store.transition(first, JobState.failed, error="boom") and freed == [{"capped"}]
        assert store.r.zrange(flight, 0, -1) == []
        assert [job_id for job_id, _, _ in sched.dispatch({queue: "fairr"}).moved] == [second]
    finally:
        sched.resume(queue)
        for job_id in filter(None, (first, second, free)):
            fair_client.cancel(job_id)
        store.r.delete(cap_key(store.prefix, "capped"), family_capacity_key(store.prefix, "fairr"), flight,
                       *store.r.scan_iter(match=f"{store.prefix}:*{queue}*"), *broker_lists("fairr"))


def test_a_freed_slot_dispatches_the_tenants_next_job_from_any_queue(fair_client, ref):
    """A capped tenant's next job may wait in another family's queue than the job that
    ended: a chain ends on its last family's worker, a cancel comes through a client. Either
    dispatches and sends it at once, instead of leaving it to that queue's next claim or
    heartbeat; a cancel whose follow-up send fails (the broker away) still cancels."""
    from types import SimpleNamespace

    from celery.signals import task_postrun, task_prerun

    from easel.producer.embedded import free_port
    from easel.shared.celery_app import make_celery, queued_deliveries
    from easel.shared.jobstore import JobStore
    from easel.shared.keys import cap_key, family_capacity_key, flight_key
    from easel.shared.scheduler import Scheduler
    from easel.shared.schema import JobState
    from easel.worker.feeding import Feeder

    store, sched, broker = fair_client.store, fair_client.scheduler, fair_client.celery
    worker_store = JobStore(store.r, store.prefix)  # the fairp worker's, where the chain ended
    feeder = Feeder(SimpleNamespace(store=worker_store, scheduler=Scheduler(worker_store),
                                    settings=fair_client.settings, registry=fair_client.registry), broker, "fairp", {})
    worker_store.on_slot_freed = feeder.after_slot_freed
    flight, made = flight_key(store.prefix, "hopper"), []

    def pending(family: str) -> str:
        fair_client.pause(family)
        made.append(fair_client.submit(jobs(ref, family, "hopper", 1)[0]))
        sched.resume(f"easel.{family}")  # no dispatch: the test decides when one runs
        return made[-1]

    for family in ("fairr", "fairn"):
        store.r.set(family_capacity_key(store.prefix, family), 5)
    store.r.set(cap_key(store.prefix, "hopper"), 1)
    try:
        first, second = pending("fairr"), pending("fairn")
        assert [job_id for job_id, _, _ in sched.dispatch({"easel.fairr": "fairr"}).moved] == [first]
        assert sched.dispatch({"easel.fairn": "fairn"}).moved == []  # held at its cap
        assert worker_store.transition(first, JobState.succeeded)  # on the fairp worker
        assert store.r.zrange(flight, 0, -1) == [second]
        assert (second, 0) in queued_deliveries(store.r, broker_lists("fairn"))  # sent
        third = pending("fairr")
        assert fair_client.cancel(second) == JobState.cancelled  # through a client
        assert store.r.zrange(flight, 0, -1) == [third]
        assert (third, 0) in queued_deliveries(store.r, broker_lists("fairr"))
        fourth = pending("fairn")
        fair_client.celery = make_celery(fair_client.settings.model_copy(
            update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
        assert fair_client.cancel(third) == JobState.cancelled  # the send fails; the cancel stands
        assert store.r.zrange(flight, 0, -1) == [fourth]  # moved: the lost-message sweep sends it
    finally:
        fair_client.celery = broker
        task_prerun.disconnect(feeder._prerun)
        task_postrun.disconnect(feeder._postrun)
        for job_id in made:
            fair_client.cancel(job_id)
        store.r.delete(cap_key(store.prefix, "hopper"), flight,
                       *(name for family in ("fairr", "fairn") for name in (
                           family_capacity_key(store.prefix, family), *broker_lists(family),
                           *store.r.scan_iter(match=f"{store.prefix}:*easel.{family}*"))))


def test_a_cancelled_job_that_held_a_full_queues_room_lets_the_next_one_in_at_once(fair_client, ref):
    """A cancel of a dispatched job that waited in a full queue gives its place to the next
    pending job (another tenant's) through the client that cancelled: dispatched and sent at
    once, not at the queue's next claim or heartbeat. A pending job's cancel frees no room."""
    from easel.shared.celery_app import queued_deliveries
    from easel.shared.keys import family_capacity_key, pending_key

    store, queue = fair_client.store, "easel.fairr"
    store.r.set(family_capacity_key(store.prefix, "fairr"), 1)  # room for 1 + margin 1
    made = []
    try:
        made += [fair_client.submit(j) for j in jobs(ref, "fairr", "roomy", 2)]  # both admitted
        made += [fair_client.submit(j) for j in jobs(ref, "fairr", "behind", 2)]  # both pending
        first, second = made[2:]
        assert store.r.zrange(pending_key(store.prefix, queue, "behind"), 0, -1) == [first, second]
        assert fair_client.cancel(second).value == "cancelled"  # pending: no room freed
        assert store.r.zscore(f"{store.prefix}:queued:{queue}", first) is None
        assert fair_client.cancel(made[0]).value == "cancelled"
        assert store.r.zscore(f"{store.prefix}:queued:{queue}", first) is not None
        assert (first, 0) in queued_deliveries(store.r, broker_lists("fairr"))  # sent
    finally:
        for job_id in made:
            fair_client.cancel(job_id)
        store.r.delete(family_capacity_key(store.prefix, "fairr"), *broker_lists("fairr"),
                       *store.r.scan_iter(match=f"{store.prefix}:*{queue}*"))


def test_retries_waiting_out_their_backoff_hold_no_room_in_their_queue(fair_client, ref):
    """A tenant whose jobs fail for now (an image server answering 503) has them wait out a
    backoff of up to 30 s, eight times: while they wait, the queue's room goes to jobs that
    can run, or the workers idle and every other tenant waits behind the failing one."""
    from easel.shared.jobstore import new_job_id
    from easel.shared.keys import family_capacity_key

    store, sched, queue = fair_client.store, fair_client.scheduler, "easel.fairr"
    queued = f"{store.prefix}:queued:{queue}"

    def submit(tenant: str):
        (got,) = sched.submit_many([(new_job_id(), *fair_client.prepare_and_plan(jobs(ref, "fairr", tenant, 1)[0]))])
        return got

    store.r.set(family_capacity_key(store.prefix, "fairr"), 1)  # room for 1 + margin 1
    made = []
    try:
        made += [submit("flaky"), submit("flaky")]
        assert all(g.admitted for g in made)
        steady = submit("steady")
        made.append(steady)
        assert not steady.admitted  # the queue is full
        for failing in made[:2]:  # claimed, failed for now: each waits out its backoff, still queued
            store.r.zrem(queued, failing.job_id)
            store.mark_position(failing.job_id, queue, 5, held_back=True)
        moved = sched.dispatch({queue: "fairr"}).moved
        assert [job_id for job_id, _, _ in moved] == [steady.job_id]  # sent in their place
        assert store.queue_position(steady.job_id) == 0  # and ahead of them
        assert {store.queue_position(g.job_id) for g in made[:2]} == {1, 2}
    finally:
        for g in made:
            fair_client.cancel(g.job_id)
        store.r.delete(family_capacity_key(store.prefix, "fairr"), *broker_lists("fairr"),
                       *store.r.scan_iter(match=f"{store.prefix}:*{queue}*"))


def test_the_lost_message_sweep_reads_retries_held_back_behind_a_long_queue(fair_client, ref):
    """A retry's countdown message lives in one worker's memory until due: that worker dying
    loses it, and only the sweep sends it again. It ranks behind every claimable job, so
    the sweep reads the held-back ones apart from the first ``limit`` of those."""
    from easel.shared.jobstore import new_job_id
    from easel.shared.keys import family_capacity_key

    store, sched, queue = fair_client.store, fair_client.scheduler, "easel.fairr"
    store.r.set(family_capacity_key(store.prefix, "fairr"), 9)
    made = [new_job_id() for _ in range(3)]
    try:
        got = sched.submit_many([(job_id, *fair_client.prepare_and_plan(job))
                                 for job_id, job in zip(made, jobs(ref, "fairr", "sweep", 3))])
        assert all(g.admitted for g in got)
        store.r.zrem(f"{store.prefix}:queued:{queue}", made[0])  # claimed, failed for now, backing off
        store.mark_position(made[0], queue, 5, held_back=True)
        assert [job_id for job_id, _, _ in store.waiting_since(queue, limit=2)] == [*made[1:], made[0]]
    finally:
        for job_id in made:
            fair_client.cancel(job_id)
        store.r.delete(family_capacity_key(store.prefix, "fairr"), *broker_lists("fairr"),
                       *store.r.scan_iter(match=f"{store.prefix}:*{queue}*"))


def submit_paused(client, ref: str, tenant: str, n: int, steps: int = 22) -> list[str]:
    """Jobs left pending by their admission (their queue paused): the dispatches decide. At
    22 steps, a job is a unit of work (``shared.plan.segment_work``: (4 + 2 x 22) / 48)."""
    client.pause("fairr")
    ids = client.submit_many(jobs(ref, "fairr", tenant, n, steps))
    client.scheduler.resume("easel.fairr")
    return ids


def dispatched(client, times: int) -> dict[str, int]:
    """Jobs per tenant over ``times`` dispatches of easel.fairr, each claimed at once."""
    store, got = client.store, {}
    for _ in range(times):
        for job_id, _, _ in client.scheduler.dispatch({"easel.fairr": "fairr"}).moved:
            tenant = store.r.hget(store.key(job_id), "tenant")
            got[tenant] = got.get(tenant, 0) + 1
        store.r.delete(f"{store.prefix}:queued:easel.fairr")  # claimed: room again
    return got


@pytest.fixture
def ten_a_dispatch(fair_client):
    """easel.fairr with room for 10 jobs a dispatch; its keys, caps and weights go afterwards."""
    from easel.shared.keys import family_capacity_key

    store, ids = fair_client.store, []
    store.r.set(family_capacity_key(store.prefix, "fairr"), 9)  # with the margin, 10 jobs a dispatch
    yield ids
    fair_client.scheduler.resume("easel.fairr")
    for job_id in ids:
        fair_client.cancel(job_id)
    store.r.hdel(f"{store.prefix}:weights", "heavy")
    store.r.delete(family_capacity_key(store.prefix, "fairr"), *store.r.scan_iter(match=f"{store.prefix}:*held*"),
                   *store.r.scan_iter(match=f"{store.prefix}:*easel.fairr*"), *broker_lists("fairr"))


def test_a_tenant_held_at_its_cap_gets_its_share_once_freed_not_a_burst(fair_client, ref, ten_a_dispatch):
    """A tenant held at its cap runs nothing while the others run: like a stride client that
    left, its pass follows theirs (the last pass served), so once its cap frees it takes
    its share again, not every slot until it has caught up on the ones it sat out. A
    newcomer meanwhile gets its credit and then its share."""
    fair_client.scheduler.set_cap("held", 2)  # its two dispatched jobs keep running
    ten_a_dispatch += submit_paused(fair_client, ref, "held", 60) + submit_paused(fair_client, ref, "busy", 300)
    assert dispatched(fair_client, 10) == {"held": 2, "busy": 98}
    ten_a_dispatch += submit_paused(fair_client, ref, "new", 80)
    got = dispatched(fair_client, 6)
    assert got.get("new", 0) >= 20 and got.get("busy", 0) >= 15 and "held" not in got, got
    fair_client.scheduler.set_cap("held", None)
    got = dispatched(fair_client, 3)  # left at its old pass (2), it would take all 30
    assert 7 <= got.get("held", 0) <= 13, got


def test_newcomers_one_after_another_each_get_their_credit_not_more(fair_client, ref, ten_a_dispatch):
    """Each newcomer starts its credit (20 jobs) below the backlogged tenants, not below the
    newcomer before it: with three joining one after another, the backlogged tenant waits
    for their 60 jobs, not for credits stacked on credits (20 + 40 + 60)."""
    ten_a_dispatch += submit_paused(fair_client, ref, "busy", 300)
    assert dispatched(fair_client, 10) == {"busy": 100}
    newcomer_jobs = 0
    for tenant in ("n1", "n2", "n3"):
        ten_a_dispatch += submit_paused(fair_client, ref, tenant, 100)
        got = dispatched(fair_client, 1)
        assert "busy" not in got, got  # each one's credit runs first
        newcomer_jobs += sum(got.values())
    while "busy" not in (got := dispatched(fair_client, 1)):
        newcomer_jobs += sum(got.values())
    assert newcomer_jobs <= 3 * 20, newcomer_jobs  # (credits stacked: 90 here)


def test_a_low_weight_tenant_ahead_does_not_take_a_newcomers_credit(fair_client, ref, ten_a_dispatch):
    """A tenant of weight 0.05 advances 20 passes a job (a unit of work each), so its pass
    runs far ahead of where service stands; a newcomer still starts its credit (20 units:
    20 jobs) below the others."""
    fair_client.scheduler.set_weight("slow", 0.05)
    try:
        ten_a_dispatch += submit_paused(fair_client, ref, "slow", 20) + submit_paused(fair_client, ref, "busy", 200)
        assert dispatched(fair_client, 3) == {"slow": 2, "busy": 28}
        ten_a_dispatch += submit_paused(fair_client, ref, "new", 80)
        assert dispatched(fair_client, 2).get("new", 0) >= 19  # (level with "slow" less 20: 8)
    finally:
        fair_client.store.r.hdel(f"{fair_client.store.prefix}:weights", "slow")


def test_a_heavy_newcomers_credit_is_twenty_of_its_jobs(fair_client, ref, ten_a_dispatch):
    """Passes advance by work/weight a job, so the credit is counted in work: a tenant of
    weight 10 starts 20 units (20 of these jobs) ahead, then shares 10:1, not 200 ahead."""
    fair_client.scheduler.set_weight("heavy", 10)
    ten_a_dispatch += submit_paused(fair_client, ref, "busy", 200)
    assert dispatched(fair_client, 10) == {"busy": 100}
    ten_a_dispatch += submit_paused(fair_client, ref, "heavy", 300)
    got = dispatched(fair_client, 6)
    assert got.get("heavy", 0) >= 30 and got.get("busy", 0) >= 2, got


def test_tenants_share_a_queue_by_the_work_their_jobs_ask_for(fair_client, ref, ten_a_dispatch):
    """A dispatched job advances its tenant's pass by its work (steps x images x area) over
    the tenant's weight, so two backlogged tenants get equal GPU work, not equal job counts:
    one whose jobs are 0.75 units of work (16 steps: (4 + 32) / 48) gets one job for every
    three of a tenant whose jobs are 0.25 (4 steps). A queued job's place in line counts
    the others' jobs by the same work."""
    big = submit_paused(fair_client, ref, "big", 100, steps=16)
    small = submit_paused(fair_client, ref, "small", 300, steps=4)
    ten_a_dispatch += big + small
    # small's 10th job (its pass: 2.25) waits for its 9 and big's at passes 0, 0.75, 1.5 and 2.25
    assert fair_client.status(small[9]).queue_position == 9 + 4
    assert fair_client.status(small[199]).queue_position == 199 + 67  # big's up to 66 x 0.75 = 49.5
    assert dispatched(fair_client, 10) == {"big": 25, "small": 75}
    # A newcomer's credit is 20 units of work, here no more than the others have had (18.75):
    # 25 of its 0.75-unit jobs, then its share.
    ten_a_dispatch += submit_paused(fair_client, ref, "new", 100, steps=16)
    got = dispatched(fair_client, 3)
    assert got.get("new", 0) >= 25 and got.get("small", 0) >= 2, got


def test_a_tenant_with_one_job_at_a_time_pays_for_each_jobs_work(fair_client, ref, ten_a_dispatch):
    """A tenant that sends its next job once the last is dispatched (its pending set empty
    at each dispatch: a closed loop) comes back with its pass ahead by that job's work, not
    level with the front: its 1.75-unit jobs (40 steps) share one slot a dispatch with
    another tenant's 0.25-unit ones (4 steps) by their work, 1 to 7, not 1 to 1."""
    from easel.shared.keys import family_capacity_key

    store = fair_client.store
    store.r.set(family_capacity_key(store.prefix, "fairr"), 0)  # with the margin, 1 job a dispatch
    ten_a_dispatch += submit_paused(fair_client, ref, "busy", 200, steps=4)
    loop, got = None, {"busy": 0, "loop": 0}
    for _ in range(96):
        if loop is None:  # (submitted paused: no dispatch but the test's own moves a job)
            loop = submit_paused(fair_client, ref, "loop", 1, steps=40)[0]
            ten_a_dispatch.append(loop)
        for job_id, _, _ in fair_client.scheduler.dispatch({"easel.fairr": "fairr"}).moved:
            got[store.r.hget(store.key(job_id), "tenant")] += 1
            loop = None if job_id == loop else loop
        store.r.delete(f"{store.prefix}:queued:easel.fairr")  # claimed: room again
    share = 1.75 * got["loop"] / (1.75 * got["loop"] + 0.25 * got["busy"])
    assert sum(got.values()) == 96 and 0.4 <= share <= 0.6, got  # forgiven at each return: 7/8 of the work


def test_a_job_that_ended_while_pending_is_not_dispatched(fair_client, ref, ten_a_dispatch):
    """A cancel ends a pending job, then takes it out of its pending set: a dispatch in
    between finds it ended and moves the tenant's next job instead, with no message, no
    place under the tenant's cap and the backlog tally kept."""
    from easel.shared.schema import JobState

    store, sched = fair_client.store, fair_client.scheduler
    sched.set_cap("held", 1)
    ended, after = submit_paused(fair_client, ref, "held", 2)
    ten_a_dispatch += [ended, after]
    assert store.transition(ended, JobState.cancelled, error="cancelled before it ran")
    assert [job_id for job_id, _, _ in sched.dispatch({"easel.fairr": "fairr"}).moved] == [after]
    assert store.r.zrange(f"{store.prefix}:flight:held", 0, -1) == [after]
    store.unmark_queued(ended)  # the cancel's second half
    assert pending_in(fair_client, "fairr") == 0


def test_a_held_tenants_job_whose_record_is_gone_stops_holding_it(fair_client, ref, ten_a_dispatch):
    """A final state takes a job out of its tenant's in-flight set; one whose record expired
    never gets one. Dispatch looks for those among the jobs dispatched (or last looked at)
    a while ago only, so a held tenant costs no read per in-flight job on every dispatch."""
    from easel.shared.scheduler import FLIGHT_CHECK_AFTER_S

    store, sched = fair_client.store, fair_client.scheduler
    flight = f"{store.prefix}:flight:held"
    sched.set_cap("held", 1)
    first, second = submit_paused(fair_client, ref, "held", 2)
    ten_a_dispatch.append(second)
    assert [job_id for job_id, _, _ in sched.dispatch({"easel.fairr": "fairr"}).moved] == [first]

    def looked_at_long_ago() -> None:
        store.r.zadd(flight, {first: time.time() - FLIGHT_CHECK_AFTER_S - 1})

    looked_at_long_ago()  # still running: looked at, and not again for a period
    assert sched.dispatch({"easel.fairr": "fairr"}).moved == []
    assert store.r.zscore(flight, first) > time.time() - 60
    store.r.delete(store.key(first))  # its record expired (or was deleted)
    assert sched.dispatch({"easel.fairr": "fairr"}).moved == []  # looked at moments ago: not yet
    looked_at_long_ago()
    assert [job_id for job_id, _, _ in sched.dispatch({"easel.fairr": "fairr"}).moved] == [second]


def test_a_familys_capacity_sums_its_workers_batch_sizes(fair_client):
    """Workers of one family may take different batches (GPUs of two kinds, a hand-set size):
    every heartbeat sets the same capacity, the sum over the live ones, so admission's room
    does not swing with whichever beat last; a retired or silent worker leaves it. A live
    worker of an earlier version (mid-upgrade: it keeps no batch size) counts at the size of
    the one that beats."""
    from easel.shared.jobstore import JobStore
    from easel.shared.keys import family_capacity_key, family_instances_key

    store = JobStore(fair_client.store.r, prefix="capacity-test")  # no other test's instances
    capacity = family_capacity_key(store.prefix, "f")

    def beat(instance: str, batch: int, ttl_s: float = 30) -> int:
        store.beat(instance, f"host-{instance}", {"family": "f", "batch_size": batch}, ttl_s)
        return int(store.r.get(capacity))

    try:
        assert [beat("a", 8), beat("b", 8), beat("c", 2), beat("a", 8), beat("c", 2)] == [8, 16, 18, 18, 18]
        store.retire("b", "host-b", "f")
        assert beat("a", 8) == 10
        beat("d", 4, ttl_s=1.0)
        assert beat("c", 2) == 14
        time.sleep(1.2)  # d stops beating
        assert beat("c", 2) == 10
        seconds, _ = store.r.time()
        store.r.zadd(family_instances_key(store.prefix, "f"), {"earlier": seconds + 30})  # an earlier version's beat
        assert beat("c", 2) == 12 and beat("a", 8) == 18
    finally:
        store.r.delete(*store.r.scan_iter(match=f"{store.prefix}:*"))
