"""``pldr-llm serve`` end to end: a tiny model (a small trained tokenizer, random weights) served on a
free localhost port, called with the real ``openai`` client and with raw HTTP.

Expected texts come from the library's own decoding (``pldr-llm generate``, ``generate``), so
each check fails if the server routes, cuts, seeds or batches a row wrongly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pldr_llm import cli, generate, generate_details  # noqa: E402
from pldr_llm.bundle import load_bundle  # noqa: E402
from pldr_llm.core.errors import PLDRError  # noqa: E402
from pldr_llm.generation import Detokenizer, generate_text  # noqa: E402
from pldr_llm.serve.app import ServeOptions  # noqa: E402
from serve_support import MODEL_ID, build_bundle, live_server, serve_process  # noqa: E402

PROMPT = "The power law graph attention"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a 1024-token context: long requests, for timing-free checks of
    what happens while a row is still running."""
    from serve_support import HP

    return build_bundle(tmp_path_factory.mktemp("serve_long"), {**HP, "max_seq_len": 1024})


@pytest.fixture(scope="module")
def loaded(bundle: Path):
    return load_bundle(str(bundle))


@pytest.fixture(scope="module")
def server(bundle: Path):
    with live_server(bundle, max_batch=8, max_queue=64) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _generate_cli(bundle: Path, prompt: str, *args: str) -> str:
    """What ``pldr-llm generate`` prints (prompt + new text), run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["generate", "--model", str(bundle), "--prompt", prompt, "-q", *args])
    assert code == 0
    return out.getvalue().rstrip("\n")


def _stop_strings(full: str, count: int) -> list[str]:
    """``count`` stop strings of 3 characters, starting at offsets spread over the middle of
    ``full``. Characters, not words: the tokenizer is trained on the repository's docs, so the
    random model's text (and how many spaces it has) changes whenever the docs do."""
    assert len(full) > 24, full
    return [full[len(full) * k // 8 :][:3] for k in range(2, 2 + count)]


def _greedy_text(loaded, prompt: str, steps: int) -> tuple[str, list[int]]:
    model, tok = loaded
    ids = tok.prompt_ids(prompt)
    out = generate(model, ids, max_new_tokens=steps, top_k=1)
    new = out[len(ids) :].tolist()
    full = tok.decode(ids + new)
    return full[len(tok.decode(ids)) :], new


# ---------------------------------------------------------------------- OpenAI API


@pytest.mark.slow
def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]


def test_greedy_completion_matches_generate(client: openai.OpenAI, loaded) -> None:
    text, new = _greedy_text(loaded, PROMPT, 20)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == text
    eos = 3 in new
    assert r.choices[0].finish_reason == ("stop" if eos else "length")
    assert r.usage.prompt_tokens == len(loaded[1].prompt_ids(PROMPT))
    assert r.usage.completion_tokens == len(new)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize(("kv", "g"), [(True, False), (False, True), (False, False)])
def test_cache_switches_are_per_request(
    client: openai.OpenAI, server, loaded, kv: bool, g: bool
) -> None:
    model, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    out = generate(model, ids, max_new_tokens=12, top_k=1, enable_kvcache=kv, enable_Gcache=g)
    want = tok.decode(out.tolist())[len(tok.decode(ids)) :]
    r = client.completions.create(
        model=MODEL_ID,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"enable_kvcache": kv, "enable_gcache": g},
    )
    assert r.choices[0].text == want
    assert (kv, g) in server[1].state.server.scheduler._engines  # an engine in that cache mode
    if not kv and not g:
        # A recomputed over the grown sequence: other logits than the cached run, other ids.
        cached = generate(model, ids, max_new_tokens=12, top_k=1)
        assert cached.tolist() != out.tolist()


