"""CPU forward-pass benchmark of the 110M PLDR-LLM configuration (issue: model core speed).

    python benchmarks/cpu_forward.py [--length 512] [--repeats 5] [--json out.json]

Prints a table (seconds per forward pass of 1 x length tokens, eager and SDPA attention) and
writes the figures as JSON. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pldr_llm import PLDRConfig, PLDRModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default="cpu_forward.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig()).eval()  # defaults are the paper's 110M configuration
    ids = torch.randint(4, model.config.input_vocab_size, (1, args.length))
    rows = []
    with torch.inference_mode():
        for implementation in ("eager", "sdpa"):
            model.attn_implementation = implementation
            model(ids)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(ids)
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "attention": implementation,
                    "best_s": min(times),
                    "median_s": sorted(times)[len(times) // 2],
                }
            )
    print(
        f"110M forward, 1 x {args.length} tokens, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"{'attention':<10} {'best s':>8} {'median s':>9}")
    for row in rows:
        print(f"{row['attention']:<10} {row['best_s']:>8.3f} {row['median_s']:>9.3f}")
    result = {
        "benchmark": "cpu_forward_110M",
        "length": args.length,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "parameters": model.num_parameters(),
        "rows": rows,
    }
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
