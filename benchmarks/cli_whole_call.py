"""The whole call of ``pldr-llm generate``, from the process's start to its exit (issue 25).

Runs ``python -m pldr_llm generate --model X --prompt P -n N --top-k 1 --timing -q`` as a
subprocess ``--runs`` times per model folder and per source tree (``--src``, the ``src`` folder
of a checkout, put first on ``PYTHONPATH``; several are run in turn, call by call, so that a
busy machine slows them alike), and prints, per folder and tree, the median wall time of the
process, the median user + system CPU seconds of the process, and the median of each phase of
its ``--timing`` line (those phases only where the tree reports them).

Without ``--model`` it builds the 110M configuration (``PLDRConfig()``, random weights, seed 0)
with the paper's tokenizer, once in the project's format and once as a published bundle
(``.pth`` + hyperparameters file), in a temporary folder.

    python benchmarks/cli_whole_call.py --runs 3 --json cli_call.json
    python benchmarks/cli_whole_call.py --src ../before/src --src src --model runs/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests/data/paper/tokenizer/refinedweb-tokenizer-model-pldrllm-kvg-cache-paper"
PHASES = (
    "startup", "parse", "import", "resolve", "tokenizer", "weights", "device",
    "warm_up_wait", "capture", "generation", "total",
)  # fmt: skip


def build_110m(folder: Path) -> list[Path]:
    """The 110M configuration with random weights: the project's format and a published bundle."""
    import shutil

    import torch

    from pldr_llm import PLDRConfig, PLDRModel, save_reference_checkpoint

    config = PLDRConfig()
    torch.manual_seed(0)
    model = PLDRModel(config).eval()
    own = model.save(folder / "own-110m")
    shutil.copy(f"{TOKENIZER}.model", own / "tokenizer.model")
    published = folder / "published-110m"
    published.mkdir()
    save_reference_checkpoint(model, published / "PLDRv51-110M-model-checkpoint.pth")
    lines = ["hpdict={"] + [f"{k!r}: {v!r}," for k, v in config.to_hpdict().items()] + ["}"]
    (published / "PLDRv51_110M_hyperparameters.py").write_text("\n".join(lines) + "\n")
    shutil.copy(f"{TOKENIZER}.model", published / "tokenizer.model")
    return [own, published]


def one_call(src: Path, folder: Path, prompt: str, new: int, device: str) -> dict:
    """One ``pldr-llm generate`` process: its wall and CPU seconds and its --timing line."""
    command = [
        sys.executable, "-m", "pldr_llm", "generate", "--model", str(folder), "--prompt", prompt,
        "-n", str(new), "--top-k", "1", "--device", device, "--timing", "-q",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    timing = json.loads(result.stderr.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "text": result.stdout, **timing}


def summary(calls: list[dict]) -> dict:
    """Medians of the calls' wall, CPU and phase seconds (the phases a call reports)."""
    out = {
        "calls": len(calls),
        "wall_seconds": round(statistics.median(c["wall"] for c in calls), 3),
        "walls": [round(c["wall"], 3) for c in calls],
        "cpu_seconds": round(statistics.median(c["cpu"] for c in calls), 3),
    }
    for phase in PHASES:
        key = "seconds" if phase == "generation" and "generation_seconds" not in calls[0] else ""
        key = key or f"{phase}_seconds"
        if key in calls[0]:
            out[f"{phase}_seconds"] = round(statistics.median(c[key] for c in calls), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, action="append", help="src folder(s) (default: ./src)")
    parser.add_argument("--model", type=Path, action="append", help="model folder(s)")
    parser.add_argument("--runs", type=int, default=3, help="calls per folder and tree (3)")
    parser.add_argument("--prompt", default="The list of things")
    parser.add_argument("--new", type=int, default=40, help="new tokens (40)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    trees = args.src or [ROOT / "src"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = args.model or build_110m(Path(tmp))
        for folder in folders:
            calls: dict[Path, list[dict]] = {tree: [] for tree in trees}
            for _ in range(args.runs):
                for tree in trees:
                    calls[tree].append(one_call(tree, folder, args.prompt, args.new, args.device))
            texts = {c["text"] for tree_calls in calls.values() for c in tree_calls}
            for tree, tree_calls in calls.items():
                row = {"model": folder.name, "src": str(tree), **summary(tree_calls)}
                row["same_text_everywhere"] = len(texts) == 1
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