@pytest.mark.slow
def test_seeded_sampling_is_the_text_of_pldr_llm_generate(
    client: openai.OpenAI, bundle: Path, loaded
) -> None:
    printed = _generate_cli(bundle, PROMPT, "--seed", "1234", "-t", "0.9", "-n", "24")
    prompt_text = loaded[1].decode(loaded[1].prompt_ids(PROMPT))
    expected = printed[len(prompt_text) :]
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.9}
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    again = client.completions.create(seed=1234, **kwargs).choices[0].text
    other = client.completions.create(seed=4321, **kwargs).choices[0].text
    assert first == expected
    model, tok = loaded
    library = generate_text(model, tok, PROMPT, 24, temperature=0.9, seed=1234)
    assert library == printed
    assert again == expected
    assert other != expected  # 24 tokens from 600 pieces: never equal by chance


@pytest.mark.slow
def test_streaming_gives_the_same_text_in_pieces(client: openai.OpenAI, server) -> None:
    # ignore_eos: 64 tokens whatever the random model draws (its words follow the tokenizer,
    # which is trained on the docs). The server sends one event per sequence and block of steps
    # (16 by default) and holds back incomplete UTF-8, so a stream needs a few blocks to show
    # more than one piece.
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 64, "seed": 7}
    kwargs["extra_body"] = {"ignore_eos": True}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(deltas) == whole
    assert len([d for d in deltas if d]) > 1  # it really streamed
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # The raw stream: server-sent events ending in [DONE].
    body = {k: v for k, v in kwargs.items() if k != "extra_body"}
    body.update(ignore_eos=True, stream=True)
    with httpx.stream("POST", server[0] + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_stop_strings_cut_the_text(client: openai.OpenAI, loaded) -> None:
    full, _ = _greedy_text(loaded, PROMPT, 40)
    stop = _stop_strings(full, 2)[1]
    cut = full.index(stop)
    kwargs = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    r = client.completions.create(stop=[stop, "\u2603never"], **kwargs)
    assert r.choices[0].text == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:cut]


@pytest.mark.slow
def test_n_choices_use_consecutive_seeds(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_ID, "max_tokens": 12, "temperature": 1.0}
    r = client.completions.create(prompt=[PROMPT, "Another prompt"], n=3, seed=50, **kwargs)
    assert [c.index for c in r.choices] == list(range(6))
    for i, prompt in enumerate([PROMPT, "Another prompt"]):
        for j in range(3):
            alone = client.completions.create(prompt=prompt, seed=50 + j, **kwargs)
            assert r.choices[i * 3 + j].text == alone.choices[0].text
    assert len({c.text for c in r.choices[:3]}) == 3


