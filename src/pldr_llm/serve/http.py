"""The server's connection layer: what bounds a client before a request reaches a handler.

uvicorn (h11) gives the idle keep-alive timeout and a graceful-shutdown timeout, but reads a
request's headers and body for as long as a client cares to send them, accepts connections until
the process runs out of file descriptors, and closes its listening socket at the first SIGTERM.
So, kept on uvicorn (any version from 0.30; the app is plain ASGI) with these additions:

- :func:`guarded_protocol`: uvicorn's h11 protocol with a :class:`ConnectionWatch` on each
  connection: a deadline per request for the headers (from the connection's start, or the first
  byte of a later request) and one for the body (from the end of the headers), one for a client
  that stops reading, and a cap on open connections (:class:`ConnectionGuard`): at the cap, a
  new connection evicts the oldest idle one found (no request in progress), or, when none is, is
  answered 503 and closed. Events are logged as one summary line per interval, never one per
  connection.
- :class:`GuardMiddleware`: the Host check (DNS rebinding), the 503 of a drain, and the count of
  requests in flight that the drain waits for.
- :class:`GracefulServer`: the first SIGTERM/SIGINT starts a drain (the listening socket stays
  open and new requests get 503) that ends when the requests in flight are done or at
  ``shutdown_timeout``, when the rest are cancelled; a second signal exits at once.
- :func:`bind_socket`: the listening socket, bound before the server says it serves, so a busy
  port or a host that does not resolve is one line (:class:`PLDRError`), not uvicorn's exit 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pldr_llm.core.errors import PLDRError

LOG = logging.getLogger("uvicorn.error")
# File descriptors kept free besides the connections: the model's files, the tokenizer,
# torch's and the loop's own, the log.
FD_RESERVE = 64
# Connections accepted per turn of the event loop. One beyond the cap holds its socket for ~3
# turns (accepted, answered, closed), so the process holds at most max_connections +
# OVERFLOW_FDS sockets. The kernel's queue of connections not yet accepted is longer (a burst of
# clients connecting at once waits there, not in SYN retries).
ACCEPT_BATCH = 100
OVERFLOW_FDS = 3 * ACCEPT_BATCH
LISTEN_BACKLOG = 2048
# At the cap, this many of the oldest connections are looked at for an idle one to close (the
# busy ones looked at go to the back): a flood costs O(1) per connection, not O(open).
IDLE_SCAN = 64
SUMMARY_INTERVAL_S = 10.0
# A forced stop after this long past the shutdown deadline, whatever is stuck (the lifespan's
# scheduler stop, a thread): the deadline is a promise.
FORCE_AFTER_DEADLINE_S = 5.0
LOOPBACK_NAMES = ("localhost",)


def _error_body(status: int, message: str, code: str) -> bytes:
    """An OpenAI error object (the shape of ``serve.protocol.APIError``)."""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI error object that closes the connection
    (written to a transport directly, where no request cycle exists to answer through)."""
    body = _error_body(status, message, code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return (head + "\r\n").encode() + body


class ConnectionGuard:
    """The open connections of one server (oldest first) and the events the log summarises."""

    def __init__(self, max_connections: int, interval: float = SUMMARY_INTERVAL_S) -> None:
        self.max_connections = max_connections
        self.interval = interval
        self.open: dict[Any, None] = {}  # insertion-ordered: the oldest first
        self.counts: dict[str, int] = {}
        self._flush_at: float | None = None

    def admit(self, conn: Any) -> bool:
        """Whether ``conn`` may stay open: at the cap, an idle connection (the oldest found) is
        closed to make room; with none idle, ``conn`` is refused."""
        if len(self.open) >= self.max_connections:
            idle = None
            for _ in range(min(IDLE_SCAN, len(self.open))):
                oldest = next(iter(self.open))
                del self.open[oldest]
                if oldest.is_idle():
                    idle = oldest
                    break
                self.open[oldest] = None  # busy: to the back
            if idle is None:
                self.note("refused (503) at the connection cap")
                return False
            self.note("idle connections closed to make room")
            idle.close_quietly()
        self.open[conn] = None
        return True

    def release(self, conn: Any) -> None:
        self.open.pop(conn, None)

    def note(self, event: str) -> None:
        """Count ``event``; the counts go to the log in one line per interval."""
        self.counts[event] = self.counts.get(event, 0) + 1
        if self._flush_at is None:
            self._flush_at = time.monotonic() + self.interval
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        self._flush_at = None
        if self.counts:
            what = ", ".join(f"{n} {event}" for event, n in sorted(self.counts.items()))
            LOG.warning(
                "connections in the last %.0f s: %s (cap %d, %d open)",
                self.interval,
                what,
                self.max_connections,
                len(self.open),
            )
            self.counts = {}


@dataclass(frozen=True)
class ReadWriteLimits:
    """Seconds a client has to send a request's headers and body, and to read again once its
    answer fills the buffers."""

    header_timeout: float
    body_timeout: float
    write_timeout: float


class ConnectionWatch:
    """The deadlines of one connection, kept beside uvicorn's h11 protocol ``proto``.

    A request's headers must be complete ``header_timeout`` seconds after the connection opened
    (or after the first byte of a later request), its body ``body_timeout`` seconds after the
    headers; a deadline is never moved by later bytes (one byte a second must not keep a
    connection open). Past one: 408 and the connection closed. A client that reads nothing for
    ``write_timeout`` seconds while the transport's buffer is full is dropped. Only h11's public
    connection states (``their_state``, ``our_state``, ``trailing_data``) of uvicorn's ``conn``
    and its ``cycle`` are read; the rest is asyncio's protocol interface."""

    def __init__(self, proto: Any, guard: ConnectionGuard, limits: ReadWriteLimits) -> None:
        self.proto = proto
        self.guard = guard
        self.limits = limits
        self._read: asyncio.TimerHandle | None = None
        self._read_kind: str | None = None  # "header" or "body"
        self._write: asyncio.TimerHandle | None = None

    def made(self) -> None:
        """A new connection: admitted under the cap (its header deadline starts), or answered
        503 and closed."""
        if self.guard.admit(self):
            self._arm("header")
            return
        message = (
            f"the server holds its maximum of {self.guard.max_connections} connections; retry later"
        )
        transport = self.proto.transport
        transport.write(_raw_response(503, "Service Unavailable", message, "too_many_connections"))
        transport.close()

    def lost(self) -> None:
        self._disarm()
        if self._write is not None:
            self._write.cancel()
        self.guard.release(self)

    def received(self) -> None:
        """After uvicorn has parsed what arrived: the deadline of the phase the request is in."""
        import h11

        state = self.proto.conn.their_state
        if state is h11.IDLE:  # part of a request's headers
            if self._read_kind != "header":
                self._arm("header")
        elif state is h11.SEND_BODY:
            if self._read_kind != "body":
                self._arm("body")
        else:  # the request is complete (or the connection is closing)
            self._disarm()

    def paused(self) -> None:
        """The transport's buffer is full: the client reads slower than the answer comes."""
        if self._write is None:
            loop = self.proto.loop
            self._write = loop.call_later(self.limits.write_timeout, self._stalled)

    def resumed(self) -> None:
        if self._write is not None:
            self._write.cancel()
            self._write = None

    def is_idle(self) -> bool:
        """No request in progress and no byte of the next one received."""
        import h11

        cycle, conn = self.proto.cycle, self.proto.conn
        return (
            (cycle is None or cycle.response_complete)
            and conn.their_state is h11.IDLE
            and not conn.trailing_data[0]
        )

    def close_quietly(self) -> None:
        self._disarm()
        self.proto.transport.close()

    def _arm(self, kind: str) -> None:
        self._disarm()
        timeout = self.limits.header_timeout if kind == "header" else self.limits.body_timeout
        self._read = self.proto.loop.call_later(timeout, self._expired, kind)
        self._read_kind = kind

    def _disarm(self) -> None:
        if self._read is not None:
            self._read.cancel()
        self._read = None
        self._read_kind = None

    def _expired(self, kind: str) -> None:
        import h11

        self._read = None
        conn, transport = self.proto.conn, self.proto.transport
        if transport.is_closing():
            return
        started = conn.trailing_data[0] or conn.their_state is not h11.IDLE
        if kind == "header" and not started:
            self.guard.note("closed idle before a request")  # a fresh connection never used
        else:
            self.guard.note(f"timed out reading the {kind} (408)")
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no answer begun
                limit = self.limits.header_timeout if kind == "header" else self.limits.body_timeout
                message = f"the request's {kind} did not arrive within {limit:g} s"
                transport.write(_raw_response(408, "Request Timeout", message, "request_timeout"))
        # The handler waiting for the body, if any, sees a disconnect.
        transport.close()

    def _stalled(self) -> None:
        self._write = None
        self.guard.note(f"closed: read nothing for {self.limits.write_timeout:g} s")
        # abort, not close: close would wait for the buffer the client does not read. The
        # handler's pending write then returns, and the request ends as a disconnect.
        self.proto.transport.abort()


def guarded_protocol(guard: ConnectionGuard, limits: ReadWriteLimits) -> type:
    """uvicorn's h11 protocol class with a :class:`ConnectionWatch` on each connection (given
    to ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):  # type: ignore[misc]
        watch: ConnectionWatch

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.watch = ConnectionWatch(self, guard, limits)
            self.watch.made()

        def connection_lost(self, exc: Exception | None) -> None:
            self.watch.lost()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.watch.received()

        def pause_writing(self) -> None:
            super().pause_writing()
            self.watch.paused()

        def resume_writing(self) -> None:
            super().resume_writing()
            self.watch.resumed()

    return GuardedH11Protocol


# ---------------------------------------------------------------------- Host header


def host_allowed(host_header: str | None, bound_host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request's Host header may reach the app.

    A web page can make a browser send requests to a loopback server under a name it controls
    (DNS rebinding); such a request carries that name. So a name must be a loopback name, the
    host the server is bound to, or listed in ``allowed`` (``*``: any). An IP address is always
    accepted (a page reaching it by address is the same origin as the server), and so is no Host
    at all (HTTP/1.0 clients and health checks; browsers always send one)."""
    if not host_header:
        return True
    if "*" in allowed:
        return True
    name = host_header.strip().lower()
    if name.startswith("["):  # [v6]:port
        return True
    name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    return name == bound_host.lower() or name in {a.lower() for a in allowed}


class RequestGate:
    """What the drain shares with the middleware: whether the server drains, and how many
    requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


class GuardMiddleware:
    """ASGI middleware before the routes: refuses a foreign Host (421), answers 503 to new
    requests while the server drains, and counts the requests in flight."""

    # Still answered during a drain: a balancer reads /health (its 503 says "draining").
    DURING_DRAIN = ("/health", "/metrics")

    def __init__(
        self, app: Any, gate: RequestGate, bound_host: str, allowed_hosts: tuple[str, ...]
    ) -> None:
        self.app = app
        self.gate = gate
        self.bound_host = bound_host
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        text = host.decode("latin-1") if host is not None else None
        if not host_allowed(text, self.bound_host, self.allowed_hosts):
            message = (
                f"the Host header '{text}' is not a name of this server "
                "(start it with --allowed-hosts NAME to accept it)"
            )
            await _json_error(send, 421, message, "host_not_allowed")
            return
        if self.gate.draining and scope.get("path") not in self.DURING_DRAIN:
            await _json_error(send, 503, "the server is shutting down", "shutting_down")
            return
        self.gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.in_flight -= 1


async def _json_error(send: Any, status: int, message: str, code: str) -> None:
    body = _error_body(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 503:
        headers += [(b"connection", b"close"), (b"retry-after", b"1")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- listening socket


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a host that does not resolve or an address that
    cannot be bound (in use, not this machine's) is a :class:`PLDRError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PLDRError(f"cannot listen on {host}: the host does not resolve ({exc})") from None
    # IPv4 first where a name has both (uvicorn's choice: "localhost" is 127.0.0.1).
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart does not wait for the old connections' TIME_WAIT (on Linux
        # this never lets two servers bind one port).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == getattr(__import__("errno"), "EADDRINUSE", None):
            why = "the port is in use (another server?)"
        raise PLDRError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def usable_connection_cap(requested: int) -> int:
    """``requested``, or fewer where the process may not open that many files: the soft
    RLIMIT_NOFILE is first raised to the hard one (as far as needed)."""
    try:
        import resource
    except ImportError:  # not POSIX: no limit to read
        return requested
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = requested + FD_RESERVE + OVERFLOW_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - FD_RESERVE - OVERFLOW_FDS))


# ---------------------------------------------------------------------- the server


class GracefulServer:
    """Runs an ASGI app on uvicorn with the drain described in the module docstring."""

    def __init__(self, config: Any, gate: RequestGate, shutdown_timeout: float) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):  # type: ignore[misc]
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                signals = (signal.SIGINT, signal.SIGTERM)
                previous = {sig: signal.signal(sig, outer.on_signal) for sig in signals}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets=sockets)
                # asyncio set the kernel's queue to its accept batch; a longer one again.
                for sock in sockets or ():
                    sock.listen(LISTEN_BACKLOG)

            async def on_tick(self, counter: int) -> bool:
                stop = await super().on_tick(counter)
                return outer.drain_done() or stop

        self.server = _Server(config)
        self.config = config
        self.gate = gate
        self.shutdown_timeout = shutdown_timeout
        self.deadline: float | None = None
        self.stopped = threading.Event()

    def run(self, sock: socket.socket) -> None:
        try:
            self.server.run(sockets=[sock])
        finally:
            self.stopped.set()  # the backstop of _force_later is not needed any more

    def start_drain(self) -> None:
        """Stop taking requests (503), and end the server when those in flight are done or at
        the deadline."""
        if self.deadline is not None:
            return
        self.deadline = time.monotonic() + self.shutdown_timeout
        self.gate.draining = True
        LOG.info(
            "draining: %d request(s) in flight; new ones get 503; stopping in at most %g s",
            self.gate.in_flight,
            self.shutdown_timeout,
        )
        threading.Thread(target=self._force_later, daemon=True).start()

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.deadline is None:
            self.start_drain()
            return
        # A second signal: the operator does not want to wait.
        os.write(2, b"pldr-llm: second signal: exiting now, without waiting for requests\n")
        os._exit(128 + signum)

    def drain_done(self) -> bool:
        if self.deadline is None:
            return False
        left = self.deadline - time.monotonic()
        if self.gate.in_flight and left > 0:
            return False
        if self.gate.in_flight:
            LOG.warning(
                "shutdown deadline (%g s) reached: cancelling %d request(s) in flight",
                self.shutdown_timeout,
                self.gate.in_flight,
            )
        # uvicorn then closes the listening socket and the idle connections, waits at most this
        # long for the rest, and cancels what remains.
        self.config.timeout_graceful_shutdown = max(0.1, left)
        return True

    def _force_later(self) -> None:
        assert self.deadline is not None
        left = max(0.0, self.deadline - time.monotonic()) + FORCE_AFTER_DEADLINE_S
        if self.stopped.wait(left):
            return
        os.write(2, b"pldr-llm: still not stopped after the shutdown deadline: exiting now\n")
        os._exit(1)


def serve_app(app: Any, options: Any, sock: socket.socket | None = None) -> None:
    """Serve ``app`` (from :func:`pldr_llm.serve.app.create_app`) with the limits of
    ``options`` (a ``ServeOptions``) until a signal's drain ends. ``sock``: an already bound
    socket (:func:`bind_socket`); without it, one on ``options.host:options.port``."""
    import uvicorn

    cap = usable_connection_cap(options.max_connections)
    if cap < options.max_connections:
        LOG.warning(
            "at most %d connections (not %d): the process may open only %d files (ulimit -n)",
            cap,
            options.max_connections,
            cap + FD_RESERVE + OVERFLOW_FDS,
        )
    guard = ConnectionGuard(cap)
    config = uvicorn.Config(
        app,
        http=guarded_protocol(
            guard,
            ReadWriteLimits(options.header_timeout, options.body_timeout, options.write_timeout),
        ),
        log_level=options.log_level,
        lifespan="on",
        access_log=False,
        backlog=ACCEPT_BATCH,
        timeout_keep_alive=options.keep_alive_timeout,  # type: ignore[arg-type]  (a float works)
        timeout_graceful_shutdown=options.shutdown_timeout,
    )
    server = GracefulServer(config, app.state.gate, options.shutdown_timeout)
    sock = sock if sock is not None else bind_socket(options.host, options.port)
    try:
        server.run(sock)
    finally:
        sock.close()
        guard.flush()  # the events of the last interval
