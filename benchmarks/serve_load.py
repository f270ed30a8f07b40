"""Load test of ``pldr-llm serve``: N concurrent streaming clients on localhost.

    # the issue's GPU setting: the 110M configuration (random init, seed 0) on one GPU
    python benchmarks/serve_load.py --device cuda --dtype bfloat16 --clients 64 --max-tokens 256 \\
        --min-tokens-per-s 20000 --json serve_load_gpu.json
    # CPU smoke run: a tiny model, 32 clients, zero errors
    python benchmarks/serve_load.py --quick

It starts ``python -m pldr_llm serve`` on a free 127.0.0.1 port (a separate process, so that the
clients do not share the server's interpreter), waits for ``/health``, then runs ``--clients``
concurrent streaming ``/v1/completions`` requests of ``--max-tokens`` tokens each (``ignore_eos``,
so every request makes exactly that many), ``--rounds`` times per client, from ``--client-procs``
processes (one per 64 clients: a single Python client cannot read a busy GPU server's chunks as
fast as they come, and would measure itself). It reports the
aggregate tokens/s (all completion tokens / wall time of the whole load), p50/p99 time to first
token and inter-token latency, the error count, how busy the client processes and the server's
threads were (CPU seconds per second of load, from /proc), then stops the server with SIGTERM. Bounded:
every request has a timeout, and ``--time-limit`` caps the whole run. Exit status 1 when there
were errors or ``--min-tokens-per-s`` was not reached.

Without ``--model`` it builds the model folder itself in a temporary directory: the 110M
configuration (or with ``--quick`` a tiny one) with random weights (seed 0) and a tokenizer trained
on this repository's docs (the text is random either way; speed does not depend on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "num_layers": 2,
    "d_model": 64,
    "num_heads": 4,
    "dff": 96,
    "A_dff": 24,
    "num_reslayerA": 2,
    "num_denseA": 2,
    "input_vocab_size": 2000,
    "max_seq_len": 256,
}


def build_model(folder: Path, quick: bool) -> Path:
    """A model folder: random weights (seed 0), a tokenizer trained on the repository's docs."""
    import torch

    from pldr_llm import PLDRConfig, PLDRModel
    from pldr_llm.tokenizer import train_tokenizer

    corpus = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
    tokenizer = train_tokenizer(corpus, 2000, folder / "tok" / "tokenizer", seed=0, progress=False)
    torch.manual_seed(0)
    config = PLDRConfig.from_hpdict(TINY) if quick else PLDRConfig()
    target = folder / ("tiny" if quick else "pldr-110m")
    PLDRModel(config).eval().save(target)
    tokenizer.save(target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


TTFT_METRIC = "pldr_time_to_first_token_seconds"
ITL_METRIC = "pldr_inter_token_latency_seconds"


def metric_value(text: str, name: str) -> float:
    """The value of the Prometheus sample ``name`` (no labels) in ``text``, 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def histogram_quantile(before: str, after: str, name: str, q: float) -> float | None:
    """The ``q`` quantile (0-1) of the Prometheus histogram ``name`` over the observations made
    between two ``/metrics`` texts, interpolated linearly inside its bucket as Prometheus's
    ``histogram_quantile`` does (None without observations)."""

    def buckets(text: str) -> list[tuple[float, float]]:
        out = []
        for line in text.splitlines():
            if line.startswith(name + "_bucket{le="):
                bound = line.split('"')[1]
                out.append(
                    (float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1]))
                )
        return out

    counts = [(b, n - m) for (b, n), (_, m) in zip(buckets(after), buckets(before))]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # past the last finite bound: its lower edge, as Prometheus
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def worker_breakdown(before: str, after: str) -> dict[str, Any]:
    """The server worker's decoding steps between two ``/metrics`` texts, and its seconds per
    phase over them as milliseconds a step: where a step's time went (collect: the worker
    waited for the device; the rest is host work, or idle)."""

    # Imported here: the client processes import this module and need no torch.
    from pldr_llm.serve.metrics import WORKER_PHASES

    def delta(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    steps = delta("pldr_decode_steps_total")
    per_step = {
        phase: round(1000 * delta(f'pldr_worker_seconds_total{{phase="{phase}"}}') / steps, 3)
        for phase in WORKER_PHASES
    } if steps else {}  # fmt: skip
    return {"server_steps": int(steps), "server_worker_ms_per_step": per_step}


async def one_request(
    client: Any, url: str, body: dict[str, Any], timeout: float, exact: bool
) -> dict:
    """One streamed completion: token count, time to first token, inter-token gaps.

    ``exact`` (the request asks for logprobs): each chunk lists its tokens, so every token gets
    its own gap. Otherwise the count comes from the final usage chunk, the time to first token
    from the first chunk with text, and no gaps (the server's histogram has them)."""
    start = time.perf_counter()
    first = None
    last = None
    gaps: list[float] = []
    tokens = 0
    events = 0  # SSE events with data (the chunks, [DONE] not counted)
    done = False
    async with client.stream("POST", url, json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            events += 1
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            now = time.perf_counter()
            if not exact:
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and any(c.get("text") for c in chunk["choices"]):
                    first = now - start
                continue
            n = sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in chunk["choices"])
            if n == 0:
                continue
            tokens += n
            if first is None:
                first = now - start
                gaps.extend([0.0] * (n - 1))  # tokens that arrived with the first one
            else:
                gaps.extend([(now - last) / n] * n)  # a chunk of n tokens: n equal gaps
            last = now
    if not done:
        return {"error": "the stream ended without [DONE]"}
    return {"ttft": first, "gaps": gaps, "tokens": tokens, "events": events}


def request_body(args: argparse.Namespace, model_id: str, i: int, r: int) -> dict[str, Any]:
    """Client ``i``'s request of round ``r``."""
    body = {
        "model": model_id,
        "prompt": f"Client {i} round {r}: the power law graph attention",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": 1000 * i + r,
        "stream": True,
        "ignore_eos": True,
    }
    if args.logprobs:
        body["logprobs"] = 0  # each chunk lists its tokens: exact token counts and gaps
    else:
        body["stream_options"] = {"include_usage": True}  # the count, in the last chunk
    if args.penalties:  # the sampling stage on every row, as issue #24 measures it
        body |= {
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {str(t): -100 for t in range(100, 110)} | {"42": 2.0},
        }
    return body


async def client_requests(
    args: argparse.Namespace, base: str, model_id: str, clients: range
) -> list[dict]:
    """The requests of ``clients`` (each ``args.rounds`` in turn), all clients at once."""
    import httpx

    url = base + "/v1/completions"
    n = len(clients)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n)
    results: list[dict] = []
    async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:

        async def client_loop(i: int) -> None:
            for r in range(args.rounds):
                body = request_body(args, model_id, i, r)
                try:
                    results.append(
                        await one_request(client, url, body, args.request_timeout, args.logprobs)
                    )
                except Exception as exc:  # counted, not raised: a load test reports errors
                    results.append({"error": f"{type(exc).__name__}: {exc}"})

        await asyncio.wait_for(asyncio.gather(*(client_loop(i) for i in clients)), args.time_limit)
    return results


