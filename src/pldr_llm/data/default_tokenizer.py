"""A SentencePiece model trained on the embedded default corpus, built once and cached.

The ``tiny`` preset trains offline on :func:`pldr_llm.data.default_corpus`, so it also needs a
tokenizer that can be made offline: this trains one with :func:`pldr_llm.tokenizer.train_tokenizer`
(about a second) and keeps it in a cache folder. Training runs on one thread, which makes the
pieces the same on every run with the same Python version and vocabulary size.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import atomic_path
from pldr_llm.data.corpus import default_corpus


def default_tokenizer_model(cache_dir: str | Path, vocab_size: int = 4096) -> Path:
    """Path of a SentencePiece ``.model`` trained on the default corpus, training it if needed.

    The file is ``<cache_dir>/pydoc-py<major><minor>-v<vocab_size>.model`` (with its ``.vocab``)
    and is written atomically, so concurrent or interrupted calls never leave a broken model.
    Load it with :func:`pldr_llm.tokenizer.load_tokenizer`.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise PLDRError(f"default tokenizer vocab_size must be an integer >= 300, got {vocab_size}")
    from pldr_llm.tokenizer import train_tokenizer  # imported late: sentencepiece loads slowly

    cache = Path(cache_dir).expanduser()
    name = f"pydoc-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    model = cache / f"{name}.model"
    if model.is_file():
        return model
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(default_corpus()) + "\n", encoding="utf-8")
        prefix = Path(tmp) / name
        train_tokenizer(
            [corpus], vocab_size, prefix, seed=0, num_threads=1, progress=False, verbose=False
        )
        # The vocab first, the model last: a present .model means a complete pair. Each is
        # synced and renamed into place (atomic_path), so a crash never leaves a torn file.
        for suffix in (".vocab", ".model"):
            with atomic_path(cache / f"{name}{suffix}") as target:
                os.replace(f"{prefix}{suffix}", target)
    return model
