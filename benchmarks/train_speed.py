"""Training speed of the product: ``pldr-llm train`` itself, timed from its ``metrics.jsonl``.

Runs ``python -m pldr_llm train --preset paper-110m`` as a subprocess, with no speed flag (the
defaults), then once per variant with one lever turned off, with the eager path (the original's
arithmetic, every lever off) and with the DAG loss, at batch 32 and 16 (context 1024). Each run
logs every 10 steps; the figure is the median interval tokens/s of steps 50-150 and the peak GPU
memory. Beside them, in the same call: the same-size transformers Llama (a baseline only, trained
by a minimal loop with the same levers) and, with ``--anchor DIR``, the original implementation's
training step (``DIR/bench_original.py``: not in the repository, it comes from the project's
shared data folder ``anchor/``, with the original's model files from the authors' KV/G-cache
repository, commit 8e8658f; without ``--anchor`` that column is left out). ``--world 2`` also
runs the defaults under torchrun on 2 GPUs (FSDP2; each strategy of ``--strategies``) and reports
tokens/s per GPU against one GPU. ``--context N`` trains at N tokens per sequence (the model's
``max_seq_len`` raised to N where shorter); the variants ``ckpt_layer`` and ``ckpt_selective``
(only when named) turn activation checkpointing on; the MFU is reported where the run logs one.

    python benchmarks/train_speed.py --json train_speed.json
    python benchmarks/train_speed.py --anchor .anchor --world 2 --json train_speed.json
    python benchmarks/train_speed.py --quick          # CPU, tiny preset, seconds
    # long context (110M) and the 1B preset, one GPU:
    python benchmarks/train_speed.py --context 8192 --batches 4 --variants default,ckpt_layer
    python benchmarks/train_speed.py --preset pldr-1b --batches 8 --variants default,ckpt_layer \
        --no-llama
    # FSDP2 scaling on 2 GPUs, each strategy (with and without CUDA graphs) against one GPU:
    python benchmarks/train_speed.py --batches 16 --variants default,no_cuda_graphs --no-llama \
        --world 2 --strategies FULL_SHARD,HYBRID_SHARD,NO_SHARD --world-variants default,graphs

The JSON (``--json``) holds every run's figures and command; the table comes last on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: name -> extra command-line flags (the defaults have none)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no_chunked_loss": ["--train.chunked_loss", "false"],
    "no_compile_layers": ["--train.compile_layers", "false"],
    "no_cuda_graphs": ["--train.cuda_graphs", "false"],
    "no_fused_optimizer": ["--train.fused_optimizer", "false"],
    "eager": [
        "--train.attn_implementation", "eager", "--train.chunked_loss", "false",
        "--train.compile_layers", "false", "--train.fused_optimizer", "false",
    ],
    "dag": ["--DAG_reg_coeffs", "0.05", "0.05", "0.05"],
    "ckpt_layer": ["--train.activation_checkpointing", "layer"],
    "ckpt_selective": ["--train.activation_checkpointing", "selective"],
}  # fmt: skip
#: multi-GPU runs (``--world``): name -> extra flags, each run under every ``--strategies``
WORLD_VARIANTS: dict[str, list[str]] = {
    "default": [],
    # CUDA graphs are off under FSDP by default (FSDP2 re-gathers parameters at new addresses
    # every step, and CUDA-graph trees answer by re-recording): measures what they give anyway
    "graphs": ["--train.cuda_graphs", "true"],
    "bf16_reduce": ["--train.fsdp_reduce_dtype", "bfloat16"],
}
#: the variants run by default (the checkpointing ones only when asked for)
DEFAULT_VARIANTS = [name for name in VARIANTS if not name.startswith("ckpt_")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset on the CPU, seconds")
    parser.add_argument("--preset", default=None, help="default: paper-110m (tiny with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (160)")
    parser.add_argument("--window", type=int, nargs=2, default=None, help="steps timed (50 150)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (32,16)")
    parser.add_argument(
        "--context", type=int, default=None, help="tokens per sequence (default: the preset's)"
    )
    parser.add_argument("--variants", default=None, help=f"comma-separated of {list(VARIANTS)}")
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama baseline")
    parser.add_argument("--anchor", default=None, help="folder with bench_original.py")
    parser.add_argument("--world", type=int, default=1, help="also run on this many GPUs")
    parser.add_argument(
        "--strategies", default="FULL_SHARD", help="FSDP strategies for --world (comma-separated)"
    )
    parser.add_argument(
        "--world-variants",
        default="default",
        help=f"comma-separated of {list(WORLD_VARIANTS)}, for --world (default: default)",
    )
    parser.add_argument("--out", default=None, help="run folders (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument(
        "--curve",
        action="store_true",
        help="instead: the defaults against eager, every step logged (--steps, first batch), "
        "and their loss curves compared step by step",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.preset = args.preset or ("tiny" if quick else "paper-110m")
    args.steps = args.steps or (12 if quick else 160)
    args.window = tuple(args.window or ((4, 12) if quick else (50, 150)))
    args.log_every = 1 if args.curve else (2 if quick else 10)
    args.batches = [int(b) for b in (args.batches or ("2" if quick else "32,16")).split(",")]
    names = (args.variants or ("default,eager" if quick else ",".join(DEFAULT_VARIANTS))).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variants = names
    args.world_variants = args.world_variants.split(",")
    unknown = [n for n in args.world_variants if n not in WORLD_VARIANTS]
    if unknown:
        parser.error(f"unknown world variants {unknown}; choose from {list(WORLD_VARIANTS)}")
    return args


def window_figures(metrics: Path, window: tuple[int, int]) -> dict[str, Any]:
    """Median interval tokens/s (and MFU) of the intervals ending in (lo, hi]; peak memory."""
    from pldr_llm.train.metrics import read_metrics

    records = [r for r in read_metrics(metrics) if "event" not in r]
    lo, hi = window
    timed = [r for r in records if r.get("tokens_per_s") and lo < r["step"] <= hi]
    out: dict[str, Any] = {"intervals": len(timed)}
    if timed:
        out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
        out["interval_tokens_per_s"] = [round(r["tokens_per_s"]) for r in timed]
        mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
        if mfus:
            out["mfu"] = statistics.median(mfus)
    memories = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
    if memories:
        out["peak_memory_gib"] = max(memories)
    if records:
        out["last_step"] = records[-1]["step"]
        out["last_loss"] = records[-1]["loss"]
    return out


def preset_context(name: str) -> int:
    """The preset's model context (``max_seq_len``)."""
    from pldr_llm.presets import load_preset

    return int(load_preset(name)["model"]["max_seq_len"])


