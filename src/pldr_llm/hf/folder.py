"""Read a transformers folder of a PLDR-LLM without transformers: config, weights, tokenizer.

A folder written by :func:`pldr_llm.hf.export.export_hf` holds ``config.json`` (a
``PldrllmConfig``, ``model_type = "pldrllm"``), ``model.safetensors`` whose keys are the
original's state-dict keys (the same file as the project's own format) and ``tokenizer.model``.
Everything here needs only torch and safetensors, so ``pldr-llm`` commands and the lm-eval model
load such folders where transformers is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pldr_llm.config import ARCHITECTURE_KEYS, PLDRConfig
from pldr_llm.errors import PLDRError

if TYPE_CHECKING:
    from pldr_llm.model.model import PLDRModel
    from pldr_llm.tokenizer import PLDRTokenizer

MODEL_TYPE = "pldrllm"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# PldrllmConfig fields -> PLDRConfig fields (the rest share their names).
_RENAMED = {"pad_token_id": "pad_id", "eos_token_id": "eos_id"}


def is_hf_config(data: Any) -> bool:
    """Whether a parsed ``config.json`` is a PLDR-LLM transformers configuration."""
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def pldr_config_from_hf(data: dict[str, Any]) -> PLDRConfig:
    """The core configuration of a parsed PLDR-LLM transformers ``config.json``."""
    if not is_hf_config(data):
        raise PLDRError(
            f"not a PLDR-LLM transformers config (model_type {data.get('model_type')!r})"
        )
    values = {key: data[key] for key in ARCHITECTURE_KEYS if key in data}
    for hf_key, key in _RENAMED.items():
        if data.get(hf_key) is not None:
            values[key] = int(data[hf_key])
    return PLDRConfig(**values)


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a PLDR-LLM transformers ``config.json``."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return is_hf_config(json.loads(config.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def read_hf_state(folder: str | Path) -> dict[str, Any]:
    """The weights of a transformers folder (single or sharded safetensors), on the CPU."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(str(single), device="cpu")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard), device="cpu"))
        return state
    raise PLDRError(f"{folder} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME})")


def load_hf_folder(
    folder: str | Path, require_tokenizer: bool = False
) -> tuple[PLDRModel, PLDRTokenizer | None]:
    """Load the core model (eval mode, CPU) and the tokenizer of a PLDR-LLM transformers folder."""
    from pldr_llm.checkpoint import load_state_dict_strict
    from pldr_llm.model.model import PLDRModel
    from pldr_llm.tokenizer import load_tokenizer

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise PLDRError(f"{folder} has no {CONFIG_NAME}")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PLDRError(f"{config_path} is not a readable JSON config ({exc})") from None
    model = PLDRModel(pldr_config_from_hf(data))
    load_state_dict_strict(model, read_hf_state(folder), source=str(folder))
    tokenizer = None
    if (folder / "tokenizer.model").is_file():
        tokenizer = load_tokenizer(folder / "tokenizer.model")
    elif require_tokenizer:
        raise PLDRError(f"no tokenizer.model in {folder}")
    return model.eval(), tokenizer
