"""Generation: batched rows equal lone runs, sampling options, clear errors."""

from __future__ import annotations

import pytest
import torch

from pldr_llm import PLDRError, generate, generate_details
from pldr_llm.generation import top_p_filter
from reference_decoding import reference_generate

PROMPTS = [[5, 17, 22, 9, 41, 7], [12, 3], [250, 31, 8, 99]]
MODES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.slow
@pytest.mark.parametrize(("kv", "g"), MODES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_batched_rows_equal_lone_runs(tiny_model, kv, g, implementation):
    tiny_model.attn_implementation = implementation
    alone = [
        generate(
            tiny_model,
            torch.tensor(p),
            10,
            top_k=1,
            enable_kvcache=kv,
            enable_Gcache=g,
            stop_at_eos=False,
        ).tolist()
        for p in PROMPTS
    ]
    batched = generate(
        tiny_model, PROMPTS, 10, top_k=1, enable_kvcache=kv, enable_Gcache=g, stop_at_eos=False
    )
    assert batched == alone


def test_padded_logits_equal_lone_logits(tiny_model):
    """Left padding is kept out of A, keys and positions: logits equal the lone run's."""
    prompt = torch.tensor([[7, 8, 9, 10]])
    padded = torch.tensor([[0, 0, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = tiny_model(prompt, output_deductive=True)
        batch = tiny_model(padded, attention_mask=mask, output_deductive=True)
    torch.testing.assert_close(batch.logits[:, 2:], alone.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch.deductive[0].A, alone.deductive[0].A, atol=1e-5, rtol=1e-4)
    # without the mask (the original's semantics) padding does enter A
    with torch.no_grad():
        unmasked = tiny_model(padded, output_deductive=True)
    assert not torch.allclose(unmasked.deductive[0].A, alone.deductive[0].A, atol=1e-3)
    # key_padding (a caller's hint that spares a read from the device) never drops a mask: True
    # says it has a 0; False (its meaning without a mask: no pad id) is not taken for a mask
    with torch.no_grad():
        masked = tiny_model(padded, attention_mask=mask)
        for hint in (True, False):
            hinted = tiny_model(padded, attention_mask=mask, key_padding=hint)
            torch.testing.assert_close(hinted.logits, masked.logits, atol=0, rtol=0)


def test_stop_at_eos_per_row(tiny_model):
    # make end-of-text (3) the greedy choice after token 5 only
    with torch.no_grad():
        tiny_model.final_layer.bias.zero_()
    first = generate(tiny_model, [[5, 6]], 1, top_k=1, stop_at_eos=False)[0][-1]
    out = generate(tiny_model, [[5, 6], [9, 10, 11]], 6, top_k=1, eos_id=first)
    assert out[0] == [5, 6, first]  # stopped right after its end-of-text
    assert len(out[1]) == 3 + 6 or out[1][-1] == first


def test_tensor_batch_keeps_rank_and_pads_finished_rows(tiny_model):
    prompt = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = generate(tiny_model, prompt, 4, top_k=1, stop_at_eos=False)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt)
    single = generate(tiny_model, torch.tensor([4, 5, 6]), 4, top_k=1, stop_at_eos=False)
    assert single.dim() == 1 and torch.equal(single, out[0])


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(tiny_model):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(
            tiny_model,
            [4, 5, 6],
            12,
            temperature=0.9,
            top_p=0.95,
            top_k=40,
            generator=gen,
            stop_at_eos=False,
        ).tolist()

    assert run(1) == run(1)
    assert run(1) != run(2) or run(1) != run(3)


def test_streamer_and_stopping_criteria(tiny_model):
    seen = []
    out = generate_details(
        tiny_model,
        [4, 5, 6],
        8,
        top_k=1,
        stop_at_eos=False,
        streamer=lambda ids: seen.append(ids.tolist()),
        stopping_criteria=lambda row, new: len(new) >= 3,
    )
    assert len(out.new_ids[0]) == 3
    assert [s[0] for s in seen] == out.new_ids[0]


@pytest.mark.slow
def test_stopping_criteria_in_blocks_drop_what_follows_the_stop(tiny_model):
    """The criterion reads blocks of steps: each row ends exactly at the id
    where the criterion said stop (the rest of its block dropped), the others go on, and every
    row's ids are the prefix of what it generates without the criterion."""
    from pldr_llm.core.generate import STOP_CHECK_BLOCK

    prompts = [[4, 5, 6], [7, 8, 9, 10], [11, 12]]
    n = 3 * STOP_CHECK_BLOCK
    free = generate_details(tiny_model, prompts, n, top_k=1, stop_at_eos=False).new_ids
    stop_at = [2, STOP_CHECK_BLOCK + 3, None]  # inside the first block, inside the second, never
    calls = []

    def criteria(row: int, new: list[int]) -> bool:
        calls.append((row, len(new)))
        return stop_at[row] is not None and len(new) >= stop_at[row]

    out = generate_details(
        tiny_model, prompts, n, top_k=1, stop_at_eos=False, stopping_criteria=criteria
    )
    assert [len(ids) for ids in out.new_ids] == [2, STOP_CHECK_BLOCK + 3, n]
    for row, ids in enumerate(out.new_ids):
        assert ids == free[row][: len(ids)]
        # called once per kept id, never for the ids generated past the stop
        assert [k for r, k in calls if r == row] == list(range(1, len(ids) + 1))
    assert out.ids[1] == prompts[1] + out.new_ids[1]


def test_empty_prompt_starts_from_end_of_text(tiny_model):
    out = generate(tiny_model, torch.tensor([], dtype=torch.long), 3, top_k=1, stop_at_eos=False)
    assert out[0].item() == 3 and out.numel() == 4


def test_top_p_keeps_at_least_one():
    logits = torch.tensor([[5.0, 1.0, 0.5]])
    assert top_p_filter(logits, 0.01).tolist() == [[5.0, -1e10, -1e10]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": -2}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": 1.5}, "seed"),
    ],
)
@pytest.mark.parametrize("call", ["generate", "stream_generate"])
def test_bad_sampling_arguments(tiny_model, kwargs, message, call):
    from pldr_llm.generation import stream_generate

    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(PLDRError, match=message):
        if call == "generate":
            generate(tiny_model, [4, 5], **args)
        else:
            list(stream_generate(tiny_model, [4, 5], **args))


