"""The `pldr-llm generate` CLI: a configuration's first call and N later calls.

The same subprocess call as ``decode_speed.py``'s CLI rows (110M configuration, random weights,
prompts of about 32 tokens, 256 new tokens), for fp32 and bf16, at batch 1 greedy by default,
beside the original implementation's decoding loop in the same run. Empty Triton's cache first
(``rm -rf ~/.triton/cache``) for the first call to include the kernels' compilation.

    python benchmarks/decode_cli_calls.py --anchor .anchor --json cli_calls.json
    python benchmarks/decode_cli_calls.py --prompts 1,64 --sampling greedy,top-p --json all.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import anchor_run, build, cli_run, prompt_texts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", type=Path, default=None, help="the shared anchor folder")
    parser.add_argument("--later", type=int, default=3, help="later calls per dtype (default 3)")
    parser.add_argument("--prompts", default="1", help="prompt counts, one CLI batch each: 1,64")
    parser.add_argument("--sampling", default="greedy", help="greedy and/or top-p (0.9)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    counts = [int(c) for c in args.prompts.split(",")]
    samplings = [s.strip() for s in args.sampling.split(",")]
    if not set(samplings) <= {"greedy", "top-p"}:
        raise SystemExit("--sampling takes greedy and/or top-p")
    if not torch.cuda.is_available():
        raise SystemExit("decode_cli_calls.py times the CLI on a CUDA GPU")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _, tokenizer = build(False, folder)
        for count in counts:
            texts = prompt_texts(tokenizer, count, 32)
            for sampling in samplings:
                for dtype in ("float32", "bfloat16"):
                    for call in ["first"] + ["later"] * args.later:
                        timing = cli_run(folder, "cuda", dtype, sampling, texts, 256, False)
                        row = {"prompts": count, "sampling": sampling, "dtype": dtype, "call": call}
                        results["rows"].append({**row, **timing})
                        rate = timing.get("tokens_per_s", timing.get("error"))
                        print(
                            f"{count:3} {sampling:6} {dtype:9} {call:6} {rate!s:>9} tok/s  "
                            f"seconds {timing.get('seconds')}  wait "
                            f"{timing.get('warm_up_wait_seconds')}  capture "
                            f"{timing.get('capture_seconds')}  process "
                            f"{timing.get('process_seconds')}",
                            flush=True,
                        )
        if args.anchor is not None:
            results["original"] = anchor_run(args.anchor, False, torch.device("cuda"), 256)
            print(f"original implementation: {results['original']['tokens_per_s']} tok/s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
