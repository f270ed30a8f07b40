"""transformers conventions of the PLDR-LLM classes: continuation decoding, hidden states and
attentions, resized embeddings, added tokens, AutoModel, beam search and assisted decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support import PAPER_TOKENIZER_MODEL, hf_greedy, paper_vocab_model  # noqa: E402


@pytest.fixture(scope="module")
def hf():
    import pldr_llm.hf

    return pldr_llm.hf


@pytest.fixture()
def tok(hf, paper_tokenizer_dir: Path):
    return hf.PldrllmTokenizer(vocab_file=str(paper_tokenizer_dir / PAPER_TOKENIZER_MODEL))


@pytest.fixture(scope="module")
def model(hf):
    # Seed 0 continues "The list" with "\u2581Joe ...": a first new piece with a leading space.
    return hf.PldrllmForCausalLM.from_core(paper_vocab_model(0))


# ---------------------------------------------------------------------------- decoding


def test_pipeline_and_streamer_print_what_decode_of_all_ids_prints(model, tok):
    from transformers import TextStreamer, pipeline

    ids = tok("The list", return_tensors="pt")["input_ids"]
    all_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
    full = tok.decode(all_ids[0])
    assert tok.convert_ids_to_tokens(all_ids[0, ids.shape[1]].item()).startswith("\u2581")
    assert full.startswith("The list ") and not full.startswith("The list  ")
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    got = generator("The list", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert got == full

    class Collect(TextStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text

    streamer = Collect(tok, skip_prompt=True)
    model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert "The list" + streamer.text == full
    whole = Collect(tok, skip_prompt=False)
    model.generate(ids, max_new_tokens=6, do_sample=False, streamer=whole)
    assert whole.text == full


def test_decode_keeps_a_continuations_space_only_when_asked(tok):
    ids = tok("The list of the class")["input_ids"]
    assert tok.decode(ids) == "The list of the class"
    assert tok.decode(ids[2:], continuation=True) == " of the class"
    assert tok.decode(ids[2:], continuation=False) == "of the class"
    # bytes and control ids decode as they do anywhere
    assert tok.decode([3, *ids[2:]], continuation=True, skip_special_tokens=True) == " of the class"


# ---------------------------------------------------------------------------- forward outputs


def _layer_inputs(core, ids, mask=None):
    """Every layer's input and the last output, captured from the core's own forward."""
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        for layer in core.decoder.dec_layers
    ]
    try:
        out = core(ids, attention_mask=mask, output_deductive=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return seen + [out.hidden_states], out


@pytest.mark.parametrize("padded", [False, True])
def test_hidden_states_and_attentions_are_the_cores_eager_ones(model, padded):
    from pldr_llm.core.plga import MASK_VALUE

    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = (ids != 0).long() if padded else None
    ids = ids if padded else ids[:1]
    core = model.core
    core.attn_implementation = "eager"
    try:
        want_hidden, want = _layer_inputs(core, ids, mask)
    finally:
        model._sync_attention()
    assert core.attn_implementation == "sdpa"  # the model asks for eager per call
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    layers = core.config.num_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for got, ref in zip(out.hidden_states, want_hidden):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    torch.testing.assert_close(out.logits, want.logits, atol=1e-6, rtol=1e-5)
    for got, deductive in zip(out.attentions, want.deductive):
        length = ids.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        expected = torch.softmax(deductive.scores.masked_fill(~allowed, MASK_VALUE), dim=-1)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        # masked keys get no weight (a padding query's row is the eager attention's uniform one)
        query_valid = torch.ones(length, dtype=torch.bool) if mask is None else mask.bool()
        rows = (
            got[query_valid.nonzero()[:, 0], :, query_valid.nonzero()[:, 1]]
            if mask is not None
            else got[0, :, :]
        )
        masked = ~allowed.expand_as(got)
        real = masked & (query_valid[:, None, :, None] if mask is not None else True)
        assert torch.all(got[real] == 0) and rows.numel() > 0
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


def test_generate_returns_attentions_and_hidden_states(model):
    prompt = torch.tensor([[5, 6, 7]])
    out = hf_greedy(
        model,
        prompt,
        3,
        output_attentions=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    native = hf_greedy(model, prompt, 3)
    assert torch.equal(out.sequences, native)
    layers = model.core.config.num_layers
    assert len(out.attentions) == 3 and len(out.hidden_states) == 3
    # prefill: [1, H, 3, 3]; later steps attend from one new token to every cached key
    assert out.attentions[0][0].shape[-2:] == (3, 3)
    assert out.attentions[2][0].shape[-2:] == (1, 5)
    assert all(len(step) == layers for step in out.attentions)
    assert all(len(step) == layers + 1 for step in out.hidden_states)


# ---------------------------------------------------------------------------- vocabulary


def test_resized_embeddings_take_a_new_id(hf, tok):
    model = hf.PldrllmForCausalLM.from_core(paper_vocab_model(1))
    added = tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert added == 1
    new_id = tok.convert_tokens_to_ids("<|tool|>")
    assert new_id == 32000
    ids = tok("call <|tool|> now", return_tensors="pt")["input_ids"]
    assert ids[0].tolist().count(new_id) == 1 and len(ids[0]) == 3
    assert tok.decode(ids[0]) == "call<|tool|> now"
    model.resize_token_embeddings(len(tok))
    assert model.core.config.input_vocab_size == len(tok) == model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, len(tok)) and torch.isfinite(logits).all()
    with pytest.raises(Exception, match="32001|vocab"):
        model(torch.tensor([[5, len(tok)]]))


@pytest.mark.slow
def test_auto_model_loads_the_base_class(hf, tmp_path: Path):
    from transformers import AutoModel, AutoModelForCausalLM

    causal = hf.PldrllmForCausalLM.from_core(paper_vocab_model(2))
    causal.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is hf.PldrllmModel
    assert "final_layer.weight" not in base.state_dict()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        want = causal(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, want, atol=0, rtol=0)
    # the causal LM wraps the same core: its head on the base's hidden states gives its logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.final_layer(hidden), reloaded(ids).logits)


# ---------------------------------------------------------------------------- search modes

CACHE_MODES = [(True, True), (True, False), (False, True), (False, False)]


def _reference_log_probs(core, prompt, continuation, kv: bool, g: bool):
    """Next-token log-probabilities after ``prompt + continuation`` computed from scratch in a
    cache mode's semantics: A (KV) and G_LM (G) come from the prompt pass."""
    from pldr_llm.core.cache import PLDRCache

    first = core(prompt)
    if not continuation:
        return first.logits[0, -1].log_softmax(-1)
    tail = torch.tensor([continuation])
    if kv:
        cache = first.cache if g else first.cache.drop_g()
        return core(tail, cache=cache).logits[0, -1].log_softmax(-1)
    full = torch.cat((prompt, tail), 1)
    cache = PLDRCache(g=first.cache.g) if g else None
    return core(full, cache=cache).logits[0, -1].log_softmax(-1)


