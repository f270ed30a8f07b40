"""The PLDR-LLM model: :class:`PLDRModel`, its caches and its deductive outputs."""

from pldr_llm.model.cache import GCacheEntry, GInit, LayerKV, PLDRCache, g_entries, prepare_g_init
from pldr_llm.model.model import PLDRModel, PLDROutput
from pldr_llm.model.plga import Deductive
from pldr_llm.model.variants import inference_G_model, predefined_G_model

__all__ = [
    "Deductive",
    "GCacheEntry",
    "GInit",
    "LayerKV",
    "PLDRCache",
    "PLDRModel",
    "PLDROutput",
    "g_entries",
    "inference_G_model",
    "predefined_G_model",
    "prepare_g_init",
]
