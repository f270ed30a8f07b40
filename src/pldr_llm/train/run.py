"""A whole training run: tokenizer, model, initial weights, :meth:`Trainer.fit`, both exports.

``pldr-llm train`` parses its arguments and calls this; a notebook starts the same run with::

    from pldr_llm.train.run import start_run

    result = start_run("runs/tiny", preset="tiny", overrides={"train.max_steps": 20})

The run folder receives ``run.yaml`` (the resolved config), ``tokenizer.model``,
``metrics.jsonl``, ``checkpoints/`` and, at the end, the trained model (``config.json`` +
``model.safetensors``) and ``original/``, the same model in the original's bundle format
(``.pth`` + ``_hyperparameters.py`` + tokenizer). Starting it again on a folder that holds a run
resumes it from its last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_write_text
from pldr_llm.train.runconfig import RUN_FILE, TOKENIZER_FILE, RunConfig, prepare_run
from pldr_llm.train.runlock import claim_run_folder

if TYPE_CHECKING:
    from pldr_llm.train.trainer import FitResult

__all__ = ["run", "start_run", "RunConfig", "prepare_run"]

logger = logging.getLogger("pldr_llm.train")


def start_run(
    out: str | os.PathLike[str],
    *,
    preset: str | None = None,
    config: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> FitResult:
    """:func:`~pldr_llm.train.runconfig.prepare_run`, then :func:`run`: ``pldr-llm train``."""
    return run(prepare_run(out, preset=preset, config=config, overrides=overrides))


def _setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("pldr_llm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


def run(resolved: RunConfig) -> FitResult:
    """Train the run ``resolved`` describes (from :func:`~pldr_llm.train.runconfig.prepare_run`).

    Returns the trainer's result: ``status`` ``"completed"`` (both exports written) or
    ``"interrupted"`` (by a signal; starting it again resumes). A run that diverged raises
    :class:`PLDRError` with the advice to follow.
    """
    if resolved.run_dir is None:
        raise PLDRError("give the run folder with --out DIR")
    run_dir, resuming = resolved.run_dir, resolved.resuming
    import random

    import numpy as np
    import torch

    from pldr_llm.data.config import open_source
    from pldr_llm.train.distributed import barrier, cleanup_distributed, setup_distributed
    from pldr_llm.train.trainer import Trainer

    cfg = resolved.train
    # Open the data source before anything slow: a missing file or column fails now. It is
    # opened once: the tokenizer and the batches read this one.
    train_source = open_source(resolved.data, "train")
    assert train_source is not None  # the train split always exists
    env = setup_distributed(cfg.device)
    folder_lock = contextlib.ExitStack()
    try:
        _setup_logging(env.is_main)
        # Before anything is written: a folder that is not a run, or one in use, is refused.
        folder_lock.enter_context(claim_run_folder(run_dir, env))
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            logger.info(
                "%s in %s on %d process(es), device %s",
                _start_words(run_dir, resuming, env),
                run_dir,
                env.world_size,
                env.device,
            )
        barrier()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)

        tokenizer, tokenizer_file = _tokenizer(resolved, run_dir, env, train_source)
        model = _build_model(resolved, tokenizer, run_dir, env)
        if env.is_main:
            logger.info(
                "model: %s parameters, %d layers, d_model %d, %d heads, context %d",
                f"{model.num_parameters():,}",
                model.config.num_layers,
                model.config.d_model,
                model.config.num_heads,
                resolved.context_length,
            )
        trainer = Trainer(model, cfg, env=env)
        train_batches, val_batches = _batches(resolved, tokenizer, trainer, train_source)
        if env.is_main:
            # Written once the tokenizer, model and data are set up: a start that fails before
            # (a missing --tokenizer.path) leaves no run.yaml that would refuse the fixed command.
            atomic_write_text(run_dir / RUN_FILE, resolved.to_yaml())
        result = trainer.fit(
            train_batches,
            run_dir,
            val_data=val_batches,
            resume=True,
            tokenizer_file=tokenizer_file,
        )
        barrier()
        if env.is_main:
            _log_end(result)
        if result.status == "interrupted":
            if env.is_main:
                logger.warning(
                    "stopped by a signal at step %d; run the same command to resume", result.step
                )
            return result
        if result.status == "diverged":
            raise PLDRError(
                f"training stopped at step {result.step}: more than "
                f"{cfg.max_nonfinite_steps} steps had a non-finite loss (the last good weights "
                "are in the last checkpoint): run the same command with a lower "
                f"--train.learning_rate (e.g. {cfg.learning_rate / 2:g}) to resume from there"
            )
        return result
    finally:
        folder_lock.close()
        cleanup_distributed(env)


def _start_words(run_dir: Path, resuming: bool, env: Any) -> str:
    """The start line's first words: "resuming" only when a checkpoint will be loaded (a
    ``run.yaml`` without one resumes nothing: training starts at step 1)."""
    from pldr_llm.train.checkpointing import CheckpointManager

    found = CheckpointManager(run_dir, env).complete_checkpoints()
    if found:
        return f"resuming run from step {found[-1][0]}"
    if resuming:
        return "starting run afresh (the folder's run.yaml has no checkpoint yet)"
    return "starting run"


def _batches(resolved: RunConfig, tokenizer: Any, trainer: Any, source: Any) -> tuple[Any, Any]:
    """The training batches (from ``source``, already open) and the validation batches (None
    without ``val_every`` or a validation split), at the trainer's per-rank batch size."""
    from pldr_llm.data import build_batches

    env, pad_id = trainer.env, trainer.pad_id
    common = {
        "batch_size": trainer.batch_size,  # resolved once, by the trainer
        "context_length": resolved.context_length,
        "rank": env.rank,
        "world_size": env.world_size,
        "pad_id": pad_id,
    }
    train = build_batches(resolved.data, tokenizer, source=source, **common)
    if not resolved.train.val_every:
        return train, None
    val = build_batches(resolved.data, tokenizer, split="validation", **common)
    if val is None and env.is_main:
        logger.warning("'train.val_every' is set but the data config has no validation split")
    return train, val