def test_logprobs_are_those_of_the_chosen_tokens(client: openai.OpenAI, loaded) -> None:
    model, tok = loaded
    ids = tok.prompt_ids(PROMPT)
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens == len(lp.tokens)
    # The logits of the same cached decoding (A and G_LM depend on the whole prompt, so an
    # uncached pass over prompt + new ids gives other logits, by design).
    out = generate_details(model, ids, max_new_tokens=6, top_k=1, output_logits=True)
    new = out.new_ids[0]
    assert out.step_logits is not None
    logits = out.step_logits[: len(new), 0]
    expected = torch.log_softmax(logits, -1)[torch.arange(len(new)), torch.tensor(new)]
    # The same float32 arithmetic; only the log-softmax's summation order may differ.
    assert torch.allclose(torch.tensor(lp.token_logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sixteen_concurrent_streams_are_independent(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL_ID, "max_tokens": 24, "temperature": 1.0}
    prompts = [f"Prompt number {i}" for i in range(16)]

    def stream(i: int) -> str:
        chunks = client.completions.create(prompt=prompts[i], seed=100 + i, stream=True, **kwargs)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(stream, range(16)))
    alone = [
        client.completions.create(prompt=prompts[i], seed=100 + i, **kwargs).choices[0].text
        for i in range(16)
    ]
    assert texts == alone
    assert len(set(texts)) == 16


def _completions(url: str, requests: list[dict]) -> list[tuple[str, str, int, str]]:
    """(text, finish_reason, completion_tokens, streamed text) of each request, sent together."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def one(kwargs: dict) -> tuple[str, str, int, str]:
        r = c.completions.create(model=MODEL_ID, **kwargs)
        chunks = c.completions.create(model=MODEL_ID, stream=True, **kwargs)
        streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens, streamed

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.mark.slow
def test_tokens_per_sync_gives_the_texts_of_single_steps(bundle: Path, loaded) -> None:
    """Blocks of 4 steps per host sync: the same texts, usage and stream as one step per sync,
    with stop strings that match inside a block (its later tokens are dropped)."""
    full, new = _greedy_text(loaded, PROMPT, 40)
    # stop strings ending at several token offsets, so some fall inside a block of 4
    stops = _stop_strings(full, 4)
    requests = [
        {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": stop} for stop in stops
    ]
    requests += [
        {"prompt": f"Prompt number {i}", "max_tokens": 17 + i, "seed": 300 + i, "top_p": p}
        for i, p in enumerate([1.0, 0.9, 1.0, 1.0])
    ]
    results = {}
    for k in (1, 4):
        with live_server(bundle, max_batch=8, tokens_per_sync=k) as (url, app):
            engine = app.state.server.scheduler._engines[(True, True)]
            blocks = []
            launch = engine.launch
            engine.launch = lambda n, b=blocks, f=launch: (b.append(n), f(n))[1]
            results[k] = _completions(url, requests)
        # blocks of 4 (step_many and the ones launched ahead), or only single steps
        assert (blocks.count(4) > 5) if k == 4 else set(blocks) <= {1}
    assert results[4] == results[1]
    for (text, reason, count, streamed), stop in zip(results[1], stops):
        assert text == full[: full.index(stop)] == streamed and reason == "stop"
        assert 0 < count < len(new)  # the tokens after the stop string are not counted
    assert all(r[0] == r[3] and r[1] in ("length", "stop") for r in results[1])


class _Loop:
    """Stands for the event loop: the worker's events are delivered at once."""

    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)


class _Events(list):
    put_nowait = list.append


def _scheduled(
    loaded,
    rows: list[tuple[str, dict, list[str]]],
    tokens_per_sync: int,
    slots: int = 0,
    keys: list[tuple[bool, bool]] | None = None,
) -> list:
    """Each row (prompt, SamplingParams fields, stop strings) through the server's scheduler
    of ``slots`` slots (default: one a row), all queued at once (``keys``: each row's cache
    mode, KV and G on by default): per row its events' text, tokens, logprobs, alternatives,
    end and token count."""
    from pldr_llm.generation import SamplingParams
    from pldr_llm.serve.scheduler import GenSequence, Scheduler

    model, tok = loaded
    scheduler = Scheduler(
        model, tok, max_batch=slots or len(rows), max_queue=len(rows),
        tokens_per_sync=tokens_per_sync,
    )  # fmt: skip
    keys = keys or [(True, True)] * len(rows)
    seqs = [
        GenSequence(
            tok.prompt_ids(p), SamplingParams(**kw), stops, tok, _Loop(), _Events(), key=key
        )
        for (p, kw, stops), key in zip(rows, keys)
    ]
    scheduler.submit(seqs)
    scheduler.drain_and_stop()  # before the worker starts: it serves the queue, then stops
    scheduler.start()
    scheduler._thread.join(120)
    scheduler.drain_and_stop()
    out = []
    for seq in seqs:
        events = seq.events
        assert events[-1].finish_reason is not None and not events[-1].error
        out.append((
            "".join(e.text for e in events), [t for e in events for t in e.tokens],
            [lp for e in events for lp in e.logprobs], [t for e in events for t in e.top_logprobs],
            events[-1].finish_reason, events[-1].completion_tokens,
        ))  # fmt: skip
    return out


