"""The server's connection guards (docs/serving.md, "Limits"): read deadlines, the connection
cap, the drain after SIGTERM and its deadline, the Host / Content-Type / CORS checks, the bind
check, ``/v1/models/{id}``, and 500s that are logged but never shown.

Everything listens on 127.0.0.1 only; every client is bounded in count and time. The servers of
the timing tests run as ``pldr-llm serve`` subprocesses (their file descriptors and their exit
are what is checked) with small timeouts, so that each test ends in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pldr_llm import cli  # noqa: E402
from serve_support import (  # noqa: E402
    HP,
    MODEL_ID,
    build_bundle,
    live_server,
    serve_process,
    wait_until_healthy,
)
from support import free_port  # noqa: E402

# The deadlines of the subprocess servers (seconds); the assertions allow ~1.5 s of scheduling
# on a loaded 2-core machine on top of them.
SHORT = 1.0
SLACK = 2.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A 1024-token context: long streams, to have a request still running at a deadline.
    return build_bundle(tmp_path_factory.mktemp("limits"), {**HP, "max_seq_len": 1024})


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when (seconds from now);
    fails past ``limit`` seconds."""
    start = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit} s (got {data[:200]!r})")
    return data, time.monotonic() - start


def _trickle(sock: socket.socket, data: bytes, every: float) -> None:
    """Send ``data`` one byte every ``every`` seconds until done or the server closes."""
    for i in range(len(data)):
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return
        time.sleep(every)


@pytest.fixture(scope="module")
def timeouts_server(bundle: Path) -> Iterator[int]:
    flags = ["--header-timeout", str(SHORT), "--body-timeout", str(SHORT)]
    flags += ["--keep-alive-timeout", str(SHORT)]
    with serve_process(bundle, *flags, "-q") as (_, port):
        yield port


REQUEST_HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("after_a_request", [False, True])
def test_a_slow_header_is_cut_at_the_header_timeout(
    timeouts_server: int, after_a_request: bool
) -> None:
    import threading

    sock = socket.create_connection(("127.0.0.1", timeouts_server))
    if after_a_request:  # the deadline of a later request on a kept-alive connection
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 ")
    # One byte every 0.2 s: each byte is "progress", but the whole head takes ~12 s.
    sender = threading.Thread(target=_trickle, args=(sock, REQUEST_HEAD * 2, 0.2), daemon=True)
    start = time.monotonic()
    sender.start()
    data, _ = _read_until_closed(sock, SHORT + SLACK)
    took = time.monotonic() - start
    sock.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert SHORT - 0.1 <= took <= SHORT + SLACK


