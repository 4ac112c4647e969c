"""bench.replay, the busy-Redis half of `python -m bench farm`: what it records is what
redis-py sent, and replaying it rebuilds the same data."""
from __future__ import annotations

import threading

import redis

from bench.replay import RequestLog, command_count, job_count, replay


def test_a_packed_pipeline_counts_its_commands():
    conn = redis.Connection()
    blob = b"".join(conn.pack_commands([("SET", "k", "a\r\nb"), ("INCR", "n"), ("PING",)]))
    assert command_count(blob) == 3
    assert command_count(b"".join(conn.pack_command("GET", "k"))) == 1


def test_recorded_requests_replay_into_the_same_data(services):
    url = services.redis.url.rsplit("/", 1)[0] + "/9"  # a database of its own: the test empties it
    with RequestLog() as log:
        r = redis.Redis.from_url(url)  # its handshake (and SELECT 9) is recorded too
        r.set("greeting", "hello\r\nworld")
        pipe = r.pipeline(transaction=False)
        pipe.incr("count").rpush("items", "a", "b").get("missing")
        pipe.execute()
        r.brpop(["items"], timeout=1)
        r.hset("record", mapping={"state": "running", "step": 3})
    expected = {"greeting": r.get("greeting"), "count": r.get("count"), "items": r.lrange("items", 0, -1),
                "record": r.hgetall("record")}

    (sequence,) = log.sequences()
    assert sum(commands for _, commands in sequence) >= 7  # the handshake's, then the five calls' (a pipeline's three)
    assert threading.get_ident() in log.by_thread

    r.flushdb()
    took, errors = replay("127.0.0.1", services.redis.port, [sequence])
    assert took > 0 and all("unknown subcommand" in e for e in errors)  # the handshake's, as when recorded
    assert {"greeting": r.get("greeting"), "count": r.get("count"), "items": r.lrange("items", 0, -1),
            "record": r.hgetall("record")} == expected == {
        "greeting": b"hello\r\nworld", "count": b"1", "items": [b"a"], "record": {b"state": b"running", b"step": b"3"}}
    r.flushdb()


def test_a_paced_replay_starts_jobs_no_faster_than_its_rate(services):
    """Job starts marked while recording pace a replay: 2 connections x 6 jobs at 20 jobs/s
    in all take at least the 5 intervals of 0.1 s each connection waits; unpaced, the same
    requests take a fraction of that."""
    url = services.redis.url.rsplit("/", 1)[0] + "/9"
    with RequestLog() as log:

        def jobs(k: int) -> None:
            r = redis.Redis.from_url(url)
            for i in range(6):
                log.job_starts()
                r.incr(f"done:{k}")

        threads = [threading.Thread(target=jobs, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    sequences = log.sequences()
    assert len(sequences) == 2 and job_count(sequences) == 12
    r = redis.Redis.from_url(url)
    r.flushdb()
    paced, errors = replay("127.0.0.1", services.redis.port, sequences, rate=20.0)
    assert paced >= 0.5 and all("unknown subcommand" in e for e in errors)
    assert r.mget("done:0", "done:1") == [b"6", b"6"]
    r.flushdb()
    flat, _ = replay("127.0.0.1", services.redis.port, sequences)
    assert flat < paced / 2
    r.flushdb()
