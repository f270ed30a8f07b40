"""The PLDR-LLM model: :class:`PLDRModel`, its caches and its deductive outputs."""

from pldr_llm.model.cache import GCacheEntry, LayerKV, PLDRCache
from pldr_llm.model.model import PLDRModel, PLDROutput
from pldr_llm.model.plga import Deductive
from pldr_llm.model.variants import inference_G_model, predefined_G_model

__all__ = [
    "Deductive",
    "GCacheEntry",
    "LayerKV",
    "PLDRCache",
    "PLDRModel",
    "PLDROutput",
    "inference_G_model",
    "predefined_G_model",
]
