"""Checkpoints: the original's ``.pth`` format and the project's own (safetensors) format.

The original saves ``torch.save({"model_state_dict": ..., "optimizer_state_dict": ...,
"loss": ..., "accuracy": ...})``; published PLDR-LLMs come in exactly that format. We read it with
``torch.load(weights_only=True)``, so a checkpoint can never execute code when loaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pldr_llm.core.config import PLDRConfig
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import CONFIG_NAME, WEIGHTS_NAME, atomic_path, safe_torch_load
from pldr_llm.core.model import PLDRModel
from pldr_llm.core.state_dict import build_uninitialized, load_state_dict_strict

# Re-exported here, where the readers of checkpoints look for them.
__all__ = [
    "load_model",
    "load_reference_checkpoint",
    "load_state_dict_strict",
    "reference_state_dict",
    "safe_torch_load",
    "save_reference_checkpoint",
]

# Keys our model has that the original's state dicts do not (v510G's fixed G_LM).
_NOT_IN_REFERENCE = ("predefined_G_LM",)


def _to_config(hpdict: Mapping[str, Any] | PLDRConfig) -> PLDRConfig:
    if isinstance(hpdict, PLDRConfig):
        return hpdict
    if not isinstance(hpdict, Mapping):
        raise PLDRError("hyperparameters must be a dictionary or a PLDRConfig")
    return PLDRConfig.from_hpdict(dict(hpdict))


def reference_state_dict(checkpoint: Any, source: str) -> dict[str, Tensor]:
    """The model state dict inside an original checkpoint (wrapped or bare)."""
    if isinstance(checkpoint, Mapping) and "model_state_dict" in checkpoint:
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(v, Tensor) for v in checkpoint.values()
    ):
        raise PLDRError(f"{source}: no model state dict found (expected 'model_state_dict')")
    return dict(checkpoint)


def load_reference_checkpoint(
    path: str | Path,
    hpdict: Mapping[str, Any] | PLDRConfig,
    G_list: Sequence[Tensor] | None = None,
    map_location: str | torch.device = "cpu",
) -> PLDRModel:
    """Load an original PLDR-LLM ``.pth`` checkpoint with its hyperparameters.

    ``hpdict`` is the original's hyperparameter dictionary (training keys are ignored) or a
    :class:`PLDRConfig`. A v510G checkpoint (no metric-learner weights) needs ``G_list``, the
    predefined G_LM per layer, which the original keeps outside the state dict.
    """
    config = _to_config(hpdict)
    state = reference_state_dict(safe_torch_load(path), str(path))
    if G_list is not None and config.version != "v510G":
        import dataclasses

        config = dataclasses.replace(config, version="v510G")
    model = build_uninitialized(lambda: PLDRModel(config), torch.device("cpu"))  # filled below
    if config.version == "v510G":
        if G_list is None:
            raise PLDRError("a v510G checkpoint needs G_list, the predefined G_LM of every layer")
        model.set_predefined_G(list(G_list))
        for layer_index, layer in enumerate(model.decoder.dec_layers):
            key = f"decoder.dec_layers.{layer_index}.mha1.predefined_G_LM"
            state.setdefault(key, layer.mha1.predefined_G_LM.clone())
    load_state_dict_strict(model, state, source=str(path))
    return model.to(map_location).eval()


def save_reference_checkpoint(
    model: PLDRModel,
    path: str | Path,
    optimizer_state_dict: dict | None = None,
    loss: float | None = None,
    accuracy: float | None = None,
) -> Path:
    """Write ``model`` in the original's ``.pth`` format (same keys, CPU tensors)."""
    path = Path(path)
    state = {
        key: value.detach().cpu().contiguous()
        for key, value in model.state_dict().items()
        if not key.endswith(_NOT_IN_REFERENCE)
    }
    payload = {
        "model_state_dict": state,
        "optimizer_state_dict": optimizer_state_dict,
        "loss": loss,
        "accuracy": accuracy,
    }
    # atomic_path creates the folder; fsync + rename, 0644: a failed write keeps the old file.
    # torch names the zip's inner folder after the file it writes: the file is written under
    # its final name in a private folder, so the same weights always give the same bytes.
    with atomic_path(path) as tmp:
        try:
            _save_named(payload, tmp, path.name)
        except RuntimeError as exc:
            # torch's zip writer loses the errno of a failed write (full disk, ulimit -f) and
            # reports "[enforce fail at inline_container.cc] ... unexpected pos"; other
            # RuntimeErrors are bugs and pass through.
            if "inline_container" not in str(exc):
                raise
            raise PLDRError(
                f"could not write {path} (the disk may be full or a file-size limit, ulimit -f, "
                "reached): free space or write elsewhere"
            ) from None
    return path


def _save_named(payload: Any, tmp: Path, name: str) -> None:
    """``torch.save(payload)`` into ``tmp`` as if the file were called ``name`` (the zip's inner
    folder is named after the file torch writes)."""
    if tmp.name == name:  # a device or pipe given as the target: written in place
        torch.save(payload, tmp)
        return
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".pth-") as staging:
        staged = Path(staging) / name
        torch.save(payload, staged)
        os.replace(staged, tmp)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> PLDRModel:
    """Load a model in the project's own format (a folder with config.json + model.safetensors)."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        return PLDRModel.load(path, map_location=map_location)
    raise PLDRError(f"{path} is not a saved model folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