def test_bad_inputs(tiny_model):
    from pldr_llm.generation import DecodeEngine, SamplingParams, stream_generate

    vocab = tiny_model.config.input_vocab_size
    with pytest.raises(
        PLDRError, match=rf"token id {vocab} is outside the vocabulary \[0, {vocab}\)"
    ):
        generate(tiny_model, [4, vocab], 2)
    with pytest.raises(PLDRError, match="token id -1 is outside the vocabulary"):
        tiny_model(torch.tensor([[-1, 4]]))
    engine = DecodeEngine(tiny_model, 1, 16)
    with pytest.raises(PLDRError, match=f"token id {vocab + 5} is outside"):
        engine.add_many([[4, vocab + 5]], [SamplingParams(max_new_tokens=2)])
    too_long = list(range(4, 4 + tiny_model.config.max_seq_len + 1))
    with pytest.raises(PLDRError, match="max_seq_len"):
        generate(tiny_model, [t % 290 + 4 for t in too_long], 1)
    with pytest.raises(PLDRError, match="max_seq_len"):
        generate(tiny_model, [4, 5], tiny_model.config.max_seq_len)
    with pytest.raises(PLDRError, match="max_seq_len"):
        list(stream_generate(tiny_model, [4, 5], tiny_model.config.max_seq_len))
    with pytest.raises(PLDRError, match="G_init has 1 layers"):
        generate(tiny_model, [4, 5], 2, G_init=[torch.eye(16).expand(4, 16, 16)])


def test_prepare_g_init_reads_checks_and_casts(tiny_model):
    """The one preparation of a G_init: any G list in, the model's dtype out, one check."""
    from pldr_llm.core.cache import GCacheEntry, PLDRCache, prepare_g_init

    config = tiny_model.config
    heads, dk = config.num_heads, config.depth
    g = torch.randn(heads, dk, dk, dtype=torch.float64)
    assert prepare_g_init(tiny_model, None) is None
    for source in (
        [g] * config.num_layers,  # bare G_LM, no batch dimension
        [(None, g[None])] * config.num_layers,  # (A_LM, G_LM) pairs
        PLDRCache.from_g_list([GCacheEntry(g, g)] * config.num_layers),  # a cache
    ):
        entries = prepare_g_init(tiny_model, source)
        assert entries is not None and len(entries) == config.num_layers
        for e in entries:
            assert e.G_LM.shape == (1, heads, dk, dk) and e.G_LM.dtype == tiny_model.dtype
            assert torch.equal(e.G_LM, g[None].to(tiny_model.dtype))
    with pytest.raises(PLDRError, match=f"G_LM of layer 0 has shape \\[1, {heads + 1}"):
        prepare_g_init(tiny_model, [torch.randn(1, heads + 1, dk, dk)] * config.num_layers)
    batched = [torch.randn(3, heads, dk, dk)] * config.num_layers
    with pytest.raises(PLDRError, match="needs \\[1, "):
        prepare_g_init(tiny_model, batched)  # the decoding loop takes one G per layer
    assert prepare_g_init(tiny_model, batched, rows=3)[0].G_LM.shape[0] == 3  # transformers' rows
    with pytest.raises(PLDRError, match="needs \\[1 or 2, "):
        prepare_g_init(tiny_model, batched, rows=2)


# ---------------------------------------------------------------------------- the one loop
# The engine against the plain eager loop of tests/reference_decoding.py (model.forward with a
# growing cache, scalar filters). float32 on the CPU: ids must be equal; logits agree to 1e-5
# (the engine attends over a static, masked cache, so sums run over more masked slots).
SAMPLING = [
    {"temperature": 0.0},
    {"top_k": 1},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 20},
    {"temperature": 0.7, "top_p": 0.8, "top_k": 5},
]


@pytest.mark.slow
@pytest.mark.parametrize(("kv", "g"), MODES)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_every_cache_mode_equals_the_eager_loop(tiny_model, kv, g, sampling):
    want = [
        reference_generate(tiny_model, p, 9, kv=kv, g=g, seed=11, stop_at_eos=False, **sampling)
        for p in PROMPTS
    ]
    out = generate_details(
        tiny_model,
        PROMPTS,
        9,
        enable_kvcache=kv,
        enable_Gcache=g,
        seed=11,
        stop_at_eos=False,
        **sampling,
    )
    assert out.new_ids == want


@pytest.mark.slow
@pytest.mark.parametrize(("kv", "g"), MODES)
def test_g_init_in_every_cache_mode(tiny_model, kv, g):
    torch.manual_seed(3)
    g_init = [
        torch.rand(1, tiny_model.config.num_heads, tiny_model.config.depth, tiny_model.config.depth)
        for _ in range(tiny_model.config.num_layers)
    ]
    want = [
        reference_generate(tiny_model, p, 6, kv=kv, g=g, top_k=1, stop_at_eos=False, g_init=g_init)
        for p in PROMPTS
    ]
    out = generate_details(
        tiny_model,
        PROMPTS,
        6,
        top_k=1,
        enable_kvcache=kv,
        enable_Gcache=g,
        G_init=g_init,
        stop_at_eos=False,
    )
    assert out.new_ids == want
    plain = generate_details(tiny_model, PROMPTS, 6, top_k=1, stop_at_eos=False)
    assert plain.new_ids != want  # G_init changed what was attended


def test_step_logits_equal_the_eager_loop(tiny_model):
    _, want = reference_generate(
        tiny_model, PROMPTS[0], 7, top_k=1, stop_at_eos=False, return_logits=True
    )
    out = generate_details(
        tiny_model, [PROMPTS[0]], 7, top_k=1, stop_at_eos=False, output_logits=True
    )
    assert out.step_logits.shape == (7, 1, tiny_model.config.input_vocab_size)
    torch.testing.assert_close(out.step_logits[:, 0], want, atol=1e-5, rtol=1e-4)


