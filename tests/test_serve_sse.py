"""The streamed answer's pieces on the event loop: the SSE chunks written from pre-encoded parts
(byte for byte ``json.dumps`` of the chunk objects), the events' inbox, the merging of events,
and the response that sends a stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("starlette")

from starlette.responses import StreamingResponse  # noqa: E402

from pldr_llm.serve.completions import _merged_events  # noqa: E402
from pldr_llm.serve.scheduler import Event, EventInbox  # noqa: E402
from pldr_llm.serve.sse import DONE, ChunkFormat, EventStreamResponse  # noqa: E402

AWKWARD = [
    "",
    "plain",
    ' "quoted" \\ back\\slash /slash',
    "new\nline\r\ttab",
    "controls \x00\x01\x08\x0b\x0c\x1f\x7f",
    "unicode é ß 中文 🙂 \u2028\u2029 \ufffd \ufeff",
    "lone surrogate \ud800 end",
    "</script><!-- & ' ",
]
LOGPROBS: list[Any] = [
    None,
    {
        "tokens": ["a", ' "b"', "\n"],
        "token_logprobs": [None, -0.5, -9999.0],
        "top_logprobs": [None, {"x\u00e9": -1.25e-07, "\n": -3.0}, {}],
        "text_offset": [0, 1, 5],
    },
    {"content": [{"token": "é", "logprob": float("nan"), "bytes": [195, 169]}]},
]


def _old_chunk(fmt: dict[str, Any], choices: list[dict[str, Any]], usage: Any = None) -> str:
    """A chunk as the server wrote it before (a dict through json.dumps)."""
    data: dict[str, Any] = {**fmt, "choices": choices}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("rid", ["cmpl-0123abcd", 'odd "id" é\n'])
def test_chunks_are_the_bytes_of_json_dumps(chat: bool, rid: str) -> None:
    kind = "chat.completion.chunk" if chat else "text_completion"
    model = 'model "ß"\t/\\'
    head = {"id": rid, "object": kind, "created": 1700000000, "model": model}
    fmt = ChunkFormat(rid, kind, 1700000000, model, chat)
    for text in AWKWARD:
        for lp in LOGPROBS:
            for index, reason in [(0, None), (3, "stop"), (12, "length"), (1, 'odd "é"')]:
                if chat:
                    choice: dict[str, Any] = {"index": index, "delta": {"content": text}}
                else:
                    choice = {"index": index, "text": text}
                old = _old_chunk(head, [{**choice, "logprobs": lp, "finish_reason": reason}])
                new = fmt.event(fmt.choice(index, text, lp, reason))
                assert new == old  # the same text, so the same UTF-8 bytes on the wire
    usage = {"prompt_tokens": 7, "completion_tokens": 256, "total_tokens": 263}
    assert fmt.event("", usage) == _old_chunk(head, [], usage)
    roles = [
        {"index": i, "delta": {"role": "assistant", "content": ""}}
        | {"logprobs": None, "finish_reason": None}
        for i in range(3)
    ]
    assert fmt.event(fmt.objects(roles)) == _old_chunk(head, roles)


def test_the_response_sends_the_headers_of_streaming_response() -> None:
    async def body():  # never iterated
        yield ""

    old = StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    assert EventStreamResponse(body()).raw_headers == old.raw_headers


def test_the_inbox_gives_everything_delivered_in_order_and_loses_nothing_to_a_cancel() -> None:
    async def run() -> None:
        inbox = EventInbox()
        waiting = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        assert not waiting.done()
        inbox.put_nowait(Event("a"))
        inbox.put_nowait(Event("b"))
        assert [e.text for e in await waiting] == ["a", "b"]
        # A wait cut short (a timeout) after the wake-up: the events stay for the next take.
        waiting = asyncio.ensure_future(inbox.take())
        await asyncio.sleep(0)
        inbox.put_nowait(Event("c"))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert [e.text for e in await inbox.take()] == ["c"]

    asyncio.run(run())


def test_merged_events_join_a_choice_without_changing_the_events() -> None:
    async def run() -> list[list[Event]]:
        inbox = EventInbox()
        first = Event("a", [1], [-0.1], index=0)
        inbox.put_nowait(first)
        inbox.put_nowait(Event("x", [9], [-0.9], index=1))
        inbox.put_nowait(Event("b", [2], [-0.2], finish_reason="length", completion_tokens=2))
        inbox.put_nowait(
            Event("y", [8], [-0.8], finish_reason="stop", completion_tokens=2, index=1)
        )
        batches = [batch async for batch in _merged_events(inbox, 2)]
        assert (first.text, first.tokens, first.finish_reason) == ("a", [1], None)
        return batches

    [batch] = asyncio.run(run())
    assert [(e.index, e.text, e.tokens, e.logprobs, e.finish_reason) for e in batch] == [
        (0, "ab", [1, 2], [-0.1, -0.2], "length"),
        (1, "xy", [9, 8], [-0.9, -0.8], "stop"),
    ]
    assert [e.completion_tokens for e in batch] == [2, 2]


def test_an_error_event_ends_the_merged_events() -> None:
    async def run() -> list[list[Event]]:
        inbox = EventInbox()
        inbox.put_nowait(Event("a"))
        inbox.put_nowait(Event(finish_reason="error", error="boom"))
        return [batch async for batch in _merged_events(inbox, 1)]

    [[ev]] = asyncio.run(run())
    assert ev.error == "boom"


async def _respond(texts: list[str], disconnect_after: int | None = None) -> tuple[list, list]:
    """The messages an EventStreamResponse of ``texts`` sends (the client goes away after
    ``disconnect_after`` of them; the body then waits), and what the body saw."""
    seen: list[str] = []
    gone = asyncio.Event()
    sent: list[dict] = []

    async def body():
        try:
            for text in texts:
                yield text
            if disconnect_after is not None:
                await asyncio.Event().wait()  # a stream waiting for tokens
        finally:
            seen.append("finally")

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if disconnect_after is not None and len(sent) == disconnect_after:
            gone.set()

    await EventStreamResponse(body())({"type": "http"}, receive, send)
    return sent, seen


def test_the_response_sends_the_done_event_as_the_last_body() -> None:
    sent, seen = asyncio.run(_respond(["data: 1\n\n", "data: 2\n\n" + DONE]))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"data: 2\n\ndata: [DONE]\n\n", False),
    ]
    assert seen == ["finally"]
    # A body that ends otherwise (an error event): an empty last body, as StreamingResponse.
    sent, seen = asyncio.run(_respond(['data: {"error": 1}\n\n']))
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b'data: {"error": 1}\n\n', True),
        (b"", False),
    ]


def test_a_client_that_goes_away_ends_the_body_where_it_waits() -> None:
    async def run() -> tuple[list, list, bool]:
        task = asyncio.ensure_future(_respond(["data: 1\n\n"], disconnect_after=2))
        sent, seen = await asyncio.wait_for(task, 10)
        return sent, seen, task.cancelled()

    sent, seen, cancelled = asyncio.run(run())
    assert len(sent) == 2 and seen == ["finally"] and not cancelled


def test_a_cancel_from_elsewhere_goes_on_up() -> None:
    async def run() -> list[str]:
        seen: list[str] = []

        async def body():
            try:
                yield "data: 1\n\n"
                await asyncio.Event().wait()
            finally:
                seen.append("finally")

        async def receive() -> dict:
            await asyncio.Event().wait()
            return {}

        async def send(message: dict) -> None:
            pass

        task = asyncio.ensure_future(EventStreamResponse(body())({"type": "http"}, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(run()) == ["finally"]
