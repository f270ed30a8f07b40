"""The `pldr-llm generate` CLI at batch 1, greedy: a configuration's first call and N later calls.

The same subprocess call as ``decode_speed.py``'s CLI rows (110M configuration, random weights,
a 32-token prompt, 256 new tokens), for fp32 and bf16, beside the original implementation's
decoding loop in the same run. Empty Triton's cache first (``rm -rf ~/.triton/cache``) for the
first call to include the kernels' compilation.

    python benchmarks/decode_cli_calls.py --anchor .anchor --json cli_calls.json
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
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_cli_calls.py times the CLI on a CUDA GPU")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _, tokenizer = build(False, folder)
        texts = prompt_texts(tokenizer, 1, 32)
        for dtype in ("float32", "bfloat16"):
            for call in ["first"] + ["later"] * args.later:
                timing = cli_run(folder, "cuda", dtype, "greedy", texts, 256, False)
                results["rows"].append({"dtype": dtype, "call": call, **timing})
                print(
                    f"{dtype:9} {call:6} {timing.get('tokens_per_s', timing.get('error'))!s:>9} "
                    f"tok/s  wait {timing.get('warm_up_wait_seconds')}  capture "
                    f"{timing.get('capture_seconds')}  process {timing.get('process_seconds')}",
                    flush=True,
                )
        if args.anchor is not None:
            results["original"] = anchor_run(args.anchor, False, torch.device("cuda"), 256)
            print(f"original implementation: {results['original']['tokens_per_s']} tok/s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