def test_per_row_filters_equal_the_original_filters():
    from pldr_llm.generation import filter_logits, filter_rows

    torch.manual_seed(0)
    logits = torch.randn(len(SAMPLING) + 2, 50) * 3
    logits[-1, :10] = 20.0  # ties with the k-th value are kept
    rows = SAMPLING + [{"top_p": 0.5}, {"top_k": 3}]
    temperature = torch.tensor([r.get("temperature", 1.0) for r in rows])
    top_k = torch.tensor([r.get("top_k", 0) for r in rows])
    top_p = torch.tensor([r.get("top_p", 1.0) for r in rows])
    got = filter_rows(logits, temperature, top_k, top_p)
    for i, r in enumerate(rows):
        if r.get("temperature", 1.0) == 0:
            continue  # greedy rows take the arg-max of the raw logits
        want = filter_logits(logits[i : i + 1], **r)
        assert torch.equal(got[i : i + 1], want), r
    assert int((got[-1] > -1e10).sum()) == 10  # top-3 kept all 10 tied maxima


def test_uniform_draws_are_a_pure_function_with_the_right_law():
    from pldr_llm.generation import uniform_draws

    seeds = torch.tensor([1, 1, 2, 2**40 + 1])[:, None]
    steps = torch.arange(5000)[None, :]
    u = uniform_draws(seeds, steps)
    assert u.shape == (4, 5000) and u.dtype == torch.float32
    assert torch.equal(u, uniform_draws(seeds, steps))
    assert torch.equal(u[0], uniform_draws(seeds[:1], steps)[0])  # the batch does not matter
    assert torch.equal(u[:, 7], uniform_draws(seeds[:, 0], torch.full((4,), 7)))
    assert torch.equal(u[0], u[1])  # same seed, same stream
    for a, b in [(0, 2), (0, 3)]:  # another seed, the high seed bits: another stream
        assert not torch.equal(u[a], u[b])
    assert bool((u > 0).all() and (u < 1).all())
    # Uniform(0, 1): mean 1/2, variance 1/12; 20000 draws: sd of the mean 0.002
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005


@pytest.mark.slow
def test_inverse_cdf_draws_each_token_with_its_probability():
    from pldr_llm.generation import inverse_cdf, uniform_draws

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 0.0, 2.0]])
    u = uniform_draws(torch.tensor([3, 4])[:, None], torch.arange(20000)[None, :])
    drawn = torch.stack([inverse_cdf(probs, u[:, i]) for i in range(0, 20000, 1)], 1)
    assert bool((drawn[1] == 3).all())  # unnormalized rows; zero-probability ids never drawn
    freq = torch.bincount(drawn[0], minlength=4).double() / drawn.shape[1]
    assert freq[1] == 0
    # 20000 draws: sd of a frequency <= 0.0036
    assert torch.allclose(freq, probs[0].double(), atol=0.015)


@pytest.mark.slow
def test_sampled_row_depends_only_on_its_seed(tiny_model):
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 5, "stop_at_eos": False}
    alone = generate(tiny_model, [PROMPTS[1]], 10, **params)
    batched = generate(tiny_model, PROMPTS, 10, **params)
    assert batched[1] == alone[0]
    other = generate(tiny_model, [PROMPTS[1]], 10, **{**params, "seed": 6})
    assert other != alone


@pytest.mark.slow
def test_engine_slots_report_pipelined_tokens(tiny_model):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    engine = DecodeEngine(tiny_model, max_batch=2, max_len=24)
    assert engine.free_slots == 2 and not engine.use_graph
    a = engine.add(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=4, stop_at_eos=False))
    first = engine.step()
    assert first.slots == [a] and first.finished == [False]
    # a second request joins mid-way; the first one's tokens do not change
    b = engine.add(PROMPTS[1], SamplingParams(temperature=0.8, seed=2, max_new_tokens=3))
    assert engine.free_slots == 0 and engine.active_slots == sorted([a, b])
    with pytest.raises(PLDRError, match="free slot"):
        engine.add(PROMPTS[2], SamplingParams())
    got = {a: first.token_ids, b: []}
    finished = {a: False, b: False}
    while engine.active_slots:
        out = engine.step()
        for slot, token, done in zip(out.slots, out.token_ids, out.finished):
            assert not finished[slot]
            got[slot].append(token)
            finished[slot] = done
    assert got[a] == generate(tiny_model, [PROMPTS[0]], 4, top_k=1, stop_at_eos=False)[0][6:]
    want_b = generate(tiny_model, [PROMPTS[1]], 3, temperature=0.8, seed=2)[0][2:]
    assert got[b] == want_b and finished == {a: True, b: True}
    assert engine.step().slots == []
    engine.release(a)
    engine.release(b)
    assert engine.free_slots == 2
    with pytest.raises(PLDRError, match="not in use"):
        engine.release(a)
    with pytest.raises(PLDRError, match="max_len"):
        engine.add(list(range(4, 20)), SamplingParams(max_new_tokens=10))
    with pytest.raises(PLDRError, match="temperature"):
        engine.add([4], SamplingParams(temperature=-1))


def test_engine_stop_ids_and_logprobs(tiny_model):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    free = generate(tiny_model, [PROMPTS[0]], 8, top_k=1, stop_at_eos=False)[0][6:]
    engine = DecodeEngine(tiny_model, 1, 32, output_logprobs=True)
    engine.add(PROMPTS[0], SamplingParams(top_k=1, stop_token_ids=(free[3],), max_new_tokens=8))
    tokens, logprobs = [], []
    while engine.active_slots:
        out = engine.step()
        tokens += out.token_ids
        logprobs += out.logprobs
    assert tokens == free[: free.index(free[3]) + 1]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1)[tokens[0]]), abs=1e-5)
    assert all(lp <= 0 for lp in logprobs)


@pytest.mark.slow
def test_stream_generate_and_text_api(tiny_model):
    from pldr_llm.generation import find_stop, stream_generate

    params = {"temperature": 0.9, "top_k": 30, "seed": 4}
    streamed = list(stream_generate(tiny_model, PROMPTS[2], 9, stop_at_eos=False, **params))
    assert streamed == generate(tiny_model, [PROMPTS[2]], 9, stop_at_eos=False, **params)[0][4:]
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("abc", ["x", ""]) is None