@pytest.mark.slow
@pytest.mark.parametrize("case", ["slow body", "short body"])
def test_a_body_that_does_not_arrive_gets_408_at_the_body_timeout(
    timeouts_server: int, case: str
) -> None:
    import threading

    body = b'{"model": "%s", "prompt": "a", "max_tokens": 2}' % MODEL_ID.encode()
    sock = socket.create_connection(("127.0.0.1", timeouts_server))
    if case == "short body":  # 1000 bytes announced, 17 sent
        sock.sendall(REQUEST_HEAD + b"Content-Length: 1000\r\n\r\n" + body[:17])
    else:  # the whole body, one byte every 0.2 s
        sock.sendall(REQUEST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
        threading.Thread(target=_trickle, args=(sock, body, 0.2), daemon=True).start()
    data, took = _read_until_closed(sock, SHORT + SLACK)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b"did not arrive within 1 s" in data
    assert SHORT - 0.1 <= took


@pytest.mark.slow
def test_idle_connections_are_closed(timeouts_server: int) -> None:
    # Never used: closed at the header timeout, without an answer.
    fresh = socket.create_connection(("127.0.0.1", timeouts_server))
    data, took = _read_until_closed(fresh, SHORT + SLACK)
    assert data == b"" and took >= SHORT - 0.1
    fresh.close()
    # Kept alive after a request: closed at the keep-alive timeout.
    used = socket.create_connection(("127.0.0.1", timeouts_server))
    used.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data, took = _read_until_closed(used, SHORT + SLACK + 1)
    assert data.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in data
    used.close()


class _FakeConnection:
    def __init__(self, idle: bool) -> None:
        self.idle, self.closed = idle, False

    def is_idle(self) -> bool:
        return self.idle

    def close_quietly(self) -> None:
        self.closed = True


def test_the_connection_cap_closes_an_idle_connection_or_refuses() -> None:
    from pldr_llm.serve.connections import ConnectionGuard

    guard = ConnectionGuard(3)
    busy1, idle, busy2 = (_FakeConnection(i) for i in (False, True, False))
    assert all(guard.admit(c) for c in (busy1, idle, busy2))
    new = _FakeConnection(False)
    assert guard.admit(new) and idle.closed and not busy1.closed and not busy2.closed
    assert list(guard.open) == [busy2, busy1, new]  # the busy one looked at went to the back
    late = _FakeConnection(True)
    assert not guard.admit(late) and late not in guard.open  # all busy: refused
    guard.release(busy1)
    assert guard.admit(late)  # room again
    records = _Records()
    logging.getLogger("uvicorn.error").addHandler(records)
    try:
        guard.flush()
        guard.flush()  # nothing new: nothing logged
    finally:
        logging.getLogger("uvicorn.error").removeHandler(records)
    assert [r.getMessage() for r in records.records] == [
        "connections in the last 10 s: 1 idle connections closed to make room, "
        "1 refused (503) at the connection cap (cap 3, 3 open)"
    ]


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.parametrize("write_timeout", [0.5, 30.0])
def test_a_client_that_stops_reading_is_disconnected(write_timeout: float) -> None:
    """An answer that never ends (an ASGI app writing 64 kB chunks until the client goes) to a
    client that reads nothing: once the buffers are full, the connection is dropped after the
    write timeout, and the app sees the disconnect. With a long timeout it is still writing."""
    import asyncio
    import threading

    import uvicorn

    from pldr_llm.serve.connections import ConnectionGuard, ReadWriteLimits, guarded_protocol

    ended: list[float] = []

    async def endless(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not gone.is_set():
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        ended.append(time.monotonic())
        await watcher

    protocol = guarded_protocol(ConnectionGuard(8), ReadWriteLimits(5.0, 5.0, write_timeout))
    config = uvicorn.Config(endless, http=protocol, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    client = socket.socket()
    try:
        while not server.started:
            time.sleep(0.01)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sent = time.monotonic()
        time.sleep(write_timeout + 1.5 if write_timeout < 1 else 2.0)
        if write_timeout < 1:
            assert ended and ended[0] - sent <= write_timeout + 1.5
        else:
            assert not ended  # still writing into full buffers: only the timeout ends it
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_a_thousand_idle_connections_leave_health_answering(bundle: Path) -> None:
    import resource

    from pldr_llm.serve.connections import OVERFLOW_FDS

    count, cap = 1000, 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 200:
        pytest.skip(f"this test opens {count} sockets; the hard file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 200), hard))
    clients: list[socket.socket] = []
    try:
        with serve_process(bundle, "--max-connections", str(cap), "-q") as (proc, port):
            baseline = _open_fds(proc.pid)
            most = baseline
            for i in range(count):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                if i % 100 == 99:
                    most = max(most, _open_fds(proc.pid))
            time.sleep(0.5)  # let the server accept the last ones
            most = max(most, _open_fds(proc.pid))
            start = time.monotonic()
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            assert r.status_code == 200 and time.monotonic() - start < 2
            # The cap holds: idle connections were closed to make room (at most `cap` open, and
            # those past it for a few turns of the loop; the listening socket and the model's
            # files are in the baseline).
            assert most <= baseline + cap + OVERFLOW_FDS, (baseline, most)
            # A busy connection is never evicted: a request in progress completes.
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"model": MODEL_ID, "prompt": "a", "max_tokens": 3},
                timeout=30,
            )
            assert r.status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            log = proc.stderr.read() if proc.stderr else ""
    finally:
        for c in clients:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Too many open files" not in log
    # -q keeps info lines out; the cap's summary is a warning, one line per 10 s (not per
    # connection: 900 were closed).
    assert 1 <= log.count("idle connections closed to make room") <= 2, log


def _stuck_uploader(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(REQUEST_HEAD + b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "a", ')
    return sock


def _non_reading_stream(port: int) -> socket.socket:
    """A streaming request for 16 x 1000 tokens from a client with a small receive buffer that
    never reads: the server's writes block once the buffers are full."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(
        {"model": MODEL_ID, "prompt": "a", "max_tokens": 1000, "n": 16, "stream": True}
        | {"logprobs": True, "ignore_eos": True}
    ).encode()
    sock.sendall(REQUEST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return sock


def _running(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["running"]


def _wait_running(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _running(port) == 0:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_exits_at_the_deadline_despite_stuck_clients(bundle: Path) -> None:
    deadline = 3.0
    # One row at a time: the 16 x 1000 tokens of the stream take far longer than the deadline.
    flags = ["--shutdown-timeout", str(deadline), "--max-batch", "1"]
    with serve_process(bundle, *flags) as (proc, port):
        uploader = _stuck_uploader(port)
        reader = _non_reading_stream(port)
        _wait_running(port)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # While it drains the listening socket stays open: new requests get the documented
        # 503, health says "draining".
        time.sleep(0.3)
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        code = proc.wait(deadline + SLACK + 3)
        took = time.monotonic() - signalled
        log = proc.stderr.read() if proc.stderr else ""
        uploader.close()
        reader.close()
    assert code == 0, log
    assert deadline - 0.2 <= took <= deadline + SLACK + 3, log
    assert "shutdown deadline (3 s) reached: cancelling 2 request(s) in flight" in log


ENDLESS_SERVER = """
import sys
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
from pldr_llm.serve.app import ServeOptions
from pldr_llm.serve.http import GuardMiddleware, RequestGate, serve_app

async def endless(request):
    async def chunks():
        while True:
            yield b"x" * 65536
    return StreamingResponse(chunks())

app = Starlette(routes=[Route("/endless", endless)])
app.state.gate = RequestGate()
app.add_middleware(GuardMiddleware, gate=app.state.gate, bound_host="127.0.0.1", allowed_hosts=())
port = int(sys.argv[1])
serve_app(app, ServeOptions(model_id="-", port=port, shutdown_timeout=2.0, log_level="warning"))
"""


@pytest.mark.slow
def test_sigterm_exits_at_the_deadline_despite_a_client_that_never_reads() -> None:
    """The answer never ends and the client reads nothing: the server's write blocks for good
    (the write timeout, 60 s, is far away). SIGTERM still ends the process at its deadline."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", ENDLESS_SERVER, str(port)], stderr=subprocess.PIPE, text=True
    )
    reader = socket.socket()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            time.sleep(0.1)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        reader.sendall(b"GET /endless HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(1.0)  # the buffers fill; the handler waits in its write
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(2.0 + SLACK + 3)
        took = time.monotonic() - signalled
        log = proc.stderr.read() if proc.stderr else ""
    finally:
        reader.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log
    assert 1.8 <= took <= 2.0 + SLACK + 3, log
    assert "shutdown deadline (2 s) reached: cancelling 1 request(s) in flight" in log


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(bundle: Path) -> None:
    with serve_process(bundle, "--shutdown-timeout", "60") as (proc, port):
        uploader = _stuck_uploader(port)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # draining: the stuck uploader holds it (for up to 60 s)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = proc.wait(10)
        assert time.monotonic() - start < 2
        uploader.close()
        log = proc.stderr.read() if proc.stderr else ""
    assert code == 128 + signal.SIGTERM
    assert "second signal: exiting now" in log
    # the default batch, sized to the device, is said at start
    assert "pldr-llm: --max-batch " in log and "CPU core(s)" in log


@pytest.mark.slow
def test_a_busy_port_is_one_line_and_exit_2(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model", str(bundle), "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert (
        out.err == f"pldr-llm: error: cannot listen on 127.0.0.1:{port}: the port is in use "
        "(another server?)\n"
    )
    assert "serving" not in out.out + out.err


def test_the_listening_socket_prefers_ipv4_for_a_name() -> None:
    from pldr_llm.serve.http import bind_socket

    sock = bind_socket("localhost", 0)  # some systems list ::1 first; clients use 127.0.0.1
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_a_host_that_does_not_resolve_is_one_line_and_exit_2(
    bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--host", "no-such-host.invalid", "--api-key", "k"]
    assert cli.main(["serve", "--model", str(bundle), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pldr-llm: error: cannot listen on no-such-host.invalid: the host does")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout", "0"),
        ("--body-timeout", "-1"),
        ("--shutdown-timeout", "1e9"),
        ("--max-connections", "0"),
    ],
)
def test_bad_limits_are_refused_in_one_line(
    bundle: Path, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--model", str(bundle), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pldr-llm: error: ") and flag in err


# ---------------------------------------------------------------------- the app's checks


@pytest.fixture(scope="module")
def keyed(bundle: Path) -> Iterator[str]:
    with live_server(bundle, api_key="sekret") as (url, _):
        yield url


def test_models_retrieve_gives_the_model_or_404_and_needs_the_key(keyed: str) -> None:
    client = openai.OpenAI(base_url=keyed + "/v1", api_key="sekret", max_retries=0)
    model = client.models.retrieve(MODEL_ID)
    assert (model.id, model.object, model.owned_by) == (MODEL_ID, "model", "pldr-llm")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    # Authentication before anything: the served id and an unknown one alike.
    for name in (MODEL_ID, "gpt-4"):
        r = httpx.get(f"{keyed}/v1/models/{name}", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("Bearer sekret", 200),
        ("bearer sekret", 200),  # RFC 7235: the scheme is case-insensitive
        ("BEARER  sekret", 200),
        ("Bearer SEKRET", 401),  # the key is not
        ("Basic sekret", 401),
        ("sekret", 401),
        ("Bearer", 401),
    ],
)
def test_the_auth_scheme_is_case_insensitive(keyed: str, header: str, status: int) -> None:
    r = httpx.get(keyed + "/v1/models", headers={"Authorization": header}, timeout=10)
    assert r.status_code == status


@pytest.fixture(scope="module")
def open_server(bundle: Path) -> Iterator[tuple[str, object]]:
    with live_server(bundle) as served:
        yield served


GOOD = {"model": MODEL_ID, "prompt": "a", "max_tokens": 2}


@pytest.mark.slow
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_json_endpoints_refuse_other_content_types(open_server, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/completions", "/v1/deductive"):
        r = httpx.post(open_server[0] + path, content=json.dumps(GOOD), headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    ok = {"Content-Type": "application/json; charset=utf-8"}
    r = httpx.post(
        open_server[0] + "/v1/completions", content=json.dumps(GOOD), headers=ok, timeout=30
    )
    assert r.status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 421),
        ("evil.example:8000", 421),
        ("localhost.evil.example", 421),
        ("localhost:8000", 200),
        ("app.localhost", 200),
        ("127.0.0.1", 200),
        ("[::1]:8000", 200),
        ("10.1.2.3", 200),  # an address is no rebinding: the page's origin is that address
    ],
)
def test_the_host_header_must_name_this_server(open_server, host: str, status: int) -> None:
    for method, path, body in (("GET", "/health", None), ("POST", "/v1/completions", GOOD)):
        r = httpx.request(
            method, open_server[0] + path, json=body, headers={"Host": host}, timeout=30
        )
        assert r.status_code == status, (path, r.text)
        if status == 421:
            assert r.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.slow
def test_allowed_hosts_and_cors_origins_are_opt_in(bundle: Path, open_server) -> None:
    page = {"Origin": "https://app.example"}
    r = httpx.get(open_server[0] + "/v1/models", headers=page, timeout=10)
    assert r.status_code == 200
    assert not any(k.startswith("access-control-") for k in r.headers)
    options = {"allowed_hosts": ("api.example:8000",), "cors_origins": ("https://app.example",)}
    with live_server(bundle, **options) as (url, _):
        r = httpx.get(url + "/v1/models", headers={**page, "Host": "api.example"}, timeout=10)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(url + "/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(url + "/health", headers={"Host": "evil.example"}).status_code == 421


def test_deeply_nested_json_is_400(open_server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    r = httpx.post(
        open_server[0] + "/v1/completions",
        content=deep,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_500_is_logged_once_with_its_traceback_and_shown_without_internals(
    open_server,
) -> None:
    url, app = open_server
    server = app.state.server
    records = _Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(records)

    def broken(prompt: str) -> list[int]:
        raise RuntimeError("secret internal detail /opt/model/weights")

    original = server.tokenizer.prompt_ids
    server.tokenizer.prompt_ids = broken
    try:
        r = httpx.post(url + "/v1/completions", json=GOOD, timeout=30)
    finally:
        server.tokenizer.prompt_ids = original
        logger.removeHandler(records)
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert "secret" not in r.text
    failures = [rec for rec in records.records if rec.levelno >= logging.ERROR]
    assert len(failures) == 1, [rec.getMessage() for rec in failures]
    assert "POST /v1/completions" in failures[0].getMessage()
    assert failures[0].exc_info and "secret internal detail" in str(failures[0].exc_info[1])
    # and the server goes on
    assert httpx.post(url + "/v1/completions", json=GOOD, timeout=30).status_code == 200


def test_an_engine_failure_is_logged_and_answered_without_its_text(open_server) -> None:
    """A 500 the handlers raise on purpose (the engine reported an error) is logged with its
    text, and the client gets the generic message."""
    from pldr_llm.serve.scheduler import Event

    url, app = open_server
    scheduler = app.state.server.scheduler
    records = _Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(records)

    def failing_submit(seqs) -> None:
        for seq in seqs:
            failed = Event(finish_reason="error", error="CUDA error: secret", index=seq.index)
            seq.events.put_nowait(failed)

    original = scheduler.submit
    scheduler.submit = failing_submit
    try:
        r = httpx.post(url + "/v1/completions", json=GOOD, timeout=30)
    finally:
        scheduler.submit = original
        logger.removeHandler(records)
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json()["error"]["message"] == "internal server error"
    logged = [rec.getMessage() for rec in records.records if rec.levelno >= logging.ERROR]
    assert logged == ["500 on POST /v1/completions: CUDA error: secret"]


# ---------------------------------------------------------------------- default batch size


def test_the_default_batch_is_sized_to_the_free_memory_and_the_model() -> None:
    from pldr_llm import PLDRConfig
    from pldr_llm.serve.sizing import bytes_per_sequence, default_max_batch

    paper = PLDRConfig(
        num_layers=5, d_model=896, num_heads=14, max_seq_len=1024, input_vocab_size=32000
    )
    # bfloat16, by hand: K and V (2 x 5 layers x 14 heads x 1024 slots x 64 x 2 bytes), the four
    # 64 x 64 G-cache matrices per head and layer, and a row's sampling buffers.
    kv, g, rows = 2 * 5 * 14 * 1024 * 64 * 2, 4 * 5 * 14 * 64 * 64 * 2, 32000 * 20 + 1024 * 10
    assert bytes_per_sequence(paper, 2) == kv + g + rows == 21_294_080
    gib = 2**30
    # An idle H200 (~139 GiB free): thousands would fit; the cap (the step is host-bound).
    assert default_max_batch(paper, "cuda", 2, free_bytes=139 * gib).max_batch == 256
    # 2 GiB free: half of it / 21.3 MB = 50 slots; float32 halves that.
    assert default_max_batch(paper, "cuda", 2, free_bytes=2 * gib).max_batch == 50
    assert default_max_batch(paper, "cuda", 4, free_bytes=2 * gib).max_batch == 25
    # a nearly full device still gets one slot (the engine then says what does not fit)
    assert default_max_batch(paper, "cuda", 2, free_bytes=10 * 2**20).max_batch == 1
    # a longer context costs more per slot
    long = PLDRConfig(
        num_layers=5, d_model=896, num_heads=14, max_seq_len=4096, input_vocab_size=32000
    )
    assert default_max_batch(long, "cuda", 2, free_bytes=2 * gib).max_batch == 14
    sizing = default_max_batch(paper, "cuda", 2, free_bytes=2 * gib)
    assert "2.0 GiB free" in sizing.reason and "20.3 MiB per sequence" in sizing.reason
    # the CPU: 8 rows a core, at most 16 (the 2-core default is the old fixed 16)
    cpu = [default_max_batch(paper, "cpu", 4, cpu_count=n).max_batch for n in (1, 2, 64)]
    assert cpu == [8, 16, 16]


# ---------------------------------------------------------------------- replicas


def _haproxy_config(front: int, first: int, second: int) -> str:
    """The HAProxy file of docs/serving.md ("Replicas"), on the given ports."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text("utf-8")
    found = re.search(r"```haproxy\n(.*?)```", doc, re.S)
    assert found, "docs/serving.md has no haproxy block"
    text = found.group(1)
    for old, new in (("8000", front), ("8001", first), ("8002", second)):
        assert f"127.0.0.1:{old}" in text
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    return text


@pytest.mark.slow
def test_replicas_behind_haproxy_lose_no_request(bundle: Path, tmp_path: Path) -> None:
    import shutil
    import threading
    from concurrent.futures import ThreadPoolExecutor

    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    prompts = [f"replica {i}" for i in range(4)]
    with contextlib.ExitStack() as stack:
        replicas = []
        for _ in range(2):
            replicas.append(
                stack.enter_context(serve_process(bundle, "--shutdown-timeout", "20", "-q"))
            )
        (first, p1), (_, p2) = replicas
        # What one server gives for each prompt (greedy): every answer must be this text.
        want = {}
        for prompt in prompts:
            r = httpx.post(
                f"http://127.0.0.1:{p2}/v1/completions",
                json={"model": MODEL_ID, "prompt": prompt, "max_tokens": 24, "temperature": 0},
                timeout=30,
            )
            want[prompt] = r.json()["choices"][0]["text"]
        front = free_port()
        config = tmp_path / "pldr.cfg"
        config.write_text(_haproxy_config(front, p1, p2), encoding="utf-8")
        balancer = subprocess.Popen(
            [haproxy, "-f", str(config), "-db"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        stack.callback(lambda: (balancer.kill(), balancer.wait(10)))
        url = f"http://127.0.0.1:{front}"
        wait_until_healthy(balancer, url, 20, "haproxy")

        total, done, signalled = 48, [], threading.Event()
        lock = threading.Lock()

        def one(i: int) -> tuple[int, bool, bool]:
            prompt = prompts[i % len(prompts)]
            body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 24, "temperature": 0}
            if i % 2:  # a stream, read to its end
                text = ""
                with httpx.stream(
                    "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60
                ) as r:
                    status = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
            else:
                r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                status = r.status_code
                text = r.json()["choices"][0]["text"] if status == 200 else r.text
            with lock:
                done.append(i)
                if len(done) == total // 3:  # a third of the load is done: stop replica 1
                    first.send_signal(signal.SIGTERM)
                    signalled.set()
            return status, text == want[prompt], signalled.is_set(), text[:300]

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(total)))
        assert all(status == 200 for status, *_ in results), [r for r in results if r[0] != 200]
        assert all(same for _, same, *_ in results)
        assert sum(after for _, _, after, _ in results) >= total // 2  # the load went on after it
        assert first.wait(30) == 0  # replica 1 drained and exited
        # and the balancer still serves, from replica 2 alone
        r = httpx.post(
            url + "/v1/completions",
            json={"model": MODEL_ID, "prompt": prompts[0], "max_tokens": 24, "temperature": 0},
            timeout=30,
        )
        assert r.json()["choices"][0]["text"] == want[prompts[0]]