def run_cli(
    args: argparse.Namespace, root: Path, name: str, flags: list[str], batch: int, world: int = 1
) -> dict[str, Any]:
    """One ``pldr-llm train`` run in a fresh folder; its figures from metrics.jsonl."""
    out = root / f"{name}_b{batch}_w{world}"
    command = [
        "-m", "pldr_llm", "train", "--preset", args.preset, "--out", str(out),
        "--max-steps", str(args.steps), "--train.batch_size", str(batch),
        "--train.log_every", str(args.log_every), "--train.save_at_end", "false",
        "--train.export_pth", "false", "--train.tensorboard", "false",
        "--train.val_every", "null", "--progress", "false", *flags,
    ]  # fmt: skip
    if args.context:
        command += ["--train.context_length", str(args.context)]
        command += ["--model.max_seq_len", str(max(args.context, preset_context(args.preset)))]
    if args.quick:
        command += ["--train.device", "cpu"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc-per-node={world}", *command]
    else:
        command = [sys.executable, *command]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    proc = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
    )
    result: dict[str, Any] = {
        "name": name,
        "batch": batch,
        "world": world,
        "command": " ".join(command[1:] if world == 1 else command),
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - started,
    }
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout)[-2000:]
    if (out / "metrics.jsonl").is_file():
        result.update(window_figures(out / "metrics.jsonl", args.window))
    print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
    return result