def test_concurrent_rows_with_mixed_params_route_as_each_alone(loaded) -> None:
    """The scheduler's routing of a block (each sequence's tokens together: text, stop strings,
    the end-of-text id, max_tokens, logprobs and alternatives): rows of mixed parameters served
    together in blocks of 4 steps give each row's ids, text and end when served alone, one
    step per sync, also where the blocks compute only the low rows of more slots."""
    model, tok = loaded
    eos = model.config.eos_id
    full, _ = _greedy_text(loaded, PROMPT, 30)
    rows = [
        (PROMPT, {"temperature": 1.0, "seed": 3, "max_new_tokens": 21, "stop_at_eos": False}, []),
        (PROMPT, {"temperature": 0, "max_new_tokens": 30}, _stop_strings(full, 2)[1:]),
        ("Penalties", {"seed": 4, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                       "logit_bias": ((100, -100.0), (42, 2.0)), "max_new_tokens": 18}, []),
        ("Ends early", {"seed": 5, "logit_bias": ((eos, 100.0),), "min_new_tokens": 6,
                        "max_new_tokens": 20}, []),  # the end-of-text id at its 7th token
        ("Asks", {"seed": 6, "logprobs": 3, "repetition_penalty": 1.3, "max_new_tokens": 13}, []),
        ("Short", {"seed": 7, "max_new_tokens": 7, "stop_at_eos": False}, []),
        ("Ignores eos", {"seed": 8, "logit_bias": ((eos, 100.0),), "stop_at_eos": False,
                         "max_new_tokens": 9}, []),
    ]  # fmt: skip
    together = _scheduled(loaded, rows, 4)
    alone = [_scheduled(loaded, [row], 1)[0] for row in rows]

    # The same ids, texts and ends; log-probabilities to float32 rounding (a batch of 7 rows
    # and one of 1 multiply in other orders on a CPU).
    def exact(r: tuple) -> tuple:
        return r[0], r[1], [[t for t, _ in top] for top in r[3]], r[4], r[5]

    assert [exact(r) for r in together] == [exact(r) for r in alone]
    # A scheduler of 32 slots runs blocks of its first 8 rows (views): the same again.
    wide = _scheduled(loaded, rows, 4, slots=32)
    assert [exact(r) for r in wide] == [exact(r) for r in together]
    for a, b in zip(together, alone):
        assert a[2] == pytest.approx(b[2], abs=1e-5)
        values = [v for top in a[3] for _, v in top]
        assert values == pytest.approx([v for top in b[3] for _, v in top], abs=1e-5)
    ends = [(r[4], r[5]) for r in together]
    assert ends[1][0] == "stop" and ends[3] == ("stop", 7) and ends[5] == ("length", 7)
    assert ends[6] == ("length", 9) and ends[0] == ("length", 21)
    assert len(together[4][3]) == 13 and all(len(t) == 3 for t in together[4][3])
    assert together[3][1][-1] == eos and together[1][0] == full[: full.index(rows[1][2][0])]


def test_reused_slots_get_only_their_own_tokens(loaded) -> None:
    """More sequences than slots, in blocks of 3 steps: a slot freed while the next block is
    already computing (its old sequence's tokens there are dropped) is admitted a waiting
    sequence, which gets its own tokens from its first block on: each sequence's ids, text and
    end as when served alone."""
    full, _ = _greedy_text(loaded, PROMPT, 20)
    rows = [
        (f"Queued {i}", {"seed": 20 + i, "max_new_tokens": 4 + 3 * i, "stop_at_eos": False}, [])
        for i in range(5)
    ]
    rows.insert(2, (PROMPT, {"temperature": 0, "max_new_tokens": 20}, _stop_strings(full, 2)[:1]))
    together = _scheduled(loaded, rows, 3, slots=2)
    alone = [_scheduled(loaded, [row], 1)[0] for row in rows]
    assert [(r[0], r[1], r[4], r[5]) for r in together] == [(r[0], r[1], r[4], r[5]) for r in alone]
    assert [r[5] for r in together[3:]] == [10, 13, 16]


