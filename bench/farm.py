"""The control plane at farm scale: what one job costs Redis and S3, and how fast it dispatches.

N sim worker processes (registry kind ``sim``: the pipeline sleeps per step, everything
else is the real path) serve one family. Jobs arrive at a rising rate, one ``submit`` each
(one input uploaded once, as a bulk pipeline does). For each rate step it records the Redis
commands (``INFO commandstats``), valkey's CPU (``INFO cpu``), the S3 requests (counted at a
TCP proxy in front of SeaweedFS) and each job's dispatch latency: from ``created_at`` to
``started_at``, the claim of its first delivery.

Headlines:
- ``farm_redis_cmds_per_job``: commands per job above the idle rate, at the lowest rate step;
- ``farm_redis_cpu_us_per_job``: marginal valkey CPU per job, the slope of CPU rate against
  job rate over the steps below the knee, so idle polling is not counted as per-job cost;
- ``farm_s3_requests_per_job``;
- ``farm_dispatch_p50_ms`` / ``farm_dispatch_p99_ms``: at the lowest rate, idle workers waiting;
- ``farm_max_jobs_per_s``: the knee, the highest job rate whose dispatch p99 stays within
  twice the lowest rate's (the machine's CPU, not Redis, sets it on a 2-core VM);
- ``farm_idle_redis_cpu_pct_per_worker``: valkey CPU per idle worker process, in % of a core;
- ``farm_backlog_cmds_per_job``: commands per job above the idle rate while a backlog drains
  (jobs submitted at once with ``submit_many``, most waiting their turn in the pending sets):
  a job's own commands plus its wait and its dispatch; ``farm_backlog_redis_cpu_us_per_job``:
  valkey's CPU per job above the idle rate over the same window, and
  ``farm_backlog_drain_jobs_per_s``, how fast the workers drained it (from the submit to
  the last job's end);
- ``farm_redis_ping_cpu_us``: valkey CPU of one PING round trip, measured in the same run on
  the same server (the baseline: what one request costs on this machine), and
  ``farm_redis_cpu_per_job_in_pings``: a job's marginal CPU in PING round trips, the figure
  that carries over to another machine (multiply by its PING cost);
- ``farm_redis_round_trips_per_job``: requests valkey read per job (``total_reads_processed``
  above the idle rate, at the lowest rate step), and ``farm_redis_lone_ping_cpu_us``: the
  marginal CPU of a lone PING sent at the rate steps' request rates (job rate times round
  trips per job, one connection, nothing else sent): what a wake-up alone costs a server that
  sleeps between requests, the floor under ``farm_redis_cpu_us_per_job`` at these rates;
  ``farm_redis_cpu_per_job_in_lone_pings`` is the one over the other;
- ``farm_busy_redis_cpu_us_per_job``: valkey CPU per job on a busy server, where a farm's
  Redis runs (``busy_cpu``): the requests of real jobs, recorded, then replayed from many
  connections at once by a light client, flat out; with ``farm_busy_jobs_per_s`` and
  ``farm_busy_redis_cpu_pct``, how fast and how busy;
- ``farm_busy_redis_marginal_us_per_job``: the same replay paced at a quarter and at three
  quarters of the flat-out rate: the difference of valkey's two CPU rates over the
  difference of the two job rates, the marginal cost per job of a busy server.

Jobs are also submitted once before anything is measured, so every worker has run one,
and once more between the idle window and the rate steps, so no connection the steps use
has idled long enough for redis-py's health-check PING (a quiet spell's cost, not a job's).
Each window (idle, rate steps, backlog) lasts a whole number of the workers' timer periods
(``periodic_s``), so their heartbeats and sweeps cancel out of the per-job counts.
By default valkey has a CPU of its own and everything else shares the rest
(``--shared-cores``: all share all), as a farm's Redis has a core to itself.

valkey runs with ``appendfsync everysec``, as a farm's Redis does (docs/operations.md).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import time
from dataclasses import dataclass

import yaml

from bench.common import BenchEnv, EventWatcher, bench_image, cpu_split, headline, log, pct, pin_process, png_bytes
from bench.replay import RequestLog, job_count, replay
from tests.netproxy import TcpProxy

REQUEST_LINE = re.compile(rb"(?:GET|PUT|POST|HEAD|DELETE) /\S* HTTP/1\.[01]\r\n")  # an S3 request


def valkey_cpu_s(r) -> float:
    """valkey's CPU time so far (user + system), in seconds."""
    cpu = r.info("cpu")
    return cpu["used_cpu_sys"] + cpu["used_cpu_user"]


