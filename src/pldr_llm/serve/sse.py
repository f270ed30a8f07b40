"""The server-sent events of a streamed completion, written with little work on the event loop.

:class:`ChunkFormat` writes the chunks; :class:`EventStreamResponse` sends them.

At 256 streams the event loop's thread and the decoding worker share the interpreter lock, so
each microsecond an SSE chunk costs on the loop is taken from the worker. A chunk used to be a
dict per event run through ``json.dumps(..., ensure_ascii=False)``, which builds a new encoder
each call and encodes the stream's constant fields (id, object, created, model) again each time.
Here those are encoded once per stream, and a chunk is that text with its variable parts (the
index, the text, the logprobs, the finish reason) each encoded by one shared encoder of the same
settings. JSON is compositional: the result is byte for byte what ``json.dumps`` of the whole
chunk gives (``tests/test_serve_sse.py`` checks that for awkward texts).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

#: ``json.dumps(value, ensure_ascii=False)`` without a new encoder per call: the default
#: separators (``", "``, ``": "``), non-ASCII kept as is, NaN allowed, as before.
_ENCODER = json.JSONEncoder(ensure_ascii=False)
encode = _ENCODER.encode

#: The last event of every stream.
DONE = "data: [DONE]\n\n"


class ChunkFormat:
    """The ``data: {...}\\n\\n`` events of one stream (completion or chat completion chunks),
    the same text as ``json.dumps`` of the chunk objects with ``ensure_ascii=False``."""

    def __init__(self, rid: str, kind: str, created: int, model: str, chat: bool) -> None:
        self.chat = chat
        # Everything before the choices' objects, encoded once.
        self._head = (
            f'data: {{"id": {encode(rid)}, "object": {encode(kind)}, '
            f'"created": {encode(created)}, "model": {encode(model)}, "choices": ['
        )
        # A choice's object up to its text: "text" (completions) or "delta" (chat).
        self._text_key = '"delta": {"content": ' if chat else '"text": '
        self._after_text = "}" if chat else ""

    def event(self, choices: str, usage: Any = None) -> str:
        """One event of the encoded ``choices`` (comma-separated choice objects, or "") and,
        when given, the ``usage`` object."""
        tail = "]}\n\n" if usage is None else f'], "usage": {encode(usage)}}}\n\n'
        return self._head + choices + tail

    def choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> str:
        """One choice's object: ``{"index": i, "text": ...}`` (chat: ``"delta": {"content":
        ...}``), then ``"logprobs"`` and ``"finish_reason"`` (None: ``null``)."""
        lp = "null" if logprobs is None else encode(logprobs)
        reason = "null" if finish_reason is None else encode(finish_reason)
        return (
            f'{{"index": {index:d}, {self._text_key}{encode(text)}{self._after_text}, '
            f'"logprobs": {lp}, "finish_reason": {reason}}}'
        )

    def objects(self, choices: list[dict[str, Any]]) -> str:
        """Choice objects given as dicts (the rare ones: a chat's first chunk of roles)."""
        return ", ".join(encode(c) for c in choices)


#: The headers of every stream (what ``StreamingResponse(media_type="text/event-stream",
#: headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})`` sends, in its order).
_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


class EventStreamResponse(Response):
    """Starlette's ``StreamingResponse`` for an SSE body, on plain asyncio.

    The same messages, and the same end when the client goes away (the body stops where it
    waits: its ``finally`` frees the sequences), but StreamingResponse runs the body in an anyio
    task group whose cancellation alone took ~60 us of the loop per request (measured on a CPU),
    while here one asyncio task waits for the disconnect and cancels the body. The event that
    ends with ``[DONE]`` is sent as the body's last (``more_body`` false): one trip less through
    the middlewares' ``send``."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[str, None]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)  # a list per response: a middleware may change it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def listen() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()  # delivered where the body waits (the try below)

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            await self._send_body(send)
        except asyncio.CancelledError:
            # Ours (the client went away) ends the response; any other goes on up.
            if not gone or _cancelled_again(task):
                raise
        finally:
            listener.cancel()
            try:
                await self.body_iterator.aclose()  # its finally runs now, not when collected
            except asyncio.CancelledError:  # the client went away while it closed
                if not gone or _cancelled_again(task):
                    raise

    async def _send_body(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for text in self.body_iterator:
            last = text.endswith(DONE)
            await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _cancelled_again(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` has a cancellation besides the one just taken (Python 3.11+ counts
    them; 3.10 cannot tell, and the response ends)."""
    if sys.version_info >= (3, 11):
        return task.uncancel() > 0
    return False
