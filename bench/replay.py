"""Record the Redis requests of real jobs, then replay them at load: valkey's CPU per job on a
busy server.

A farm's Redis serving hundreds of GPUs is busy, and a busy server reads several clients'
requests per wake-up; at the rates a 2-core machine's Python workers reach, valkey sleeps
between requests instead and each one pays a wake-up (on a VM, most of its cost). To see
the busy regime here, ``RequestLog`` records the exact bytes that easel's own calls send
(redis-py's ``send_packed_command``, which kombu's transport uses too), per thread, in
order; ``replay`` sends each thread's requests again over one connection, each request
only after the previous one's replies, as the real calls do, with many such connections at
once (asyncio callbacks and hiredis's reply parser: a light client). Same requests, same
round trips, same server state (replayed into the emptied database the recording started
from); only the client side is lighter, so one core of Python can keep valkey busy.

A recording may mark where each job starts (``RequestLog.job_starts``); a replay given a
``rate`` then starts jobs no faster than that many a second in all, spread evenly over its
connections, so valkey's CPU can be read at chosen job rates and the marginal cost per job
taken from the difference of two.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import hiredis
import redis


def command_count(blob: bytes) -> int:
    """How many commands a packed request holds (a pipeline sends several at once)."""
    n, pos = 0, 0
    while pos < len(blob):
        end = blob.index(b"\r\n", pos)
        args = int(blob[pos + 1:end])  # "*<args>"
        pos = end + 2
        for _ in range(args):
            end = blob.index(b"\r\n", pos)  # "$<length>"
            pos = end + 2 + int(blob[pos + 1:end]) + 2
        n += 1
    return n


JOB_START = (b"", 0)  # a mark in a recorded sequence, a job's requests follow (no request is empty)


class RequestLog:
    """While entered: every request this process sends to Redis, as (bytes, commands), per
    thread in order of sending, and the marks ``job_starts`` left there."""

    def __init__(self) -> None:
        self.by_thread: dict[int, list[tuple[bytes, int]]] = defaultdict(list)

    def job_starts(self) -> None:
        """Mark, in this thread's sequence, that a job's requests start here."""
        self.by_thread[threading.get_ident()].append(JOB_START)

    def __enter__(self) -> "RequestLog":
        self._original = original = redis.connection.AbstractConnection.send_packed_command
        log = self.by_thread

        def send_packed_command(conn, command, check_health=True):
            blob = command.encode() if isinstance(command, str) else b"".join(
                [command] if isinstance(command, bytes) else command)
            log[threading.get_ident()].append((blob, command_count(blob)))
            return original(conn, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = send_packed_command
        return self

    def __exit__(self, *exc) -> None:
        redis.connection.AbstractConnection.send_packed_command = self._original

    def sequences(self) -> list[list[tuple[bytes, int]]]:
        return [reqs for reqs in self.by_thread.values() if reqs]


def job_count(sequences: list[list[tuple[bytes, int]]]) -> int:
    """How many job starts the sequences mark."""
    return sum(entry == JOB_START for seq in sequences for entry in seq)


class _Replayer(asyncio.Protocol):
    """One connection's requests, each sent once the previous one's replies are all in
    (replies parsed by hiredis; error replies are counted, as they were when recorded: a
    handshake option this server lacks). Sends nothing until ``start``. With ``every_s``, the
    k-th job start waits until ``first_at + k * every_s`` (loop time)."""

    def __init__(self, requests: list[tuple[bytes, int]], done: asyncio.Future):
        self.requests, self.done, self.next, self.owed, self.errors = requests, done, 0, 0, []
        self.reader = hiredis.Reader(notEnoughData=_NOT_YET)
        self.every_s: float | None = None
        self.first_at, self.jobs = 0.0, 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self, first_at: float = 0.0, every_s: float | None = None) -> None:
        self.first_at, self.every_s = first_at, every_s
        self._send()

    def _send(self) -> None:
        while self.next < len(self.requests) and self.requests[self.next] == JOB_START:
            if self.every_s is not None:
                loop = asyncio.get_running_loop()
                due = self.first_at + self.jobs * self.every_s
                if due > loop.time():
                    loop.call_at(due, self._send)
                    return
            self.jobs += 1
            self.next += 1
        if self.next == len(self.requests):
            self.transport.close()
            if not self.done.done():
                self.done.set_result(self.errors)
            return
        blob, self.owed = self.requests[self.next]
        self.next += 1
        self.transport.write(blob)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.owed and (reply := self.reader.gets()) is not _NOT_YET:
            self.owed -= 1
            if isinstance(reply, hiredis.ReplyError):
                self.errors.append(str(reply))
        if not self.owed and not self.done.done():
            self._send()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the last reply"))


_NOT_YET = object()  # hiredis's "no whole reply yet" (a reply may itself be False or None)


def replay(host: str, port: int, sequences: list[list[tuple[bytes, int]]],
           rate: float | None = None) -> tuple[float, list[str]]:
    """Send each sequence over a connection of its own, all starting at once; returns the
    seconds it took and the error replies it got. ``rate``: jobs a second in all, paced at
    the sequences' job starts (each connection gets an equal share, phases staggered)."""

    async def main() -> tuple[float, list[str]]:
        loop = asyncio.get_running_loop()
        replayers, waits = [], []
        for reqs in sequences:
            done = loop.create_future()
            _, protocol = await loop.create_connection(lambda reqs=reqs, done=done: _Replayer(reqs, done), host, port)
            replayers.append(protocol)
            waits.append(done)
        paced = sum(job_count([reqs]) > 0 for reqs in sequences)  # connections that start jobs
        every_s = paced / rate if rate else None
        t0, now = time.perf_counter(), loop.time()
        for k, protocol in enumerate(replayers):
            protocol.start(now + (k * every_s / len(replayers) if every_s else 0.0), every_s)
        errors = await asyncio.gather(*waits)
        return time.perf_counter() - t0, [e for per in errors for e in per]

    return asyncio.run(main())
