"""The server's connection layer: what bounds a client before a request reaches a handler.

uvicorn (h11) gives the idle keep-alive timeout and a graceful-shutdown timeout, but reads a
request's headers and body for as long as a client cares to send them, accepts connections until
the process runs out of file descriptors, and closes its listening socket at the first SIGTERM.
So, kept on uvicorn (any version from 0.30; the app is plain ASGI) with these additions:

- ``serve.connections.guarded_protocol``: uvicorn's h11 protocol with a ``ConnectionWatch`` on
  each connection: a deadline per request for the headers (from the connection's start, or the first
  byte of a later request) and one for the body (from the end of the headers), one for a client
  that stops reading, and a cap on open connections (``ConnectionGuard``): at the cap, a
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

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.serve.connections import (
    ACCEPT_BATCH,
    FD_RESERVE,
    LISTEN_BACKLOG,
    OVERFLOW_FDS,
    ConnectionGuard,
    ReadWriteLimits,
    error_body,
    guarded_protocol,
    usable_connection_cap,
)

LOG = logging.getLogger("uvicorn.error")
# A forced stop after this long past the shutdown deadline, whatever is stuck (the lifespan's
# scheduler stop, a thread): the deadline is a promise.
FORCE_AFTER_DEADLINE_S = 5.0
LOOPBACK_NAMES = ("localhost",)


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
    name = _host_name(name)
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    return name == bound_host.lower() or name in {_host_name(a.lower()) for a in allowed}


def _host_name(host: str) -> str:
    """``host`` (lower case) without its port and a trailing dot."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


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
    body = error_body(status, message, code)
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


# ---------------------------------------------------------------------- the server


class GracefulServer:
    """Runs an ASGI app on uvicorn with the drain described in the module docstring."""

    def __init__(self, config: Any, gate: RequestGate, shutdown_timeout: float) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
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


#: The interpreter's thread switch interval while serving (seconds; Python's default is 5 ms).
#: The decoding worker thread lets go of the interpreter lock at every wait for the device and
#: every copy to it; while the event loop's thread is busy writing streams, the worker gets the
#: lock back only when that thread is made to yield, after this interval. At 5 ms the device
#: idled for most of a step at 256 streams on an H200; 0.5 ms bounds the wait well below a
#: block of steps, at the price of more switches while both threads run Python.
SWITCH_INTERVAL_S = 0.0005


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
        timeout_keep_alive=options.keep_alive_timeout,  # uvicorn types it int; a float works
        timeout_graceful_shutdown=options.shutdown_timeout,
    )
    server = GracefulServer(config, app.state.gate, options.shutdown_timeout)
    sock = sock if sock is not None else bind_socket(options.host, options.port)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        server.run(sock)
    finally:
        sys.setswitchinterval(switch_interval)
        sock.close()
        guard.flush()  # the events of the last interval
