"""Helpers shared by the tests (fixtures live in conftest.py): the paper tokenizer's file names,
a writer of model bundles laid out like the published ones, and the CLI run as a user runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from pldr_llm import PLDRConfig, PLDRModel, save_reference_checkpoint

PAPER_TOKENIZER_MODEL = "refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"
PAPER_TOKENIZER_VOCAB = "refinedweb-tokenizer-pldrllm-kvg-cache-paper.vocab"

#: The random tiny model of the decoding tests (conftest's ``tiny_model``, seed 0).
TINY_HPDICT = {
    "num_layers": 2,
    "d_model": 64,
    "num_heads": 4,
    "dff": 96,
    "num_reslayerA": 2,
    "num_denseA": 2,
    "A_dff": 24,
    "input_vocab_size": 300,
    "max_seq_len": 64,
}

#: Vocabulary 32000 to fit the paper tokenizer, everything else as small as the model allows
#: (bundles for the CLI tests; tests override ``max_seq_len`` or the vocabulary as they need).
PAPER_VOCAB_HP = {
    "num_layers": 2,
    "d_model": 16,
    "num_heads": 2,
    "dff": 24,
    "A_dff": 8,
    "num_reslayerA": 1,
    "num_denseA": 1,
    "input_vocab_size": 32000,
    "max_seq_len": 64,
}


def paper_vocab_model(seed: int, max_seq_len: int = 64, **switches) -> PLDRModel:
    """A seeded random model (d_model 32) whose embedding fits the paper tokenizer, in eval
    mode; ``switches`` are further :class:`PLDRConfig` fields."""
    torch.manual_seed(seed)
    config = PLDRConfig(
        num_layers=2,
        d_model=32,
        num_heads=2,
        dff=48,
        A_dff=16,
        num_reslayerA=1,
        num_denseA=1,
        input_vocab_size=32000,
        max_seq_len=max_seq_len,
        **switches,
    )
    return PLDRModel(config).eval()


def hf_greedy(model, prompt: torch.Tensor, steps: int, **options) -> object:
    """transformers' ``generate`` of a ``PldrllmForCausalLM``, greedy: ``steps`` new tokens,
    not stopping at end-of-text; ``options`` are further ``generate`` arguments."""
    return model.generate(
        prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None, **options
    )


def write_hyperparameters(path: Path, hp: dict) -> None:
    """A ``*_hyperparameters.py`` laid out like the published ones."""
    lines = ["import torch.nn.functional as F", "", "hpdict={"]
    lines += [f"{key!r}: {value!r}," for key, value in hp.items()]
    lines += [
        "'epochs': 1,",
        "'activation': F.silu,",
        "'disable_amp': False,",
        "'save_type': 'torch'}",
    ]
    path.write_text("\n".join(lines) + "\n")


def make_bundle(
    folder: Path, tokenizer_dir: Path, hp: dict, name: str = "PLDRv51-Tiny-1", seed: int = 0
) -> PLDRModel:
    """A bundle like the published ones: .pth, hyperparameters file, tokenizer .tar.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = PLDRModel(PLDRConfig.from_hpdict(hp)).eval()
    save_reference_checkpoint(model, folder / f"{name}-model-checkpoint.pth")
    write_hyperparameters(folder / f"{name.replace('-', '_')}_hyperparameters.py", hp)
    with tarfile.open(
        folder / "refinedweb-tokenizer-pldrllm-kvg-cache-paper.tar.gz", "w:gz"
    ) as tar:
        tar.add(tokenizer_dir / PAPER_TOKENIZER_MODEL, arcname=f"tokenizer/{PAPER_TOKENIZER_MODEL}")
        tar.add(tokenizer_dir / PAPER_TOKENIZER_VOCAB, arcname=f"tokenizer/{PAPER_TOKENIZER_VOCAB}")
    return model


def copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """The files of the flat folder ``src`` copied into a new ``dst``, but those whose names end
    with one of ``skip``."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if not path.name.endswith(skip):
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m pldr_llm ARGS`` in a fresh process (UTF-8 output, ``env`` added to ours)."""
    return subprocess.run(
        [sys.executable, "-m", "pldr_llm", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that no one listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(capsys) -> str:
    """The one ``pldr-llm: error:`` line an in-process command wrote to the captured stderr
    (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("pldr-llm: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def write_cuda_pickle(path: Path, obj: object) -> Path:
    """``pickle.dump(obj)`` of CPU tensors written exactly as if they had been saved from CUDA.

    The paper's G files are plain pickles whose storages reduce to
    ``torch.storage._load_from_bytes(<legacy torch.save of the storage>)``; that inner stream tags
    each storage with the device it lived on (``"cuda:0"``). Torch writes that tag with
    ``torch.serialization.location_tag``, so swapping it for the duration of the dump yields the
    same bytes a CUDA machine writes, without needing one -- and the readers' map-to-CPU path is
    exercised by every test that loads these files.
    """
    import pickle

    import torch.serialization as serialization

    real = serialization.location_tag
    serialization.location_tag = lambda storage: "cuda:0"
    try:
        data = pickle.dumps(obj, protocol=5)
    finally:
        serialization.location_tag = real
    assert b"cuda:0" in data  # the tag really went in (a torch change would trip this)
    path.write_bytes(data)
    return path


#: A two-layer model small enough for many trainer steps in a test.
TINY_TRAIN_HP = {
    "num_layers": 2,
    "d_model": 32,
    "num_heads": 2,
    "dff": 48,
    "A_dff": 8,
    "num_reslayerA": 1,
    "num_denseA": 1,
    "input_vocab_size": 97,
    "max_seq_len": 32,
}

#: The model of the FSDP tests: two CPU processes (tests/test_train_multiprocess.py) and two
#: "nodes" (tests/multinode_worker.py), each checked against one process training it.
FSDP_HP = {
    "num_layers": 2,
    "d_model": 32,
    "num_heads": 2,
    "dff": 48,
    "A_dff": 16,
    "num_reslayerA": 1,
    "num_denseA": 2,
    "input_vocab_size": 97,
    "max_seq_len": 16,
}

#: ``pldr-llm train`` flags of a model small enough that a 30-step run takes seconds on 2 CPU
#: cores; the tests add their schedule (warm-up, checkpoint and log intervals, steps).
MINI_TRAIN_ARGS = [
    "--preset", "tiny",
    "--num_layers", "1", "--d_model", "64", "--num_heads", "2", "--dff", "96", "--A_dff", "32",
    "--num_reslayerA", "1", "--context_length", "32", "--model.max_seq_len", "32",
    "--batch_size", "8", "--tokenizer.vocab_size", "400", "--lr_total_steps", "100",
    "--progress", "false",
]  # fmt: skip


def golden_trainer(golden_dir: Path, golden_case: dict, attn: str = "eager", **extra):
    """A Trainer on the golden tiny model with the golden case's optimizer and schedule (CPU).

    ``attn="eager"`` is the original's arithmetic (scores materialized like the original).
    """
    from pldr_llm import load_reference_checkpoint
    from pldr_llm.train import TrainConfig, Trainer

    model = load_reference_checkpoint(
        golden_dir / "reference_checkpoint.pth", golden_case["hpdict"]
    )
    model.attn_implementation = attn
    train = golden_case["train"]
    schedule = train["schedule"]
    config = TrainConfig(
        learning_rate=train["lr"],
        betas=tuple(train["betas"]),
        eps=train["eps"],
        adamw_decay=train["weight_decay"],
        lr_total_steps=schedule["total_steps"],
        warmup_steps=schedule["warmup_steps"],
        lr_alpha=schedule["alpha"],
        clip_grad_value=train["clip_grad_value"],
        batch_size=2,
        device="cpu",
        attn_implementation=attn,
        **extra,
    )
    return Trainer(model, config)


#: An lm-eval multiple-choice task over a JSON-lines file (``.format(task=..., data=...)``).
LM_EVAL_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
