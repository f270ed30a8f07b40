"""Tensors from pickles that must not run code: the reader of the paper's G_LM pickles.

The paper published its G lists as Python pickles of tensors (``pickle.dump`` of a list of
tensors, or of ``[A_LM, G_LM]`` pairs, saved from CUDA). Pickles can run arbitrary code when
loaded, so they are read by :class:`_RestrictedUnpickler`: only the globals needed to rebuild
tensors resolve, each to a function of this module (never to torch's own loaders, because
``torch.storage._load_from_bytes`` calls ``torch.load(weights_only=False)``); every other global
-- ``os.system``, ``builtins.eval``, ``subprocess.Popen`` ... -- is refused with a
:class:`~pldr_llm.core.errors.PLDRError` that names it, before anything from the file is called.
Storages are always materialized on the CPU whatever device they were saved from. Legacy
(pre-1.6, non-zip) ``torch.save`` streams are read by the same restricted reader.

Why not ``torch.load(weights_only=True)``: torch's restricted unpickler rejects the paper's files
(they are protocol-5 pickles whose storages come through ``_load_from_bytes``), so they could
only be loaded with ``weights_only=False``, which executes whatever the file says.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import struct
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from pldr_llm.core.errors import PLDRError

__all__ = ["load_tensor_pickle"]

# First object of a legacy torch.save stream, then its protocol version (torch/serialization.py).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    # Untyped storages are raw bytes; _rebuild_tensor_v3 says which dtype to view them as.
    "UntypedStorage": torch.uint8,
}

_DTYPE_NAMES = (
    "float32 float64 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
    "float double half long int short"
).split()


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class _StorageType:
    """Stand-in for a torch storage class named in a pickle: carries only its dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A pickle may try to *call* a storage class (REDUCE); torch never writes that.
        raise PLDRError(f"refusing to construct torch.{self.name} directly from a pickle")


class _Storage:
    """A storage rebuilt from a file: a flat CPU tensor of its dtype holding all its elements."""

    def __init__(self, flat: Tensor) -> None:
        self.flat = flat

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype


