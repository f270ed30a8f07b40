"""File names, safe reading and writing: atomic replaces, ordinary permissions, one-line errors.

The names of the files of a saved model (:data:`CONFIG_NAME`, :data:`WEIGHTS_NAME`, ...) are
defined here once, for the model, the bundle loader and the transformers folders. Reading never
runs code: safetensors, or ``torch.load(weights_only=True)`` (:func:`safe_torch_load`).

Why atomic: a model file, export, plot, JSON report or G file is often written over a previous one
(a resumed run saves its final model again). Writing straight into the target leaves a truncated
file -- and no previous one -- when the disk fills up or a file-size limit is hit. Every writer here
writes a temporary file beside the target, flushes it to disk and renames it over the target, so
the target is either the old file or the complete new one.

Why explicit permissions: ``safetensors.torch.save_file`` creates its file 0600, so another user
reading a shared run folder got "No such file or directory" for a file that exists. Files written
here get ``0666 & ~umask`` (0644 under the usual umask), like every other file of a run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PLDRError, first_line

if TYPE_CHECKING:  # torch loads on first use: the CLI answers --help and config errors without it
    from torch import Tensor

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "CHECKPOINT_SUFFIX",
    "HYPERPARAMETERS_SUFFIX",
    "safe_torch_load",
    "read_json_object",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "io_error_message",
    "load_safetensors",
    "save_safetensors",
]

# The files of a saved model: the project's format (and transformers'), then the original's.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CHECKPOINT_SUFFIX = ".pth"
HYPERPARAMETERS_SUFFIX = "_hyperparameters.py"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success, fsync it and rename it over ``target``.

    On any error the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_file():
        # A device, pipe or terminal (/dev/stdout, /dev/full): write into it, never replace it.
        try:
            yield target
        except OSError as exc:
            exc.filename = exc.filename or str(target)
            raise
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        exc.filename = str(target)  # not the temporary name the user never asked for
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(target)  # name the file the user asked for, not our temporary
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def save_safetensors(
    tensors: Mapping[str, Tensor],
    target: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """``safetensors.torch.save_file``, atomically and with ordinary permissions."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        except SafetensorError as exc:
            # safetensors reports a failed write as "I/O error: ... (os error 28)": give it back
            # its errno, so a full disk reads like every other full disk.
            found = re.search(r"os error (\d+)", str(exc))
            if not found:
                raise PLDRError(f"could not write {target}: {exc}") from None
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(target)) from None
    return Path(target)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` on the CPU; a truncated or corrupt file is a PLDRError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise PLDRError(
            f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt: "
            "save or download it again"
        ) from None


#: What to do about the I/O errors a user can cause (or fix) without touching the code.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f): raise it or write "
    "elsewhere",
    errno.EACCES: "permission denied: choose a path you can write to",
    errno.EPERM: "permission denied: choose a path you can write to",
    errno.EROFS: "read-only file system: choose a path you can write to",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "it is a directory",
    errno.EEXIST: "it already exists",
}


def io_error_message(exc: OSError) -> str:
    """One line for an ``OSError``: the path (when known), what happened and what to do."""
    what = _ADVICE.get(exc.errno or -1) or exc.strerror or str(exc)
    if exc.filename is not None:
        where = os.fsdecode(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)}"
        return f"{where}: {what}"
    return what


def refused_global(exc: BaseException) -> str | None:
    """The global torch's weights-only loader refused (``'posix.system'``), if its message says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def safe_torch_load(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU (a file never runs code), one-line errors.

    ``mmap``: map the tensors' bytes instead of reading them ahead (each is read when it is
    first used: a model's parameters copy them once), where the file is in torch's zip format.
    """
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise PLDRError(f"checkpoint not found: {path}")
    try:
        mmap = mmap and zipfile.is_zipfile(path)  # the legacy format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's text advises weights_only=False, exactly what must not be done with such a file
        what = refused_global(exc) or "an object that is not tensors or plain data"
        raise PLDRError(
            f"{path}: refused to unpickle '{what}' (a checkpoint may hold only tensors and plain "
            "data); nothing in the file was run"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other failure to read is a bad file
        raise PLDRError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None


def read_json_object(path: str | os.PathLike[str], kind: str = "config") -> dict[str, Any]:
    """A JSON file that must hold an object (a model's or tokenizer's config); one-line errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PLDRError(f"{path} is not a readable JSON {kind} ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise PLDRError(f"{path}: a {kind} must be a JSON object")
    return data
