"""Where a training step's time goes: ``torch.profiler`` over the product's step, beside the Llama.

Builds the paper's 110M PLDR-LLM and a :class:`pldr_llm.train.Trainer` with the defaults of
``pldr-llm train`` (every speed lever on), warms it up (compilation, CUDA-graph capture), then
profiles a few steps of ``Trainer.step_async`` exactly as ``fit`` runs them (figures read back
once at the end). Beside it, the same-shape transformers Llama trained as a user would write it
(bf16 autocast, SDPA, fused AdamW, the model compiled), profiled the same way. For each it prints:

- wall time per step and GPU busy time per step (the union of kernel intervals): their
  difference is what the GPU waits for the host;
- kernel launches per step;
- the operators with the most host (CPU) time and the most device time.

    python benchmarks/profile_train_step.py --batches 16,32 --out prof/

Needs a CUDA GPU. Writes ``summary.json`` and one text table per run under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="16,32", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=30, help="steps before profiling")
    p.add_argument("--steps", type=int, default=6, help="profiled steps")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--dag", action="store_true", help="also profile with the DAG loss")
    p.add_argument("--out", default="prof", help="folder for the tables and summary.json")
    return p.parse_args(argv)


def busy_time_us(events: list[Any]) -> float:
    """Union of the device kernels' intervals (overlapping kernels counted once)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
    )
    total, end = 0.0, float("-inf")
    for s, t in spans:
        if s > end:
            total += t - s
            end = t
        elif t > end:
            total += t - end
            end = t
    return total


def profile(name: str, step: Any, steps: int, out: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    events = prof.events()
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy = busy_time_us(events) / 1e6 / steps
    averages = prof.key_averages()
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=40)
    cuda_table = averages.table(sort_by="self_device_time_total", row_limit=40)
    (out / f"{name}.txt").write_text(
        f"# {name}: wall {wall * 1e3:.2f} ms/step, GPU busy {busy * 1e3:.2f} ms/step, "
        f"{len(kernels) / steps:.0f} kernels/step\n\n## by self CPU time\n{cpu_table}\n\n"
        f"## by self device time\n{cuda_table}\n"
    )
    # Also time without the profiler (its own overhead inflates host time).
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps * 3):
        step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t0) / (steps * 3)
    row = {
        "name": name,
        "wall_ms_profiled": wall * 1e3,
        "wall_ms": plain * 1e3,
        "gpu_busy_ms": busy * 1e3,
        "kernels_per_step": len(kernels) / steps,
    }
    print(json.dumps(row), flush=True)
    return row


def pldr_step(batch: int, context: int, dag: bool) -> Any:
    import torch
    from _data import markov_batches

    from pldr_llm.core.config import PLDRConfig
    from pldr_llm.core.model import PLDRModel
    from pldr_llm.train import TrainConfig, Trainer

    hp = dict(PLDRConfig().to_hpdict(), max_seq_len=context)
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.from_hpdict(hp))
    extra: dict[str, Any] = {"dag_reg_coeffs": [0.05, 0.05, 0.05]} if dag else {}
    cfg = TrainConfig(global_batch_size=batch, device="cuda", **extra)
    trainer = Trainer(model, cfg)
    data = markov_batches(8, batch, context, hp["input_vocab_size"])
    prepared = [trainer.prepare_batch(b) for b in data]
    state = {"i": 0, "pending": []}

    def step() -> None:
        state["pending"].append(trainer.step_async(prepared[state["i"] % len(prepared)]))
        state["i"] += 1
        if len(state["pending"]) >= 10:  # fit reads a log interval of figures at once
            trainer.read_steps(state["pending"])
            state["pending"] = []

    return step


def llama_step(batch: int, context: int) -> Any:
    import torch
    from _data import markov_batches
    from _llama import llama_like, llama_train_step

    from pldr_llm.core.config import PLDRConfig

    model = llama_like(PLDRConfig().to_hpdict(), context)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = [b.to(model.device) for b in markov_batches(8, batch, context, model.config.vocab_size)]
    state = {"i": 0}

    def step() -> None:
        ids = data[state["i"] % len(data)]
        state["i"] += 1
        llama_train_step(model, optimizer, ids, forward=compiled)

    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("profile_train_step.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        makers = [(f"pldr_b{batch}", lambda b=batch: pldr_step(b, args.context, False))]
        if args.dag:
            makers.append((f"pldr_dag_b{batch}", lambda b=batch: pldr_step(b, args.context, True)))
        if not args.no_llama:
            makers.append((f"llama_b{batch}", lambda b=batch: llama_step(b, args.context)))
        for name, make in makers:
            step = make()
            for _ in range(args.warmup):
                step()
            rows.append(dict(profile(name, step, args.steps, out), batch=batch))
            del step
            torch.cuda.empty_cache()
    (out / "summary.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "rows": rows}, indent=2) + "\n"
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
