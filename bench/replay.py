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


class RequestLog:
    """While entered: every request this process sends to Redis, as (bytes, commands), per
    thread in order of sending."""

    def __init__(self) -> None:
        self.by_thread: dict[int, list[tuple[bytes, int]]] = defaultdict(list)

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


class _Replayer(asyncio.Protocol):
    """One connection's requests, each sent once the previous one's replies are all in
    (replies parsed by hiredis; error replies are counted, as they were when recorded: a
    handshake option this server lacks). Sends nothing until ``start``."""

    def __init__(self, requests: list[tuple[bytes, int]], done: asyncio.Future):
        self.requests, self.done, self.next, self.owed, self.errors = requests, done, 0, 0, []
        self.reader = hiredis.Reader(notEnoughData=_NOT_YET)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def start(self) -> None:
        self._send()

    def _send(self) -> None:
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


def replay(host: str, port: int, sequences: list[list[tuple[bytes, int]]]) -> tuple[float, list[str]]:
    """Send each sequence over a connection of its own, all starting at once; returns the
    seconds it took and the error replies it got."""

    async def main() -> tuple[float, list[str]]:
        loop = asyncio.get_running_loop()
        replayers, waits = [], []
        for reqs in sequences:
            done = loop.create_future()
            _, protocol = await loop.create_connection(lambda reqs=reqs, done=done: _Replayer(reqs, done), host, port)
            replayers.append(protocol)
            waits.append(done)
        t0 = time.perf_counter()
        for protocol in replayers:
            protocol.start()
        errors = await asyncio.gather(*waits)
        return time.perf_counter() - t0, [e for per in errors for e in per]

    return asyncio.run(main())
