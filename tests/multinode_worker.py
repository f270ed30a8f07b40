"""One rank of the two-"node" run of tests/test_multinode.py, started by ``torchrun`` (not a test).

It joins the process group the way ``pldr-llm train`` does (``setup_distributed``, from torchrun's
environment), trains ``STEPS`` steps on its half of each global batch with FSDP2, and rank 0
writes the losses to ``OUT/losses.json``. The test imports the model, config and batches from here
so that its single-process reference trains the same thing.

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \\
        tests/multinode_worker.py OUT STRATEGY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from support import FSDP_HP as HP

STEPS = 20
GLOBAL_BATCH = 4


def model():
    """The model, in float64 (see the module docstring of tests/test_multinode.py)."""
    from pldr_llm import PLDRConfig, PLDRModel

    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.from_hpdict(HP)).double()


def config(strategy: str = "FULL_SHARD"):
    from pldr_llm.train import TrainConfig

    return TrainConfig(
        learning_rate=1e-3,
        warmup_steps=2,
        lr_total_steps=STEPS,
        global_batch_size=GLOBAL_BATCH,
        device="cpu",
        fsdp_sharding_strategy=strategy,
    )


def global_batches() -> list[torch.Tensor]:
    """``STEPS`` global batches [4, 13] of learnable rows (arithmetic sequences from random
    starts, so the loss falls); rank 0's half has padding, rank 1's none (a mean of per-rank
    means would then differ from the global token mean)."""
    gen = torch.Generator().manual_seed(7)
    vocab = HP["input_vocab_size"]
    out = []
    for step in range(STEPS):
        start = torch.randint(4, vocab, (GLOBAL_BATCH, 1), generator=gen)
        batch = (start + 3 * torch.arange(13)) % (vocab - 4) + 4
        batch[0, 9 + step % 3 :] = 0
        out.append(batch)
    return out


def main(out_dir: str, strategy: str) -> None:
    from pldr_llm.train import Trainer
    from pldr_llm.train.distributed import cleanup_distributed, setup_distributed

    torch.set_num_threads(1)
    env = setup_distributed("cpu", timeout_s=120)
    try:
        trainer = Trainer(model(), config(strategy), env=env)
        assert trainer.sharded and env.world_size == 2 and env.local_world_size == 1
        half = GLOBAL_BATCH // env.world_size
        losses = []
        for batch in global_batches():
            result = trainer.train_step(batch[env.rank * half : (env.rank + 1) * half])
            losses.append([result["loss"], result["tokens"], result["lr"]])
        if env.is_main:
            Path(out_dir, "losses.json").write_text(json.dumps(losses))
    finally:
        cleanup_distributed(env)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
