"""Loading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

A DCP folder is read by two pickle loaders that trust the file: ``FileSystemReader.read_metadata``
unpickles ``.metadata`` with plain ``pickle.load``, and ``DefaultLoadPlanner.load_bytes`` reads
every non-tensor value (the optimizer's ``param_groups``) with ``torch.load(weights_only=False)``.
A folder copied from elsewhere could run anything through either. Here:

* ``.metadata`` goes through :class:`_MetadataUnpickler`: only the classes DCP's metadata is made
  of resolve (``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``, ... , ``torch.Size``,
  dtypes, layouts, paths); any other global is refused with one line naming the file and the
  global, before anything from the file is called. ``BUILD`` (setting state) is allowed on
  instances of those classes only, so a file cannot alter a class or function it names.
* Every storage entry must name a plain file inside the checkpoint folder (no ``..``, no ``/``).
* Non-tensor values are read with ``torch.load(weights_only=True)`` (torch's own allow-list).

:func:`safe_dcp_load` is the one way this project calls ``dcp.load``.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import torch

from pldr_llm.core.errors import PLDRError
from pldr_llm.core.fileio import refused_global

__all__ = ["read_dcp_metadata", "safe_dcp_load"]

_METADATA_FILE = ".metadata"
#: torch.distributed.checkpoint.metadata's classes a DCP pickle may name (those this torch has)
_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "ChunkStorageMetadata",
    "BytesStorageMetadata",
)


def _layout(name: Any) -> torch.layout:
    """Stand-in for ``torch.serialization._get_layout``: a layout by its name, nothing else."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise PLDRError(f"malformed checkpoint metadata: unknown layout {name!r}")
    return layouts[name]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """``(module, name) -> object`` for everything DCP metadata is pickled from."""
    from torch.distributed.checkpoint import filesystem, metadata

    table: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): _layout,
        ("pathlib", "PosixPath"): PurePosixPath,  # a checkpoint id is informative only
        ("pathlib", "PurePosixPath"): PurePosixPath,
        ("collections", "OrderedDict"): dict,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    }
    for name in (*_METADATA_CLASSES, "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            table[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    return table


def _buildable_types() -> tuple[type, ...]:
    """The classes whose *instances* a pickle may set state on (never the classes themselves)."""
    from torch.distributed.checkpoint import filesystem, metadata

    found = [getattr(metadata, n) for n in _METADATA_CLASSES if hasattr(metadata, n)]
    return (*found, filesystem._StorageInfo)


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with an allow-list ``find_class`` and a guarded ``BUILD``.

    ``find_class`` is the only way a pickle reaches a callable; the pure-Python class is used
    (metadata files are small) because its opcode table can be changed: ``BUILD`` on an allowed
    class or function object would otherwise ``setattr`` on it for the whole process.
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the unpickler's value stack (set by its load)

    def __init__(self, file: io.BytesIO, source: Path) -> None:
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()
        self._buildable = _buildable_types()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise PLDRError(
                f"{self._source}: refusing to unpickle '{module}.{name}': a checkpoint's "
                "metadata may hold only DCP's metadata classes, and nothing in the file was run"
            )
        return found

    def _load_build(self) -> None:
        target = self.stack[-2]  # the state is on top, the object it is set on below
        if not isinstance(target, self._buildable):
            raise PLDRError(
                f"{self._source}: refusing to set state on a {type(target).__name__} while "
                "unpickling checkpoint metadata; nothing in the file was run"
            )
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build


def read_dcp_metadata(folder: str | Path) -> Any:
    """The ``Metadata`` of the DCP folder ``folder``, unpickled with the allow-list; its storage
    entries checked to name plain files inside ``folder``. One-line :class:`PLDRError` otherwise."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / _METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PLDRError(f"{path}: cannot read the checkpoint's metadata ({exc.strerror})") from None
    try:
        meta = _MetadataUnpickler(io.BytesIO(data), path).load()
    except PLDRError:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure is a malformed file
        raise PLDRError(
            f"{path}: not readable checkpoint metadata ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(meta, Metadata) or not isinstance(meta.storage_data, dict):
        raise PLDRError(f"{path}: not DCP checkpoint metadata ({type(meta).__name__})")
    for info in meta.storage_data.values():
        name = getattr(info, "relative_path", None)
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or "\\" in name
            or name
            in (
                ".",
                "..",
            )
        ):
            raise PLDRError(f"{path}: a storage entry names {name!r}, not a file of the folder")
    return meta


def _reader(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # per-rank metadata files are not written here
                raise PLDRError(f"{folder}: per-rank checkpoint metadata is not supported")
            meta = read_dcp_metadata(folder)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeFileSystemReader(folder)


def _planner(folder: Path) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """``DefaultLoadPlanner`` reading non-tensor values with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError as exc:
                what = refused_global(exc) or "an object that is not plain data"
                raise PLDRError(
                    f"{folder}: refusing to unpickle '{what}' (value "
                    f"{read_item.dest_index.fqn}); nothing in the file was run"
                ) from None
            # Placed as DefaultLoadPlanner.load_bytes places what it loads.
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return WeightsOnlyLoadPlanner()


def safe_dcp_load(state: dict[str, Any], folder: str | Path) -> None:
    """``dcp.load(state)`` from ``folder`` through the guarded reader and planner.

    Raises :class:`PLDRError` (one line, naming the file and the refused class) for a file that
    needs anything else; DCP's ``CheckpointException`` wrapping of it is undone here.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(folder)
    read_dcp_metadata(folder)  # refuse before DCP starts (and wraps errors per rank)
    try:
        dcp.load(state, storage_reader=_reader(folder), planner=_planner(folder))
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, PLDRError):
                raise PLDRError(str(inner)) from None
        raise