def _check_int(value: Any, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PLDRError(f"malformed tensor in pickle: {what} is {value!r}")
    return value


def _as_strided_checked(flat: Tensor, offset: Any, size: Any, stride: Any) -> Tensor:
    """``flat.as_strided(size, stride, offset)`` after checking every index stays inside ``flat``."""
    offset = _check_int(offset, "storage offset")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise PLDRError("malformed tensor in pickle: size and stride must be tuples")
    size = tuple(_check_int(s, "a size") for s in size)
    stride = tuple(_check_int(s, "a stride") for s in stride)
    if len(size) != len(stride) or len(size) > 32:
        raise PLDRError("malformed tensor in pickle: size and stride do not match")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= flat.numel():
            raise PLDRError(
                f"malformed tensor in pickle: view of {size} reaches element {last} "
                f"of a storage of {flat.numel()}"
            )
    return flat.as_strided(size, stride, offset)


def _as_storage(storage: Any) -> _Storage:
    if not isinstance(storage, _Storage):
        raise PLDRError(f"malformed tensor in pickle: storage is a {type(storage).__name__}")
    return storage


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Tensor:
    """Safe stand-in for ``torch._utils._rebuild_tensor``."""
    return _as_strided_checked(_as_storage(storage).flat, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Tensor:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v2``.

    ``requires_grad``, backward hooks and tensor metadata are dropped on purpose: a G file holds
    data, and hooks are callables that must never come from a file.
    """
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> Tensor:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v3`` (untyped storage + explicit dtype)."""
    flat = _as_storage(storage).flat
    if not isinstance(dtype, torch.dtype):
        raise PLDRError(f"malformed tensor in pickle: dtype is {dtype!r}")
    if flat.dtype != dtype:
        if flat.dtype != torch.uint8 or flat.numel() % _element_size(dtype):
            raise PLDRError("malformed tensor in pickle: storage does not match its dtype")
        flat = flat.view(dtype)
    return _as_strided_checked(flat, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Tensor:
    """Safe stand-in for ``torch._utils._rebuild_parameter``: the plain tensor, no Parameter."""
    if not isinstance(data, Tensor):
        raise PLDRError("malformed parameter in pickle: its data is not a tensor")
    return data


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Safe stand-in for ``_codecs.encode``: protocol-2 pickles spell ``bytes`` this way."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PLDRError("malformed bytes in pickle")
    return text.encode("latin1")


def _load_from_bytes(data: Any) -> _Storage:
    """Safe stand-in for ``torch.storage._load_from_bytes`` (which would call
    ``torch.load(weights_only=False)``): parses the embedded storage with the restricted reader."""
    if not isinstance(data, (bytes, bytearray)):
        raise PLDRError("malformed storage in pickle: payload is not bytes")
    data = bytes(data)
    if data[:4] == b"PK\x03\x04":  # a future torch may embed zip-format storages
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if not isinstance(obj, torch.storage.TypedStorage):
            raise PLDRError("malformed storage in pickle: zip payload is not a storage")
        flat = torch.empty(0, dtype=obj.dtype).set_(obj._untyped_storage)
        return _Storage(flat)
    obj = _read_legacy_stream(io.BytesIO(data), len(data), _INNER_GLOBALS)
    if not isinstance(obj, _Storage):
        raise PLDRError("malformed storage in pickle: payload is not a storage")
    return obj


def _globals_table(
    extra: Mapping[tuple[str, str], Any],
) -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(name, dtype)
    table[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", torch.uint8)
    for name in _DTYPE_NAMES:
        table[("torch", name)] = getattr(torch, name)
    table.update(extra)
    return table


# Inside an embedded storage (a legacy torch.save stream) nothing may nest another payload.
_INNER_GLOBALS = _globals_table({})
# The outer pickle may carry storages as `_load_from_bytes(b"...")`, the way pickle.dump writes them.
_OUTER_GLOBALS = _globals_table({("torch.storage", "_load_from_bytes"): _load_from_bytes})


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals come only from an allow-list of safe stand-ins.

    ``find_class`` is the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ,
    EXT* all go through it), so refusing there means nothing else in the file can run.
    ``persistent_load`` is given by the caller: legacy torch.save streams refer to their storages
    by persistent id; a plain pickle has none.
    """

    def __init__(
        self,
        file: io.BytesIO,
        allowed: Mapping[tuple[str, str], Any],
        persistent: Callable[[Any], Any] | None,
    ) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise PLDRError(
                f"refusing to unpickle global '{module}.{name}': this reader allows only what "
                "rebuilds tensors, and nothing in the file was run"
            ) from None
        # Hand out fresh objects: a BUILD opcode can set attributes on whatever a global resolves
        # to, and must not be able to alter this module's functions for later loads.
        if isinstance(found, _StorageType):
            return _StorageType(found.name, found.dtype)
        if isinstance(found, types.FunctionType):
            return functools.partial(found)
        return found  # torch.device, OrderedDict, dtypes: immutable

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise PLDRError(f"malformed pickle: unexpected persistent id {pid!r}")
        return self._persistent(pid)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_legacy_stream(f: io.BytesIO, total: int, allowed: Mapping[tuple[str, str], Any]) -> Any:
    """Read a legacy (non-zip) ``torch.save`` stream whose first pickle, the magic number, is next.

    Layout (torch/serialization.py, ``_legacy_save``): pickles of the magic number, the protocol
    version, a sys-info dict, the object (storages as persistent ids
    ``("storage", StorageClass, key, location, numel, view_metadata)``) and the list of storage
    keys; then, per key, an int64 element count and the raw little-endian data.
    """
    magic = _RestrictedUnpickler(f, allowed, None).load()
    if magic != _LEGACY_MAGIC:
        raise PLDRError("malformed storage in pickle: not a torch.save stream")
    return _read_legacy_body(f, total, allowed)


def _read_legacy_body(f: io.BytesIO, total: int, allowed: Mapping[tuple[str, str], Any]) -> Any:
    protocol = _RestrictedUnpickler(f, allowed, None).load()
    if protocol != _LEGACY_PROTOCOL:
        raise PLDRError(f"unsupported legacy torch.save protocol {protocol!r}")
    sys_info = _RestrictedUnpickler(f, allowed, None).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise PLDRError("unsupported legacy torch.save file: saved on a big-endian machine")

    storages: dict[str, _Storage] = {}

    def persistent(pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] not in ("storage", b"storage"):
            raise PLDRError(f"malformed pickle: unsupported persistent id {pid!r}")
        _, storage_type, key, location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise PLDRError("malformed pickle: persistent id names no storage class")
        if not isinstance(key, str) or not isinstance(location, (str, bytes)):
            raise PLDRError("malformed pickle: bad storage key or location")
        numel = _check_int(numel, "a storage size")
        # Every element must be present in the file: refuse before allocating anything bigger.
        if numel * _element_size(storage_type.dtype) > total:
            raise PLDRError(f"malformed pickle: storage of {numel} elements exceeds the file")
        if key not in storages:
            # The location (e.g. "cuda:0") is ignored on purpose: storages live on the CPU.
            storages[key] = _Storage(torch.empty(numel, dtype=storage_type.dtype))
        storage = storages[key]
        if storage.dtype != storage_type.dtype or storage.flat.numel() != numel:
            raise PLDRError("malformed pickle: one storage key with two shapes")
        if view is None:
            return storage
        if not isinstance(view, tuple) or len(view) != 3:
            raise PLDRError("malformed pickle: bad storage view")
        _, v_offset, v_size = view
        return _Storage(_as_strided_checked(storage.flat, v_offset, (v_size,), (1,)))

    result = _RestrictedUnpickler(f, allowed, persistent).load()
    keys = _RestrictedUnpickler(f, allowed, None).load()
    if not isinstance(keys, list) or any(k not in storages for k in keys):
        raise PLDRError("malformed pickle: storage key list does not match its storages")
    for key in keys:
        flat = storages[key].flat
        head = f.read(8)
        if len(head) != 8:
            raise PLDRError("malformed pickle: storage data is truncated")
        (count,) = struct.unpack("<q", head)
        if count != flat.numel():
            raise PLDRError("malformed pickle: storage data size does not match its header")
        nbytes = count * flat.element_size()
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise PLDRError("malformed pickle: storage data is truncated")
        if nbytes:
            # Fill in place: tensors rebuilt above are views of this storage.
            flat.copy_(torch.frombuffer(bytearray(raw), dtype=flat.dtype))
    return result


def load_tensor_pickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only tensor reconstruction; tensors come back on the CPU.

    Accepts a plain ``pickle.dump`` of tensors (or lists/tuples/dicts of them) and a legacy
    ``torch.save`` stream. Any global outside the allow-list raises :class:`PLDRError` naming it,
    and nothing from the file is executed.
    """
    f = io.BytesIO(data)
    try:
        first = _RestrictedUnpickler(f, _OUTER_GLOBALS, None).load()
        if isinstance(first, int) and not isinstance(first, bool) and first == _LEGACY_MAGIC:
            return _read_legacy_body(f, len(data), _OUTER_GLOBALS)
        return first
    except PLDRError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RuntimeError,
        struct.error,
        MemoryError,
        RecursionError,
    ) as exc:
        raise PLDRError(f"not a readable tensor pickle ({type(exc).__name__}: {exc})") from None
