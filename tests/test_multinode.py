"""Two "nodes" on loopback: two ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d``
launchers (one process each, gloo) rendezvous and train like one process on the same global
batch: 20 steps, losses within 1e-5 (docs/training.md, "Many nodes").

The tolerance, and why float64: two ranks reduce the gradients in another order than one process
sums them. In float32 that rounding difference (~1e-7 relative) does not stay small: the power law
``A_LM ** pw`` with A_LM near its 1e-9 floor has a local slope of ~1e5, and over 20 steps even one
process differs from itself split into two micro-batches by 1e-2 in the loss (docs/training.md,
"Why the fast path is not bit-faithful"). In float64 the same amplification leaves the weights
within ~1e-10, so what is left is the loss's own float32 cross-entropy (~3e-7 at a loss of 4.6):
1e-5 then tests that the two nodes compute the same steps, not float32 noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import multinode_worker as worker
from support import free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TIMEOUT_S = 300  # both launchers together; they are killed past it


def _launch_two_nodes(out: Path, strategy: str) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "h6",
        "--max-restarts", "0", worker.__file__, str(out), strategy,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(worker.__file__).parent), *sys.path[:0], env.get("PYTHONPATH", "")]
    )
    nodes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    codes = [node.returncode for node in nodes]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)


@pytest.mark.parametrize("strategy", ["FULL_SHARD", "HYBRID_SHARD"])
def test_two_nodes_train_like_one_process(tmp_path: Path, strategy: str) -> None:
    from pldr_llm.train import Trainer

    trainer = Trainer(worker.model(), worker.config(), shard=False)
    reference = []
    for batch in worker.global_batches():
        result = trainer.train_step(batch)
        reference.append([result["loss"], result["tokens"], result["lr"]])

    _launch_two_nodes(tmp_path, strategy)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == worker.STEPS == 20
    for step, ((loss, tokens, lr), (ref_loss, ref_tokens, ref_lr)) in enumerate(
        zip(losses, reference)
    ):
        assert tokens == ref_tokens and lr == ref_lr, step  # the whole global batch, one schedule
        assert loss == pytest.approx(ref_loss, abs=1e-5), step
    assert reference[-1][0] < reference[0][0] - 0.1  # it trained
