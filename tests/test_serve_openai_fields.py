"""``pldr-llm serve``'s OpenAI fields, with the real ``openai`` client: ``echo`` and prompt
logprobs, ``top_logprobs`` and ``text_offset``, prompts as token ids, ``logit_bias``, the
penalties and ``min_tokens``, and a 400 naming every field the server does not implement.

References come from the core model itself (its forward, its teacher-forced decoding loop), so
each check fails if the server scores, routes or biases a token wrongly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pldr_llm import generate  # noqa: E402
from pldr_llm.bundle import load_bundle  # noqa: E402
from pldr_llm.generation import DecodeEngine, SamplingParams  # noqa: E402
from pldr_llm.serve.logprobs import TokenTexts  # noqa: E402
from pldr_llm.serve.protocol import CHARS_PER_TOKEN  # noqa: E402
from serve_support import HP, MODEL_ID, build_bundle, live_server  # noqa: E402

PROMPT = "The power law graph attention"
STAGE_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
needs_stage = pytest.mark.skipif(
    not {"logit_bias", "frequency_penalty", "logprobs"} <= STAGE_FIELDS,
    reason="needs the decoding loop's sampling stage (SamplingParams.logit_bias, penalties, "
    "logprobs)",
)
# Alternatives of generated tokens come from the sampling stage.
TOP = 2 if "logprobs" in STAGE_FIELDS else 0
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_bundle(tmp_path_factory.mktemp("fields"))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def loaded(bundle: Path):
    return load_bundle(str(bundle))


@pytest.fixture(scope="module")
def server(bundle: Path):
    with live_server(bundle, max_batch=4, max_queue=32, chat_template=TEMPLATE) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _prompt_reference(model, ids: list[int], top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the model's logits over the prompt but its last id ([len - 1, V]), and
    each later prompt token's logprob in it: what ``pldr-llm eval`` scores."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    return logprobs, logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def _step_logits(model, ids: list[int], forced: list[int]) -> torch.Tensor:
    """The decoding loop's logits [len(forced), V] when it emits ``forced`` after ``ids``
    (teacher-forced): row k is what the k-th new token is chosen from."""
    engine = DecodeEngine(model, 1, len(ids) + len(forced) + 1, cuda_graph=False, keep_logits=True)
    params = SamplingParams(temperature=0, max_new_tokens=len(forced), stop_at_eos=False)
    engine.add(ids, params, forced_ids=forced)
    rows = []
    while engine.active_slots:
        out = engine.step()
        rows.append(out.logits[0])
    return torch.stack(rows)


def _greedy(loaded, ids: list[int], steps: int) -> list[int]:
    model, _ = loaded
    return generate(model, ids, max_new_tokens=steps, top_k=1)[len(ids) :].tolist()


# ---------------------------------------------------------------------- echo and logprobs


@pytest.mark.slow
def test_echo_scores_the_prompt_as_eval_does(client: openai.OpenAI, loaded) -> None:
    model, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, echo=True, max_tokens=0, logprobs=3
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    # The pieces add up to the text (leading spaces kept), text_offset is where each starts.
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == len(ids)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(ids))]
    assert sum(t.startswith(" ") for t in lp.tokens) >= 4  # one per word after the first
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    table, expected = _prompt_reference(model, ids, 3)
    # One float32 forward on each side (same input, same kernels): summation order only.
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-5, rtol=0)
    texts = TokenTexts(tok)
    for k in range(1, len(ids)):
        values, indices = torch.topk(table[k - 1], 3)
        top = lp.top_logprobs[k]
        assert list(top) == [texts(int(i)) for i in indices]
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_echo_with_new_tokens_and_token_id_prompts(client: openai.OpenAI, loaded) -> None:
    model, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    new = _greedy(loaded, ids, 6)
    kwargs = {"model": MODEL_ID, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    r = client.completions.create(prompt=PROMPT, echo=True, **kwargs)
    text = tok.decode(ids + new)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text == "".join(lp.tokens)
    assert len(lp.tokens) == len(ids) + len(new) == len(lp.token_logprobs)
    # The same prompt as token ids, alone and in a list of lists (OpenAI's four prompt forms).
    by_ids = client.completions.create(prompt=ids, echo=True, **kwargs)
    assert by_ids.choices[0].text == text
    assert by_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs
    other = tok.prompt_ids("Deductive outputs")
    two = client.completions.create(prompt=[ids, other], **kwargs)
    assert [c.text for c in two.choices] == [
        tok.decode(ids + new)[len(tok.decode(ids)) :],
        client.completions.create(prompt=other, **kwargs).choices[0].text,
    ]
    # An empty list of ids is the empty prompt (lm-eval sends an empty context so).
    empty = client.completions.create(prompt=[[]], **kwargs).choices[0].text
    assert empty == client.completions.create(prompt="", **kwargs).choices[0].text


def test_streamed_echo_and_logprobs_add_up_to_the_text(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 12, "seed": 4, "logprobs": TOP}
    whole = client.completions.create(echo=True, **kwargs).choices[0]
    text, tokens, offsets = "", [], []
    for chunk in client.completions.create(echo=True, stream=True, **kwargs):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert text == whole.text == "".join(tokens)
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


def test_generated_tokens_logprobs_concatenate_with_stop_strings(
    client: openai.OpenAI, loaded
) -> None:
    _, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    full = tok.decode(ids + _greedy(loaded, ids, 20))[len(tok.decode(ids)) :]
    stop = full[len(full) // 2 :][:3]
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    for stream in (False, True):
        r = client.completions.create(stop=stop, logprobs=TOP, stream=stream, **kwargs)
        chunks = list(r.choices if not stream else (c for ch in r for c in ch.choices))
        text = "".join(c.text for c in chunks)
        pieces = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        assert text == full[: full.index(stop)] == "".join(pieces)


@needs_stage
def test_top_logprobs_are_a_log_softmax_of_the_step_logits(client: openai.OpenAI, loaded) -> None:
    model, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    new = _greedy(loaded, ids, 5)
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=4
    )
    lp = r.choices[0].logprobs
    table = torch.log_softmax(_step_logits(model, ids, new), -1)
    texts = TokenTexts(tok)
    for k, top in enumerate(lp.top_logprobs):
        values, indices = torch.topk(table[k], 4)
        assert list(top) == [texts(int(i)) for i in indices]
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-5, rtol=0)
        assert abs(lp.token_logprobs[k] - float(table[k, new[k]])) < 1e-5


def test_chat_logprobs_content(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=8, seed=3, logprobs=True, top_logprobs=TOP
    )
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens
    for c in content:
        assert bytes(c.bytes) == c.token.encode() and c.logprob <= 0
        assert len(c.top_logprobs) == TOP
        assert all(t.logprob <= 0 and isinstance(t.bytes, list) for t in c.top_logprobs)
    streamed = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=8,
        seed=3,
        logprobs=True,
        top_logprobs=TOP,
        stream=True,
    )
    chunks = [c.choices[0] for c in streamed if c.choices]
    items = [item for c in chunks if c.logprobs for item in c.logprobs.content]
    assert "".join(c.delta.content or "" for c in chunks) == r.choices[0].message.content
    assert [(i.token, i.logprob) for i in items] == [(c.token, c.logprob) for c in content]


# ---------------------------------------------------------------------- fields that change it


@needs_stage
def test_logit_bias_minus_100_removes_the_greedy_token(client: openai.OpenAI, loaded) -> None:
    model, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    first = _greedy(loaded, ids, 1)[0]
    logits = _step_logits(model, ids, [first])[0].clone()
    logits[first] = float("-inf")
    second = int(logits.argmax())
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    plain = client.completions.create(**kwargs, logprobs=1).choices[0]
    banned = client.completions.create(**kwargs, logprobs=1, logit_bias={str(first): -100})
    prompt_text = tok.decode(ids)
    assert plain.text == tok.decode(ids + [first])[len(prompt_text) :]
    assert banned.choices[0].text == tok.decode(ids + [second])[len(prompt_text) :]
    # The ids themselves (two byte pieces may both read U+FFFD): the top alternative of the
    # distribution greedy took its token from, keyed by the id's own text.
    texts = TokenTexts(tok)
    assert list(plain.logprobs.top_logprobs[0]) == [texts(first)]
    assert list(banned.choices[0].logprobs.top_logprobs[0]) == [texts(second)]


@pytest.mark.slow
@needs_stage
@pytest.mark.parametrize(
    ("frequency", "presence", "repetition"), [(2.0, 0.0, 1.0), (0.5, 1.0, 1.0), (0.0, 0.0, 1.5)]
)
def test_penalties_follow_their_formulas(
    client: openai.OpenAI, loaded, frequency: float, presence: float, repetition: float
) -> None:
    model, tok = loaded
    steps = 16
    # A prompt whose greedy text repeats a token (random weights: most do within 16 tokens;
    # which one depends on the tokenizer, trained on the repository's docs).
    repeating = []
    for prompt in ("a", "the the the", PROMPT, "Deductive outputs", ""):
        plain = _greedy(loaded, tok.prompt_ids(prompt), steps)
        if max(Counter(plain).values()) > 1:
            repeating.append((prompt, plain))
    assert repeating, "no candidate prompt repeats under greedy decoding"
    prompt, plain = repeating[0]
    ids = tok.prompt_ids(prompt)
    # The reference, on the loop's own teacher-forced logits: the repetition penalty
    # (transformers' rule: every token of prompt and text so far, a positive logit divided by
    # it, a negative one multiplied), then logit - frequency * count - presence * (count > 0)
    # over the tokens generated so far (OpenAI's formula); greedy on the result.
    chosen: list[int] = []
    for k in range(steps):
        logits = _step_logits(model, ids, chosen + [0])[k].clone()
        for token in set(ids + chosen):
            value = logits[token]
            logits[token] = value / repetition if value > 0 else value * repetition
        for token, count in Counter(chosen).items():
            logits[token] -= frequency * count + presence
        chosen.append(int(logits.argmax()))
    assert chosen != plain
    r = client.completions.create(
        model=MODEL_ID,
        prompt=prompt,
        max_tokens=steps,
        temperature=0,
        frequency_penalty=frequency,
        presence_penalty=presence,
        extra_body={"ignore_eos": True, "repetition_penalty": repetition},
    )
    assert r.choices[0].text == tok.decode(ids + chosen)[len(tok.decode(ids)) :]


@needs_stage
def test_min_tokens_holds_back_the_end_of_text(client: openai.OpenAI, loaded) -> None:
    model, _ = loaded
    eos = {str(model.config.eos_id): 100}  # greedy then ends at once
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    assert client.completions.create(**kwargs, logit_bias=eos).usage.completion_tokens == 1
    r = client.completions.create(**kwargs, logit_bias=eos, extra_body={"min_tokens": 4})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5


# ---------------------------------------------------------------------- refused


def _bad(call, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as raised:
        call(**kwargs)
    error = raised.value.body
    assert raised.value.status_code == 400 and "\n" not in error["message"]
    return error


REFUSED_COMPLETION = {
    "suffix": {"suffix": " the end"},
    "best_of": {"best_of": 2, "n": 1},
    "n": {"n": 17},
    "logprobs": {"logprobs": 21},
    "top_k": {"extra_body": {"top_k": 2**63}},
    "top_k ": {"extra_body": {"top_k": 1e30}},
    "presence_penalty": {"presence_penalty": 2.5},
    "frequency_penalty": {"frequency_penalty": -3},
    "logit_bias": {"logit_bias": {"600": 5}},
    "logit_bias ": {"logit_bias": {"12": 101}},
    "logit_bias  ": {"logit_bias": {"12": 1, "012": 2}},
    "stop": {"stop": [f"s{k}" for k in range(17)]},
    "stream_options": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "min_tokens": {"max_tokens": 2, "extra_body": {"min_tokens": 3}},
    "max_tokens": {"max_tokens": 0},
    "prompt": {"prompt": [[1, 2], [600]]},
    "temperature": {"temperature": 10**400},
    "metadata": {"extra_body": {"metadata": {"a": "b"}}},
    "frobnicate": {"extra_body": {"frobnicate": 1}},
}


@pytest.mark.slow
@pytest.mark.parametrize("field", sorted(REFUSED_COMPLETION))
def test_completion_fields_refused_by_name(client: openai.OpenAI, field: str) -> None:
    kwargs = {"model": MODEL_ID, "prompt": "a", "max_tokens": 2, **REFUSED_COMPLETION[field]}
    error = _bad(client.completions.create, **kwargs)
    assert error["param"] == field.strip(), error
    assert "Overflow" not in error["message"] and "Traceback" not in error["message"]


REFUSED_CHAT = {
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    "tool_choice": {"tool_choice": "auto"},
    "response_format": {"response_format": {"type": "json_object"}},
    "functions": {"functions": [{"name": "f", "parameters": {}}]},
    "function_call": {"function_call": "auto"},
    "top_logprobs": {"top_logprobs": 2},  # without logprobs: true
    "echo": {"extra_body": {"echo": True}},
}


@pytest.mark.parametrize("field", sorted(REFUSED_CHAT))
def test_chat_fields_refused_by_name(client: openai.OpenAI, field: str) -> None:
    kwargs = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error = _bad(client.chat.completions.create, **{**kwargs, **REFUSED_CHAT[field]})
    assert error["param"] == field, error


def test_lone_surrogates_are_400(server) -> None:
    # Sent as JSON escapes (json.dumps writes "\\ud800"; the openai client cannot encode
    # them): valid JSON, but not Unicode text any tokenizer can encode.
    base = {"model": MODEL_ID, "max_tokens": 2}
    cases = [
        ("/v1/completions", "prompt", {"prompt": "\ud800abc"}),
        ("/v1/completions", "stop", {"prompt": "a", "stop": ["\udfff"]}),
        (
            "/v1/chat/completions",
            "messages",
            {"messages": [{"role": "user", "content": "x\ud800"}]},
        ),
        ("/v1/completions", None, {"prompt": "a", "\ud800": 1}),  # a field's name
    ]
    for path, param, fields in cases:
        body = json.dumps({**base, **fields})
        assert "\\ud" in body
        headers = {"Content-Type": "application/json"}
        r = httpx.post(server[0] + path, content=body.encode(), headers=headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        message = r.json()["error"]["message"]
        assert ("lone surrogate U+D" if param else "\\ud800") in message


def test_no_op_values_of_unimplemented_fields_are_taken(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
        user="someone",
    )
    assert r.choices[0].message.content is not None
    r = client.completions.create(model=MODEL_ID, prompt="a", max_tokens=2, best_of=1, suffix="")
    assert r.usage.completion_tokens >= 1


def test_a_request_larger_than_the_queue_is_400_not_429(client: openai.OpenAI) -> None:
    # 3 prompts x n 16 = 48 sequences; the server queues at most 32: retrying cannot help.
    error = _bad(client.completions.create, model=MODEL_ID, prompt=["a", "b", "c"], n=16)
    assert error["param"] == "n" and "--max-queue" in error["message"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"


def test_prompt_over_the_character_limit_is_refused_untokenized(server, monkeypatch) -> None:
    """A prompt over the limit is refused before tokenizing; a short one is tokenized on the
    event loop (cheaper than a thread's round trip), a longer one on a thread."""
    from pldr_llm.serve import prompts

    url, app = server
    tokenizer = app.state.server.tokenizer
    calls: list[bool] = []
    original = tokenizer.prompt_ids

    def recording(text: str) -> list[int]:
        try:
            asyncio.get_running_loop()
            calls.append(True)  # on the event loop
        except RuntimeError:
            calls.append(False)
        return original(text)

    tokenizer.prompt_ids = recording
    try:
        body = {"model": MODEL_ID, "max_tokens": 1}
        long = "x" * (CHARS_PER_TOKEN * HP["max_seq_len"] + 1)
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": long}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert calls == []  # refused before tokenizing
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": "a b"}, timeout=60)
        assert r.status_code == 200 and calls == [True]  # short: on the event loop
        monkeypatch.setattr(prompts, "INLINE_PROMPT_CHARS", 2)
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": "a b"}, timeout=60)
        assert r.status_code == 200 and calls == [True, False]  # longer: off the event loop
    finally:
        del tokenizer.prompt_ids


@pytest.mark.parametrize("seed", range(4))
def test_piece_tracker_stays_inside_the_sent_text(loaded, seed: int) -> None:
    """The released pieces are always a prefix of the text sent so far (which lags behind
    while it may be the start of a stop string, and ends before one), and at the end exactly
    that text, with one entry per token. Random ids: many byte-fallback pieces."""
    from pldr_llm.generation import Detokenizer, final_text
    from pldr_llm.serve.logprobs import PieceTracker

    _, tok = loaded
    generator = torch.Generator().manual_seed(seed)
    prompt = tok.prompt_ids(PROMPT)
    new = torch.randint(6, len(tok), (40,), generator=generator).tolist()
    whole = final_text(tok, prompt, new)[len(tok.decode(prompt)) :]
    stops = [whole[len(whole) // 2 :][:2]] if seed % 2 else []
    detok = Detokenizer(tok, prompt, stops)
    tracker = PieceTracker(tok, prompt)
    sent, released, count = "", "", 0
    for token in new:
        sent += detok.push([token])
        tracker.add(token, -1.0, [])
        count += 1
        entries = tracker.release(len(sent))
        released += "".join(e.text for e in entries)
        assert sent.startswith(released)
        if detok.stopped:
            break
    sent += detok.finish()
    entries = tracker.release(len(sent), final=True)
    released += "".join(e.text for e in entries)
    assert (
        released == sent == final_text(tok, prompt, new[:count], stops)[len(tok.decode(prompt)) :]
    )
