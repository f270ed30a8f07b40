"""PLDR-LLM in Hugging Face transformers: configuration, model, tokenizer, export.

Importing this package registers the classes with transformers' auto classes::

    import pldr_llm.hf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("exported_folder")
    tokenizer = AutoTokenizer.from_pretrained("exported_folder")

A folder written by :func:`export_hf` also carries its code, so it loads without this package
through ``trust_remote_code=True``. See docs/huggingface.md.

Without transformers installed the package still imports (so that :mod:`pldr_llm.hf.folder`
reads exported folders), and naming one of the transformers classes raises a
:class:`~pldr_llm.errors.PLDRError` that says what to install.
"""

from __future__ import annotations

from typing import Any

from pldr_llm.errors import PLDRError

__all__ = [
    "PldrllmCausalLMOutput",
    "PldrllmConfig",
    "PldrllmForCausalLM",
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
    from pldr_llm.hf.configuration_pldrllm import PldrllmConfig
    from pldr_llm.hf.export import export_hf
    from pldr_llm.hf.modeling_pldrllm import (
        PldrllmCausalLMOutput,
        PldrllmForCausalLM,
        PldrllmPreTrainedModel,
        PldrllmSamplingFilter,
    )
    from pldr_llm.hf.tokenization_pldrllm import PldrllmTokenizer


def register() -> None:
    """Register the PLDR-LLM classes with AutoConfig, AutoModelForCausalLM and AutoTokenizer.

    Runs on import; calling it again is harmless.
    """
    if _MISSING is not None:
        raise PLDRError(
            "the transformers integration needs 'transformers': pip install 'pldr-llm[hf]'"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register(PldrllmConfig.model_type, PldrllmConfig, exist_ok=True)
    AutoModelForCausalLM.register(PldrllmConfig, PldrllmForCausalLM, exist_ok=True)
    AutoTokenizer.register(PldrllmConfig, slow_tokenizer_class=PldrllmTokenizer, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name in __all__ and _MISSING is not None:
        raise PLDRError(f"pldr_llm.hf.{name} needs 'transformers': pip install 'pldr-llm[hf]'")
    raise AttributeError(f"module 'pldr_llm.hf' has no attribute {name!r}")


if _MISSING is None:
    register()