@pytest.mark.slow
def test_compiled_step_traces_whole(tiny_model):
    """The step is one graph (no host sync inside): ``aot_eager`` traces it without codegen."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    torch._dynamo.reset()
    engine = DecodeEngine(
        tiny_model, 2, 20, cuda_graph=False, compile={"backend": "aot_eager", "fullgraph": True}
    )
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_new_tokens=8, stop_at_eos=False)
    slots = engine.add_many(PROMPTS[:2], [params, params])
    engine.advance(7)
    got = [engine.generated(s) for s in slots]
    assert (
        got
        == generate_details(
            tiny_model, PROMPTS[:2], 8, temperature=0.8, top_p=0.9, seed=1, stop_at_eos=False
        ).new_ids
    )


# ---------------------------------------------------------------------------- step variants
@pytest.mark.slow
def test_plain_variant_equals_the_filters_for_rows_that_filter_nothing():
    """top_p 1 and top_k 0 or >= vocab make the filters the identity: the sort-free variant
    must then pick exactly the ids of filter_rows + the draw (and differ when a row filters)."""
    from pldr_llm.generation import filter_rows, inverse_cdf, sample_rows, uniform_draws

    torch.manual_seed(1)
    vocab, rows = 300, 8
    logits = torch.randn(rows, vocab) * 4
    temperature = torch.tensor([1.0, 0.5, 1.7, 0.0, 1.0, 0.9, 2.5, 1.0])
    top_k = torch.tensor([0, 0, vocab, 0, vocab + 7, 0, 0, 0])
    top_p = torch.ones(rows)
    for step in range(20):
        seed, steps = torch.arange(rows) * 7 + 3, torch.full((rows,), step)
        args = (logits, temperature, top_k, top_p, uniform_draws(seed, steps))
        plain = sample_rows(*args, mode="plain")
        filtered = filter_rows(logits, temperature, top_k, top_p)
        by_hand = inverse_cdf(torch.softmax(filtered, -1), uniform_draws(seed, steps))
        by_hand[3] = logits[3].argmax()  # temperature 0: greedy
        assert torch.equal(plain, by_hand)
        assert torch.equal(plain, sample_rows(*args, mode="filtered"))
    # a row that does filter (top_k 2): the plain variant would draw outside its top 2
    top_k2 = torch.full((rows,), 2)
    drawn = [
        sample_rows(
            logits, temperature, top_k2, top_p, uniform_draws(seed, torch.full((rows,), s)), m
        )
        for s in range(20)
        for m in ("plain", "filtered")
    ]
    assert any(not torch.equal(a, b) for a, b in zip(drawn[::2], drawn[1::2]))


def test_step_variant_follows_the_running_rows(tiny_model):
    from pldr_llm.core.sampling import batch_mode, row_mode
    from pldr_llm.generation import DecodeEngine, SamplingParams

    vocab = tiny_model.config.input_vocab_size
    assert row_mode(SamplingParams(temperature=0), vocab) == "greedy"
    assert row_mode(SamplingParams(top_k=1), vocab) == "greedy"
    assert row_mode(SamplingParams(top_k=vocab), vocab) == "plain"
    assert row_mode(SamplingParams(top_p=0.99), vocab) == "filtered"
    assert row_mode(SamplingParams(top_k=vocab - 1), vocab) == "filtered"
    assert batch_mode(["greedy", "plain"]) == "plain"
    assert batch_mode(["plain", "filtered", "greedy"]) == "filtered"

    engine = DecodeEngine(tiny_model, 3, 24)
    used: list[str] = []
    step_fn = engine.graphs.step_fn

    def recording(variant):
        assert not variant.forcing  # no row is teacher-forced here
        assert not variant.processed and not variant.top_logprobs  # nor asks for processing
        fn = step_fn(variant)
        return lambda: (used.append(variant.mode), fn())[1]

    engine.graphs.step_fn = recording
    greedy = engine.add(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=9))
    engine.step()
    plain = engine.add(PROMPTS[1], SamplingParams(seed=1, max_new_tokens=9, stop_at_eos=False))
    engine.step()
    engine.add(PROMPTS[2], SamplingParams(top_p=0.9, seed=2, max_new_tokens=2))
    engine.step()  # the mixed batch takes the filtered variant ...
    engine.step()
    engine.step()  # ... until the filtering row has finished
    assert used == ["greedy", "plain", "filtered", "filtered", "plain"]
    assert {greedy, plain} <= set(engine.active_slots)


def _drain(engine, k: int) -> list:
    """Every step's (slots, tokens, finished, logprobs) until no slot runs."""
    steps = []
    while engine.active_slots:
        outs = engine.step_many(k) if k > 1 else [engine.step()]
        steps += [(o.slots, o.token_ids, o.finished, o.logprobs) for o in outs]
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4, 5])
def test_step_many_equals_single_steps(tiny_model, k):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    base = {"max_new_tokens": 11, "stop_at_eos": False}
    first = [
        SamplingParams(temperature=0, **base),
        SamplingParams(seed=4, **{**base, "max_new_tokens": 6}),  # finishes mid-block
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, **base),
    ]
    stop = generate(tiny_model, [PROMPTS[1]], 9, seed=9, stop_at_eos=False)[0][2:][4]
    later = SamplingParams(seed=9, max_new_tokens=9, stop_token_ids=(stop,))
    runs = []
    for many in (1, k):
        engine = DecodeEngine(tiny_model, 4, 32, output_logprobs=True)
        engine.add_many(PROMPTS, first)
        outs = engine.step_many(many) if many > 1 else [engine.step() for _ in range(k)]
        steps = [(o.slots, o.token_ids, o.finished, o.logprobs) for o in outs]
        joined = engine.add([7, 8, 9], first[2])  # a row joins while the others run
        steps += _drain(engine, many)
        for slot in range(4):
            engine.release(slot)
        slot = engine.add(PROMPTS[1], later)  # a reused slot, a stop id mid-block
        steps += _drain(engine, many)
        runs.append((steps, joined, slot))
    assert runs[0] == runs[1]
    tokens = [t for slots, ids, _, _ in runs[0][0] for s, t in zip(slots, ids) if s == 0]
    later_ids = tokens[11:]  # slot 0: the greedy row's 11 ids, then the stop-id row's
    assert later_ids.index(stop) == len(later_ids) - 1 < 8  # stopped at the stop id
    assert all(len(slots) > 0 for slots, _, _, _ in runs[0][0])


