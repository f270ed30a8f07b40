"""Issue 25's (and 24's) server targets in one run: ``serve_load.py`` for each load, a table.

    python benchmarks/serve_targets.py --model M --json-dir results/   # one GPU, bf16
    python benchmarks/serve_targets.py --quick                         # CPU smoke: tiny model

Each load starts its own server with no tuning flags (``--max-batch 0``: the server sizes
itself) and 256 new tokens a request: 64 streams x 4 rounds, the same with penalties and a
``logit_bias`` on every request, 256 streams x 4, 256 streams x 4 asking for logprobs, and 1,024
streams x 1. The table gives tokens/s, the server's time to first token p50 and the errors, next
to the targets (GPU only: on the CPU the targets do not apply). Exit status 1 when a load had
errors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (serve_load.py arguments, target tokens/s, target server TTFT p50 in ms)
LOADS: dict[str, tuple[list[str], float | None, float | None]] = {
    "64 streams x 4": (["--clients", "64", "--rounds", "4"], 40_000.0, 100.0),
    "64 x 4, penalties": (["--clients", "64", "--rounds", "4", "--penalties"], None, None),
    "256 streams x 4": (["--clients", "256", "--rounds", "4"], 100_000.0, 250.0),
    "256 x 4, logprobs": (["--clients", "256", "--rounds", "4", "--logprobs"], None, None),
    "1,024 streams x 1": (["--clients", "1024", "--rounds", "1"], None, None),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: serve_load.py builds one)")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model, 64 tokens")
    parser.add_argument("--json-dir", help="keep each load's JSON here")
    args = parser.parse_args()
    device = ["--device", "cpu"] if args.quick else ["--device", "cuda", "--dtype", "bfloat16"]
    common = [*device, "--max-batch", "0", "--max-tokens", "64" if args.quick else "256"]
    if args.quick:
        common.append("--quick")
    if args.model:
        common += ["--model", args.model]
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.json_dir or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (name, (load, target, ttft_target)) in enumerate(LOADS.items()):
            out = out_dir / f"serve_target_{i}.json"
            cmd = [sys.executable, str(HERE / "serve_load.py"), *common, *load, "--json", str(out)]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
            result = json.loads(out.read_text()) if out.exists() else {"errors": "no result"}
            failed |= result.get("errors") != 0
            rows.append((name, result, target, ttft_target))
    plain_64 = rows[0][1].get("tokens_per_s") or 0.0
    print("| load | tokens/s | target | server TTFT p50 (ms) | target | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, result, target, ttft_target in rows:
        tokens = result.get("tokens_per_s")
        shown = f"{tokens:,.0f}" if tokens else "-"
        if name.endswith("penalties") and tokens and plain_64:
            shown += f" ({100 * (tokens / plain_64 - 1):+.1f}%)"  # issue 24: within 10%
        print(
            f"| {name} | {shown} | {'' if args.quick or not target else f'{target:,.0f}'} "
            f"| {result.get('server_ttft_ms_p50', '-')} "
            f"| {'' if args.quick or not ttft_target else ttft_target} | {result.get('errors')} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
