"""Time of one admission into the server's decoding engine, in-process, with nothing else running.

    python benchmarks/serve_admission.py --model M --device cuda --dtype bfloat16
    python benchmarks/serve_admission.py            # CPU: serve_load.py's tiny model

The server admits arriving sequences with :meth:`DecodeEngine.add_many` (their prompts' pass,
the caches, the first token), on the engine ``pldr-llm serve`` makes (256 slots by default on a
GPU, the KV- and G-cache on, log-probabilities kept). This times that call for batches of
``--prompts`` prompts of 11-14 tokens (sampled rows, ``serve_load.py``'s parameters): the host's
time until the call returns, and until the device has finished it too. The median of
``--repeats`` after two unmeasured calls. A time that hardly grows with the batch is host-bound
(the prompt pass's kernel launches), which is why the server prefills arriving prompts together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pldr_llm import load_model
from pldr_llm.core.engine_cache import EngineSpec, lend_engine
from pldr_llm.generation import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: serve_load.py's tiny one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--slots", type=int, default=256, help="the engine's rows (256)")
    parser.add_argument("--prompts", default="1,4,16,64", help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--uncaptured-metric",
        action="store_true",
        help="run the prompt pass's metric learner op by op (as before core.metric_graphs)",
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = Path(args.model)
        else:
            from serve_load import build_model  # this folder's load test: its tiny model

            folder = build_model(Path(tmp), quick=True)
        model = load_model(folder, map_location=args.device).to(getattr(torch, args.dtype))
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = EngineSpec(args.slots, None, kv=True, g=True, output_logprobs=True)
    engine = lend_engine(model, spec)
    if args.uncaptured_metric:
        engine.metric_graphs = None
    engine.warm_up(steps=[16], prompt_rows=args.slots)  # as the server warms up
    vocab = model.config.input_vocab_size
    rows = []
    for n in (int(x) for x in args.prompts.split(",")):
        prompts = [[5 + (i * 7 + j) % (vocab - 5) for j in range(11 + i % 4)] for i in range(n)]
        params = [SamplingParams(max_new_tokens=64, seed=i, stop_at_eos=False) for i in range(n)]
        host, total = [], []
        for r in range(args.repeats + 2):
            sync()
            start = time.perf_counter()
            slots = engine.add_many(prompts, params)
            returned = time.perf_counter()
            sync()
            done = time.perf_counter()
            for slot in slots:
                engine.release(slot)
            if r >= 2:
                host.append(returned - start)
                total.append(done - start)
        row = {
            "prompts": n,
            "host_ms": round(1000 * statistics.median(host), 2),
            "with_device_ms": round(1000 * statistics.median(total), 2),
        }
        rows.append(row)
        print(row)
    if args.json:
        captured = not args.uncaptured_metric
        result = {"device": args.device, "captured_metric": captured, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
