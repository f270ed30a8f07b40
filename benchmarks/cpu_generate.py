"""CPU generation throughput of a 110M-parameter PLDR-LLM (random weights).

Measures ``pldr_llm.generate`` with 1 prompt and with a batch of 8 prompts of different lengths,
64 new tokens each (end-of-text ignored, so every row produces all 64), in the cache modes asked
for (default: KV-cache and G-cache on, the original's default). Prints a table and writes JSON.

    python benchmarks/cpu_generate.py                       # 110M, batches 1 and 8, kv+g
    python benchmarks/cpu_generate.py --modes kv+g kv g none --threads 8 --out result.json

Tokens/s counts new tokens only, over the whole call (prompt pass included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.generation import generate_details

CONFIG_110M = PLDRConfig().to_hpdict()  # the defaults are the paper's 110M configuration
MODES = {
    "kv+g": (True, True),
    "kv": (True, False),
    "g": (False, True),
    "none": (False, False),
}


def prompts(batch: int, seed: int) -> list[list[int]]:
    """``batch`` prompts of 12 to 33 ids (ids 4.. so no control id appears)."""
    rng = torch.Generator().manual_seed(seed)
    lengths = [12 + (3 * i) % 22 for i in range(batch)]
    return [torch.randint(4, 32000, (n,), generator=rng).tolist() for n in lengths]


def run_once(
    model: PLDRModel, batch: list[list[int]], new: int, kv: bool, g: bool
) -> tuple[float, float]:
    """Seconds for the whole call and to the first new token."""
    first: list[float] = []
    start = time.perf_counter()

    def streamer(_ids: torch.Tensor) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    out = generate_details(
        model,
        batch,
        max_new_tokens=new,
        top_k=1,
        enable_kvcache=kv,
        enable_Gcache=g,
        stop_at_eos=False,
        streamer=streamer,
    )
    seconds = time.perf_counter() - start
    assert all(len(row) == new for row in out.new_ids)
    return seconds, first[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["kv+g"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("cpu_generate.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = PLDRConfig.from_hpdict(CONFIG_110M)
    model = PLDRModel(config).eval().to(getattr(torch, args.dtype))
    params = model.num_parameters()

    print(
        f"PLDR-LLM {params / 1e6:.1f}M parameters, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    header = (
        f"{'mode':<6} {'prompts':>7} {'new tok':>8} {'seconds':>8} {'1st tok s':>9} "
        f"{'tok/s':>8} {'ms/step':>8}"
    )
    print(header)
    print("-" * len(header), flush=True)

    rows = []
    for mode in args.modes:
        kv, g = MODES[mode]
        for size in args.batches:
            batch = prompts(size, seed=size)
            run_once(model, batch, 4, kv, g)  # warm-up: allocator, kernels
            timings = [run_once(model, batch, args.new_tokens, kv, g) for _ in range(args.repeats)]
            seconds = statistics.median(t for t, _ in timings)
            first = statistics.median(f for _, f in timings)
            new_total = size * args.new_tokens
            row = {
                "mode": mode,
                "prompts": size,
                "prompt_lengths": [len(p) for p in batch],
                "new_tokens_per_prompt": args.new_tokens,
                "seconds": round(seconds, 4),
                "first_token_s": round(first, 4),
                "tokens_per_s": round(new_total / seconds, 2),
                "ms_per_step": round(1000 * seconds / args.new_tokens, 2),
            }
            rows.append(row)
            print(
                f"{mode:<6} {size:>7} {new_total:>8} {seconds:>8.2f} {first:>9.3f} "
                f"{row['tokens_per_s']:>8.1f} {row['ms_per_step']:>8.1f}",
                flush=True,
            )

    result = {
        "benchmark": "cpu_generate",
        "config": CONFIG_110M,
        "parameters": params,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
