"""The export at the end of a completed run, in one place for :meth:`Trainer.fit
<pldr_llm.train.trainer.Trainer.fit>` and ``pldr-llm train`` (:func:`pldr_llm.train.run.run`).

``export_dir`` gets ``config.json`` + ``model.safetensors`` (+ ``tokenizer.model``), what
``pldr-llm generate --model export_dir`` loads; with ``export_pth`` also the original's bundle in
``export_dir/original/``: ``<run_name>-model-checkpoint.pth``, ``<run_name>_hyperparameters.py``
(the model's and the run's keys in the original's spelling) and the tokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from pldr_llm.core.config import hyperparameters_file_text
from pldr_llm.core.fileio import HYPERPARAMETERS_SUFFIX, atomic_path, atomic_write_text
from pldr_llm.train.checkpointing import export_model, original_export
from pldr_llm.train.config import TrainConfig

__all__ = ["export_run"]


def export_run(
    model: nn.Module,
    config: TrainConfig,
    export_dir: str | Path,
    *,
    is_main: bool = True,
    tokenizer_file: str | Path | None = None,
    last_metrics: dict[str, Any] | None = None,
) -> Path:
    """Export the trained ``model`` into ``export_dir`` (see the module). Collective under
    FSDP: every rank calls it, the main rank writes. ``last_metrics`` (the last step's record)
    gives the loss and accuracy the ``.pth`` carries, as the original's checkpoints do."""
    export_dir = Path(export_dir)
    reference = original_export(export_dir, config.run_name)[1] if config.export_pth else None
    export_model(
        model,
        export_dir,
        tokenizer_file=tokenizer_file,
        reference_pth=reference,
        loss=last_metrics["loss"] if last_metrics else None,
        accuracy=last_metrics["accuracy"] if last_metrics else None,
    )
    if reference is not None and is_main and reference.is_file():
        _complete_original_bundle(model, config, reference, tokenizer_file)
    return export_dir


def _complete_original_bundle(
    model: nn.Module, config: TrainConfig, pth: Path, tokenizer_file: str | Path | None
) -> None:
    """Add ``<name>_hyperparameters.py`` and the tokenizer beside the exported ``.pth``."""
    name = original_export(pth.parent.parent, config.run_name)[0]
    hp = model.config.to_hpdict()  # type: ignore[union-attr, operator]
    hp.update(config.to_hpdict())
    hp["save_model_path"] = name
    atomic_write_text(pth.parent / f"{name}{HYPERPARAMETERS_SUFFIX}", hyperparameters_file_text(hp))
    if tokenizer_file is not None:
        with atomic_path(pth.parent / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer_file, tmp)
