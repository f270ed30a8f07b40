"""G-cache files: read the paper's G_LM pickles safely, read and write the project's safetensors form.

A G file holds a G list: what a PLDR-LLM's G-cache holds, one
:class:`~pldr_llm.core.cache.GCacheEntry` (``A_LM`` or ``None``, ``G_LM``) per decoder layer,
each tensor ``[1, H, dk, dk]`` (the paper's files use ``[1, 14, 64, 64]``). ``A_LM`` is ``None``
where a file stores only ``G_LM`` (the paper's "predefined G_LM" lists). Files load into
``GCacheEntry`` lists and are saved from anything :func:`~pldr_llm.core.cache.g_entries` reads.

Formats read by :func:`load_g_file` (sniffed from the content, not the file name):

* **The project's safetensors form** written by :func:`save_g_file`: keys ``layer{i}.G_LM`` and,
  optionally, ``layer{i}.A_LM``; string metadata in the header. Other keys are ignored, so a
  safetensors file of deductive outputs (e.g. the golden ``expected.safetensors``) reads too.
* **Python pickles of tensors**, as published with the paper, and legacy (pre-1.6, non-zip)
  ``torch.save`` files: through the restricted reader of :mod:`pldr_llm.tensor_pickle`, which
  refuses (naming it) any global other than tensor reconstruction, before anything in the file
  runs.
* Zip-format ``torch.save`` files, through ``torch.load(weights_only=True, map_location="cpu")``.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from pldr_llm.core.cache import GCacheEntry, GInit, check_g_init, g_entries
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import safe_torch_load, save_safetensors
from pldr_llm.tensor_pickle import load_tensor_pickle

__all__ = [
    "G_FILE_FORMAT",
    "load_g_file",
    "read_g_metadata",
    "save_g_file",
]

#: Value of the ``format`` metadata key in files written by :func:`save_g_file`.
G_FILE_FORMAT = "pldr-llm-gcache"

_KEY_RE = re.compile(r"^layer(\d+)\.(A_LM|G_LM)$")


def _entries_from_keys(tensors: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    layers: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _KEY_RE.match(str(key))
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise PLDRError("no 'layer{i}.G_LM' entries found")
    n = max(layers) + 1
    missing = [i for i in range(n) if "G_LM" not in layers.get(i, {})]
    if missing:
        raise PLDRError(f"'layer{missing[0]}.G_LM' is missing")
    return [(layers[i].get("A_LM"), layers[i]["G_LM"]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise PLDRError(f"G file not found: {p}")
    return p.read_bytes()


def load_g_file(path: str | os.PathLike[str], config: Any = None) -> list[GCacheEntry]:
    """Load a G-cache file as one :class:`GCacheEntry` per layer (A_LM may be ``None``), on the
    CPU, each tensor [1, H, dk, dk] ([H, dk, dk] in a file is given its batch dimension); with
    ``config`` (a ``PLDRConfig``), checked to fit a model of it (:func:`check_g_init`).

    Reads the project's safetensors files, the paper's pickles (restricted unpickler; a pickle
    that names any global other than tensor reconstruction is refused with :class:`PLDRError`
    and nothing in it runs) and ``torch.save`` files (``weights_only=True``). Tensors keep the
    dtype they were stored in.
    """
    data = _read_bytes(path)
    if _is_safetensors(data[:9], len(data)):
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            obj: Any = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PLDRError(f"{path}: not a readable safetensors file ({exc})") from None
    elif data[:4] == b"PK\x03\x04" and zipfile.is_zipfile(io.BytesIO(data)):
        obj = safe_torch_load(path)  # weights_only, on the CPU, one-line errors
    else:
        try:
            obj = load_tensor_pickle(data)
        except PLDRError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    try:
        if isinstance(obj, Mapping):
            obj = _entries_from_keys(obj)
        entries = [
            GCacheEntry(None if e.A_LM is None else e.A_LM.contiguous(), e.G_LM.contiguous())
            for e in g_entries(obj)
        ]
        if config is not None:
            check_g_init(config, entries)
        return entries
    except PLDRError as exc:
        raise PLDRError(f"{path}: {exc}") from None


def read_g_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors G file (empty for other formats)."""
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(9)
        if not _is_safetensors(head, p.stat().st_size):
            return {}
        (n,) = struct.unpack("<Q", head[:8])
        header = head[8:] + f.read(n - 1)  # the header is read, never the tensors
    try:
        meta = json.loads(header).get("__metadata__", {})
    except (ValueError, UnicodeDecodeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def save_g_file(
    path: str | os.PathLike[str],
    entries: GInit,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a G-cache as safetensors: ``layer{i}.G_LM`` and, where present, ``layer{i}.A_LM``.

    ``entries`` is anything :func:`~pldr_llm.core.cache.g_entries` reads (a list of
    ``GCacheEntry``, of ``(A_LM, G_LM)`` pairs or of G_LM tensors, a ``PLDRCache``...). ``metadata`` values are stored as
    strings next to ``format``, ``num_layers``, ``num_heads`` and ``dk``. Returns the path.
    """
    norm = g_entries(entries)
    tensors: dict[str, Tensor] = {}
    for i, e in enumerate(norm):
        tensors[f"layer{i}.G_LM"] = e.G_LM.detach().cpu().clone().contiguous()
        if e.A_LM is not None:
            tensors[f"layer{i}.A_LM"] = e.A_LM.detach().cpu().clone().contiguous()
    g0 = norm[0].G_LM
    meta: dict[str, str] = {
        "format": G_FILE_FORMAT,
        "num_layers": str(len(norm)),
        "num_heads": str(g0.shape[-3]) if g0.dim() >= 3 else "1",
        "dk": str(g0.shape[-1]),
    }
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    out = Path(path)
    save_safetensors(tensors, out, metadata=meta)  # creates the folder; atomic, 0644
    return out
