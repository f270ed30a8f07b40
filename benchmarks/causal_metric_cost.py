"""Cost of ``model.causal_metric`` (issue 14): training step and leak audit, off vs on.

    python benchmarks/causal_metric_cost.py --quick            # CPU: tiny preset shapes
    python benchmarks/causal_metric_cost.py --device cuda      # GPU: 110M, batch 8 x 1024
    python benchmarks/causal_metric_cost.py --device cuda --json out.json

Times one training step (forward + backward, AdamW step excluded: it is the same either way) of
a random model with the original full-sequence metric tensor and with the causal one at several
``metric_block`` sizes, reports peak GPU memory, and times :func:`pldr_llm.deductive.leak_audit`
on one sequence. Random weights: speed does not depend on them.

Expected: the causal metric costs more than the original (it runs the metric learner and the
power law once per position instead of once per sequence); the figures say how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch
import torch.nn.functional as F

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.deductive import leak_audit
from pldr_llm.presets import load_preset


def _tiny() -> PLDRConfig:
    """The tiny preset's model, with the vocabulary its tokenizer is trained to."""
    preset = load_preset("tiny")
    return PLDRConfig(**{**preset["model"], "input_vocab_size": preset["tokenizer"]["vocab_size"]})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_time(
    model: PLDRModel, ids: torch.Tensor, repeats: int, device: torch.device
) -> tuple[float, float]:
    """(median seconds of forward + backward, peak GPU memory in GiB or 0)."""

    def step() -> None:
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset shapes, few repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--blocks", default="16,64,256")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base = _tiny() if args.quick else PLDRConfig()  # defaults: the paper's 110M configuration
    batch = args.batch or (4 if args.quick else 8)
    length = args.length or base.max_seq_len
    repeats = args.repeats or (3 if args.quick else 5)
    blocks = [int(b) for b in args.blocks.split(",")]

    torch.manual_seed(0)
    ids = torch.randint(4, base.input_vocab_size, (batch, length), device=device)
    rows = []
    for causal, block in [(False, None)] + [(True, b) for b in blocks]:
        torch.manual_seed(0)
        model = PLDRModel(dataclasses.replace(base, causal_metric=causal)).to(device, dtype)
        model.train()
        if block is not None:
            for layer in model.decoder.dec_layers:
                layer.mha1.metric_block = block
        seconds, peak = _step_time(model, ids, repeats, device)
        rows.append({"causal_metric": causal, "block": block, "step_s": seconds, "peak_gib": peak})
        del model
    audit_rows = []
    torch.manual_seed(0)
    model = PLDRModel(base).to(device, dtype).eval()
    for block in (16, 64):
        _sync(device)
        start = time.perf_counter()
        leak_audit(model, ids[0], prompt_len=length // 2, block=block)
        _sync(device)
        audit_rows.append({"block": block, "seconds": time.perf_counter() - start})

    name = "tiny" if args.quick else "110M"
    print(f"{name}: train step (fwd+bwd) on {batch} x {length} tokens, {device}, {args.dtype}")
    print(f"{'causal_metric':<14}{'block':>6}{'step s':>10}{'x off':>7}{'peak GiB':>10}")
    for row in rows:
        ratio = row["step_s"] / rows[0]["step_s"]
        print(
            f"{row['causal_metric']!s:<14}{row['block'] or '-':>6}{row['step_s']:>10.4f}"
            f"{ratio:>7.2f}{row['peak_gib']:>10.2f}"
        )
    for row in audit_rows:
        print(f"leak_audit, 1 x {length} tokens, block {row['block']}: {row['seconds']:.2f} s")
    if args.json:
        result = {
            "benchmark": "causal_metric_cost",
            "model": name,
            "batch": batch,
            "length": length,
            "device": str(device),
            "dtype": args.dtype,
            "torch": torch.__version__,
            "host": platform.processor() or platform.machine(),
            "train_step": rows,
            "leak_audit": audit_rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