@pytest.mark.slow
def test_launch_then_collect_with_a_release_in_between(tiny_model):
    """A server routes one block while the next computes: releasing a slot meanwhile is allowed
    (its tokens of that block are still reported), adding is refused until collect()."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    params = SamplingParams(seed=3, max_new_tokens=10, stop_at_eos=False)
    kw = {"seed": 3, "stop_at_eos": False}
    want = generate(tiny_model, PROMPTS[:2], 10, **kw)
    engine = DecodeEngine(tiny_model, 2, 24)
    a, b = engine.add_many(PROMPTS[:2], [params, params])
    first = engine.step_many(4)
    engine.launch(4)
    with pytest.raises(PLDRError, match="in flight"):
        engine.add([5], params)
    with pytest.raises(PLDRError, match="in flight"):
        engine.launch(4)
    engine.release(a)  # e.g. a stop string matched in the first block
    second = engine.collect()
    assert [o.slots for o in second] == [[a, b]] * 4
    got_b = [t for o in first + second for s, t in zip(o.slots, o.token_ids) if s == b]
    assert got_b == want[1][2:10]
    assert engine.active_slots == [b] and engine.free_slots == 1
    c = engine.add(PROMPTS[2], params)  # the released slot starts afresh
    assert c == a
    while engine.active_slots:
        engine.step_many(3)
    assert engine.generated(c) == generate(tiny_model, [PROMPTS[2]], 10, **kw)[0][4:]
    with pytest.raises(PLDRError, match="no block"):
        engine.collect()


@pytest.mark.parametrize("small", [128, 0])
def test_collect_block_is_the_single_steps_per_slot(tiny_model, monkeypatch, small):
    """A block read per slot (the server's read): each slot's tokens, log-probabilities and
    top alternatives of k single steps, cut after its last; ``steps()`` gives those steps
    (a small block's read converted in Python, a large one's with tensor operations)."""
    from pldr_llm.core import step_output
    from pldr_llm.generation import DecodeEngine, SamplingParams

    monkeypatch.setattr(step_output, "SMALL_BLOCK", small)

    base = {"max_new_tokens": 9, "stop_at_eos": False}
    params = [
        SamplingParams(temperature=0, logprobs=2, **base),  # asks for alternatives
        SamplingParams(seed=4, **{**base, "max_new_tokens": 3}),  # finishes mid-block
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, **base),
    ]
    single = DecodeEngine(tiny_model, 3, 24, output_logprobs=True)
    single.add_many(PROMPTS, params)
    steps = [single.step() for _ in range(5)]
    engine = DecodeEngine(tiny_model, 3, 24, output_logprobs=True)
    engine.add_many(PROMPTS, params)
    engine.launch(5)
    block = engine.collect_block()
    assert block.steps() == steps
    assert block.slots == [0, 1, 2] and block.finished == [False, True, False]
    for j, slot in enumerate(block.slots):
        mine = [(o.token_ids[i], o.logprobs[i], o.top_logprobs[i])
                for o in steps for i, s in enumerate(o.slots) if s == slot]  # fmt: skip
        assert block.token_ids[j] == [t for t, _, _ in mine]
        assert block.logprobs is not None and block.logprobs[j] == [lp for _, lp, _ in mine]
        assert block.top_logprobs is not None
        assert block.top_logprobs[j] == [top for _, _, top in mine]
    assert len(block.token_ids[1]) == 3 and len(block.top_logprobs[0][0]) == 2
    assert engine.active_slots == [0, 2]
    engine.launch(2)
    engine.release(0)  # released while its block runs: its tokens come, nothing is read for it
    block = engine.collect_block()
    assert block.slots == [0, 2] and block.top_logprobs is None
    assert block.token_ids[1] == [o.token_ids[-1] for o in (single.step(), single.step())]


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("sampling", [{"top_k": 1}, {"temperature": 0.8, "top_p": 0.9}])
def test_cuda_graph_loop_equals_the_eager_loop(tiny_model, compiled, sampling):
    torch.set_float32_matmul_precision("highest")
    model = tiny_model.cuda()
    prompts = PROMPTS + [[7] * 9]
    kwargs = {"seed": 3, "stop_at_eos": False, **sampling}
    eager = generate_details(model, prompts, 24, cuda_graph=False, **kwargs)
    graph = generate_details(model, prompts, 24, compile=compiled, **kwargs)
    assert graph.new_ids == eager.new_ids
    alone = generate_details(model, [prompts[1]], 24, **kwargs)
    assert alone.new_ids[0] == eager.new_ids[1]
    model.cpu()
    assert generate_details(model, prompts, 24, **kwargs).new_ids == eager.new_ids


@pytest.mark.gpu
def test_cuda_engine_bfloat16_runs_and_steps_per_graph(tiny_model):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    model = tiny_model.cuda()
    engine = DecodeEngine(model, 2, 64, steps_per_graph=4)
    params = SamplingParams(top_k=1, max_new_tokens=23, stop_at_eos=False)
    slots = engine.add_many(PROMPTS[:2], [params, params])
    engine.advance(22)  # 6 graphs of 4 steps: the rows stop at 23 tokens on their own
    got = [engine.generated(s) for s in slots]
    assert (
        got
        == generate_details(
            model, PROMPTS[:2], 23, top_k=1, stop_at_eos=False, cuda_graph=False
        ).new_ids
    )
    half = tiny_model.to(torch.bfloat16)
    out = generate_details(half, PROMPTS, 16, top_k=1, stop_at_eos=False)
    assert all(len(n) == 16 for n in out.new_ids)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 4])
def test_cuda_step_many_graph_equals_eager(tiny_model, k):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    torch.set_float32_matmul_precision("highest")
    model = tiny_model.cuda()
    params = [
        SamplingParams(temperature=0, max_new_tokens=13, stop_at_eos=False),
        SamplingParams(seed=4, max_new_tokens=7, stop_at_eos=False),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_new_tokens=13),
    ]
    runs = []
    for graph, ahead in [(False, False), (True, False), (True, True)]:
        engine = DecodeEngine(model, 3, 32, cuda_graph=graph, output_logprobs=True)
        engine.add_many(PROMPTS, params)
        outs = _drain_ahead(engine, k) if ahead else _drain_many(engine, k)
        runs.append([(o.slots, o.token_ids, o.finished) for o in outs])
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) >= 7
    model.cpu()


def _drain_many(engine, k: int) -> list:
    outs = []
    while engine.active_slots:
        outs += engine.step_many(k)
    return outs


def _drain_ahead(engine, k: int) -> list:
    """As the server drives it: the next block is launched before this one is looked at."""
    outs = []
    engine.launch(k)
    while True:
        block = engine.collect()
        if not engine.active_slots:
            return outs + block
        engine.launch(k)
        outs += block


@pytest.mark.gpu
def test_cuda_warm_up_captures_ahead_and_changes_no_result(tiny_model):
    from pldr_llm.generation import DecodeEngine, SamplingParams

    torch.set_float32_matmul_precision("highest")
    model = tiny_model.cuda()
    params = [
        SamplingParams(temperature=0, max_new_tokens=9, stop_at_eos=False),
        SamplingParams(seed=4, max_new_tokens=9, stop_at_eos=False),
    ]
    cold = DecodeEngine(model, 2, 32)
    cold.add_many(PROMPTS[:2], params)
    want = _drain_many(cold, 4)
    warm = DecodeEngine(model, 2, 32)
    assert warm.warm_up(steps=(1, 4), modes=("plain",)) > 0
    captured = warm.capture_seconds
    from pldr_llm.core.engine import StepVariant

    # (variant, steps, rows): blocks of fewer rows are captured too (StepGraphs.row_counts)
    captured_kinds = {key[:2] for key in warm.graphs._graphs}
    assert captured_kinds == {(StepVariant("plain"), 1), (StepVariant("plain"), 4)}
    warm.add_many(PROMPTS[:2], params)
    got = _drain_many(warm, 4)
    assert warm.capture_seconds == captured  # the first request captured nothing
    assert [(o.slots, o.token_ids, o.finished) for o in got] == [
        (o.slots, o.token_ids, o.finished) for o in want
    ]
    model.cpu()


def test_warm_up_is_a_no_op_without_cuda_graphs(tiny_model):
    from pldr_llm.generation import DecodeEngine

    engine = DecodeEngine(tiny_model, 2, 32)
    assert engine.warm_up(steps=(1, 4)) == 0.0
    assert engine.free_slots == 2 and not engine.graphs._graphs


@pytest.mark.slow
def test_packed_projections_decode_like_the_model_and_follow_weight_changes(tiny_model):
    """The packed wq|wk|wv and gluw1|gluw2 (on by default on CUDA) compute the same function:
    equal ids here, logits equal to float32 rounding (one matrix product of stacked rows
    instead of several: the same dot products, possibly summed in another order)."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    params = [
        SamplingParams(temperature=0, max_new_tokens=12, stop_at_eos=False),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=12, stop_at_eos=False),
    ]

    def drain(engine):
        outs = []
        while engine.active_slots:
            out = engine.step()
            outs.append((out.slots, out.token_ids, out.finished, out.logits))
        return outs

    def run(pack: bool):
        engine = DecodeEngine(tiny_model, 2, 40, pack_projections=pack, keep_logits=True)
        engine.add_many(PROMPTS[:2], params)
        return engine, drain(engine)

    plain_engine, plain = run(False)
    packed_engine, packed = run(True)
    assert plain_engine.packed is None and len(packed_engine.packed) == len(
        tiny_model.decoder.dec_layers
    )
    assert [o[:3] for o in packed] == [o[:3] for o in plain]
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-5)
    # A weight changed in place after the engine was built is seen by the next request.
    with torch.no_grad():
        tiny_model.decoder.dec_layers[0].mha1.wk.weight.mul_(1.5)
        tiny_model.decoder.dec_layers[1].ffn.gluw2.bias.add_(0.25)
    try:
        fresh_engine, fresh = run(False)
        for slot in (0, 1):
            packed_engine.release(slot)
        packed_engine.add_many(PROMPTS[:2], params)
        again = drain(packed_engine)
        assert [o[:3] for o in again] == [o[:3] for o in fresh]
        assert [o[:3] for o in again] != [o[:3] for o in plain]
    finally:
        with torch.no_grad():
            tiny_model.decoder.dec_layers[0].mha1.wk.weight.div_(1.5)
            tiny_model.decoder.dec_layers[1].ffn.gluw2.bias.sub_(0.25)


