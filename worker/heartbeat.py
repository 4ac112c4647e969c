"""Worker presence in Redis: a key per live worker process, refreshed while it runs.

Lets producers, `easel queues` and the tests see which families have warm workers
(Celery's own heartbeats are off: the solo pool cannot send them while a stage runs).
"""
from __future__ import annotations

import json
import os
import threading
import time

import redis

TTL_S = 30


def worker_key(prefix: str, hostname: str) -> str:
    return f"{prefix}:worker:{hostname}"


def start_heartbeat(r: redis.Redis, prefix: str, hostname: str, info: dict, every_s: float = 10.0) -> threading.Event:
    stop = threading.Event()
    payload = json.dumps({**info, "hostname": hostname, "pid": os.getpid(), "since": time.time()})

    def beat() -> None:
        while not stop.is_set():
            try:
                r.set(worker_key(prefix, hostname), payload, ex=TTL_S)
            except redis.RedisError:
                pass  # the broker is away; Celery reconnects on its own, we retry next beat
            stop.wait(every_s)
        try:
            r.delete(worker_key(prefix, hostname))
        except redis.RedisError:
            pass

    threading.Thread(target=beat, name="easel-heartbeat", daemon=True).start()
    return stop


def live_workers(r: redis.Redis, prefix: str) -> list[dict]:
    keys = list(r.scan_iter(f"{prefix}:worker:*", count=500))
    return [json.loads(v) for v in r.mget(keys) if v] if keys else []
