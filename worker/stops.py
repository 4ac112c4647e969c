"""Stops pushed to the worker: cancels and take-overs arrive by pub/sub, so every denoising
step can check for them in memory.

``JobStore.request_cancel`` and the reaper's take-over (``JobStore.requeue``) publish on the
deployment's stops channel. A thread of the worker process listens and keeps what it heard
for ``KEEP_S`` (every stop of the farm: they are rare), so a step of a running call looks
up its jobs in a dict instead of asking Redis, and a cancel lands within a step.

Pub/sub delivers only to a connected listener. ``epoch`` counts the subscriptions this
listener made: a stage compares it with the epoch at its jobs' claim (which read the
cancel flag itself), and while they differ, or while the listener is not connected, or
every ``READ_EVERY_S`` anyway, its progress write also reads the flags back
(``worker.engine.StepHook``). Nothing is missed; nothing is read on the common path.

The same connection carries other notices a worker acts on (``on``): a handler per channel,
called with each message, and with None after each (re)subscription, when notices may have
been missed.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import redis

from easel.shared.jobstore import _text
from easel.shared.quiet import QuietCheck

log = logging.getLogger("easel.worker.stops")

KEEP_S = 3600.0  # how long a stop is remembered (a job claimed later reads its flag at the claim)
READ_EVERY_S = 15.0  # a stage still reads the flags back this often, whatever it heard


class StopListener:
    def __init__(self, r: redis.Redis, channel: str):
        self.r, self.channel = r, channel
        self._handlers: dict[str, Callable[[str | None], None]] = {}
        self.epoch = 0  # subscriptions made; a stage started under another epoch reads the flags
        self.connected = False
        # job id -> (when, stop, instance), oldest first: forgetting is a pop from the front
        self._heard: OrderedDict[str, tuple[float, str, str | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def on(self, channel: str, handler: Callable[[str | None], None]) -> "StopListener":
        """Also listen on ``channel`` (before ``start``)."""
        self._handlers[channel] = handler
        return self

    def start(self) -> "StopListener":
        threading.Thread(target=self._run, name="easel-stops", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()

    def stop_for(self, job_id: str, instance: str) -> str | None:
        """"cancel" when the job was cancelled, "taken" when it was taken from ``instance``."""
        with self._lock:
            heard = self._heard.get(job_id)
        if heard is None:
            return None
        _, stop, taken_from = heard
        if stop == "taken":
            return "taken" if taken_from == instance else None
        return stop

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.r.pubsub()
            try:
                pubsub.subscribe(self.channel, *self._handlers)
                quiet = QuietCheck()  # a silent connection is replaced (shared.quiet)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if (todo := quiet.after_read(msg is not None)) == "dead":
                        raise redis.ConnectionError(f"no word from Redis in {quiet.silence_s():.0f} s")
                    if todo == "ping":
                        pubsub.ping()
                    if msg is None or msg["type"] not in ("subscribe", "message"):
                        continue
                    self._take(msg)
            except (redis.RedisError, OSError) as e:
                log.warning("stops channel lost (%s); stages read cancel flags until it is back", e)
            except Exception:  # a reply the client could not read (bytes that are not UTF-8): anew
                log.exception("stops channel failed; subscribing again")
            finally:
                self.connected = False
                pubsub.close()
            self._stop.wait(1.0)

    def _take(self, msg: dict) -> None:
        """One subscribe confirmation or message. A handler's error is logged and the message
        dropped: the thread lives on (were it to end, cancels would fall back to flag reads,
        and backlog notices would stop for the life of the process)."""
        try:
            channel = _text(msg["channel"])
            if msg["type"] == "subscribe" and channel == self.channel:
                self.epoch += 1
                self.connected = True
            elif msg["type"] == "subscribe":
                self._handlers[channel](None)
            elif channel == self.channel:
                self._note(msg["data"])
            else:
                self._handlers[channel](_text(msg["data"]))
        except Exception:
            log.exception("a message on %r was dropped", msg.get("channel"))

    def _note(self, data: bytes | str) -> None:
        try:
            stop = json.loads(data)
            job_id, kind, instance = str(stop["job_id"]), str(stop["stop"]), stop.get("instance")
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed stop: %r", data)
            return
        now = time.monotonic()
        with self._lock:
            self._heard[job_id] = (now, kind, instance)
            self._heard.move_to_end(job_id)
            while now - next(iter(self._heard.values()))[0] >= KEEP_S:  # each stop is forgotten once
                self._heard.popitem(last=False)