@dataclass
class Reading:
    """Redis and S3 counters at one moment."""

    t: float
    cmds: dict[str, int]
    usec: dict[str, int]  # valkey's time inside each command (scripts include their commands)
    cpu_s: float
    reads: int  # requests valkey read (one per round trip; pub/sub deliveries are writes)
    s3: int

    @classmethod
    def take(cls, r, proxy: TcpProxy | None) -> "Reading":
        stats = {k[len("cmdstat_"):]: v for k, v in r.info("commandstats").items()}
        return cls(time.perf_counter(), {k: v["calls"] for k, v in stats.items()},
                   {k: v["usec"] for k, v in stats.items()}, valkey_cpu_s(r),
                   r.info("stats")["total_reads_processed"], proxy.requests if proxy else 0)

    def since(self, a: "Reading") -> dict:
        cmds = {k: v - a.cmds.get(k, 0) for k, v in self.cmds.items() if v - a.cmds.get(k, 0)}
        usec = {k: v - a.usec.get(k, 0) for k, v in self.usec.items() if v - a.usec.get(k, 0)}
        return {"s": self.t - a.t, "cmds": cmds, "cmd_total": sum(cmds.values()), "usec": usec,
                "cpu_s": self.cpu_s - a.cpu_s, "reads": self.reads - a.reads,
                "s3": self.s3 - a.s3}


def farm_registry(env: BenchEnv, step_s: float) -> str:
    path = env.tmp / "farm-models.yaml"
    path.write_text(yaml.safe_dump({"models": {"sim": {
        "source": "sim", "family": "sim", "latent_space": "none", "kind": "sim", "sim_step_s": step_s}}}))
    return str(path)


def periodic_s() -> float:
    """The period of the workers' own timers (heartbeat, reaper: the lcm of their default
    intervals). A window of whole periods holds the same number of each worker's beats and
    sweeps, whatever their phase, so the idle rate subtracts them exactly."""
    from easel.shared.settings import Settings

    ms = [round(1000 * v) for v in (Settings.model_fields["heartbeat_interval_s"].default,
                                    Settings.model_fields["reap_every_s"].default)]
    return math.lcm(*ms) / 1000


def pad_window(t0: float, period_s: float) -> None:
    """Sleep until the window that started at ``t0`` lasts a whole number of ``period_s``."""
    took = time.perf_counter() - t0
    time.sleep(math.ceil(took / period_s) * period_s - took)


def run_step(env, client, r, proxy, ref: str, rate: float, seconds: float, steps: int, seed0: int,
             period_s: float | None = None) -> dict:
    """Jobs at ``rate`` per second for ``seconds``, the window padded to whole ``period_s``;
    returns the step's counters and latencies."""
    n = max(5, int(rate * seconds))
    watcher = EventWatcher(env.redis_url)
    before = Reading.take(r, proxy)
    ids, t0 = [], time.perf_counter()
    for i in range(n):
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        ids.append(client.submit({"input": {"image": ref}, "stages": [
            {"model": "sim", "prompt": "farm", "steps": steps, "strength": 1.0, "seed": seed0 + i}]}))
    done = watcher.wait(ids, timeout=600)
    took = time.perf_counter() - before.t
    watcher.close()
    if period_s:
        pad_window(before.t, period_s)
    after = Reading.take(r, proxy)
    window = after.since(before)
    pipe = r.pipeline(transaction=False)
    for j in ids:
        pipe.hmget(f"easel:job:{j}", "created_at", "started_at")
    dispatch = [(float(s) - float(c)) * 1000 for c, s in pipe.execute()]
    return {"rate": rate, "jobs": n, "failed": sum(st != "succeeded" for _, st in done.values()),
            "throughput": n / took, "window": window, "dispatch_p50_ms": pct(dispatch, 50),
            "dispatch_p99_ms": pct(dispatch, 99)}


