"""``pldr-llm serve``: an OpenAI-compatible server for one model (see docs/serving.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pldr_llm.commands.common import add_model_arguments, log
from pldr_llm.core.errors import PLDRError

HELP = "serve a PLDR-LLM over an OpenAI-compatible HTTP API, with a playground"
DESCRIPTION = (
    "Serve one PLDR-LLM over the OpenAI API (/v1/completions, /v1/models; "
    "/v1/chat/completions when the model folder has a chat template), with continuous "
    "batching, /health, Prometheus /metrics, /v1/deductive and a playground page at /. "
    "SIGTERM stops taking requests, finishes those in flight, then exits."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` command's options."""
    p.add_argument(
        "--model-id",
        metavar="NAME",
        help="the name clients pass as 'model' (default: the folder's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="sequences decoded together (default: sized to the device: on a GPU from its free "
        "memory and the model's cache per sequence, at most 256; on the CPU 8 a core, at most 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="sequences waiting for a slot before requests get 429 (256)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest request body; larger ones get 413 (default: 1 MiB)",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $PLDR_API_KEY if set)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key",
    )
    p.add_argument(
        "--tokens-per-sync",
        type=int,
        default=16,  # serve.app.DEFAULT_TOKENS_PER_SYNC (not imported here: no starlette at parse time)
        metavar="K",
        help="decoding steps per host sync (a block; requests are admitted between blocks); 1: "
        "one sync per token (16)",
    )
    _add_limit_arguments(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step")
    p.add_argument("--quiet", "-q", action="store_true", help="no logs on stderr")
    add_model_arguments(p)


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """The connection limits and checks (docs/serving.md, "Limits")."""
    limits = p.add_argument_group("limits (docs/serving.md, 'Limits')")
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's headers (10)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a client has to send a request's body once its headers are in (30)",
    )
    limits.add_argument(
        "--write-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a client may read nothing while its answer waits in full buffers (60)",
    )
    limits.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds an idle keep-alive connection stays open (5)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=4096,
        metavar="N",
        help="open connections; past it an idle one is closed, or the new one gets 503 (4096)",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="after SIGTERM, seconds to finish the requests in flight before they are cut; a "
        "second SIGTERM exits at once (30)",
    )
    limits.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        default="",
        help="comma-separated Host names accepted besides the bound host, loopback names and "
        "IP addresses ('*': any)",
    )
    limits.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin (https://app.example) whose pages may call the API; repeatable "
        "(default: none, no CORS headers)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM / Ctrl-C."""
    if args.max_batch is not None and args.max_batch < 1:
        raise PLDRError(f"--max-batch must be at least 1, got {args.max_batch}")
    if not 1 <= args.tokens_per_sync <= 64:
        raise PLDRError(f"--tokens-per-sync must be in [1, 64], got {args.tokens_per_sync}")
    if args.max_queue < 1:
        raise PLDRError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_body < 1024:
        raise PLDRError(f"--max-body must be at least 1024 bytes, got {args.max_body}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("PLDR_API_KEY")
    if api_key is not None and not api_key.strip():
        raise PLDRError("the API key is empty")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PLDRError("serve needs its extra: pip install 'pldr-llm[serve]'") from None

    from pldr_llm.serve.app import (
        ServeOptions,
        check_listen_address,
    )
    from pldr_llm.serve.http import bind_socket

    # Before a hub model is downloaded or any model loaded (ServeOptions checks it again).
    check_listen_address(args.host, args.port, api_key, args.insecure)
    limits = {
        "header_timeout": args.header_timeout,
        "body_timeout": args.body_timeout,
        "write_timeout": args.write_timeout,
        "keep_alive_timeout": args.keep_alive_timeout,
        "max_connections": args.max_connections,
        "shutdown_timeout": args.shutdown_timeout,
        "allowed_hosts": tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        "cors_origins": tuple(args.cors_origin),
    }
    ServeOptions(model_id="-", host=args.host, port=args.port, insecure=True, **limits)
    # Bound before the model loads (seconds to minutes): a busy port is one line at once, and
    # "serving on" is only said of an address this process holds.
    sock = bind_socket(args.host, args.port)
    try:
        _load_and_serve(args, api_key, sock, limits)
    finally:
        sock.close()
    return 0


def _load_and_serve(args: argparse.Namespace, api_key: str | None, sock: Any, limits: Any) -> None:
    from pldr_llm.bundle import bundle_summary, load_bundle, resolve_bundle
    from pldr_llm.serve.app import ServeOptions, find_chat_template, run_server
    from pldr_llm.serve.sizing import device_max_batch

    files = resolve_bundle(args.model)
    model_id = args.model_id or files.root.name
    model, tokenizer = load_bundle(
        files, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer
    )
    log(args, f"loaded {bundle_summary(files, model)}")
    max_batch = args.max_batch
    if max_batch is None:
        sizing = device_max_batch(model)
        max_batch = sizing.max_batch
        log(args, f"--max-batch {max_batch} ({sizing.reason})")
    options = ServeOptions(
        model_id=model_id,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=args.max_queue,
        max_body=args.max_body,
        chat_template=find_chat_template(files.root),
        engine_options={"compile": True} if args.compile else None,
        tokens_per_sync=args.tokens_per_sync,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        log_level="warning" if args.quiet else "info",
        **limits,
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log(args, f"serving '{model_id}' on http://{shown}:{port}/ (playground at /)")
    run_server(model, tokenizer, options, sock)
