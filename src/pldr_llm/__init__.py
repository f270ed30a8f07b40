"""pldr-llm: PLDR-LLMs (Large Language Models from Power Law Decoder Representations) in PyTorch.

The public API::

    from pldr_llm import PLDRConfig, PLDRModel, generate
    model = PLDRModel(PLDRConfig(num_layers=2, d_model=64, num_heads=4, dff=170, A_dff=24,
                                 num_reslayerA=2, num_denseA=2, input_vocab_size=300))
    out = model(input_ids, output_deductive=True)   # .logits, .cache, .deductive[i].G_LM
    ids = generate(model, prompt_ids, max_new_tokens=32, top_k=1)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> the module that defines them. Imported on first use (PEP 562), so that
# `pldr-llm --help` and config errors answer before torch (seconds to import) is loaded.
_EXPORTS = {
    "load_bundle": "pldr_llm.bundle",
    "load_model": "pldr_llm.checkpoint",
    "load_reference_checkpoint": "pldr_llm.checkpoint",
    "safe_torch_load": "pldr_llm.core.fileio",
    "save_reference_checkpoint": "pldr_llm.checkpoint",
    "PLDRConfig": "pldr_llm.core.config",
    "read_hyperparameters_file": "pldr_llm.core.config",
    "PLDRError": "pldr_llm.core.errors",
    "DecodeEngine": "pldr_llm.generation",
    "SamplingParams": "pldr_llm.generation",
    "filter_logits": "pldr_llm.generation",
    "generate": "pldr_llm.generation",
    "generate_details": "pldr_llm.generation",
    "generate_text": "pldr_llm.generation",
    "stream_generate": "pldr_llm.generation",
    "load_g_file": "pldr_llm.gfile",
    "save_g_file": "pldr_llm.gfile",
    "dag_regularizer": "pldr_llm.core.losses",
    "masked_accuracy": "pldr_llm.core.losses",
    "masked_cross_entropy": "pldr_llm.core.losses",
    "Deductive": "pldr_llm.core.plga",
    "GCacheEntry": "pldr_llm.core.cache",
    "PLDRCache": "pldr_llm.core.cache",
    "PLDRModel": "pldr_llm.core.model",
    "PLDROutput": "pldr_llm.core.model",
    "inference_G_model": "pldr_llm.core.variants",
    "predefined_G_model": "pldr_llm.core.variants",
    "PLDRTokenizer": "pldr_llm.tokenizer",
    "load_tokenizer": "pldr_llm.tokenizer",
    "train_tokenizer": "pldr_llm.tokenizer",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from pldr_llm.bundle import load_bundle
    from pldr_llm.checkpoint import (
        load_model,
        load_reference_checkpoint,
        save_reference_checkpoint,
    )
    from pldr_llm.core.cache import GCacheEntry, PLDRCache
    from pldr_llm.core.config import PLDRConfig, read_hyperparameters_file
    from pldr_llm.core.errors import PLDRError
    from pldr_llm.core.fileio import safe_torch_load
    from pldr_llm.core.losses import dag_regularizer, masked_accuracy, masked_cross_entropy
    from pldr_llm.core.model import PLDRModel, PLDROutput
    from pldr_llm.core.plga import Deductive
    from pldr_llm.core.variants import inference_G_model, predefined_G_model
    from pldr_llm.generation import (
        DecodeEngine,
        SamplingParams,
        filter_logits,
        generate,
        generate_details,
        generate_text,
        stream_generate,
    )
    from pldr_llm.gfile import load_g_file, save_g_file
    from pldr_llm.tokenizer import PLDRTokenizer, load_tokenizer, train_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pldr_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "DecodeEngine",
    "Deductive",
    "GCacheEntry",
    "PLDRCache",
    "PLDRConfig",
    "PLDRError",
    "PLDRModel",
    "PLDROutput",
    "dag_regularizer",
    "filter_logits",
    "generate",
    "generate_details",
    "generate_text",
    "stream_generate",
    "SamplingParams",
    "PLDRTokenizer",
    "inference_G_model",
    "load_bundle",
    "load_g_file",
    "load_model",
    "load_tokenizer",
    "load_reference_checkpoint",
    "masked_accuracy",
    "masked_cross_entropy",
    "predefined_G_model",
    "read_hyperparameters_file",
    "safe_torch_load",
    "save_g_file",
    "save_reference_checkpoint",
    "train_tokenizer",
]