def backlog_step(env, client, r, proxy, ref: str, n: int, steps: int, idle: dict, period_s: float) -> dict:
    """``n`` jobs submitted at once with ``submit_many``, as a bulk pipeline does: all but the
    queue's room wait their turn in the pending sets, and the claims dispatch them. Returns
    the commands per job above the idle rate while that backlog drains."""
    watcher = EventWatcher(env.redis_url)
    before = Reading.take(r, proxy)
    ids = client.submit_many([{"input": {"image": ref}, "stages": [
        {"model": "sim", "prompt": "farm", "steps": steps, "strength": 1.0, "seed": 500_000 + i}]} for i in range(n)])
    done = watcher.wait(ids, timeout=900)
    took = time.perf_counter() - before.t
    watcher.close()
    pad_window(before.t, period_s)
    window = Reading.take(r, proxy).since(before)
    extra = per_job_commands(idle, {"window": window, "jobs": n})
    return {"jobs": n, "failed": sum(st != "succeeded" for _, st in done.values()), "window": window,
            "cmds_per_job": above_idle(idle, window, n),
            "cpu_us_per_job": 1e6 * above_idle(idle, window, n, "cpu_s"),
            "drain_jobs_per_s": n / took, "per_job_commands": extra}


def above_idle(idle: dict, window: dict, jobs: int, counter: str = "cmd_total") -> float:
    """Per job in ``window``, a counter (``cmd_total``: Redis commands; ``cpu_s``: valkey's
    CPU seconds) above what the idle workers would have spent over the same time."""
    return (window[counter] - idle[counter] / idle["s"] * window["s"]) / jobs


def knee(steps: list[dict]) -> dict:
    base = steps[0]["dispatch_p99_ms"]
    ok = [s for s in steps if s["dispatch_p99_ms"] <= 2 * max(base, 1.0) and not s["failed"]]
    return ok[-1] if ok else steps[0]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


def job_rate(step: dict) -> float:
    """Jobs per second a rate step ran over its window."""
    return step["jobs"] / step["window"]["s"]


def below_knee(steps: list[dict]) -> list[dict]:
    """The steps up to the knee: those whose slope gives ``farm_redis_cpu_us_per_job``."""
    top = knee(steps)
    return [s for s in steps if s["rate"] <= top["rate"]]


def summarize(idle: dict, workers: int, steps: list[dict]) -> dict:
    idle_cpu_rate = idle["cpu_s"] / idle["s"]
    low, top = steps[0], knee(steps)
    w = low["window"]
    cpu_points = [(job_rate(s), s["window"]["cpu_s"] / s["window"]["s"]) for s in below_knee(steps)]
    return {
        "farm_workers": workers,
        "farm_redis_cmds_per_job": round(above_idle(idle, w, low["jobs"]), 1),
        "farm_redis_cpu_us_per_job": round(slope([(0.0, idle_cpu_rate), *cpu_points]) * 1e6),
        "farm_s3_requests_per_job": round(w["s3"] / low["jobs"], 2),
        "farm_dispatch_p50_ms": round(low["dispatch_p50_ms"], 1),
        "farm_dispatch_p99_ms": round(low["dispatch_p99_ms"], 1),
        "farm_max_jobs_per_s": round(top["throughput"], 1),
        "farm_idle_redis_cpu_pct_per_worker": round(100 * idle_cpu_rate / workers, 3),
        "farm_redis_round_trips_per_job": round(above_idle(idle, w, low["jobs"], "reads"), 1),
    }


def lone_ping_cpu_us(r, request_rates: list[float], idle: dict, period_s: float) -> float:
    """Marginal valkey CPU per PING sent alone at each of ``request_rates`` (per second, one
    connection, paced, each window padded to whole ``period_s`` as the jobs' are): the slope
    of valkey's CPU rate against the PING rate from the ``idle`` window's rate at zero, as
    ``farm_redis_cpu_us_per_job`` is taken."""
    points = [(0.0, idle["cpu_s"] / idle["s"])]
    for rate in request_rates:
        n = max(20, int(rate * period_s))
        before = Reading.take(r, None)
        for i in range(n):
            time.sleep(max(0.0, before.t + i / rate - time.perf_counter()))
            r.ping()
        pad_window(before.t, period_s)
        used = Reading.take(r, None).since(before)
        points.append((n / used["s"], used["cpu_s"] / used["s"]))
    return slope(points) * 1e6


