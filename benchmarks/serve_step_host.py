"""Host time per decoding step of ``pldr-llm serve``'s worker, in-process (CPU or GPU).

    python benchmarks/serve_step_host.py --rows 64,256 [--penalties] [--breakdown] [--profile 25]
    python benchmarks/serve_step_host.py --device cuda --dtype bfloat16 --model M --kernels 20

It builds the tiny model of ``serve_load.py --quick`` (random weights, seed 0, a tokenizer
trained on the repository's docs), makes the server's :class:`~pldr_llm.serve.scheduler.Scheduler`
with ``--max-batch`` rows and the server's default tokens per sync, queues that many sequences at
once (``serve_load.py``'s requests: temperature 1, a seed each, ``ignore_eos``; ``--penalties``:
presence and frequency penalties 0.5 and a ``logit_bias`` of 11 ids) and runs the worker's loop
(``_admit``, then ``_turn`` and ``_flush``) on this thread until they are all done, with events delivered
to a queue as the event loop would take them.

The step's own computation -- :meth:`StepGraphs.run`, a graph replay on a GPU, here the tiny
model's layers op by op -- is timed apart and subtracted: what is left is the worker's host work
(collecting the report, building the step outputs, routing tokens to their sequences,
detokenizing, stop checks, logprobs, events), which on a GPU is what the device waits for. The
host time per step is that work over the steps it served (``--breakdown``: also the part in
``Scheduler._route``, handing tokens to sequences, and in their detokenizers' ``push`` within
it); the prefill of the arriving sequences (``_admit``) is reported apart. The best of
``--repeats`` runs is kept. ``--profile N`` prints the N functions with the most own time
(cProfile) of one more run.

On a GPU (``--device cuda``) the timed computation synchronizes after each block, so that it is
the device's time for the block's steps (the server overlaps a block with the host's routing of
the previous one; here they are apart, to see each); ``--kernels N`` prints the N device
kernels with the most time over one more run (torch.profiler; its steps launched op by op).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_model  # noqa: E402

from pldr_llm.bundle import load_bundle  # noqa: E402
from pldr_llm.serve.app import DEFAULT_TOKENS_PER_SYNC  # noqa: E402
from pldr_llm.serve.completions import sampling_params  # noqa: E402
from pldr_llm.serve.protocol import parse_completion  # noqa: E402
from pldr_llm.serve.scheduler import GenSequence, Scheduler  # noqa: E402

PENALTIES = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {str(t): -100 for t in range(100, 110)} | {"42": 2.0},
}


class Loop:
    """Stands for the server's event loop: runs what the worker hands it at once."""

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        fn(*args)


class Events:
    """Stands for a request's event queue: counts what arrives."""

    def __init__(self) -> None:
        self.count = 0
        self.finished = 0

    def put_nowait(self, event: Any) -> None:
        self.count += 1
        self.finished += event.finish_reason is not None


def sequences(model: Any, tokenizer: Any, rows: int, max_tokens: int, penalties: bool) -> list:
    """``rows`` sequences as the server makes them from serve_load's request bodies."""
    loop, events = Loop(), Events()
    out = []
    vocab = int(model.config.input_vocab_size)
    for i in range(rows):
        body: dict[str, Any] = {
            "model": "bench",
            "prompt": f"Client {i} round 0: the power law graph attention",
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "seed": 1000 * i,
            "logprobs": 0,
            "ignore_eos": True,
        }
        if penalties:
            body |= PENALTIES
        req = parse_completion(body, vocab)
        ids = tokenizer.prompt_ids(req.prompts[0])
        params = sampling_params(req, req.seed or 0, max_tokens)
        params.validate()
        out.append(GenSequence(ids, params, req.stop, tokenizer, loop, events))  # type: ignore[arg-type]
    return out