def test_cache_modes_queued_together_are_each_served_as_alone(loaded) -> None:
    """Sequences of two cache modes (two engines: the cached step and the full re-run without
    KV-cache) queued alternately, more than the slots of either: each is served as alone."""
    rows = [
        (f"Mode {i}", {"seed": 40 + i, "max_new_tokens": 3 + 2 * i, "stop_at_eos": False}, [])
        for i in range(6)
    ]
    keys = [(True, True), (False, True)] * 3
    together = _scheduled(loaded, rows, 2, slots=2, keys=keys)
    alone = [_scheduled(loaded, [row], 1, keys=[key])[0] for row, key in zip(rows, keys)]
    assert [(r[1], r[4], r[5]) for r in together] == [(r[1], r[4], r[5]) for r in alone]
    assert [r[5] for r in together] == [3, 5, 7, 9, 11, 13]


# ---------------------------------------------------------------------- bad input


def _post(url: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(url + path, timeout=60, **kwargs)


JSON = {"Content-Type": "application/json"}
BAD = {
    "malformed JSON": {"content": b'{"model": "x", "prompt": ', "headers": JSON},
    "not UTF-8": {"content": b'{"model": "\xff\xfe", "prompt": "a"}', "headers": JSON},
    "prompt longer than the context": {"json": {"model": MODEL_ID, "prompt": "word " * 200}},
    "max_tokens 0": {"json": {"model": MODEL_ID, "prompt": "a", "max_tokens": 0}},
    "max_tokens negative": {"json": {"model": MODEL_ID, "prompt": "a", "max_tokens": -3}},
    "temperature above 2": {"json": {"model": MODEL_ID, "prompt": "a", "temperature": 2.5}},
    "temperature negative": {"json": {"model": MODEL_ID, "prompt": "a", "temperature": -0.1}},
    "top_p 0": {"json": {"model": MODEL_ID, "prompt": "a", "top_p": 0}},
    "top_p above 1": {"json": {"model": MODEL_ID, "prompt": "a", "top_p": 1.5}},
    "prompt not text": {"json": {"model": MODEL_ID, "prompt": {"file": "/etc/passwd"}}},
    "body not an object": {"json": [1, 2, 3]},
}


def test_sampling_fields_take_defaults_and_are_checked_by_name() -> None:
    from pldr_llm.serve.protocol import APIError, CompletionRequest, parse_sampling

    assert parse_sampling({}, ["a"]) == CompletionRequest(prompts=["a"])
    body = {"max_tokens": 9, "max_completion_tokens": 5, "temperature": 0, "top_k": 3, "seed": 7}
    req = parse_sampling({**body, "n": 2, "stream": True, "enable_gcache": False}, ["a"])
    # max_completion_tokens (the newer name) wins over max_tokens
    assert (req.max_tokens, req.temperature, req.top_k, req.seed, req.n) == (5, 0.0, 3, 7, 2)
    assert (req.stream, req.enable_gcache, req.enable_kvcache) == (True, False, True)
    for name, value in [
        ("max_tokens", 0),
        ("max_completion_tokens", -1),
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_k", -1),
        ("seed", -1),
        ("n", 17),
        ("stream", 1),
    ]:
        with pytest.raises(APIError) as raised:
            parse_sampling({name: value}, ["a"])
        assert (raised.value.status, raised.value.param) == (400, name)
        assert f"'{name}'" in raised.value.message


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_400_and_the_server_keeps_serving(server, case: str) -> None:
    url = server[0]
    r = _post(url, "/v1/completions", **BAD[case])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"] and "\n" not in error["message"]
    ok = _post(url, "/v1/completions", json={"model": MODEL_ID, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_openai_client_sees_bad_request_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_ID, prompt="a", temperature=3)
    with pytest.raises(openai.BadRequestError, match="base model"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])


def test_max_tokens_is_capped_by_the_context(client: openai.OpenAI, loaded) -> None:
    ids = loaded[1].prompt_ids(PROMPT)
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=10_000, temperature=0, stop=None
    )
    text, new = _greedy_text(loaded, PROMPT, 96 - len(ids))
    assert r.choices[0].text == text
    assert r.usage.completion_tokens == len(new) <= 96 - len(ids)


