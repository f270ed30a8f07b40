"""The ``pldrllm`` lm-eval model's arguments as lm-eval passes them (often strings), checked into
values with one-line errors, and the loading of the model they name. Kept apart from
:mod:`pldr_llm.eval.lm_eval_model` so that neither needs the other's imports (this one needs no
lm-eval)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.model import PLDRModel

log = logging.getLogger(__name__)

#: requests per forward pass when the model arguments name none (or ``auto``)
DEFAULT_BATCH_SIZE = 16


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise PLDRError(f"model argument {name!r} must be true or false, got {value!r}")


def positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PLDRError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise PLDRError(f"{name} must be a positive integer, got {value!r}")
    return number


def batch_size_arg(value: Any) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        log.info("batch_size=auto: using %d", DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    return positive_int(value, "batch_size")


def load_pretrained(
    pretrained: Any, tokenizer: Any = None, device: Any = None, dtype: Any = None
) -> tuple[PLDRModel, Any]:
    """``(core model, PLDRTokenizer)`` for a ``pretrained`` model argument.

    ``pretrained`` is a core :class:`PLDRModel` (give ``tokenizer``), a transformers
    ``PldrllmForCausalLM`` (its core is used), a folder written by ``convert --to hf``, or
    anything :func:`pldr_llm.bundle.load_bundle` accepts.
    """
    from pldr_llm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if isinstance(pretrained, PLDRModel):
        model = pretrained
    elif hasattr(pretrained, "core") and isinstance(pretrained.core, PLDRModel):
        model = pretrained.core
    else:
        from pldr_llm.bundle import load_bundle

        # Any model folder (transformers exports too) or hub id; its tokenizer unless given one.
        model, folder_tok = load_bundle(
            str(pretrained), device="cpu", tokenizer=tok, require_tokenizer=False
        )
        tok = tok if tok is not None else folder_tok
    if tok is None:
        raise PLDRError("the pldrllm model needs a tokenizer (model argument tokenizer=PATH)")
    from pldr_llm.bundle import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    if device is not None:
        model = model.to(device=device)
    return model.eval(), tok