def per_job_commands(idle: dict, step: dict, what: str = "cmds") -> dict[str, float]:
    """Per job, above the idle rate: command calls (``what="cmds"``) or valkey's microseconds
    inside each command (``"usec"``; a script's includes the commands it runs)."""
    w = step["window"]
    out = {k: (v - idle[what].get(k, 0) / idle["s"] * w["s"]) / step["jobs"] for k, v in w[what].items()}
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def redis_cpus(env: BenchEnv, procs: list) -> None:
    """valkey alone on the last CPU, everything else (workers, SeaweedFS, this process) on the
    others, as a farm's Redis has a core of its own: its CPU per job is then its own work,
    not the cost of being preempted by the workers it serves."""
    servers, rest = cpu_split()
    pin_process(env.server_pids()["redis"], servers)
    for pid in [env.server_pids()["s3"], os.getpid(), *(p.proc.pid for p in procs)]:
        pin_process(pid, rest)
    log(f"valkey on CPUs {sorted(servers)}, workers, SeaweedFS and the producer on {sorted(rest)}")


def job_loops(settings, ref: str, steps: int, loops: int, seconds: float, on_job=lambda: None) -> None:
    """``loops`` threads, each with a client of its own, each running jobs one after another
    for ``seconds`` through a job's Redis calls: ``submit`` (the submit script, then the
    message's LPUSH), the BRPOP that fetches a message, the worker's claim and its
    final-state script (``JobStore.claim_many`` and ``transition_many``, as the engine calls
    them), each its own round trip as on the real path. ``on_job`` is called in the loop's
    thread as each job starts."""
    import threading

    from easel.producer.client import EaselClient
    from easel.shared.metrics import priority_lists
    from easel.shared.schema import JobState

    job = {"input": {"image": ref}, "stages": [{"model": "sim", "prompt": "farm", "steps": steps, "strength": 1.0}]}
    clients = [EaselClient(settings) for _ in range(loops)]
    lists = [name for _, name in priority_lists(clients[0].prepare_and_plan(job)[1].segments[0].queue)]
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        client, store, instance = clients[k], clients[k].store, f"loop-{k}"
        while time.perf_counter() < stop:
            on_job()
            job_id = client.submit(job)
            store.r.brpop(lists, timeout=1)
            (claim,) = store.claim_many([(job_id, 0, None)], f"{instance}@bench", instance, 3)
            store.transition_many([(job_id, JobState.succeeded, {"outputs": [], "manifest": ""})],
                                  ends=[(0, instance, claim.attempts)])

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def busy_cpu(env, client, r, ref: str, steps: int, loops: int, seconds: float) -> dict:
    """valkey's CPU per job on a busy server: ``loops`` job loops' requests (``job_loops``)
    recorded, then replayed (``bench.replay``), each time into the emptied database the
    recording started from. No worker idles meanwhile, so all of valkey's CPU is the jobs'.

    Flat out, from a quarter of the loops' connections and from all of them: the CPU per job
    of the busiest server (a farm's hundreds of connections keep its Redis busier still).
    Then paced, from all of them, at a quarter and at three quarters of that top rate: the
    marginal CPU per job, the difference of the two CPU rates over the difference of the
    two job rates, where a farm's Redis works."""
    from redis.connection import parse_url

    from easel.shared.keys import family_capacity_key

    address = parse_url(env.redis_url)

    def reset() -> None:
        r.flushdb()
        r.set(family_capacity_key(client.store.prefix, "sim"), 10**7)  # room, as live workers' heartbeats keep it

    reset()
    with RequestLog() as requests:
        job_loops(client.settings, ref, steps, loops, seconds, on_job=requests.job_starts)
    sequences = requests.sequences()

    def point(share: int, rate: float | None = None) -> dict:
        reset()
        jobs = job_count(sequences[:share])
        before = Reading.take(r, None)
        took, errors = replay(address["host"], address["port"], sequences[:share], rate)
        # Connection handshakes ask for options this server may lack (as when recorded); any
        # other error means the replay did not do the jobs' work.
        if unexpected := sorted({e for e in errors if "unknown subcommand" not in e}):
            raise RuntimeError(f"the replay got error replies: {unexpected[:5]}")
        used = Reading.take(r, None).since(before)
        got = {"connections": share, "paced_at": rate, "jobs": jobs, "jobs_per_s": jobs / took,
               "cpu": used["cpu_s"] / took, "us_per_job": used["cpu_s"] / jobs * 1e6,
               "cmds_per_job": used["cmd_total"] / jobs,
               "usec_per_job": {k: round(v / jobs, 2) for k, v in used["usec"].items() if v / jobs >= 0.05}}
        log(f"replay, {share} connections{f', paced at {rate:.0f}/s' if rate else ''}: "
            f"{got['jobs_per_s']:.0f} jobs/s, valkey {100 * got['cpu']:.0f}% of a core, "
            f"{got['us_per_job']:.0f} µs/job, {got['cmds_per_job']:.1f} cmds/job")
        return got

    flat = [point(share) for share in (max(1, len(sequences) // 4), len(sequences))]
    top = flat[-1]
    low, high = (point(len(sequences), f * top["jobs_per_s"]) for f in (0.25, 0.75))
    marginal = (high["cpu"] - low["cpu"]) / (high["jobs_per_s"] - low["jobs_per_s"])
    log(f"paced: marginal {marginal * 1e6:.0f} µs/job between {low['jobs_per_s']:.0f} and "
        f"{high['jobs_per_s']:.0f} jobs/s")
    return {"points": [*flat, low, high], "headline": {
        "farm_busy_jobs_per_s": round(top["jobs_per_s"]),
        "farm_busy_redis_cpu_pct": round(100 * top["cpu"]),
        "farm_busy_redis_cpu_us_per_job": round(top["us_per_job"]),
        "farm_busy_redis_marginal_us_per_job": round(marginal * 1e6)}}


def ping_cpu_us(r, n: int = 3000) -> float:
    """valkey CPU per PING round trip (one connection, no pipelining), in microseconds."""
    c0 = valkey_cpu_s(r)
    for _ in range(n):
        r.ping()
    return (valkey_cpu_s(r) - c0) / n * 1e6


def run(env: BenchEnv, workers: int, rates: list[float], seconds: float, steps: int, step_s: float,
        idle_s: float, own_core: bool = True, busy_loops: int = 32, busy_s: float = 20.0,
        backlog_jobs: int = 600) -> dict:
    import redis

    r = redis.Redis.from_url(env.redis_url)
    # The embedded server fsyncs every write (no loss in tests); a farm's Redis runs everysec
    # (docs/operations.md), and the per-job CPU measured here should be that one's.
    r.config_set("appendfsync", "everysec")
    proxy = TcpProxy(int(env.service_env["EASEL_S3_ENDPOINT_URL"].rsplit(":", 1)[1]), count=REQUEST_LINE).start()
    models = farm_registry(env, step_s)
    extra = {"EASEL_MODELS": models, "EASEL_S3_ENDPOINT_URL": proxy.url}
    procs = [env.worker("sim", hostname=f"farm-{k}@bench", extra_env=extra) for k in range(workers)]
    if own_core:
        redis_cpus(env, procs)
    try:
        from easel.producer.client import EaselClient

        client = EaselClient(env.settings(models=models, s3_endpoint_url=proxy.url))
        ref = client.storage.put_input(png_bytes(bench_image(64)), "png", (64, 64))
        # Every worker's first job (connections, first S3 write) before anything is measured.
        run_step(env, client, r, proxy, ref, 4 * workers, 1.0, steps, seed0=10**7)
        time.sleep(3)
        period = periodic_s()
        a = Reading.take(r, proxy)
        time.sleep(math.ceil(idle_s / period) * period)
        idle = Reading.take(r, proxy).since(a)
        ping = ping_cpu_us(r)  # idle workers around, as for the jobs
        log(f"idle: {idle['cmd_total'] / idle['s']:.0f} cmds/s, valkey {100 * idle['cpu_s'] / idle['s']:.2f}% "
            f"of a core for {workers} idle workers")
        # Each worker's connections idled through that window: redis-py health-checks a
        # connection idle over 30 s with a PING before using it. That is the cost of a quiet
        # spell, not of a job, so one more round of jobs comes before the measured steps.
        run_step(env, client, r, proxy, ref, 4 * workers, 1.0, steps, seed0=2 * 10**7)
        results = []
        for k, rate in enumerate(rates):
            res = run_step(env, client, r, proxy, ref, rate, seconds, steps, seed0=k * 100_000, period_s=period)
            log(f"rate {rate:>5}/s: {res['throughput']:.1f} jobs/s done, dispatch p50 {res['dispatch_p50_ms']:.0f} "
                f"ms p99 {res['dispatch_p99_ms']:.0f} ms, {res['window']['cmd_total'] / res['jobs']:.1f} cmds/job "
                f"raw, {res['window']['s3'] / res['jobs']:.2f} S3 req/job, failed {res['failed']}")
            results.append(res)
        time.sleep(3)  # the last step's overload drains
        backlog = backlog_step(env, client, r, proxy, ref, backlog_jobs, steps, idle, period)
        log(f"backlog of {backlog_jobs} jobs submitted at once: {backlog['cmds_per_job']:.1f} cmds/job, "
            f"{backlog['cpu_us_per_job']:.0f} µs valkey CPU/job, failed {backlog['failed']}")
        # idle workers around, as for the jobs
        round_trips = above_idle(idle, results[0]["window"], results[0]["jobs"], "reads")
        lone = lone_ping_cpu_us(r, [job_rate(s) * round_trips for s in below_knee(results)], idle, period)
        log(f"a lone PING at {round_trips:.1f} per job's rate: {lone:.0f} µs of valkey CPU")
    finally:
        for p in procs:
            p.stop()
        proxy.stop()
    # The proxy is gone: the busy loops' submissions reach S3 directly.
    busy = busy_cpu(env, EaselClient(env.settings(models=models)), r, ref, steps, busy_loops, busy_s)
    out = summarize(idle, workers, results)
    out["farm_backlog_cmds_per_job"] = round(backlog["cmds_per_job"], 1)
    out["farm_backlog_redis_cpu_us_per_job"] = round(backlog["cpu_us_per_job"])
    out["farm_backlog_drain_jobs_per_s"] = round(backlog["drain_jobs_per_s"], 1)
    out.update(busy["headline"])
    out["farm_redis_ping_cpu_us"] = round(ping, 1)
    out["farm_redis_cpu_per_job_in_pings"] = round(out["farm_redis_cpu_us_per_job"] / ping, 1)
    out["farm_redis_lone_ping_cpu_us"] = round(lone, 1)
    out["farm_redis_cpu_per_job_in_lone_pings"] = round(out["farm_redis_cpu_us_per_job"] / lone, 1) if lone > 0 else None
    for k, v in out.items():
        headline(k, v)
    return {"headline": out, "details": {"idle": idle, "steps": results,
                                         "per_job_commands": per_job_commands(idle, results[0]),
                                         "per_job_usec": per_job_commands(idle, results[0], "usec"),
                                         "backlog": backlog, "busy": busy["points"]}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rates", default="5,10,20,40,80,120,160", help="job arrival rates (per second), rising")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each rate step")
    ap.add_argument("--steps", type=int, default=4, help="sim steps per job")
    ap.add_argument("--step-ms", type=float, default=5.0, help="sim sleep per step (short: the knee is the control plane)")
    ap.add_argument("--idle-s", type=float, default=30.0,
                    help="idle window measured before the jobs (rounded up to whole timer periods, 15 s)")
    ap.add_argument("--backlog-jobs", type=int, default=600, help="jobs submitted at once for the backlog step")
    ap.add_argument("--busy-loops", type=int, default=32, help="job loops recorded for the busy-Redis replay")
    ap.add_argument("--busy-s", type=float, default=20.0, help="how long the busy-Redis job loops are recorded")
    ap.add_argument("--shared-cores", action="store_true",
                    help="let valkey share every CPU with the workers (default: a core of its own)")


NEEDS_MODELS = False


def main(env: BenchEnv, args) -> dict:
    rates = [float(x) for x in args.rates.split(",")]
    return run(env, args.workers, rates, args.seconds, args.steps, args.step_ms / 1000, args.idle_s,
               own_core=not args.shared_cores, busy_loops=args.busy_loops, backlog_jobs=args.backlog_jobs,
               busy_s=args.busy_s)
