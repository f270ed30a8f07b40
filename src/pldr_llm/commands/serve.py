"""``pldr-llm serve``: an OpenAI-compatible server for one model (see docs/serving.md)."""

from __future__ import annotations

import argparse
import os

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
        "--max-batch", type=int, default=16, metavar="N", help="sequences decoded together (16)"
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
        help="decoding steps per host sync while no request waits for a slot; 1: one sync per "
        "token (16)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step")
    p.add_argument("--quiet", "-q", action="store_true", help="no logs on stderr")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM / Ctrl-C."""
    if args.max_batch < 1:
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

    from pldr_llm.bundle import bundle_summary, load_bundle, resolve_bundle
    from pldr_llm.serve.app import (
        ServeOptions,
        check_listen_address,
        find_chat_template,
        run_server,
    )

    # Before a hub model is downloaded or any model loaded (ServeOptions checks it again).
    check_listen_address(args.host, args.port, api_key, args.insecure)
    files = resolve_bundle(args.model)
    model_id = args.model_id or files.root.name
    options = ServeOptions(
        model_id=model_id,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body=args.max_body,
        chat_template=find_chat_template(files.root),
        engine_options={"compile": True} if args.compile else None,
        tokens_per_sync=args.tokens_per_sync,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        log_level="warning" if args.quiet else "info",
    )
    model, tokenizer = load_bundle(
        files, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer
    )
    log(args, f"loaded {bundle_summary(files, model)}")
    log(args, f"serving '{model_id}' on http://{args.host}:{args.port}/ (playground at /)")
    run_server(model, tokenizer, options)
    return 0