def share_results(args: argparse.Namespace, base: str, model_id: str, clients: range) -> list[dict]:
    """:func:`client_requests` run to the end; past the time limit every request of the share
    counts as failed (a load test reports errors, it does not raise them)."""
    try:
        return asyncio.run(client_requests(args, base, model_id, clients))
    except Exception as exc:
        return [{"error": f"{type(exc).__name__}: {exc}"}] * (len(clients) * args.rounds)


def client_process(
    args: argparse.Namespace, base: str, model_id: str, clients: range, barrier: Any, out: Any
) -> None:
    """One client process (``--client-procs``): its share of the clients, started together
    with the others' (``barrier``, passed twice: all ready, then go once the parent has read
    the server's counters); puts (results, start, end, its CPU seconds) on ``out``."""
    import httpx  # noqa: F401 - imported before the start, not inside the timed load

    barrier.wait(120)
    barrier.wait(120)
    start, cpu = time.monotonic(), time.process_time()
    results = share_results(args, base, model_id, clients)
    out.put((results, start, time.monotonic(), time.process_time() - cpu))


def run_clients(
    args: argparse.Namespace,
    base: str,
    model_id: str,
    on_ready: Callable[[], None],
    on_done: Callable[[], None],
) -> tuple[list[dict], float, list[float]]:
    """Every client's requests, over ``args.client_procs`` processes (a single client process
    cannot parse the chunks of a busy GPU server fast enough: it would measure itself): the
    results, the wall time from the first start to the last end, each process's CPU seconds.
    ``on_ready`` runs just before the first request (the processes started: their start-up
    is not in the server's counters), ``on_done`` as soon as the last one is answered (before
    the processes exit)."""
    procs = max(1, min(args.client_procs, args.clients))
    if procs == 1:
        on_ready()
        start, cpu = time.monotonic(), time.process_time()
        results = share_results(args, base, model_id, range(args.clients))
        on_done()
        return results, time.monotonic() - start, [time.process_time() - cpu]
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no state of the parent (torch) inherited
    barrier, out = context.Barrier(procs + 1), context.Queue()  # the parent waits too
    shares = [range(p, args.clients, procs) for p in range(procs)]
    workers = [
        context.Process(target=client_process, args=(args, base, model_id, share, barrier, out))
        for share in shares
    ]
    for w in workers:
        w.start()
    barrier.wait(120)  # all started
    on_ready()
    barrier.wait(120)  # go
    parts = [out.get(timeout=args.time_limit + 120) for _ in workers]
    on_done()
    for w in workers:
        w.join(30)
    results = [r for part in parts for r in part[0]]
    wall = max(p[2] for p in parts) - min(p[1] for p in parts)
    return results, wall, [p[3] for p in parts]


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of process ``pid``: its main thread (the server's event loop) and all its
    other threads together (the decoding worker, torch's), from /proc (Linux; {} elsewhere or
    when the process is gone): the scheduler's nanosecond run time (``schedstat``) where the
    kernel keeps it, else user + system time in clock ticks (10 ms: coarse for a short load)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds = {"main_thread": 0.0, "other_threads": 0.0}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            used = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            try:
                text = (task / "stat").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            fields = text[text.rindex(")") + 2 :].split()  # after the name: state is field 3
            used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime: fields 14 and 15
        seconds["main_thread" if task.name == str(pid) else "other_threads"] += used
    return seconds


def run_load(
    args: argparse.Namespace,
    base: str,
    model_id: str,
    on_ready: Callable[[], None] = lambda: None,
    on_done: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The load (see the module's docstring) and its summary (``on_ready``, ``on_done``: see
    :func:`run_clients`)."""
    results, wall, client_cpu = run_clients(args, base, model_id, on_ready, on_done)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
    return {
        "clients": args.clients,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "penalties": args.penalties,
        "logprobs": args.logprobs,
        "requests": len(results),
        "errors": len(errors),
        "error_examples": errors[:3],
        "completion_tokens": tokens,
        "sse_events": sum(r["events"] for r in ok),
        "short_requests": sum(1 for r in ok if r["tokens"] != args.max_tokens),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p99": ms(percentile(gaps, 99)),
        "itl_ms_mean": ms(statistics.fmean(gaps)) if gaps else None,
        # Busy share of each client process (near 1.0: the client, not the server, set the pace).
        "client_procs": len(client_cpu),
        "client_cpu_busy_max": round(max(client_cpu) / wall, 3) if wall > 0 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build one, see above)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 32 x 64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=None, help="default: 64 (quick: 32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 256 (quick: 64)")
    parser.add_argument("--rounds", type=int, default=1, help="requests per client (1)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="default: --clients; 0: none passed (the server sizes it to the device)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--logprobs",
        action="store_true",
        help="every request asks for logprobs (exact per-token gaps; more work for the server)",
    )
    parser.add_argument("--compile", action="store_true", help="serve --compile")
    parser.add_argument(
        "--penalties",
        action="store_true",
        help="every request sets presence/frequency penalties and a logit_bias",
    )
    parser.add_argument(
        "--tokens-per-sync", type=int, default=None, help="serve --tokens-per-sync (its default)"
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=None,
        help="client processes (default: one per 64 clients, at most 8)",
    )
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--time-limit", type=float, default=540.0, help="cap on the load (s)")
    parser.add_argument("--min-tokens-per-s", type=float, default=None)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.clients = args.clients or (32 if args.quick else 64)
    args.max_tokens = args.max_tokens or (64 if args.quick else 256)
    args.client_procs = args.client_procs or min(8, -(-args.clients // 64))
    if not (1 <= args.clients <= 1024 and 1 <= args.rounds <= 100):
        parser.error("--clients must be in [1, 1024] and --rounds in [1, 100]")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_model(Path(tmp), args.quick)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "pldr_llm", "serve", "--model", str(folder)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", args.device]
        cmd += ["--dtype", args.dtype]
        if args.max_batch != 0:
            cmd += ["--max-batch", str(args.max_batch or args.clients)]
        cmd += ["--max-queue", str(args.clients * 2), "--model-id", "bench", "-q"]
        if args.compile:
            cmd.append("--compile")
        if args.tokens_per_sync is not None:
            cmd += ["--tokens-per-sync", str(args.tokens_per_sync)]
        # The repository's sources first, keeping whatever the caller's PYTHONPATH adds.
        paths = [
            str(REPO / "src"),
            *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        server = subprocess.Popen(cmd, env=env)
        try:
            import httpx

            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with status {server.returncode}")
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start within 300 s")
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            # Warm-up (CUDA-graph capture, compilation, allocator): one short request per slot,
            # long enough for the blocks of several steps per sync to be captured too.
            warm = argparse.Namespace(**{**vars(args), "max_tokens": 16, "rounds": 1})
            run_load(warm, base, "bench")
            # The server's counters (its /metrics, its threads' CPU seconds) just before the
            # load and just after it.
            snapshots: list[tuple[str, dict[str, float]]] = []

            def snapshot() -> None:
                metrics_text = httpx.get(base + "/metrics", timeout=10).text
                snapshots.append((metrics_text, thread_cpu_seconds(server.pid)))

            result = run_load(args, base, "bench", snapshot, snapshot)
            (before, cpu_before), (metrics, cpu_after) = snapshots
            # The server's busy share per thread over the load: its main thread runs the event
            # loop (HTTP, JSON, SSE); the others are the decoding worker (and torch's threads).
            result["server_cpu_busy"] = {
                name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / result["wall_s"], 3)
                for name in cpu_after
            }
            # The server's own view of the timed run's time to first token (from the request's
            # arrival at the scheduler to its first routed token): what the HTTP path adds is
            # the difference to the clients' figure.
            count = metric_value(metrics, TTFT_METRIC + "_count") - metric_value(
                before, TTFT_METRIC + "_count"
            )
            total = metric_value(metrics, TTFT_METRIC + "_sum") - metric_value(
                before, TTFT_METRIC + "_sum"
            )
            result["server_ttft_ms_mean"] = round(1000 * total / count, 2) if count else None
            p50 = histogram_quantile(before, metrics, TTFT_METRIC, 0.5)
            result["server_ttft_ms_p50"] = round(1000 * p50, 2) if p50 is not None else None
            p50 = histogram_quantile(before, metrics, ITL_METRIC, 0.5)
            result["server_itl_ms_p50"] = round(1000 * p50, 3) if p50 is not None else None
            # The event loop's CPU time per request and per SSE event (chunk) of the load: what
            # its thread takes from the worker's share of the interpreter lock.
            loop_cpu = cpu_after["main_thread"] - cpu_before.get("main_thread", 0.0)
            result["server_loop_cpu_s"] = round(loop_cpu, 4)
            result["server_loop_cpu_us_per_request"] = round(1e6 * loop_cpu / result["requests"], 1)
            events = max(1, result["sse_events"])
            result["server_loop_cpu_us_per_event"] = round(1e6 * loop_cpu / events, 2)
            result |= worker_breakdown(before, metrics)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    import torch

    result.update(
        {
            "model": str(args.model or ("tiny (random)" if args.quick else "110M (random)")),
            "device": args.device,
            "dtype": args.dtype,
            "temperature": args.temperature,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "server_metrics_ttft_count": next(
                (
                    line.split()[-1]
                    for line in metrics.splitlines()
                    if line.startswith("pldr_time_to_first_token_seconds_count")
                ),
                None,
            ),
        }
    )
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    failed = result["errors"] > 0 or result["short_requests"] > 0
    if args.min_tokens_per_s is not None and (result["tokens_per_s"] or 0) < args.min_tokens_per_s:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
