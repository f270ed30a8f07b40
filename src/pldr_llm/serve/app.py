"""The ASGI app: the OpenAI API's completions (and chat completions when the model has a chat
template), health, Prometheus metrics, the deductive outputs as JSON, and the playground page.

:func:`create_app` builds it around a loaded model; :func:`run_server` serves it with uvicorn,
through the connection limits of :mod:`pldr_llm.serve.http`. The model is fixed when the app is
built: nothing in a request names a file or a model path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import read_json_object
from pldr_llm.deductive import (
    DEDUCTIVE_NAMES,
    analyze_deductive,
    deductive_outputs,
    head_matrices,
)
from pldr_llm.serve.completions import CompletionHandlers
from pldr_llm.serve.http import GuardMiddleware, RequestGate, serve_app
from pldr_llm.serve.metrics import Metrics
from pldr_llm.serve.protocol import (
    APIError,
    bad,
    check_model,
)
from pldr_llm.serve.scheduler import Scheduler, ShuttingDown

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
# 16: on an H200 (64 clients x 256 tokens, bf16) 4 gave 13.7k tokens/s, 16 gave 18.7k and 32
# 18.6k (BENCHMARKS.md); larger blocks only add burstiness.
DEFAULT_TOKENS_PER_SYNC = 16


@dataclass
class ServeOptions:
    """Settings of one server (see ``pldr-llm serve --help``)."""

    model_id: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_body: int = DEFAULT_MAX_BODY
    chat_template: str | None = None
    engine_options: dict[str, Any] | None = None
    # Decoding steps per host sync while no request waits for a slot (1: one sync per token);
    # docs/serving.md says why.
    tokens_per_sync: int = DEFAULT_TOKENS_PER_SYNC
    # Where :func:`run_server` listens. A host that other machines can reach needs an API key,
    # or ``insecure`` to say that none is wanted.
    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False
    log_level: str = "info"
    # Connection limits (docs/serving.md, "Limits"): seconds to send a request's headers (from
    # the connection's start or the request's first byte) and its body (from the headers' end),
    # to read again once the answer fills the buffers, an idle keep-alive connection's life,
    # open connections, and the drain after SIGTERM.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    write_timeout: float = 60.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 4096
    shutdown_timeout: float = 30.0
    # Host names accepted besides the bound host, loopback names and IP addresses ("*": any).
    allowed_hosts: tuple[str, ...] = ()
    # Origins a browser may call the API from (CORS); none by default.
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_listen_address(self.host, self.port, self.api_key, self.insecure)
        timeouts = ("header", "body", "write", "keep_alive", "shutdown")
        for name in (f"{t}_timeout" for t in timeouts):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                flag = "--" + name.replace("_", "-")
                raise PLDRError(f"{flag} must be in (0, 3600] seconds, got {value}")
        if self.max_connections < 1:
            raise PLDRError(f"--max-connections must be at least 1, got {self.max_connections}")


# ---------------------------------------------------------------------- helpers


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen_address(host: str, port: int, api_key: str | None, insecure: bool) -> None:
    """Refuse a bad port, and a host other machines can reach without an API key or insecure."""
    if not 0 <= port <= 65535:
        raise PLDRError(f"the port must be in [0, 65535], got {port}")
    if not is_loopback(host) and not api_key and not insecure:
        raise PLDRError(
            f"refusing to listen on {host} (reachable from other machines) without an API key: "
            "give --api-key KEY (or PLDR_API_KEY), or --insecure"
        )


LOG = logging.getLogger("uvicorn.error")


def error_response(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def is_json_media_type(content_type: str | None) -> bool:
    """Whether a Content-Type header is ``application/json`` (parameters such as a charset
    allowed)."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 unless sent as ``application/json`` (a web page can send
    ``text/plain`` to any server without asking first), 413 past ``limit`` bytes, 400 when not
    UTF-8, not JSON or nested too deep to parse."""
    if not is_json_media_type(request.headers.get("content-type")):
        raise APIError(
            415,
            "the request body must be sent with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="too_large")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise bad(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise bad("the request body is JSON nested too deeply") from None


def find_chat_template(folder: str | Path) -> str | None:
    """A chat template the model folder declares (``chat_template.jinja``, or ``chat_template``
    in ``tokenizer_config.json``); None for a base model."""
    root = Path(folder)
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = root / "tokenizer_config.json"
    if config.is_file():
        value = read_json_object(config, "tokenizer config").get("chat_template")
        if isinstance(value, str):
            return value
    return None


# ---------------------------------------------------------------------- the app


class _Server(CompletionHandlers):
    """The request handlers and the state they share (the completion handlers are
    :class:`~pldr_llm.serve.completions.CompletionHandlers`)."""

    def __init__(self, model: Any, tokenizer: Any, options: ServeOptions) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.metrics = Metrics()
        self.max_len = int(model.config.max_seq_len)
        self.created = int(time.time())
        self.scheduler = Scheduler(
            model,
            tokenizer,
            max_batch=options.max_batch,
            max_queue=options.max_queue,
            metrics=self.metrics,
            engine_options=options.engine_options,
            tokens_per_sync=options.tokens_per_sync,
        )
        self.gate = RequestGate()
        self.api_key = options.api_key.encode() if options.api_key else None

    @property
    def draining(self) -> bool:
        """Whether the server is shutting down (new requests get 503)."""
        return self.gate.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.gate.draining = value

    # ------------------------------------------------------------------ checks
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        scheme, _, given = header.strip().partition(b" ")
        # The scheme is case-insensitive (RFC 7235); the key is compared in constant time, so
        # that timing tells nothing about it.
        right_key = hmac.compare_digest(given.strip(), self.api_key)
        if not (right_key and scheme.lower() == b"bearer"):
            raise APIError(
                401,
                "a valid API key is required: send 'Authorization: Bearer KEY'",
                type_="authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> Any:
        self.authorize(request)
        return await read_json(request, self.options.max_body)

    # ------------------------------------------------------------------ simple endpoints
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def health(self, request: Request) -> Response:
        state = "draining" if self.draining else "ok"
        return JSONResponse(
            {
                "status": state,
                "model": self.options.model_id,
                "running": self.scheduler.running,
                "queued": self.scheduler.queue_depth,
            },
            status_code=503 if self.draining else 200,
        )

    async def metrics_text(self, request: Request) -> Response:
        text = self.metrics.render(self.scheduler.queue_depth, self.scheduler.running)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.options.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "pldr-llm",
            "max_model_len": self.max_len,
            "chat": self.options.chat_template is not None,
        }

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    # Not named ``model``: that is the PLDRModel this server holds.
    async def model_info(self, request: Request) -> Response:
        self.authorize(request)
        name = request.path_params["model"]
        if name != self.options.model_id:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.options.model_id}'",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(self.model_card())

    # ------------------------------------------------------------------ deductive outputs
    async def deductive(self, request: Request) -> Response:
        body = await self.body(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        if body.get("model") is not None:
            check_model(body, self.options.model_id)
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string", "prompt")
        names = body.get("tensors", ["G_LM"])
        if not isinstance(names, list) or not names or any(n not in DEDUCTIVE_NAMES for n in names):
            raise bad(f"'tensors' must be a non-empty list of {list(DEDUCTIVE_NAMES)}", "tensors")
        ids = self.tokenizer.prompt_ids(prompt)
        if len(ids) > self.max_len:
            raise bad(
                f"the prompt has {len(ids)} tokens, more than the context ({self.max_len})",
                "prompt",
                "context_length_exceeded",
            )
        try:
            future = self.scheduler.run_on_worker(lambda: deductive_payload(self.model, ids, names))
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type_="server_error") from None
        payload = await asyncio.wrap_future(future)
        payload.update({"object": "deductive", "model": self.options.model_id})
        return JSONResponse(payload)


def _finite_list(t: Any) -> Any:
    import torch

    t = t.double()
    values = t.tolist()
    if bool(torch.isfinite(t).all()):
        return values

    def clean(x: Any) -> Any:
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x if x == x and abs(x) != float("inf") else None

    return clean(values)


def deductive_payload(model: Any, ids: list[int], names: list[str]) -> dict[str, Any]:
    """The deductive outputs of one uncached pass over ``ids`` (what ``pldr-llm inspect``
    analyses): per layer and head the ``dk x dk`` matrices of ``names``, and the inspect report
    (singular values, rank, log|det|, RMS) of G_LM and the other requested tensors."""
    layers = deductive_outputs(model, ids)
    others = [n for n in names if n != "G_LM"]
    report = analyze_deductive(layers, others=others, source={"kind": "serve", "prompt_ids": ids})
    tensors = {
        name: [_finite_list(head_matrices(layer[name]).float()) for layer in layers]
        for name in names
    }
    return {
        "prompt_ids": ids,
        "num_layers": report.num_layers,
        "num_heads": report.num_heads,
        "dk": report.dk,
        "tensors": tensors,
        "report": report.to_dict(),
    }


class _Errors:
    """ASGI middleware: counts requests by endpoint and status, and answers any exception that
    escapes a handler with an OpenAI error object (never a traceback: that goes to the log, once,
    with the request's method and path)."""

    def __init__(self, app: Any, server: _Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def wrapped(message: Any) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except ClientDisconnect:
            status = 499  # the client went away while sending its body: nobody to answer
        except Exception:
            LOG.exception("500 on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                err = APIError(500, "internal server error", type_="server_error")
                await error_response(err)(scope, receive, send)
        finally:
            path = scope.get("path", "")
            known = ("/v1/completions", "/v1/chat/completions", "/v1/deductive", "/v1/models")
            endpoint = next((k for k in known if path.startswith(k)), None)
            if endpoint is None:
                endpoint = path if path in ("/", "/health", "/metrics") else "other"
            self.server.metrics.count_request(endpoint, status)


def create_app(model: Any, tokenizer: Any, options: ServeOptions) -> Any:
    """The ASGI app serving ``model`` (already loaded, in eval mode) with ``tokenizer``."""
    server = _Server(model, tokenizer, options)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        if exc.status >= 500 and exc.status != 503:
            # The detail (an engine's exception text) is for the log, not for the client.
            LOG.error("%d on %s %s: %s", exc.status, request.method, request.url.path, exc)
            exc = APIError(exc.status, "internal server error", type_="server_error")
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        message = {404: "no such endpoint", 405: "method not allowed"}.get(status, str(exc.detail))
        return error_response(APIError(status, f"{message}: {request.method} {request.url.path}"))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        # uvicorn has stopped taking connections and waited for those in flight.
        server.draining = True
        await asyncio.get_running_loop().run_in_executor(None, server.scheduler.drain_and_stop)

    routes = [
        Route("/", server.index),
        Route("/health", server.health),
        Route("/metrics", server.metrics_text),
        Route("/v1/models", server.models),
        Route("/v1/models/{model:path}", server.model_info),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/deductive", server.deductive, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={APIError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.server = server
    app.state.gate = server.gate
    # Added innermost first: _Errors (counts and 500s) sees everything, then the Host check and
    # the drain, then CORS (only with --cors-origin: no CORS headers otherwise).
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        GuardMiddleware,
        gate=server.gate,
        bound_host=options.host,
        allowed_hosts=options.allowed_hosts,
    )
    app.add_middleware(_Errors, server=server)
    return app


def run_server(
    model: Any, tokenizer: Any, options: ServeOptions, sock: socket.socket | None = None
) -> None:
    """Serve until SIGTERM/SIGINT: then answer new requests 503, finish those in flight (at
    most ``options.shutdown_timeout`` seconds), return. ``sock``: a socket already bound
    (``pldr_llm.serve.http.bind_socket``), else one is bound on ``options.host:port``."""
    serve_app(create_app(model, tokenizer, options), options, sock)
