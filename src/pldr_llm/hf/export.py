"""``export_hf``: write a PLDR-LLM as a self-contained Hugging Face transformers folder.

The folder holds ``config.json`` (with ``auto_map``), ``generation_config.json``,
``model.safetensors`` (the original's state-dict keys), ``tokenizer.model`` with
``tokenizer_config.json``, and the model's code (see :mod:`pldr_llm.core.code_bundle`). It
loads with ``AutoModelForCausalLM``/``AutoTokenizer`` where ``pldr_llm`` is imported, and with
``trust_remote_code=True`` where it is not installed at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pldr_llm.core.code_bundle import AUTO_MAP_TOKENIZER
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_write_text
from pldr_llm.core.hf_folder import TOKENIZER_CONFIG
from pldr_llm.core.modeling_pldrllm import PldrllmForCausalLM
from pldr_llm.core.tokenization_pldrllm import PldrllmTokenizer

if TYPE_CHECKING:
    from pldr_llm.core.model import PLDRModel
    from pldr_llm.tokenizer import PLDRTokenizer


def export_hf(
    model: PLDRModel | PldrllmForCausalLM,
    tokenizer: PLDRTokenizer | PldrllmTokenizer | str | Path | None,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a transformers folder ``out_dir``; returns it.

    Args:
        model: a core :class:`~pldr_llm.core.model.PLDRModel` (any device; its weights are
            shared, not copied, while saving) or a :class:`PldrllmForCausalLM`.
        tokenizer: a :class:`~pldr_llm.tokenizer.PLDRTokenizer`, a transformers tokenizer of
            this package, the path of a SentencePiece ``.model`` file, or None (no tokenizer).
        out_dir: the folder to write (created; files of an earlier export are overwritten).
        dtype: store the weights in this dtype (default: as they are).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PLDRError(f"{out} is a file; the export needs a folder")
    out.mkdir(parents=True, exist_ok=True)
    hf_model = (
        model if isinstance(model, PldrllmForCausalLM) else PldrllmForCausalLM.from_core(model)
    )
    if dtype is not None and dtype != hf_model.dtype:
        # Cast a copy: the caller's model keeps its dtype.
        source = hf_model.core
        from pldr_llm.core.model import PLDRModel

        copy = PLDRModel(source.config)
        copy.load_state_dict(source.state_dict())
        hf_model = PldrllmForCausalLM.from_core(copy.to(dtype=dtype))
    hf_model.save_pretrained(out)

    if tokenizer is not None:
        hf_tokenizer = _as_hf_tokenizer(tokenizer)
        hf_tokenizer.model_max_length = int(hf_model.config.max_seq_len)
        hf_tokenizer.save_pretrained(out)
        _add_tokenizer_auto_map(out / TOKENIZER_CONFIG)
    return out


def _as_hf_tokenizer(tokenizer: Any) -> PldrllmTokenizer:
    if isinstance(tokenizer, PldrllmTokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
    else:
        model_path = getattr(tokenizer, "model_path", None)
        if model_path is None:
            raise PLDRError(f"cannot export a tokenizer of type {type(tokenizer).__name__}")
        path = Path(model_path)
    if not Path(path).is_file():
        raise PLDRError(f"tokenizer model not found: {path}")
    # A tokenizer read from a transformers folder keeps that folder's prompt convention.
    return PldrllmTokenizer(
        vocab_file=str(path),
        add_bos_token=bool(getattr(tokenizer, "add_bos", False)),
        add_eos_token=bool(getattr(tokenizer, "add_eos", False)),
    )


def _add_tokenizer_auto_map(path: Path) -> None:
    """Point AutoTokenizer at the bundled tokenizer code (for ``trust_remote_code`` loading)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["auto_map"] = dict(AUTO_MAP_TOKENIZER)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