def timed(owner: Any, name: str, spent: dict[str, float], key: str) -> None:
    """Wrap ``owner.name`` (a method or function) so that its seconds add to ``spent[key]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def run_once(
    scheduler: Scheduler,
    seqs: list,
    profile: cProfile.Profile | None = None,
    breakdown: bool = False,
) -> dict[str, float]:
    """Serve ``seqs`` to the end on this thread: seconds of admission, of the step's own
    computation and of the rest (with ``breakdown``: of which routing tokens to their
    sequences, and of that detokenizing), and the steps and tokens served."""
    engine = scheduler._engine_for((True, True))
    graphs = engine.graphs
    spent = {"compute": 0.0, "steps": 0, "route": 0.0, "detokenize": 0.0}
    run = graphs.run

    device = engine.model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)

    def timed_run(variant: Any, count: int, **kwargs: Any) -> None:
        sync(device)  # on a GPU: what was queued before (a prefill) is not the step's
        start = time.perf_counter()
        run(variant, count, **kwargs)
        sync(device)
        spent["compute"] += time.perf_counter() - start
        spent["steps"] += count

    graphs.run = timed_run  # type: ignore[method-assign]
    if breakdown:  # the wrappers' own cost (~0.3 us a call) counts as host time
        timed(scheduler, "_route", spent, "route")
        for seq in seqs:
            timed(seq.detok, "push", spent, "detokenize")
    tokens_before = scheduler.metrics.completion_tokens
    scheduler.submit(seqs)
    try:
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        scheduler._admit()
        admitted = time.perf_counter()
        while scheduler._running or scheduler._in_flight or scheduler._waiting:
            scheduler._turn()  # collect, admit, launch, route: the worker's turn
            scheduler._flush()
        end = time.perf_counter()
        if profile is not None:
            profile.disable()
    finally:
        del graphs.run
        vars(scheduler).pop("_route", None)
    decoding = end - admitted
    return {
        "admit_s": admitted - start,
        "decode_s": decoding,
        "compute_s": spent["compute"],
        "host_s": decoding - spent["compute"],
        "route_s": spent["route"],
        "detokenize_s": spent["detokenize"],
        "steps": spent["steps"],
        "tokens": scheduler.metrics.completion_tokens - tokens_before,
    }


def measure(folder: Path, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_bundle(str(folder), device=args.device, dtype=args.dtype)
    scheduler = Scheduler(
        model, tokenizer, max_batch=rows, max_queue=rows, tokens_per_sync=args.tokens_per_sync
    )
    # A warm-up run (the first steps of each variant, the allocator), then the timed ones.
    run_once(scheduler, sequences(model, tokenizer, rows, 8, args.penalties))
    runs = [
        run_once(
            scheduler,
            sequences(model, tokenizer, rows, args.max_tokens, args.penalties),
            breakdown=args.breakdown,
        )
        for _ in range(args.repeats)
    ]
    best = min(runs, key=lambda r: r["host_s"])
    assert best["tokens"] == rows * args.max_tokens, best
    row = {
        "rows": rows,
        "penalties": args.penalties,
        "max_tokens": args.max_tokens,
        "tokens_per_sync": args.tokens_per_sync,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()},
        "host_ms_per_step": round(1000 * best["host_s"] / best["steps"], 3),
        "host_us_per_token": round(1e6 * best["host_s"] / best["tokens"], 2),
        "compute_ms_per_step": round(1000 * best["compute_s"] / best["steps"], 3),
        **(
            {
                "route_ms_per_step": round(1000 * best["route_s"] / best["steps"], 3),
                "detokenize_ms_per_step": round(1000 * best["detokenize_s"] / best["steps"], 3),
            }
            if args.breakdown
            else {}
        ),
        "host_ms_per_step_runs": [round(1000 * r["host_s"] / r["steps"], 3) for r in runs],
    }
    if args.profile:
        profile = cProfile.Profile()
        run_once(
            scheduler,
            sequences(model, tokenizer, rows, args.max_tokens, args.penalties),
            profile,
        )
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(args.profile)
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        # Steps launched op by op (no graph), so that each kernel is listed by name; a kernel
        # takes the same device time inside a graph, which only removes the launch gaps.
        eager = Scheduler(
            model, tokenizer, max_batch=rows, max_queue=rows,
            tokens_per_sync=args.tokens_per_sync, engine_options={"cuda_graph": False},
        )  # fmt: skip
        run_once(eager, sequences(model, tokenizer, rows, 8, args.penalties))
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities) as prof:
            run_once(eager, sequences(model, tokenizer, rows, args.max_tokens, args.penalties))
        print(f"rows {rows}: device kernels over {args.max_tokens} steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="64,256", help="comma-separated --max-batch values")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tokens-per-sync", type=int, default=DEFAULT_TOKENS_PER_SYNC)
    parser.add_argument("--penalties", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, help="print the N top functions")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time routing and detokenizing apart"
    )
    parser.add_argument("--model", help="model folder (default: build serve_load's tiny one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="as serve --dtype (default: the model's)")
    parser.add_argument(
        "--kernels", type=int, default=0, help="print the N device kernels with the most time"
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else build_model(Path(tmp), quick=True)
        rows = [measure(folder, int(n), args) for n in args.rows.split(",")]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
