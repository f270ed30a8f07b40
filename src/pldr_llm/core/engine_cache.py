"""The one factory of decoding engines, and the one cache of them per model.

Every caller that decodes -- :func:`pldr_llm.generate` and its siblings, the CLI's background
warm-up, the server's scheduler, the deductive cache-mode runs -- describes the engine it needs
as an :class:`EngineSpec` and gets it from :func:`build_engine` (always a new engine) or
:func:`borrow_engine` / :func:`lend_engine` (the model's cached engine of that spec when one is
idle). Engines whose step runs as CUDA graphs are cached (their captured graphs are the
expensive part); eager ones are cheap and built fresh. The cache lives on the model
(``model.__dict__``), so a server and :func:`pldr_llm.generate` in one process find the same
engines, and their graphs, for the same spec.

An engine is not thread-safe: the cache lends each one to one user at a time. A spec whose
cached engine is out on loan (a server holds its engines for its lifetime) gets a fresh engine,
which is cached when it is given back and nothing idle holds that spec.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from .engine import DecodeEngine
from .model import PLDRModel

#: Idle engines kept per model (the least recently used beyond this are dropped).
MAX_IDLE_ENGINES = 4
_LOCK = threading.Lock()


@dataclass(frozen=True)
class EngineSpec:
    """Everything that makes two engines interchangeable: their shape (``rows`` slots of up to
    ``span`` tokens) and their options (those of :class:`DecodeEngine`). ``compile`` may be
    torch.compile's options (a dict): specs compare it by its ``repr``."""

    rows: int
    span: int | None = None  # None: the model's max_seq_len
    kv: bool = True
    g: bool = True
    cuda_graph: bool | None = None
    compile: bool | dict[str, Any] = field(default=False, compare=False)
    steps_per_graph: int = 1
    keep_logits: bool = False
    output_logprobs: bool = False
    record_deductive: bool = False
    fused: bool | None = None
    pack_projections: bool | None = None
    compile_key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile_key", repr(self.compile))

    def resolved(self, model: PLDRModel) -> EngineSpec:
        """The same spec with its defaults spelled out for ``model`` (span: its max_seq_len;
        cuda_graph: on for a CUDA model with the KV-cache, unless recording), so that two specs
        of the same engine compare equal however they were written."""
        graph = self.cuda_graph
        if graph is None:
            graph = model.device.type == "cuda" and self.kv and not self.record_deductive
        span = model.config.max_seq_len if self.span is None else self.span
        return replace(self, span=span, cuda_graph=graph)


def build_engine(model: PLDRModel, spec: EngineSpec) -> DecodeEngine:
    """A new engine of ``spec`` for ``model`` (the one place engines are made)."""
    return DecodeEngine(
        model, spec.rows, spec.span, cuda_graph=spec.cuda_graph, compile=spec.compile,
        steps_per_graph=spec.steps_per_graph, enable_kvcache=spec.kv, enable_Gcache=spec.g,
        output_logprobs=spec.output_logprobs, keep_logits=spec.keep_logits,
        record_deductive=spec.record_deductive, fused=spec.fused,
        pack_projections=spec.pack_projections,
    )  # fmt: skip


class IdlePool(OrderedDict):
    """What a model keeps for reuse while nobody uses it, by key (one each): the most recently
    given back last, at most ``limit`` (the least recently used beyond it are dropped). Decoding
    engines by spec here, transformers' loop's static decoders (:mod:`.hf_static_cache`)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def take(self, key: Any) -> Any:
        """The idle object of ``key``, no longer idle (None: none)."""
        with _LOCK:
            return self.pop(key, None)

    def put(self, key: Any, value: Any) -> None:
        """``value`` becomes the idle object of ``key`` (when none is)."""
        with _LOCK:
            if key in self:
                return
            self[key] = value
            while len(self) > self.limit:
                self.popitem(last=False)


def idle_pool(model: Any, name: str, limit: int) -> IdlePool:
    """The :class:`IdlePool` ``name`` of ``model`` (kept in its ``__dict__``, so that every
    caller in the process finds it)."""
    with _LOCK:
        pool = model.__dict__.get(name)
        if not isinstance(pool, IdlePool):
            pool = model.__dict__[name] = IdlePool(limit)
        return pool


@dataclass
class _ModelEngines:
    idle: IdlePool = field(default_factory=lambda: IdlePool(MAX_IDLE_ENGINES))
    lent: dict[int, EngineSpec] = field(default_factory=dict)  # id(engine) -> its spec


def _engines_of(model: PLDRModel) -> _ModelEngines:
    with _LOCK:
        engines = model.__dict__.get("_pldr_decode_engines")
        if not isinstance(engines, _ModelEngines):
            engines = model.__dict__["_pldr_decode_engines"] = _ModelEngines()
        return engines


def lend_engine(model: PLDRModel, spec: EngineSpec) -> DecodeEngine:
    """An engine of ``spec`` for the caller alone until :func:`give_back_engine`: the cached
    idle one (its graphs already captured) or a new one. Engines that run captured CUDA graphs
    are cached; others are cheap, and always new."""
    spec = spec.resolved(model)
    if not spec.cuda_graph:
        return build_engine(model, spec)
    engines = _engines_of(model)
    engine = engines.idle.take(spec)
    if engine is None:
        engine = build_engine(model, spec)  # outside the lock: building allocates on the device
    with _LOCK:
        engines.lent[id(engine)] = spec
    return engine


def give_back_engine(model: PLDRModel, engine: DecodeEngine) -> None:
    """End the loan of ``engine``: it becomes the idle engine of its spec (when none is)."""
    engines = _engines_of(model)
    with _LOCK:
        spec = engines.lent.pop(id(engine), None)
    if spec is not None:
        engines.idle.put(spec, engine)


@contextmanager
def borrow_engine(model: PLDRModel, spec: EngineSpec) -> Iterator[DecodeEngine]:
    """:func:`lend_engine` for the duration of a ``with`` block."""
    engine = lend_engine(model, spec)
    try:
        yield engine
    finally:
        give_back_engine(model, engine)


def cached_engines(model: PLDRModel) -> dict[EngineSpec, DecodeEngine]:
    """The model's idle cached engines, by spec (for inspection and tests)."""
    engines = _engines_of(model)
    with _LOCK:
        return dict(engines.idle)