def _reference_beam_search(core, prompt, beams: int, steps: int, kv: bool, g: bool):
    running = [((), 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, score in running:
            log_probs = _reference_log_probs(core, prompt, list(tokens), kv, g)
            top = log_probs.topk(beams)
            for value, index in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((tokens + (index,), score + value))
        running = sorted(candidates, key=lambda c: -c[1])[:beams]
    return prompt[0].tolist() + list(running[0][0])


@pytest.mark.parametrize("kv,g", CACHE_MODES)
def test_beam_search_with_caches_equals_a_from_scratch_search(model, kv, g):
    """transformers' beam search reorders the PLDR caches (the rows of K, V, A and G_LM follow
    their beams): it finds what a search that recomputes every beam from scratch finds."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        got = model.generate(
            prompt,
            max_new_tokens=4,
            num_beams=3,
            eos_token_id=None,
            length_penalty=0.0,
            enable_kvcache=kv,
            enable_Gcache=g,
        )
        want = _reference_beam_search(model.core, prompt, 3, 4, kv, g)
    assert got[0].tolist() == want
    if kv and g:
        off = model.generate(
            prompt, max_new_tokens=4, num_beams=3, eos_token_id=None, use_cache=False
        )
        assert off[0].tolist() == _reference_beam_search(model.core, prompt, 3, 4, False, False)


@pytest.mark.slow
@pytest.mark.parametrize("kv,g", CACHE_MODES[:3])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(hf, model, kv, g, monkeypatch):
    from pldr_llm.core.cache import PLDRCache

    crops = []
    crop = PLDRCache.crop
    monkeypatch.setattr(PLDRCache, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])  # repeats: prompt lookup drafts from it
    options = dict(
        max_new_tokens=10, do_sample=False, eos_token_id=None, enable_kvcache=kv, enable_Gcache=g
    )
    greedy = model.generate(prompt, **options)
    lookup = model.generate(prompt, prompt_lookup_num_tokens=3, **options)
    assert torch.equal(lookup, greedy)
    assert any(n < 0 for n in crops)  # a rejected draft was cropped
    crops.clear()
    other = hf.PldrllmForCausalLM.from_core(paper_vocab_model(5))
    assisted = model.generate(prompt, assistant_model=other, **options)
    assert torch.equal(assisted, greedy) and any(n < 0 for n in crops)


def test_assisted_decoding_without_caches_is_refused(model):
    from pldr_llm.core.errors import PLDRError

    with pytest.raises(PLDRError, match="KV or G cache"):
        model.generate(
            torch.tensor([[5, 6, 5, 6]]),
            max_new_tokens=3,
            prompt_lookup_num_tokens=2,
            use_cache=False,
        )


# ---------------------------------------------------------------------------- routed options


@pytest.fixture()
def native_calls(monkeypatch):
    """Counts the calls of the native loop (``pldr_llm.core.generate.generate``)."""
    import pldr_llm.core.generate as native

    calls = []
    real = native.generate

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "generate", counted)
    return calls


@pytest.fixture(scope="module")
def repeating_model(hf):
    """A model that repeats itself when greedy (its head is mostly a bias favouring token 100,
    then 200, 300), so that a repetition penalty changes its ids."""
    core = paper_vocab_model(0, final_bias=True)
    with torch.no_grad():
        core.final_layer.weight.mul_(0.01)
        core.final_layer.bias.zero_()
        core.final_layer.bias[[100, 200, 300]] = torch.tensor([3.0, 2.8, 2.6])
    return hf.PldrllmForCausalLM.from_core(core)


def _transformers_loop(model, prompt, **options):
    """transformers' own loop on the same model (``output_attentions``, even False, is not an
    argument of the native loop: it keeps the call off it)."""
    out = model.generate(prompt, return_dict_in_generate=True, output_attentions=False, **options)
    return out.sequences


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.5, "min_new_tokens": 3, "eos_token_id": [3, 100]},
        {"min_new_tokens": 5, "eos_token_id": [3, 100]},
    ],
    ids=["repetition", "both", "min_new_tokens"],
)
def test_routed_options_equal_transformers_loop(repeating_model, native_calls, options):
    model = repeating_model
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    mask = (prompt != 0).long()
    common = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    routed = model.generate(prompt, **common, **options)
    assert len(native_calls) == 1
    assert torch.equal(routed, _transformers_loop(model, prompt, **common, **options))
    plain = model.generate(prompt, **common, eos_token_id=options.get("eos_token_id", 3))
    assert not torch.equal(routed, plain)  # the option changed the ids


@pytest.mark.slow
def test_routed_stop_strings_and_streamer_equal_transformers_loop(model, tok, native_calls):
    from transformers import TextStreamer

    prompt = tok("The list", return_tensors="pt")["input_ids"]
    free = model.generate(prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(free[0, prompt.shape[1] :], continuation=True)
    stop = text.split()[2][:3]  # part of the third new word: the run stops inside the text
    options = dict(max_new_tokens=8, do_sample=False, stop_strings=stop, tokenizer=tok)
    native_calls.clear()
    routed = model.generate(prompt, **options)
    assert len(native_calls) == 1 and routed.shape[1] < free.shape[1]
    assert torch.equal(routed, _transformers_loop(model, prompt, **options))

    class Collect(TextStreamer):
        pieces: list

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.pieces = [*getattr(self, "pieces", []), text]

    streamed, own = Collect(tok, skip_prompt=True), Collect(tok, skip_prompt=True)
    native_calls.clear()
    with_streamer = model.generate(prompt, max_new_tokens=8, do_sample=False, streamer=streamed)
    assert len(native_calls) == 1 and torch.equal(with_streamer, free)
    _transformers_loop(model, prompt, max_new_tokens=8, do_sample=False, streamer=own)
    assert "".join(streamed.pieces) == "".join(own.pieces) == text


def test_routed_num_return_sequences_are_seeded_native_samples(model, native_calls):
    from pldr_llm import generate

    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = model.generate(
        prompt, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=11, eos_token_id=None
    )
    assert out.shape == (6, 9) and len(native_calls) == 3
    for copy in range(3):
        want = generate(model.core, prompt, 6, seed=11 + copy, stop_at_eos=False)
        assert torch.equal(out[copy::3], want)
    assert not torch.equal(out[0], out[1])  # the copies differ


def test_stop_strings_criterion_is_incremental_and_stops_where_a_whole_decode_does(tok):
    """The native ``stop_strings`` check of a PLDR tokenizer decodes only the newest ids; it
    must stop at the id where decoding the whole text each step (the check any other tokenizer
    gets) does, a stop string beginning in the prompt included."""
    import random

    from pldr_llm.core.modeling_pldrllm import _stop_string_check

    class Plain:  # the same decoding, without the PLDR tokenizer's marks: the whole-text check
        def __init__(self, inner) -> None:
            self.decode = inner.decode

    r = random.Random(3)
    prompt = tok("Say the list of", return_tensors="pt")["input_ids"]
    prompt_text = tok.decode(prompt[0].tolist())
    new = [r.randrange(3, tok.vocab_size) for _ in range(120)]
    text = tok.decode(prompt[0].tolist() + new)
    inside = text[len(prompt_text) + 40 : len(prompt_text) + 43]
    across = (
        prompt_text[-2:] + text[len(prompt_text) : len(prompt_text) + 2]
    )  # starts in the prompt
    for stops in ([inside], [across, "\u0000never"], ["e", "zzzz"], ["@@never@@"]):
        fast = _stop_string_check(tok, stops, prompt)
        whole = _stop_string_check(Plain(tok), stops, prompt)
        assert type(fast) is not type(whole)  # really the incremental check
        got = next((j for j in range(1, len(new) + 1) if fast(0, new[:j])), None)
        want = next((j for j in range(1, len(new) + 1) if whole(0, new[:j])), None)
        assert got == want
        assert (want is None) == (stops == ["@@never@@"])


def _returned_cache(output: object) -> object:
    """The cache a ``generate(return_dict_in_generate=True)`` output carries, by either name."""
    name = "cache" if hasattr(output, "cache") else "past_key_values"
    return getattr(output, name)


def test_routed_scores_and_logits_equal_transformers_loop(model, monkeypatch):
    """``output_scores`` / ``output_logits`` of one greedy row run on the native loop and give
    transformers' tuples: one [1, V] float32 tensor per new token, ids equal, values equal up to
    float32 rounding (the native step and transformers' forward sum in different orders)."""
    import pldr_llm.core.generate as native

    calls = []
    real = native.generate_details
    monkeypatch.setattr(
        native, "generate_details", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )

    def generate(prompt: torch.Tensor, **kwargs) -> tuple:
        """The output, and whether the native loop made it."""
        before = len(calls)
        return model.generate(prompt, **kwargs), len(calls) > before

    prompt = torch.tensor([[5, 6, 7, 8]])
    options = dict(
        max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    routed, on_native = generate(prompt, output_scores=True, output_logits=True, **options)
    own, own_native = generate(
        prompt, output_scores=True, output_logits=True, output_attentions=False, **options
    )
    assert on_native and not own_native
    assert torch.equal(routed.sequences, own.sequences)
    assert len(routed.scores) == len(own.scores) == len(routed.logits) == 6
    for got, want, raw in zip(routed.scores, own.scores, routed.logits):
        assert got.shape == want.shape == (1, model.config.vocab_size)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got, raw)  # greedy, nothing processed: scores are the logits
    assert _returned_cache(routed) is None  # the native loop returns no cache
    only_scores, on_native = generate(prompt, output_scores=True, **options)
    assert on_native and only_scores.logits is None and len(only_scores.scores) == 6
    # Greedy scores of processed logits (a repetition penalty, min_new_tokens) are native too:
    # transformers' processors applied to the native step's logits, as its loop does.
    eos = {**options, "eos_token_id": 9}
    for processing in ({"repetition_penalty": 1.3}, {"min_new_tokens": 4, **eos},
                       {"repetition_penalty": 0.7, "min_new_tokens": 3, **eos}):  # fmt: skip
        kwargs = {**options, **processing}
        routed, on_native = generate(prompt, output_scores=True, output_logits=True, **kwargs)
        own, own_native = generate(prompt, output_scores=True, output_attentions=False, **kwargs)
        assert on_native and not own_native
        assert torch.equal(routed.sequences, own.sequences)
        assert len(routed.scores) == len(own.scores)
        for got, want in zip(routed.scores, own.scores):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # processed: not the raw logits (min_new_tokens alone: until the minimum is reached)
        assert not torch.equal(routed.scores[0], routed.logits[0])
    # What the native loop cannot score as transformers does stays on transformers' loop:
    # sampled scores (warped) and a batch (transformers still scores the padding of finished
    # rows).
    _, sampled_native = generate(prompt, output_scores=True, **{**options, "do_sample": True})
    _, batch_native = generate(torch.cat([prompt, prompt]), output_scores=True, **options)
    assert not sampled_native and not batch_native


def test_a_zero_repetition_penalty_is_refused_not_dropped(model):
    """``repetition_penalty=0`` is refused with one line, as transformers refuses it, instead of
    being read as "off" (a falsy value once fell back to 1.0 and ran)."""
    from pldr_llm.core.errors import PLDRError

    with pytest.raises(PLDRError, match="repetition_penalty must be a finite number > 0"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, repetition_penalty=0.0)
