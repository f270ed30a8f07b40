"""Helpers of the serve tests: a tiny published-style bundle, a live server in a thread and a
``pldr-llm serve`` subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support import PAPER_VOCAB_HP, free_port

REPO = Path(__file__).resolve().parents[1]

# A tokenizer trained here (600 pieces, byte fallback, the original's conventions) on the
# repository's own docs, and a tiny model with random weights: a decoding step of 16 rows takes
# a few milliseconds on a CPU, and random weights sample many byte-fallback pieces (which tests
# the streamed text's UTF-8 handling).
VOCAB = 600
HP = {**PAPER_VOCAB_HP, "input_vocab_size": VOCAB, "max_seq_len": 96}
MODEL_ID = "PLDRv51-Tiny-1"


def build_bundle(root: Path, hp: dict[str, Any] | None = None) -> Path:
    """A pldr-llm model folder (config.json, model.safetensors, tokenizer.model)."""
    import torch

    from pldr_llm import PLDRConfig, PLDRModel
    from pldr_llm.tokenizer import train_tokenizer

    corpus = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
    tokenizer = train_tokenizer(corpus, VOCAB, root / "tokenizer" / "tok", seed=0, progress=False)
    folder = root / MODEL_ID
    torch.manual_seed(0)
    PLDRModel(PLDRConfig.from_hpdict(hp or HP)).eval().save(folder)
    tokenizer.save(folder)
    return folder


@contextmanager
def live_server(
    folder: Path, device: str = "cpu", dtype: str | None = None, **options: Any
) -> Iterator[tuple[str, Any]]:
    """``(base_url, app)`` of a server on a free 127.0.0.1 port, stopped (drained) at exit."""
    import uvicorn

    from pldr_llm.bundle import load_bundle
    from pldr_llm.serve import ServeOptions, create_app

    model, tokenizer = load_bundle(str(folder), device=device, dtype=dtype)
    app = create_app(model, tokenizer, ServeOptions(model_id=MODEL_ID, **options))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def wait_until_healthy(
    proc: subprocess.Popen, url: str, timeout: float, what: str = "the server"
) -> None:
    """Until ``url/health`` answers 200; fails at once if ``proc`` exits (with its stderr), or
    after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{what} did not start"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


@contextmanager
def serve_process(folder: Path, *args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """A ``pldr-llm serve`` subprocess of ``folder`` on a free loopback port, answering
    ``/health`` when entered, killed at exit if still up."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pldr_llm", "serve", "--model", str(folder), "--port", str(port)]
        + list(args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", 120)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