def world_runs(
    args: argparse.Namespace, root: Path, single: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every strategy x world variant on ``args.world`` GPUs, each with its tokens/s per GPU over
    one GPU's defaults (``per_gpu_scaling``) and over one GPU without CUDA graphs
    (``per_gpu_vs_no_graphs``, when the ``no_cuda_graphs`` variant ran): FSDP runs without
    graphs by default, so the second figure separates the graphs from the communication."""
    rows = []
    for strategy in args.strategies.split(","):
        for variant in args.world_variants:
            flags = ["--train.fsdp_sharding_strategy", strategy, *WORLD_VARIANTS[variant]]
            suffix = "" if variant == "default" else f"_{variant}"
            for batch in args.batches:
                name = f"fsdp_{strategy.lower()}{suffix}"
                row = run_cli(args, root, name, flags, batch, args.world)
                per_gpu = (row.get("tokens_per_s") or 0.0) / args.world
                for key, base in (
                    ("per_gpu_scaling", "default"),
                    ("per_gpu_vs_no_graphs", "no_cuda_graphs"),
                ):
                    one = [r for r in single if r["name"] == base and r["batch"] == batch]
                    if per_gpu and one and one[0].get("tokens_per_s"):
                        row[key] = per_gpu / one[0]["tokens_per_s"]
                rows.append(row)
    return rows


def llama_baseline(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """The same-size transformers Llama: bf16 autocast, fused AdamW, clip by value 1.0, each
    decoder layer compiled; the same synthetic batches. A baseline, not the product."""
    import torch
    from _data import markov_batches
    from _llama import llama_like, llama_train_step

    from pldr_llm.presets import load_preset

    preset = load_preset(args.preset)
    context = args.context or int(preset["train"]["context_length"])
    model = llama_like(preset["model"], context, bos_token_id=1, eos_token_id=None)
    device = model.device
    for layer in model.model.layers:
        layer.compile(dynamic=False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, fused=True
    )
    lo, hi = args.window
    data = markov_batches(hi, batch, context, model.config.vocab_size)
    started = None
    losses = []
    for step in range(hi):
        ids = data[step].to(device, non_blocking=True)
        loss = llama_train_step(model, optimizer, ids)
        losses.append(loss.detach())
        if step + 1 == lo:
            torch.cuda.synchronize()
            started = time.perf_counter()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "name": "llama",
        "batch": batch,
        "world": 1,
        "tokens_per_s": (hi - lo) * batch * context / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "last_loss": float(losses[-1]),
    }


def anchor_figures(anchor: Path, timeout: int) -> dict[str, Any]:
    """The original implementation's training step (``bench_original.py``'s REF_RESULT)."""
    proc = subprocess.run(
        [sys.executable, str(anchor.resolve() / "bench_original.py")],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=anchor,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("REF_RESULT "):
            return json.loads(line[len("REF_RESULT ") :])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def format_table(results: list[dict[str, Any]], batches: list[int]) -> str:
    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "-"
        if row.get("tokens_per_s") is None:
            return "failed"
        text = f"{row['tokens_per_s'] / 1e3:,.1f}k"
        if row.get("peak_memory_gib") is not None:
            text += f" ({row['peak_memory_gib']:.1f} GiB)"
        if row.get("mfu") is not None:
            text += f" MFU {row['mfu']:.3f}"
        if row.get("per_gpu_scaling") is not None:
            text += f" {row['per_gpu_scaling']:.0%}/GPU"
        if row.get("per_gpu_vs_no_graphs") is not None:
            text += f" ({row['per_gpu_vs_no_graphs']:.0%} of no graphs)"
        return text

    names: list[tuple[str, int]] = []
    for row in results:
        key = (row["name"], row.get("world", 1))
        if key not in names:
            names.append(key)
    header = "| run | " + " | ".join(f"tokens/s, batch {b}" for b in batches) + " |"
    lines = [header, "|" + " --- |" * (len(batches) + 1)]
    for name, world in names:
        cells = []
        for b in batches:
            match = [
                r for r in results if r["name"] == name and r.get("world", 1) == world
                and r["batch"] == b
            ]  # fmt: skip
            cells.append(cell(match[0] if match else None))
        label = name if world == 1 else f"{name} x{world} GPUs"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_losses(metrics: Path) -> dict[int, float]:
    """The loss of every logged step of a run (log_every 1: every step)."""
    from pldr_llm.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(metrics) if "event" not in r}


def compare_curves(args: argparse.Namespace) -> int:
    """``--curve``: the defaults and eager from the same weights on the same batches."""
    batch = args.batches[0]
    with tempfile.TemporaryDirectory(prefix="train-curve-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        runs = {
            name: run_cli(args, root, name, VARIANTS[name], batch) for name in ("default", "eager")
        }
        if any(r["returncode"] != 0 for r in runs.values()):
            print(json.dumps(runs, indent=1))
            return 1
        default = step_losses(root / f"default_b{batch}_w1" / "metrics.jsonl")
        eager = step_losses(root / f"eager_b{batch}_w1" / "metrics.jsonl")
    steps = sorted(set(default) & set(eager))
    diffs = [abs(default[s] - eager[s]) for s in steps]
    last = steps[-50:]
    report = {
        "argv": sys.argv[1:],
        "preset": args.preset,
        "batch": batch,
        "steps": len(steps),
        "first_loss": [default[steps[0]], eager[steps[0]]],
        "last_loss": [default[steps[-1]], eager[steps[-1]]],
        "max_abs_diff": max(diffs),
        "max_abs_diff_step": steps[diffs.index(max(diffs))],
        "first_three_max_abs_diff": max(diffs[:3]),
        "last50_mean": [
            statistics.fmean(default[s] for s in last),
            statistics.fmean(eager[s] for s in last),
        ],
        "default": {s: default[s] for s in steps},
        "eager": {s: eager[s] for s in steps},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k not in ("default", "eager")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.curve:
        return compare_curves(args)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for batch in args.batches:
            for name in args.variants:
                results.append(run_cli(args, root, name, VARIANTS[name], batch))
        if args.world > 1:
            results += world_runs(args, root, results)
    if not args.quick and not args.no_llama:
        for batch in args.batches:
            try:
                results.append(llama_baseline(args, batch))
            except Exception as error:  # noqa: BLE001 - a baseline must not sink the run
                results.append({"name": "llama", "batch": batch, "error": repr(error)[:500]})
    if args.anchor:
        original = anchor_figures(Path(args.anchor), args.timeout)
        for batch in args.batches:
            figures = dict(original.get(f"train_b{batch}") or {})
            figures.setdefault("peak_memory_gib", figures.get("peak_gib"))
            results.append({"name": "original", "batch": batch, **figures})
    report = {
        "argv": sys.argv[1:] if argv is None else argv,
        "preset": args.preset,
        "context": args.context or preset_context(args.preset),
        "steps": args.steps,
        "window": list(args.window),
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(format_table(results, args.batches))
    failed = [r for r in results if r.get("returncode", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
