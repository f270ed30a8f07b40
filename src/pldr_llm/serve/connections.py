"""The connections of the server: the cap on open connections and the deadlines of each one.

:func:`guarded_protocol` is uvicorn's h11 protocol with a :class:`ConnectionWatch` on each
connection: a deadline per request for the headers (from the connection's start, or the first
byte of a later request) and one for the body (from the end of the headers), one for a client
that stops reading, and a place under the cap of :class:`ConnectionGuard` (at the cap, a new
connection evicts the oldest idle one found, or, when none is idle, is answered 503 and closed).
Events are logged as one summary line per interval, never one per connection. See
:mod:`pldr_llm.serve.http` for why these are added to uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

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


def error_body(status: int, message: str, code: str) -> bytes:
    """An OpenAI error object (the shape of ``serve.protocol.APIError``)."""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI error object that closes the connection
    (written to a transport directly, where no request cycle exists to answer through)."""
    body = error_body(status, message, code)
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

    class GuardedH11Protocol(H11Protocol):
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