def test_cpu_block_stops_once_every_row_reported_its_end(tiny_model):
    """On the CPU a launched block of 16 steps ends at the step that reported the end of
    every active row (the steps after it would change nothing read): rows of 3 and 5 tokens
    take 5 steps (the first token is drawn by the prompt pass, each step reports one), with the
    ids of single steps."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    params = [SamplingParams(top_k=1, max_new_tokens=n, stop_at_eos=False) for n in (3, 5)]
    prompts = [[4, 5, 6], [7, 8]]
    single = DecodeEngine(tiny_model, 2, 32, cuda_graph=False)
    slots = single.add_many(prompts, params)
    while single.active_slots:
        single.step()
    want = single.generated_many(slots)

    engine = DecodeEngine(tiny_model, 2, 32, cuda_graph=False)
    steps = []
    run_step = engine.graphs._step
    engine.graphs._step = lambda variant: (steps.append(1), run_step(variant))[1]
    slots = engine.add_many(prompts, params)
    engine.launch(16)
    block = engine.collect_block()
    assert len(steps) == 5 and not engine.active_slots
    assert block.token_ids == want and block.finished == [True, True]


def test_padding_groups_set_apart_only_the_rows_that_do_not_fit():
    from pldr_llm.core.engine_options import padding_groups
    from pldr_llm.generation import SamplingParams

    def groups(lengths: list[int], max_new: list[int], slots: int = 24) -> list[list[int]]:
        params = [SamplingParams(max_new_tokens=m) for m in max_new]
        return padding_groups([[5] * n for n in lengths], params, slots)

    assert groups([2, 6, 4], [10, 10, 10]) == [[0, 1, 2]]  # all fit: one prefill
    # row 0 (2 tokens) asks for the whole context: padded to 6 it would pass the 24 slots
    assert groups([2, 6, 4, 6], [22, 10, 10, 18]) == [[1, 2, 3], [0]]
    assert groups([2, 6, 4], [22, 18, 20]) == [[1], [2], [0]]  # one group per length at worst


@pytest.mark.parametrize("k", [1, 4])
def test_prompts_of_different_lengths_may_each_fill_the_context(tiny_model, k):
    """Left-padded together, a short prompt's keys would start after the padding and its last
    steps would write past the cache (an index error on the CPU, another row's memory on a GPU):
    rows that would not fit are prefilled apart. Each row's ids equal its lone run's."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    max_len = 24
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]  # 2, 6 and 4 tokens
    params = [
        SamplingParams(max_new_tokens=max_len - len(p), seed=i, stop_at_eos=False)
        for i, p in enumerate(prompts)
    ]

    def ids(engine: DecodeEngine, slots: list[int]) -> list[list[int]]:
        while engine.active_slots:
            engine.launch(k)
            engine.collect_block()
        return engine.generated_many(slots)

    together = DecodeEngine(tiny_model, 4, max_len)
    batched = ids(together, together.add_many(prompts, params))
    alone = []
    for p, q in zip(prompts, params):
        engine = DecodeEngine(tiny_model, 1, max_len)
        alone += ids(engine, [engine.add(p, q)])
    assert batched == alone
    assert [len(row) for row in batched] == [max_len - len(p) for p in prompts]


