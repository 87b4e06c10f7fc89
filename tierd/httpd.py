"""The metrics endpoint's HTTP server: one thread, one selector, every connection non-blocking.

Idle or slow clients cost a file descriptor each, never a thread, so they cannot keep a scrape waiting: a server
with a thread per connection and a cap on threads answers 503 once idle clients hold the cap. Here a connection
that does not send a whole request within ``timeout_s`` is closed, and when ``max_connections`` are open a new one
pushes out the oldest that has not sent a whole request. Only ``GET`` and ``HEAD`` are answered (HTTP/1.0, one
request per connection); the body comes from a callable, built when the request is complete.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
"""A request line and headers longer than this are refused (431): a scraper's are a few hundred bytes."""

Route = Callable[[], tuple[bytes, str]]
"""Returns (body, content type) for one path."""


@dataclass
class _Conn:
    sock: socket.socket
    peer: str
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None  # set once the request is complete: the response still to send


class HttpServer:
    """Serves ``routes`` (path -> Route) on ``sock`` (bound and listening) from a daemon thread until ``close``."""

    def __init__(self, sock: socket.socket, routes: dict[str, Route], server_name: str,
                 max_connections: int = 1024, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.sock = sock
        self.routes = routes
        self.server_name = server_name
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.clock = clock
        self.conns: dict[int, _Conn] = {}
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="tierd-metrics", daemon=True)
        self._thread.start()

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, close every connection and the listening socket (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join()
        for conn in list(self.conns.values()):
            self._drop(conn)
        self._selector.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- the loop ----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception:  # a bug in one connection's handling must not end the endpoint
                log.exception("metrics: the HTTP loop failed; going on")

    def _once(self) -> None:
        for key, mask in self._selector.select(timeout=self._next_timeout()):
            if key.fileobj is self.sock:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._wake_r.recv(64)
            elif (conn := self.conns.get(key.fd)) is not None:
                if mask & selectors.EVENT_READ:
                    self._read(conn)
                elif mask & selectors.EVENT_WRITE:
                    self._write(conn)
        self._expire()

    def _next_timeout(self) -> float:
        if not self.conns:
            return 1.0
        return max(0.0, min(c.deadline for c in self.conns.values()) - self.clock())

    def _accept(self) -> None:
        while True:
            try:
                client, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: the backlog keeps the client until a descriptor is free
                log.debug("metrics: accept failed: %s", e)
                return
            client.setblocking(False)
            if len(self.conns) >= self.max_connections and not self._evict_one():
                self._refuse(client)
                continue
            conn = _Conn(client, str(addr[0]) if addr else "?", self.clock() + self.timeout_s)
            self.conns[client.fileno()] = conn
            self._selector.register(client, selectors.EVENT_READ, None)

    def _evict_one(self) -> bool:
        """Close the oldest connection still waiting for its request; False when every one is being answered."""
        waiting = [c for c in self.conns.values() if c.out is None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.deadline)
        log.debug("metrics: %d connections open; dropping the oldest idle one (%s)", len(self.conns), oldest.peer)
        self._drop(oldest)
        return True

    def _refuse(self, client: socket.socket) -> None:
        try:
            client.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        client.close()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if 0 <= end <= MAX_REQUEST_BYTES:
            self._answer(conn, *self._route(bytes(conn.inbuf[:end])))
        elif end > MAX_REQUEST_BYTES or len(conn.inbuf) > MAX_REQUEST_BYTES:
            self._answer(conn, 431, "text/plain; charset=utf-8", b"431 request header fields too large\n", ())

    def _route(self, head: bytes) -> tuple[int, str, bytes, tuple[tuple[str, str], ...], bool]:
        """(status, content type, body, extra headers, send body) for a request's head."""
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "text/plain; charset=utf-8", b"400 bad request\n", (), True
        method, target = parts[0], parts[1].split(b"?", 1)[0].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return (405, "text/plain; charset=utf-8", b"405 method not allowed: tierd's metrics endpoint answers GET\n",
                    (("Allow", "GET, HEAD"),), True)
        route = self.routes.get(target)
        if route is None:
            return 404, "text/plain; charset=utf-8", b"404 not found: tierd serves /metrics\n", (), method == b"GET"
        try:
            body, content_type = route()
        except Exception:
            log.exception("metrics: generating %s failed", target)
            return 500, "text/plain; charset=utf-8", b"500 collecting metrics failed (see tierd's log)\n", (), True
        return 200, content_type, body, (), method == b"GET"

    def _answer(self, conn: _Conn, status: int, content_type: str, body: bytes,
                extra: tuple[tuple[str, str], ...], with_body: bool = True) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error"}[status]
        head = [f"HTTP/1.0 {status} {reason}", f"Server: {self.server_name}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in extra)]
        conn.out = memoryview(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if with_body else b""))
        conn.deadline = self.clock() + self.timeout_s
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, None)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._drop(conn)

    def _expire(self) -> None:
        now = self.clock()
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            log.debug("metrics: %s sent no whole request (or read no answer) in %.1fs; closing", conn.peer,
                      self.timeout_s)
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