def test_unknown_endpoint_and_method_get_error_objects(server) -> None:
    r = httpx.get(server[0] + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server[0] + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------- other endpoints


def test_health_and_metrics(server, client: openai.OpenAI) -> None:
    url = server[0]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    client.completions.create(model=MODEL_ID, prompt="a", max_tokens=3)
    _post(url, "/v1/completions", json={"model": MODEL_ID, "prompt": "a", "top_p": 9})
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['pldr_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values['pldr_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert values["pldr_completion_tokens_total"] >= 3
    assert values["pldr_time_to_first_token_seconds_count"] >= 1
    assert values["pldr_inter_token_latency_seconds_count"] >= 2
    assert (
        values['pldr_time_to_first_token_seconds_bucket{le="+Inf"}']
        == (values["pldr_time_to_first_token_seconds_count"])
    )
    assert values["pldr_queue_depth"] == 0
    # The worker's phases: the 3 tokens took at least one block of steps, whose device work
    # (collect) and launch took time; every phase is there.
    assert values["pldr_decode_steps_total"] >= 3
    phases = {p: values[f'pldr_worker_seconds_total{{phase="{p}"}}'] for p in
              ("idle", "jobs", "admit", "launch", "collect", "route", "flush")}  # fmt: skip
    assert phases["collect"] + phases["launch"] > 0 and phases["admit"] > 0
    assert all(seconds >= 0 for seconds in phases.values())
    # A worker waiting for work: its idle seconds are current at every reading (not added only
    # when it wakes, which would put a wait before a load into the load's counters).
    idle = 'pldr_worker_seconds_total{phase="idle"}'

    def idle_now() -> float:
        line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(idle))
        return float(line.rsplit(" ", 1)[1])

    first = idle_now()
    time.sleep(0.3)
    assert idle_now() - first >= 0.25


def test_idle_seconds_never_decrease_while_the_worker_wakes() -> None:
    """A /metrics reading races the worker waking up (it adds its wait and closes it): the
    idle counter a reading gives never goes down (Prometheus would take it for a reset)."""
    import threading

    from pldr_llm.serve.metrics import Metrics

    metrics = Metrics()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            since = time.perf_counter()
            metrics.worker_waits(since)
            time.sleep(0.0002)  # a wait long enough to show at the counter's microseconds
            metrics.worker_woke(since)

    def idle() -> float:
        line = next(x for x in metrics.render(0, 0).splitlines() if 'phase="idle"' in x)
        return float(line.rsplit(" ", 1)[1])

    thread = threading.Thread(target=worker)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two statements: the race shows
    thread.start()
    try:
        readings = [idle() for _ in range(5000)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert all(b >= a for a, b in zip(readings, readings[1:]))


def test_deductive_endpoint_gives_the_numbers_of_inspect(server, loaded) -> None:
    from pldr_llm.deductive import analyze_deductive, deductive_outputs

    model, tok = loaded
    r = _post(server[0], "/v1/deductive", json={"prompt": PROMPT, "tensors": ["G_LM", "A_P"]})
    assert r.status_code == 200, r.text
    data = r.json()
    ids = tok.prompt_ids(PROMPT)
    layers = deductive_outputs(model, ids)
    report = analyze_deductive(layers, others=["A_P"]).to_dict()
    assert data["prompt_ids"] == ids
    assert (data["num_layers"], data["num_heads"], data["dk"]) == (2, 2, 8)
    for name in ("G_LM", "A_P"):
        got = torch.tensor(data["tensors"][name])
        assert got.shape == (2, 2, 8, 8)
        want = torch.stack([layer[name][0] for layer in layers]).double()
        assert torch.equal(got, want)  # float32 values carried exactly through JSON
    assert data["report"]["layers"] == json.loads(json.dumps(report["layers"]))
    bad = _post(server[0], "/v1/deductive", json={"prompt": "a", "tensors": ["../weights"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tensors"


@pytest.mark.slow
def test_queue_bound_answers_429_and_a_request_that_never_fits_400(long_bundle: Path) -> None:
    with live_server(long_bundle, max_batch=1, max_queue=1) as (url, _):
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 2}
        # More sequences than the queue holds: no retry can help, so 400, not 429.
        r = _post(url, "/v1/completions", json={**body, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "--max-queue" in r.json()["error"]["message"]
        # A long stream holds the one slot, a second request waits in the queue (its one
        # place), so a third one gets 429 until the queue has room again. (Uncached: each step
        # a pass over the whole row, so that the stream lasts seconds even on a fast CPU.)
        body["enable_kvcache"] = False
        long = {**body, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(_post, url, "/v1/completions", json=body)
                while httpx.get(url + "/health").json()["queued"] < 1:
                    assert not waiting.done(), waiting.result().text
                r = _post(url, "/v1/completions", json=body)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                stream.close()  # the client goes away: its slot frees, the waiting one runs
                assert waiting.result(60).status_code == 200


@pytest.mark.slow
def test_api_key_and_body_limit(bundle: Path) -> None:
    key = "s3cret-key"
    with live_server(bundle, api_key=key) as (url, _):
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 2}
        assert _post(url, "/v1/completions", json=body).status_code == 401
        wrong = _post(url, "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert _post(url, "/v1/deductive", json={"prompt": "a"}).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        big = {**body, "prompt": "x" * (1 << 20)}
        r = _post(url, "/v1/completions", json=big, headers=auth)
        assert r.status_code == 413 and "error" in r.json()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert good.completions.create(**body).usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200  # not under /v1


@pytest.mark.slow
def test_chat_completions_with_a_chat_template(bundle: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / MODEL_ID
    shutil.copytree(bundle, folder)
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    (folder / "chat_template.jinja").write_text(template)
    from pldr_llm.serve import find_chat_template

    with live_server(folder, chat_template=find_chat_template(folder)) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Hello there"}]
        chat = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, seed=3)
        plain = c.completions.create(
            model=MODEL_ID, prompt="user: Hello there\nassistant:", max_tokens=8, seed=3
        )
        assert chat.choices[0].message.content == plain.choices[0].text
        assert chat.choices[0].message.role == "assistant"
        streamed = c.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=8, seed=3, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        assert text == plain.choices[0].text


# ---------------------------------------------------------------------- the detokenizer


def test_detokenizer_never_emits_half_a_character(loaded) -> None:
    tok = loaded[1]
    prompt = tok.prompt_ids("Say")
    target = " 日本語🙂 ok"
    ids = tok.encode(target, add_eos=False)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte-fallback pieces
    detok = Detokenizer(tok, prompt, stops=())
    deltas = [detok.push([i]) for i in ids]
    deltas.append(detok.finish())
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)) :]


def test_detokenizer_holds_back_a_possible_stop_string(loaded) -> None:
    tok = loaded[1]
    prompt = tok.prompt_ids("Say")
    ids = tok.encode(" alpha beta gamma", add_eos=False)
    detok = Detokenizer(tok, prompt, stops=["beta gam"])
    shown = "".join(detok.push([i]) for i in ids)
    assert detok.stopped
    assert shown + detok.finish() == " alpha "


# ---------------------------------------------------------------------- rows and shutdown


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.slow
def test_a_disconnected_client_frees_its_row(long_bundle: Path) -> None:
    import time

    with live_server(long_bundle, max_batch=1) as (url, _):
        before = _metric(url, "pldr_completion_tokens_total")
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 1000, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line:  # the first token arrived: the row is running; now hang up
                    break
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["running"]:
            assert time.monotonic() < deadline, "the row of a gone client was never freed"
            time.sleep(0.005)
        # 1000 tokens take seconds; the row was freed long before they were all made.
        assert _metric(url, "pldr_completion_tokens_total") - before < 1000
        # The one slot is free again: the next request runs to the end.
        r = _post(url, "/v1/completions", json={**body, "max_tokens": 5})
        assert r.json()["usage"]["completion_tokens"] == 5


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_then_exits(long_bundle: Path) -> None:
    import signal
    import time

    with serve_process(long_bundle, "--max-batch", "2", "-q") as (proc, port):
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 600, "temperature": 0}
        body["stream"] = True
        events = []
        during_drain = None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if not events:
                    proc.send_signal(signal.SIGTERM)  # after the first token
                    signalled = time.monotonic()
                elif during_drain is None and time.monotonic() - signalled > 0.3:
                    # The server notices the signal at once and drains: it still listens, and
                    # new requests get 503 (health says "draining").
                    during_drain = httpx.post(url + "/v1/completions", json=body, timeout=2)
                events.append(line)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert during_drain is not None  # 600 tokens outlast the 0.3 s
        assert during_drain.status_code == 503
        assert during_drain.json()["error"]["code"] == "shutting_down"
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "without an API key"),
        (["--max-batch", "0"], "--max-batch"),
        (["--api-key", " "], "API key is empty"),
        (["--tokens-per-sync", "0"], "--tokens-per-sync"),
        (["--port", "70000"], "port must be in [0, 65535]"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line(
    bundle: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--model", str(bundle), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pldr-llm: error: ") and message in err


def test_cli_refuses_an_exposed_host_before_looking_for_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["serve", "--model", missing, "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_serve_options_refuse_an_exposed_host_without_a_key() -> None:
    with pytest.raises(PLDRError, match="refusing to listen on 0.0.0.0"):
        ServeOptions(model_id="m", host="0.0.0.0")
    # a key, or saying insecure, allows it; a loopback host needs neither
    assert ServeOptions(model_id="m", host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert ServeOptions(model_id="m", host="0.0.0.0", insecure=True).insecure
    assert ServeOptions(model_id="m", host="::1").port == 8000


@pytest.mark.parametrize("seed", range(5))
def test_incremental_detokenizer_equals_a_full_decode(loaded, seed: int) -> None:
    """Random ids (byte pieces, broken UTF-8, control ids) streamed one by one add up to the
    text of one decode of prompt + ids -- with and without a stop string that never occurs."""
    tok = loaded[1]
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, tok.vocab_size, (int(torch.randint(1, 12, (1,), generator=g)),))
    prompt_ids = prompt.tolist()
    ids = torch.randint(0, tok.vocab_size, (200,), generator=g).tolist()
    want = tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)) :]
    for stops in ((), ("\u2603\u2603",)):
        detok = Detokenizer(tok, prompt_ids, stops)
        got = "".join(detok.push([i]) for i in ids) + detok.finish()
        assert got == want


@pytest.mark.gpu
def test_gpu_server_rows_are_independent_and_match_generate(long_bundle: Path) -> None:
    """On CUDA (graph-captured steps): greedy text equals ``generate`` on the same model, and 16
    concurrent sampled streams each give their lone text."""
    model, tok = load_bundle(str(long_bundle), device="cuda")
    with live_server(long_bundle, device="cuda", max_batch=16) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        ids = tok.prompt_ids(PROMPT)
        out = generate(model, ids, max_new_tokens=64, top_k=1)
        want = tok.decode(out.tolist())[len(tok.decode(ids)) :]
        r = c.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=64, temperature=0)
        assert r.choices[0].text == want
        kwargs = {"model": MODEL_ID, "max_tokens": 64, "temperature": 1.0}

        def stream(i: int) -> str:
            chunks = c.completions.create(prompt=f"p{i}", seed=i, stream=True, **kwargs)
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(stream, range(16)))
        alone = [
            c.completions.create(prompt=f"p{i}", seed=i, **kwargs).choices[0].text
            for i in range(16)
        ]
        assert texts == alone
