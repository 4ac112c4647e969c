"""A TCP forwarder the fault tests can cut and restore: an outage at the network level.

Used for storage outages: a single-process SeaweedFS restarted on the same folder does not
always re-register its volumes in time, so the fault is injected between worker and S3.
``bench farm`` uses it to count the S3 requests that pass (``count``).
"""
from __future__ import annotations

import re
import socket
import threading
import time


class TcpProxy:
    """``count``: a pattern counted in what clients send (``requests``), matched anywhere in
    the stream, since on a keep-alive connection a request follows the previous body."""

    def __init__(self, target_port: int, listen_port: int = 0, count: re.Pattern[bytes] | None = None):
        self.target_port = target_port
        self.port = listen_port
        self.count, self.requests = count, 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._held = threading.Event()
        self._silenced: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.port = srv.getsockname()[1]
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def hold(self) -> None:
        """Keep connections open but forward nothing: requests hang instead of failing."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def silence(self) -> None:
        """The connections open now forward nothing more, for good, and stay open, as to a
        server host that vanished without closing them; new ones are forwarded (a failover)."""
        with self._lock:
            self._silenced.update(self._conns)

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self._lock:
            if self._server:
                try:
                    self._server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
                except OSError:
                    pass
                self._server.close()
                self._server = None
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()
            self._silenced.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, counted in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, counted), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if counted and self.count is not None:
                    seen = tail + data
                    n = len(self.count.findall(seen)) - len(self.count.findall(tail))
                    tail = seen[-256:]
                    with self._lock:
                        self.requests += n
                while self._held.is_set() or src in self._silenced:
                    if src.fileno() < 0:  # stopped
                        return
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
