"""Training throughput of the paper's 110M PLDR-LLM on 1 or N GPUs, and a resume across GPU counts.

Trains the 110M configuration (5 layers, d_model 896, 14 heads, dff 2389, A_dff 170, 8 residual
metric units of 2 GLUs, vocabulary 32000, context 1024, batch 16 per GPU) with the project's
trainer (FSDP2 under torchrun with 2+ processes, bf16 autocast), times the steps after a warm-up,
and prints tokens/s per GPU and peak GPU memory as a table; ``--json`` also writes them to a file.

    torchrun --nproc-per-node 1 benchmarks/train_gpu.py --steps 60 --json one.json
    torchrun --nproc-per-node 2 benchmarks/train_gpu.py --steps 60 --json two.json \\
        --save-at 30 --ckpt-dir /tmp/ck110m
    # resume the 2-GPU checkpoint of step 30 on one GPU with the same global batch (32) and compare
    # the losses of steps 31..60 with the 2-GPU run's:
    torchrun --nproc-per-node 1 benchmarks/train_gpu.py --steps 60 --global-batch 32 \\
        --resume-from /tmp/ck110m --compare two.json --json resume.json

Data: ``synthetic`` (default) is a fixed random first-order Markov chain over the vocabulary
(every global batch is a function of the step number, so any GPU count sees the same global batch
and the loss falls quickly); ``corpus`` is the embedded corpus through the real data pipeline, as
UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from pldr_llm.core.config import PLDRConfig

PAPER_110M = PLDRConfig().to_hpdict()  # the defaults are the paper's 110M configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps in total (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed first steps (default 10)")
    p.add_argument("--batch", type=int, default=16, help="sequences per GPU per step (default 16)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per step over all GPUs (default: batch x GPUs); split into micro-batches "
        "of --batch on each GPU",
    )
    p.add_argument("--context", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smoke tests)")
    p.add_argument("--data", choices=("synthetic", "corpus"), default="synthetic")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10, help="LR warm-up steps (default 10)")
    p.add_argument("--lr-total-steps", type=int, default=250_000)
    p.add_argument("--sharding", default="FULL_SHARD", help="fsdp_sharding_strategy")
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save-at", type=int, default=None, help="save a checkpoint after this step")
    p.add_argument("--ckpt-dir", default=None, help="run folder for --save-at / --resume-from")
    p.add_argument("--resume-from", default=None, help="resume from this run folder's checkpoint")
    p.add_argument("--compare", default=None, help="JSON of another run: compare common steps")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", help="auto (GPU if any), cuda or cpu")
    return p.parse_args(argv)


class MarkovBatches:
    """Global batch of step s: rows of a fixed random Markov chain (seeded by s), same on any world."""

    def __init__(self, vocab: int, context: int, seed: int, branching: int = 8) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.length = vocab, context + 1
        # each token has `branching` likely successors: the loss can fall to about ln(branching)
        self.successors = torch.randint(4, vocab, (vocab, branching), generator=gen)
        self.seed = seed

    def global_batch(self, step: int, size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = torch.empty(size, self.length, dtype=torch.long)
        out[:, 0] = torch.randint(4, self.vocab, (size,), generator=gen)
        choice = torch.randint(0, self.successors.shape[1], (size, self.length), generator=gen)
        for t in range(1, self.length):
            out[:, t] = self.successors[out[:, t - 1], choice[:, t]]
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pldr_llm.core.model import PLDRModel
    from pldr_llm.train import TrainConfig, Trainer
    from pldr_llm.train.checkpointing import CheckpointManager
    from pldr_llm.train.distributed import cleanup_distributed, setup_distributed

    env = setup_distributed(args.device)
    world, rank = env.world_size, env.rank
    global_batch = args.global_batch or args.batch * world
    if global_batch % world or (global_batch // world) % args.batch:
        raise SystemExit(f"--global-batch {global_batch} must be a multiple of GPUs x --batch")
    accum = global_batch // world // args.batch

    hp = dict(PAPER_110M, max_seq_len=max(args.context, 16))
    if args.layers is not None:
        hp["num_layers"] = args.layers
    torch.manual_seed(args.seed)
    model = PLDRModel(PLDRConfig.from_hpdict(hp))
    n_params = model.num_parameters()
    cfg = TrainConfig(
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_total_steps=args.lr_total_steps,
        global_batch_size=global_batch,
        grad_accum_steps=accum,
        disable_amp=args.no_amp,
        fsdp_sharding_strategy=args.sharding,
        compile=args.compile,
        device=args.device,
        seed=args.seed,
    )
    trainer = Trainer(model, cfg, env=env)
    device = trainer.device
    start = 0
    if args.resume_from:
        manager = CheckpointManager(args.resume_from, env)
        latest = manager.latest()
        if latest is None:
            raise SystemExit(f"no complete checkpoint in {args.resume_from}")
        loaded = manager.load(latest, trainer.model, trainer.optimizer)
        trainer.load_state_dict(loaded.trainer_state["trainer"])
        start = trainer.step
        if rank == 0:
            print(
                f"resumed step {start} from {latest} (saved by {loaded.saved_world_size} GPU(s)) "
                f"on {world} GPU(s)",
                file=sys.stderr,
            )

    if args.data == "synthetic":
        source = MarkovBatches(hp["input_vocab_size"], args.context, args.seed)

        def next_batch(step: int) -> torch.Tensor:
            rows = source.global_batch(step, global_batch)
            per_rank = global_batch // world
            return rows[rank * per_rank : (rank + 1) * per_rank]
    else:
        from pldr_llm.data import BatchIterator, ByteTokenizer, ListSource, default_corpus

        stream = BatchIterator(
            ListSource(default_corpus()),
            ByteTokenizer(),
            batch_size=global_batch // world,
            sample_length=args.context + 1,
            batch_agg_count=4,
            rank=rank,
            world_size=world,
        )

        def next_batch(step: int) -> torch.Tensor:
            return next(stream)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    tokens_per_step_rank = (global_batch // world) * args.context
    for step in range(start, args.steps):
        batch = next_batch(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if step - start >= args.warmup:
            times.append(elapsed)
        losses.append([trainer.step, result["loss"], result["lr"]])
        if rank == 0 and (trainer.step % 10 == 0 or trainer.step == args.steps):
            print(
                f"step {trainer.step:5d} loss {result['loss']:.4f} lr {result['lr']:.2e} "
                f"{elapsed * 1000:.0f} ms",
                file=sys.stderr,
                flush=True,
            )
        if args.save_at is not None and trainer.step == args.save_at:
            if not args.ckpt_dir:
                raise SystemExit("--save-at needs --ckpt-dir")
            CheckpointManager(args.ckpt_dir, env).save(
                trainer.step,
                trainer.model,
                trainer.optimizer,
                {"trainer": trainer.state_dict()},
                {},
            )
            if rank == 0:
                print(f"saved step {trainer.step} in {args.ckpt_dir}", file=sys.stderr)

    step_time = statistics.median(times) if times else float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    peaks = torch.tensor([peak], device=device)
    if world > 1:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    result = {
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": n_params,
        "config": hp,
        "global_batch": global_batch,
        "micro_batch_per_gpu": args.batch,
        "grad_accum_steps": accum,
        "context": args.context,
        "amp_bf16": trainer.amp,
        "fsdp": trainer.sharded,
        "sharding": args.sharding if trainer.sharded else None,
        "timed_steps": len(times),
        "step_time_s": step_time,
        "tokens_per_s_per_gpu": tokens_per_step_rank / step_time if times else None,
        "tokens_per_s_total": tokens_per_step_rank * world / step_time if times else None,
        "peak_memory_gib": float(peaks.item()),
        "losses": losses,
        "first_step": start + 1,
    }
    if rank == 0:
        _print_table(result)
        if args.compare:
            result["comparison"] = _compare(result, json.loads(Path(args.compare).read_text()))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    cleanup_distributed(env)
    ok = result.get("comparison", {}).get("ok", True)
    return 0 if ok else 1


def _print_table(r: dict) -> None:
    rows = [
        ("GPUs", f"{r['world_size']} x {r['device']}"),
        ("parameters", f"{r['parameters'] / 1e6:.1f}M"),
        (
            "global batch",
            f"{r['global_batch']} x {r['context']} tokens (accum {r['grad_accum_steps']})",
        ),
        ("precision", "bf16 autocast" if r["amp_bf16"] else "float32"),
        ("FSDP2", r["sharding"] or "no (1 process)"),
        ("step time (median)", f"{r['step_time_s'] * 1000:.1f} ms over {r['timed_steps']} steps"),
        (
            "tokens/s per GPU",
            f"{r['tokens_per_s_per_gpu']:,.0f}" if r["tokens_per_s_per_gpu"] else "-",
        ),
        ("tokens/s total", f"{r['tokens_per_s_total']:,.0f}" if r["tokens_per_s_total"] else "-"),
        ("peak memory / GPU", f"{r['peak_memory_gib']:.2f} GiB"),
        ("final loss", f"{r['losses'][-1][1]:.4f}" if r["losses"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


def _compare(mine: dict, other: dict) -> dict:
    """Losses of the steps both runs made (e.g. a resumed run against the uninterrupted one)."""
    theirs = {int(s): loss for s, loss, _ in other.get("losses", [])}
    pairs = [(int(s), loss, theirs[int(s)]) for s, loss, _ in mine["losses"] if int(s) in theirs]
    if not pairs:
        return {"ok": False, "reason": "no common steps"}
    diffs = [abs(a - b) for _, a, b in pairs]
    # bf16 autocast on different GPU counts sums in a different order: allow its noise
    tolerance = 5e-2 if mine.get("amp_bf16") else 1e-3
    ok = max(diffs) <= tolerance and all(math.isfinite(a) for _, a, _ in pairs)
    print(
        f"compared {len(pairs)} common steps ({pairs[0][0]}..{pairs[-1][0]}): max |loss diff| "
        f"{max(diffs):.2e} (first step {diffs[0]:.2e}), tolerance {tolerance:.0e}: "
        f"{'OK' if ok else 'MISMATCH'}"
    )
    return {"ok": ok, "steps": len(pairs), "max_abs_diff": max(diffs), "first_diff": diffs[0]}


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