@pytest.mark.gpu
def test_cuda_admission_reads_nothing_back(tiny_model):
    """An admission's host work is some thousand kernel launches; a read from the device
    among them would also wait for all the work queued before it. Prompts of different
    lengths (padded: the mask's padding is known on the host), penalties and
    log-probabilities, added while the device is busy, make no host sync."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    model = tiny_model.cuda()
    engine = DecodeEngine(model, 8, 64, output_logprobs=True)
    plain = SamplingParams(seed=1, max_new_tokens=30, stop_at_eos=False)
    asks = SamplingParams(
        seed=2, max_new_tokens=20, presence_penalty=0.5, logit_bias=((5, -100.0),), logprobs=2
    )
    engine.add_many(PROMPTS, [plain, asks, plain])  # the buffers these rows need exist now
    busy = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):  # work queued on the stream while the prompts are added
            busy = busy @ busy / 64
        joined = engine.add_many([[9, 4, 33], [7] * 9], [asks, plain])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.active_slots:
        engine.step_many(4)
    assert [len(ids) for ids in engine.generated_many(joined)] == [20, 30]
    model.cpu()


def test_a_failed_prefill_leaves_its_slots_needing_nothing(tiny_model, monkeypatch):
    """A prefill in groups that fails after its first group gives every slot back clean: the
    next rows there get only what they ask for (no alternatives, no processed step)."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    engine = DecodeEngine(tiny_model, 2, 24)
    asks = SamplingParams(max_new_tokens=10, logprobs=3, presence_penalty=0.5)
    tight = SamplingParams(max_new_tokens=22)  # 2 tokens: it cannot be padded to 6
    prefill, calls = engine._prefill, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return prefill(*args, **kwargs)

    monkeypatch.setattr(engine, "_prefill", second_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.add_many([[5, 6], [7] * 6], [tight, asks])
    monkeypatch.undo()
    assert engine.free_slots == 2 and not engine.active_slots
    plain = SamplingParams(max_new_tokens=4)
    engine.add_many([[5, 6], [7, 8]], [plain, plain])
    assert engine.table.top_n == {} and engine.table.processed == set()
    variant = engine.table.variant()
    assert not variant.processed and not variant.top_logprobs


def _admit_both(engines, prompts, seed):
    """The same prompts into each engine; each engine's slots."""
    from pldr_llm.generation import SamplingParams

    params = [SamplingParams(seed=seed + i, max_new_tokens=6) for i in range(len(prompts))]
    return [engine.add_many(prompts, params) for engine in engines]


def _prefilled(engine, slots):
    """What a prompt pass left in the engine's caches for ``slots`` (copies)."""
    b = engine.buffers
    caches = [t for kv in b.kv for t in (kv.key, kv.value)] + [g.G_LM for g in b.g]
    caches += b.metric if b.metric is not None else []
    return [t[slots].clone() for t in caches] + [b.ids[slots].clone()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_cache", [True, False])
def test_cuda_prompt_pass_replays_the_metric_learner_bit_for_bit(tiny_model, dtype, g_cache):
    """The prompt pass's metric learner replayed as CUDA graphs (one per layer and row count,
    core.metric_graphs) leaves exactly what the uncaptured pass leaves: the same kernels on the
    same shapes, so no tolerance. Captured on first use, replayed on the next pass of as many
    rows, captured again after a parameter is replaced (the graphs read parameters where they
    are: a change in place is seen without a capture)."""
    from pldr_llm.generation import DecodeEngine

    model = tiny_model.cuda().to(dtype)
    captured = DecodeEngine(model, 8, 64, enable_Gcache=g_cache)
    plain = DecodeEngine(model, 8, 64, enable_Gcache=g_cache)
    assert captured.metric_graphs is not None
    plain.metric_graphs = None
    batches = [PROMPTS, [[7] * 9, [3, 4]], [[40, 2, 9], [11] * 5, [6]]]  # 3 rows twice
    for step, prompts in enumerate(batches):
        slots = _admit_both((captured, plain), prompts, seed=step)
        got, want = _prefilled(captured, slots[0]), _prefilled(plain, slots[1])
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        for engine, engine_slots in zip((captured, plain), slots):
            for slot in engine_slots:
                engine.release(slot)
    graphs = captured.metric_graphs._layers[0].graphs
    assert sorted(graphs) == [2, 3]
    first_graph = graphs[3]
    with torch.no_grad():  # in place: the same graphs see it
        model.decoder.dec_layers[0].mha1.plgatt_layer.alst.mul_(1.5)
    slots = _admit_both((captured, plain), PROMPTS, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(_prefilled(captured, slots[0]),
                                                   _prefilled(plain, slots[1])))  # fmt: skip
    assert captured.metric_graphs._layers[0].graphs[3] is first_graph
    for engine, engine_slots in zip((captured, plain), slots):
        for slot in engine_slots:
            engine.release(slot)
    attention = model.decoder.dec_layers[0].mha1  # replaced: captured again
    attention.plgatt_layer.alst = torch.nn.Parameter(attention.plgatt_layer.alst * 0.5)
    slots = _admit_both((captured, plain), PROMPTS, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(_prefilled(captured, slots[0]),
                                                   _prefilled(plain, slots[1])))  # fmt: skip
    assert captured.metric_graphs._layers[0].graphs[3] is not first_graph
    # And the tokens that follow are the same.
    while captured.active_slots:
        captured.step_many(3)
    while plain.active_slots:
        plain.step_many(3)
    assert captured.generated_many(slots[0]) == plain.generated_many(slots[1])
    model.cpu().float()


@pytest.mark.gpu
def test_cuda_warm_up_captures_the_prompt_pass_and_it_launches_less(tiny_model, monkeypatch):
    """``warm_up(prompt_rows=n)`` captures the metric learner for admissions of 1..n prompts;
    an admission then dispatches none of the metric learner's operators (a copy in and a few
    views per layer instead), and every other operator of the pass still runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pldr_llm.core.plga import PowerLawGraphAttention
    from pldr_llm.generation import DecodeEngine

    class Count(TorchDispatchMode):  # aten operators: what launches kernels
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    model = tiny_model.cuda()
    captured = DecodeEngine(model, 8, 64)
    captured.warm_up(steps=[1], prompt_rows=4)
    assert len(captured.metric_graphs._layers) == model.config.num_layers
    assert all(sorted(layer.graphs) == [1, 2, 3, 4] for layer in
               captured.metric_graphs._layers.values())  # fmt: skip
    plain = DecodeEngine(model, 8, 64)
    plain.metric_graphs = None
    _admit_both((plain,), PROMPTS, seed=0)  # the first uncaptured pass loads kernels
    learner_calls = []
    metric_to_G = PowerLawGraphAttention.metric_to_G

    def counted(self, raw):
        before = Count.calls
        out = metric_to_G(self, raw)
        learner_calls.append(Count.calls - before)
        return out

    monkeypatch.setattr(PowerLawGraphAttention, "metric_to_G", counted)
    totals = []
    for engine in (captured, plain):
        Count.calls = 0
        with Count():
            _admit_both((engine,), [[5, 6, 7]] * 2, seed=1)
        totals.append(Count.calls)
    # metric_to_G ran in Python only for the uncaptured engine, once per layer
    assert len(learner_calls) == model.config.num_layers
    per_layer = 6  # the input's view and copy, the four outputs' views
    saved = sum(learner_calls) - per_layer * model.config.num_layers
    assert saved > 0 and totals[0] <= totals[1] - saved, (totals, learner_calls)
    model.cpu()


def test_metric_runners_take_the_place_of_each_layers_metric_learner(tiny_model):
    """``forward(metric_runners=...)`` hands each layer's raw ``Q^T Q`` of a fresh prompt to
    its runner and uses what it returns (here: the same function, counted, then a changed one);
    with a G-cache the runners are not called. The engine makes graphs only where they apply."""
    from pldr_llm import PLDRConfig, PLDRModel
    from pldr_llm.core.cache import PLDRCache
    from pldr_llm.core.metric_graphs import MetricGraphs, metric_graphs_for

    ids = torch.tensor([PROMPTS[0]])
    layers = tiny_model.decoder.dec_layers
    seen = []

    def runner(index, scale=1.0):
        def run(raw):
            seen.append((index, tuple(raw.shape)))
            metric, a_lm, a_p, g_lm = layers[index].mha1.metric_to_G(raw)
            return metric, a_lm, a_p, g_lm * scale

        return run

    plain = tiny_model(ids)
    same = tiny_model(ids, metric_runners=[runner(i) for i in range(len(layers))])
    config = tiny_model.config
    square = (1, config.num_heads, config.depth, config.depth)
    assert seen == [(i, square) for i in range(len(layers))]
    assert torch.equal(same.logits, plain.logits)
    changed = tiny_model(ids, metric_runners=[runner(i, 2.0) for i in range(len(layers))])
    assert not torch.allclose(changed.logits, plain.logits)
    seen.clear()
    cached = tiny_model(ids, cache=PLDRCache(g=plain.cache.g), metric_runners=[runner(0)] * 2)
    assert seen == [] and torch.allclose(cached.logits, plain.logits, atol=1e-6)
    # Where the graphs apply: a learned, non-causal G with CUDA graphs; on the CPU they run as is
    assert metric_graphs_for(tiny_model, use_graph=False) is None
    assert isinstance(metric_graphs_for(tiny_model, use_graph=True), MetricGraphs)
    # buffers for the engine's rows, at most 32: a one-row engine captures one-row passes only
    assert metric_graphs_for(tiny_model, True, 1).max_rows == 1
    assert metric_graphs_for(tiny_model, True, 256).max_rows == 32
    for changes in ({"version": "v510G"}, {"causal_metric": True}):
        other = PLDRModel(PLDRConfig.from_hpdict({**config.to_hpdict(), **changes}))
        assert metric_graphs_for(other, use_graph=True) is None
    raw = torch.randn(square)
    on_cpu = MetricGraphs().run(0, layers[0].mha1, raw)
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, layers[0].mha1.metric_to_G(raw)))