def _log_end(result: FitResult) -> None:
    metrics = result.last_metrics or {}
    logger.info(
        "%s at step %d%s",
        result.status,
        result.step,
        f": loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}"
        if metrics.get("loss") is not None
        else "",
    )


def _tokenizer(resolved: RunConfig, run_dir: Path, env: Any, source: Any) -> tuple[Any, Path]:
    """Load the configured tokenizer, the run's own, or train one (rank 0) on the training data."""
    from pldr_llm.tokenizer import load_tokenizer
    from pldr_llm.train.distributed import barrier

    settings = resolved.tokenizer
    if settings.path is not None:
        tok = load_tokenizer(settings.path)
        return tok, Path(tok.model_path)
    own = run_dir / TOKENIZER_FILE
    if not own.is_file():
        if env.is_main:
            _train_tokenizer(resolved, run_dir, source)
        barrier()
    tok = load_tokenizer(own)
    return tok, own


def _train_tokenizer(resolved: RunConfig, run_dir: Path, source: Any) -> None:
    import itertools
    import tempfile

    from pldr_llm.tokenizer import train_tokenizer

    settings = resolved.tokenizer
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tokenizer-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        count = 0
        with open(corpus, "w", encoding="utf-8") as fh:
            for doc in itertools.islice(source.iter_documents(), settings.train_docs):
                if doc:
                    fh.write(doc.rstrip("\n") + "\n")
                    count += 1
        if count == 0:
            raise PLDRError("the training data holds no text to train a tokenizer on")
        # One thread and a fixed seed: the same data always gives the same tokenizer, so a run
        # repeated from scratch reproduces its numbers.
        train_tokenizer(
            [corpus],
            settings.vocab_size,
            Path(tmp) / "tokenizer",
            num_threads=1,
            seed=resolved.train.seed,
            progress=False,
        )
        os.replace(Path(tmp) / "tokenizer.model", run_dir / TOKENIZER_FILE)
        vocab = Path(tmp) / "tokenizer.vocab"
        if vocab.is_file():
            os.replace(vocab, run_dir / "tokenizer.vocab")
    logger.info(
        "trained a %d-piece tokenizer on %d documents in %.1fs",
        settings.vocab_size,
        count,
        time.perf_counter() - started,
    )


def _build_model(resolved: RunConfig, tokenizer: Any, run_dir: Path, env: Any) -> Any:
    from pldr_llm.core.config import PLDRConfig
    from pldr_llm.core.model import PLDRModel
    from pldr_llm.train.checkpointing import CheckpointManager

    model_keys = dict(resolved.model)
    if model_keys.get("input_vocab_size") is None:
        model_keys["input_vocab_size"] = tokenizer.vocab_size
    config = PLDRConfig(**model_keys)
    if tokenizer.vocab_size > config.input_vocab_size:
        raise PLDRError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but 'model.input_vocab_size' is "
            f"{config.input_vocab_size}"
        )
    model = PLDRModel(config)
    if resolved.predefined_G is not None:
        from pldr_llm.gfile import load_g_file

        model.set_predefined_G([e.G_LM for e in load_g_file(resolved.predefined_G)])
    init_from = resolved.train.init_from
    if init_from and not CheckpointManager(run_dir, env).complete_checkpoints():
        _load_initial_weights(model, init_from)
    return model


def _load_initial_weights(model: Any, source: str) -> None:
    """Start from the weights of anything ``--model`` takes (:func:`pldr_llm.bundle.resolve_weights`:
    a published bundle, a project or transformers folder, a hub id, a ``.pth`` or
    ``.safetensors`` file) or of a checkpoint of a run (a DCP folder)."""
    from pldr_llm.bundle import resolve_weights
    from pldr_llm.core.state_dict import load_state_dict_strict

    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dcp").is_dir() or (path / ".metadata").is_file()):
        from pldr_llm.train.safe_dcp import safe_dcp_load

        dcp_dir = path / "dcp" if (path / "dcp").is_dir() else path
        state = {"model": model.state_dict()}
        safe_dcp_load(state, dcp_dir)
        model.load_state_dict(state["model"])
        where = str(dcp_dir)
    else:
        try:
            weights, _, where = resolve_weights(source)
        except PLDRError as exc:
            raise PLDRError(f"'train.init_from': {exc}") from None
        load_state_dict_strict(model, weights, source=where)
    logger.info("initial weights from %s", where)
