"""Read a transformers folder of a PLDR-LLM without transformers: config, weights, tokenizer.

Two producers write such folders (``config.json`` with ``model_type = "pldrllm"``,
``model.safetensors`` with the original's state-dict keys, ``tokenizer.model``):

* the authors' transformers implementation (hub repos such as ``fromthesky/PLDR-LLM-v51-110M-3``):
  their key names (``hidden_size``, ``custom_G_type``, ``reference_rope``, ...); a predefined-G
  model stores its G_LM tensors as the buffer ``decoder.past_G_values``
  [num_layers, 3, 1, H, dk, dk] (index 2 of the second axis is G_LM);
* :func:`pldr_llm.hf.export.export_hf` (``pldr-llm convert --to hf``), which writes the same
  format; its older exports used the project's names (``d_model``, ``version``, ...) and
  per-layer ``predefined_G_LM`` buffers, and still load.

Everything here needs only torch and safetensors, so ``pldr-llm`` commands and the lm-eval model
load such folders where transformers is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import PLDRConfig
from .errors import PLDRError
from .fileio import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    load_safetensors,
    read_json_object,
)

if TYPE_CHECKING:
    from .model import PLDRModel

MODEL_TYPE = "pldrllm"
TOKENIZER_CONFIG = "tokenizer_config.json"

# The authors' buffers of a predefined-G model: per layer (A, A_LM, G_LM) and a status flag.
PAST_G_VALUES = "decoder.past_G_values"
PAST_G_STATUS = "decoder.past_G_values_status"
_G_LM_INDEX = 2


def is_hf_config(data: Any) -> bool:
    """Whether a parsed ``config.json`` is a PLDR-LLM transformers configuration."""
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def pldr_config_from_hf(data: dict[str, Any]) -> PLDRConfig:
    """The core configuration of a parsed PLDR-LLM transformers ``config.json``."""
    if not is_hf_config(data):
        raise PLDRError(
            f"not a PLDR-LLM transformers config (model_type {data.get('model_type')!r})"
        )
    return PLDRConfig.from_hf_dict(data)


def _predefined_G_key(layer: int) -> str:
    return f"decoder.dec_layers.{layer}.mha1.predefined_G_LM"


def core_state_from_hf(
    state: dict[str, Any], config: PLDRConfig, tie_word_embeddings: bool = False
) -> dict[str, Any]:
    """The weights of a transformers folder as :class:`PLDRModel` state-dict entries.

    A predefined-G (v510G) model's ``decoder.past_G_values`` becomes the per-layer
    ``predefined_G_LM`` buffers; tied word embeddings fill a missing LM head weight.
    """
    state = dict(state)
    past_G = state.pop(PAST_G_VALUES, None)
    state.pop(PAST_G_STATUS, None)
    if config.version == "v510G" and past_G is not None:
        dk = config.depth
        expected = (config.num_layers, 3, 1, config.num_heads, dk, dk)
        if tuple(past_G.shape) != expected:
            raise PLDRError(
                f"{PAST_G_VALUES} has shape {tuple(past_G.shape)}, the model needs {expected}"
            )
        for layer in range(config.num_layers):
            state[_predefined_G_key(layer)] = past_G[layer, _G_LM_INDEX].clone()
    if tie_word_embeddings and "final_layer.weight" not in state:
        embedding = state.get("decoder.embedding.weight")
        if embedding is not None:
            state["final_layer.weight"] = embedding
    return state


def hf_state_from_core(state: dict[str, Any], config: PLDRConfig) -> dict[str, Any]:
    """:class:`PLDRModel` weights in the authors' layout (``decoder.past_G_values`` for v510G)."""
    if config.version != "v510G":
        return dict(state)
    import torch

    state = dict(state)
    g_list = [state.pop(_predefined_G_key(layer)) for layer in range(config.num_layers)]
    g = torch.stack(g_list)  # [L, 1, H, dk, dk]
    zeros = torch.zeros_like(g)
    state[PAST_G_VALUES] = torch.stack([zeros, zeros, g], dim=1).contiguous()
    state[PAST_G_STATUS] = torch.ones(config.num_layers, dtype=torch.bool)
    return state


def read_tokenizer_flags(folder: str | Path) -> tuple[bool, bool]:
    """``(add_bos_token, add_eos_token)`` of a folder's ``tokenizer_config.json`` (default off)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return False, False
    data = read_json_object(path, "tokenizer config")
    return bool(data.get("add_bos_token", False)), bool(data.get("add_eos_token", False))


def load_hf_state(model: PLDRModel, folder: str | Path) -> None:
    """Load a transformers folder's weights into ``model`` (strict: every weight must match)."""
    from .state_dict import load_state_dict_strict

    folder = Path(folder)
    data = read_json_object(folder / CONFIG_NAME)
    state = core_state_from_hf(
        read_hf_state(folder), model.config, bool(data.get("tie_word_embeddings", False))
    )
    load_state_dict_strict(model, state, source=str(folder))


def read_hf_state(folder: str | Path) -> dict[str, Any]:
    """The weights of a transformers folder (single or sharded safetensors), on the CPU."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = read_json_object(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise PLDRError(f"{index}: no weight_map object")
        state: dict[str, Any] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_safetensors(folder / shard))
        return state
    raise PLDRError(f"{folder} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME})")
