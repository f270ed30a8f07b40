"""The one factory and cache of decoding engines (pldr_llm.core.engine_cache).

Engines whose step runs as CUDA graphs are cached per model and lent to one user at a time;
building one captures nothing (capture happens on a step), so the cache's rules are checked on
the CPU with ``cuda_graph=True`` engines that are never stepped.
"""

from __future__ import annotations

import threading

from pldr_llm.core.engine_cache import (
    MAX_IDLE_ENGINES,
    EngineSpec,
    borrow_engine,
    build_engine,
    cached_engines,
    give_back_engine,
    lend_engine,
)
from pldr_llm.core.generate import engine_spec


def test_a_spec_builds_the_engine_it_names(tiny_model):
    spec = EngineSpec(3, 24, kv=True, g=False, cuda_graph=False, output_logprobs=True)
    engine = build_engine(tiny_model, spec)
    assert (engine.max_batch, engine.max_len) == (3, 24)
    assert not engine.enable_Gcache and engine.output_logprobs and not engine.use_graph
    assert EngineSpec(2, compile={"mode": "a"}) == EngineSpec(2, compile={"mode": "a"})
    assert EngineSpec(2, compile={"mode": "a"}) != EngineSpec(2, compile={"mode": "b"})


def test_graph_engines_are_cached_and_lent_to_one_user_at_a_time(tiny_model):
    spec = EngineSpec(2, 32, cuda_graph=True)
    with borrow_engine(tiny_model, spec) as first:
        with borrow_engine(tiny_model, spec) as second:
            assert second is not first  # the first is out on loan
        assert cached_engines(tiny_model)[spec] is second
    # one idle engine per spec: the second stays, the first is dropped
    assert cached_engines(tiny_model)[spec] is second
    with borrow_engine(tiny_model, spec) as again:
        assert again is second and spec not in cached_engines(tiny_model)
    # eager engines are cheap: always new, never cached
    eager = EngineSpec(2, 32, cuda_graph=False)
    with borrow_engine(tiny_model, eager) as a, borrow_engine(tiny_model, eager) as b:
        assert a is not b
    assert eager not in cached_engines(tiny_model)


def test_the_cache_keeps_the_most_recently_used_engines(tiny_model):
    specs = [EngineSpec(1, 16 + 8 * i, cuda_graph=True) for i in range(MAX_IDLE_ENGINES + 2)]
    engines = [lend_engine(tiny_model, s) for s in specs]
    for engine in engines:
        give_back_engine(tiny_model, engine)
    assert list(cached_engines(tiny_model)) == specs[-MAX_IDLE_ENGINES:]


def test_threads_never_share_an_engine(tiny_model):
    spec = EngineSpec(1, 40, cuda_graph=True)
    held, barrier = [], threading.Barrier(4)

    def worker() -> None:
        engine = lend_engine(tiny_model, spec)
        held.append(engine)
        barrier.wait()  # all four hold theirs at once
        give_back_engine(tiny_model, engine)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in held}) == 4
    assert cached_engines(tiny_model)[spec] in held


def test_generate_spec_buckets_only_captured_engines(tiny_model):
    cpu = engine_spec(tiny_model, 3, 40)
    assert (cpu.rows, cpu.span, cpu.cuda_graph) == (3, 40, False)
    graph = engine_spec(tiny_model, 3, 40, cuda_graph=True, output_logprobs=True)
    assert (graph.rows, graph.span, graph.output_logprobs) == (4, 64, True)


def test_a_server_engine_and_generate_share_one_spec(tiny_model):
    """The scheduler's spec (max_batch rows, the whole context, logprobs kept) and generate's
    for one prompt over the whole context name the same engine once defaults are resolved."""
    server = EngineSpec(1, None, output_logprobs=True, cuda_graph=True)
    engine = lend_engine(tiny_model, server)
    give_back_engine(tiny_model, engine)  # the scheduler stopped
    length = tiny_model.config.max_seq_len
    spec = engine_spec(tiny_model, 1, length, cuda_graph=True, output_logprobs=True)
    with borrow_engine(tiny_model, spec) as shared:
        assert shared is engine
    assert EngineSpec(2).resolved(tiny_model) == EngineSpec(2, 64, cuda_graph=False)
