"""PLDR-LLM in Hugging Face transformers: configuration, model, tokenizer, export.

Importing this package registers the classes with transformers' auto classes (see
:func:`register`; ``import pldr_llm`` alone leaves transformers untouched)::

    import pldr_llm.hf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("exported_folder")
    tokenizer = AutoTokenizer.from_pretrained("exported_folder")

A folder written by :func:`export_hf` also carries its code, so it loads without this package
through ``trust_remote_code=True``. See docs/huggingface.md.

Without transformers installed the package still imports (so that :mod:`pldr_llm.core.hf_folder`
reads exported folders), and naming one of the transformers classes raises a
:class:`~pldr_llm.core.errors.PLDRError` that says what to install.
"""

from __future__ import annotations

import logging
from typing import Any

from pldr_llm.core.errors import PLDRError

_log = logging.getLogger(__name__)

__all__ = [
    "PldrllmCausalLMOutput",
    "PldrllmConfig",
    "PldrllmForCausalLM",
    "PldrllmModel",
    "PldrllmModelOutput",
    "PldrllmPreTrainedModel",
    "PldrllmSamplingFilter",
    "PldrllmTokenizer",
    "export_hf",
    "register",
]

try:
    import transformers  # noqa: F401
except ImportError as exc:  # transformers is an optional dependency (pldr-llm[hf])
    _MISSING: ImportError | None = exc
else:
    _MISSING = None
    from pldr_llm.core.configuration_pldrllm import PldrllmConfig
    from pldr_llm.core.modeling_pldrllm import (
        PldrllmCausalLMOutput,
        PldrllmForCausalLM,
        PldrllmModel,
        PldrllmModelOutput,
        PldrllmPreTrainedModel,
        PldrllmSamplingFilter,
    )
    from pldr_llm.core.tokenization_pldrllm import PldrllmTokenizer
    from pldr_llm.hf.export import export_hf


_REGISTERED: str | None = None


def register() -> str:
    """Register the PLDR-LLM classes with AutoConfig, AutoModel (:class:`PldrllmModel`),
    AutoModelForCausalLM and AutoTokenizer.

    Runs on ``import pldr_llm.hf`` (importing ``pldr_llm`` alone never touches transformers);
    calling it again is harmless. If the installed transformers ships a ``pldrllm`` model type
    of its own, this steps aside: the Auto classes keep transformers' classes, and this package's
    classes stay usable by name (``PldrllmForCausalLM.from_pretrained``). Either way one log
    line (logger ``pldr_llm.hf``, INFO) names the class the Auto classes use. Returns that
    class's qualified name.
    """
    global _REGISTERED
    if _MISSING is not None:
        raise PLDRError(
            "the transformers integration needs 'transformers': pip install 'pldr-llm[hf]'"
        )
    if _REGISTERED is not None:
        return _REGISTERED
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto import configuration_auto

    builtin = configuration_auto.CONFIG_MAPPING_NAMES.get(PldrllmConfig.model_type)
    if builtin is not None:
        from transformers.models.auto import modeling_auto

        model_class = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(
            PldrllmConfig.model_type, builtin
        )
        _REGISTERED = f"transformers.{model_class}"
        _log.info(
            "transformers %s ships model type 'pldrllm': AutoModelForCausalLM uses its %s; "
            "pldr_llm.hf.PldrllmForCausalLM is not registered (use it by name)",
            transformers.__version__,
            model_class,
        )
        return _REGISTERED
    AutoConfig.register(PldrllmConfig.model_type, PldrllmConfig, exist_ok=True)
    AutoModel.register(PldrllmConfig, PldrllmModel, exist_ok=True)
    AutoModelForCausalLM.register(PldrllmConfig, PldrllmForCausalLM, exist_ok=True)
    AutoTokenizer.register(PldrllmConfig, slow_tokenizer_class=PldrllmTokenizer, exist_ok=True)
    _REGISTERED = f"{PldrllmForCausalLM.__module__}.{PldrllmForCausalLM.__qualname__}"
    _log.info("model type 'pldrllm': AutoModelForCausalLM uses %s", _REGISTERED)
    return _REGISTERED


def __getattr__(name: str) -> Any:
    if name in __all__ and _MISSING is not None:
        raise PLDRError(f"pldr_llm.hf.{name} needs 'transformers': pip install 'pldr-llm[hf]'")
    raise AttributeError(f"module 'pldr_llm.hf' has no attribute {name!r}")


if _MISSING is None:
    register()
