"""The ``/v1/completions`` and ``/v1/chat/completions`` handlers.

A request is validated (:mod:`pldr_llm.serve.protocol`), its prompts tokenized on a worker
thread (never on the event loop: a long prompt would stall every stream), checked against the
context, and its ``len(prompts) * n`` sequences queued on the scheduler. ``echo`` puts the
prompt's text (and with ``logprobs`` its tokens, scored by one pass of the model on the
scheduler's thread) before each choice's new text; ``max_tokens: 0`` with ``echo`` only scores.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pldr_llm.core.errors import PLDRError
from pldr_llm.generation import SamplingParams
from pldr_llm.serve.logprobs import (
    PieceTracker,
    TokenLogprob,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    prompt_pieces,
    score_prompt,
)
from pldr_llm.serve.metrics import Metrics
from pldr_llm.serve.prompts import off_loop, render_chat
from pldr_llm.serve.protocol import (
    APIError,
    CompletionRequest,
    Prompt,
    bad,
    check_model,
    check_prompt_chars,
    parse_chat,
    parse_completion,
    parse_messages,
)
from pldr_llm.serve.scheduler import (
    Event,
    EventInbox,
    GenSequence,
    QueueFull,
    Scheduler,
    ShuttingDown,
)
from pldr_llm.serve.sse import DONE, ChunkFormat, EventStreamResponse


def sampling_params(req: CompletionRequest, seed: int, max_new: int) -> SamplingParams:
    """The engine's parameters of one choice. The fields of the sampling stage (penalties,
    ``logit_bias``, ``min_tokens``, alternatives) are passed only when set, so a request that
    uses none of them runs exactly the plain step."""
    stage: dict[str, Any] = {}
    if req.presence_penalty:
        stage["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        stage["frequency_penalty"] = req.frequency_penalty
    if req.repetition_penalty != 1.0:
        stage["repetition_penalty"] = req.repetition_penalty
    if req.logit_bias:
        stage["logit_bias"] = req.logit_bias
    if req.min_tokens:
        stage["min_new_tokens"] = min(req.min_tokens, max_new)
    if req.logprobs and req.top_logprobs:
        stage["logprobs"] = req.top_logprobs
    return SamplingParams(
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        seed=seed,
        max_new_tokens=max_new,
        stop_at_eos=not req.ignore_eos,
        **stage,
    )


@dataclass
class PromptPlan:
    """One prompt of a request: its ids, its text (what ``echo`` shows) and, for ``echo`` with
    ``logprobs``, its tokens (the first with no logprob)."""

    ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None


class CompletionHandlers:
    """The completion handlers, mixed into the app's server object, which holds the model, the
    tokenizer, the options, the metrics, the scheduler, ``max_len`` and ``draining``, and reads
    (and authorizes) a request's JSON body with ``body``."""

    model: Any
    tokenizer: Any
    options: Any
    metrics: Metrics
    scheduler: Scheduler
    max_len: int
    draining: bool
    body: Callable[[Request], Awaitable[Any]]

    @functools.cached_property
    def token_texts(self) -> TokenTexts:
        """The texts of alternatives (cached per id)."""
        return TokenTexts(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.input_vocab_size)

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        check_model(body, self.options.model_id)
        req = parse_completion(body, self.vocab_size)
        return await self._generate(request, req, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await self.body(request)
        check_model(body, self.options.model_id)
        # The fields first: a field the server cannot honour is named even for a base model.
        req = parse_chat(body, self.vocab_size)
        template = self.options.chat_template
        if template is None:
            raise bad(
                f"'{self.options.model_id}' is a base model: it declares no chat template, so "
                "it has no chat completions; use /v1/completions",
                "model",
                "model_not_chat",
            )
        messages = parse_messages(body)
        # The character limit before the template renders it (and before tokenizing).
        check_prompt_chars(["".join(m["content"] for m in messages)], self.max_len)
        chars = sum(len(m["role"]) + len(m["content"]) + 16 for m in messages)  # + the markup
        req.prompts = [await off_loop(chars, render_chat, template, messages)]
        return await self._generate(request, req, chat=True)

    # ------------------------------------------------------------------ preparing
    def _plan(self, prompt: Prompt, echo: bool, pieces: bool) -> PromptPlan:
        """Tokenize one prompt (on a worker thread): its ids, its text for echo and, for echo
        with logprobs, its tokens' pieces (scored later)."""
        # Text as `pldr-llm generate` encodes it; no ids: the empty prompt (the end-of-text id).
        ids: list[int]
        if isinstance(prompt, str) or not prompt:
            ids = self.tokenizer.prompt_ids(prompt or "")
        else:
            ids = list(prompt)
        return PromptPlan(
            ids=ids,
            text=self.tokenizer.decode(ids) if echo else "",
            logprobs=(
                [
                    TokenLogprob(t, p, None, [])
                    for t, p in zip(ids, prompt_pieces(self.tokenizer, ids))
                ]
                if pieces
                else None
            ),
        )

    async def _plans(self, req: CompletionRequest) -> list[PromptPlan]:
        check_prompt_chars(req.prompts, self.max_len)
        pieces = req.echo and req.logprobs
        # (A prompt of token ids counts 4 characters an id: echo decodes each.)
        chars = sum(len(p) if isinstance(p, str) else 4 * len(p) for p in req.prompts)
        plans = await off_loop(
            chars, lambda: [self._plan(p, req.echo, pieces) for p in req.prompts]
        )
        only_score = req.max_tokens == 0
        for plan in plans:
            # The context holds the prompt and at least one new token (echo with max_tokens 0:
            # the prompt alone).
            if len(plan.ids) > self.max_len - (0 if only_score else 1):
                room = (
                    "" if only_score else ", which must hold the prompt and at least one new token"
                )
                raise bad(
                    f"the prompt has {len(plan.ids)} tokens; this model's context is "
                    f"{self.max_len} tokens{room}",
                    "prompt",
                    "context_length_exceeded",
                )
        count = 0 if only_score else len(plans) * req.n
        if count > self.scheduler.max_queue:
            raise bad(
                f"this request needs {count} sequences (prompts x n); the server queues at most "
                f"{self.scheduler.max_queue} (--max-queue), so it can never be served",
                "n" if req.n > 1 else "prompt",
            )
        if pieces:
            await self._score_prompts(plans, req.top_logprobs)
        return plans

    async def _score_prompts(self, plans: list[PromptPlan], top_n: int) -> None:
        """The logprobs of each prompt's tokens, on the worker that owns the model (one job
        between two decoding steps)."""

        def score() -> list[list[tuple[float, list]]]:
            return [score_prompt(self.model, plan.ids, top_n) for plan in plans]

        try:
            future = self.scheduler.run_on_worker(score)
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type_="server_error") from None
        for plan, scores in zip(plans, await asyncio.wrap_future(future)):
            assert plan.logprobs is not None
            for entry, (logprob, top) in zip(plan.logprobs[1:], scores):
                entry.logprob, entry.top = logprob, top

    def _sequences(
        self, req: CompletionRequest, plans: list[PromptPlan]
    ) -> tuple[list[GenSequence], EventInbox]:
        """The ``len(prompts) * n`` sequences of a request (choice ``i * n + j``: prompt i,
        seed ``seed + j``); none for ``echo`` with ``max_tokens`` 0."""
        loop = asyncio.get_running_loop()
        events = EventInbox()
        seqs: list[GenSequence] = []
        if req.max_tokens == 0:
            return seqs, events
        key = (req.enable_kvcache, req.enable_gcache)
        for i, plan in enumerate(plans):
            room = self.max_len - len(plan.ids)
            max_new = room if req.max_tokens is None else min(req.max_tokens, room)
            # Every field was checked by the protocol (ranges as strict as, or stricter than,
            # SamplingParams.validate's).
            for j, seed in enumerate(req.seeds()):
                params = sampling_params(req, seed, max_new)
                try:
                    params.validate()  # the engine's own check, before anything is queued
                except PLDRError as exc:
                    raise bad(str(exc)) from None
                seqs.append(
                    GenSequence(
                        plan.ids,
                        params,
                        req.stop,
                        self.tokenizer,
                        loop,
                        events,
                        i * req.n + j,
                        key,
                    )
                )
        return seqs, events

    def _submit(self, seqs: list[GenSequence]) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type_="server_error")
        try:
            self.scheduler.submit(seqs)
        except QueueFull:
            raise APIError(
                429,
                "the server is busy (its request queue is full); retry later",
                type_="rate_limit_error",
                code="queue_full",
            ) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type_="server_error") from None

    def _trackers(
        self, req: CompletionRequest, starts: list[PromptPlan]
    ) -> list[PieceTracker | None]:
        """Per choice, what turns its tokens into logprob entries (None without logprobs).
        This runs on the event loop, as the SSE chunks do, not on the worker that steps."""
        if not req.logprobs:
            return [None] * len(starts)
        return [PieceTracker(self.tokenizer, plan.ids) for plan in starts]

    def _logprobs(self, entries: list[TokenLogprob], chat: bool, offset: int) -> Any:
        if chat:
            return chat_logprobs(entries, self.token_texts)
        return completion_logprobs(entries, self.token_texts, offset)

    # ------------------------------------------------------------------ answering
    async def _generate(self, request: Request, req: CompletionRequest, chat: bool) -> Response:
        plans = await self._plans(req)
        seqs, events = self._sequences(req, plans)
        self._submit(seqs)
        prompt_tokens = sum(len(p.ids) for p in plans)
        self.metrics.prompt_tokens += prompt_tokens
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        # What each choice starts with: the prompt's text and tokens with echo, else nothing.
        starts = [plans[i // req.n] for i in range(len(plans) * req.n)]
        if req.stream:
            return EventStreamResponse(
                self._stream(req, seqs, events, starts, rid, prompt_tokens, chat)
            )
        texts = [p.text for p in starts]
        entries = [list(p.logprobs or []) for p in starts]
        reasons: list[str | None] = ["length"] * len(starts)
        trackers = self._trackers(req, starts)
        produced = await self._collect(request, seqs, events, texts, (trackers, entries), reasons)
        if produced is None:
            return Response(status_code=499)
        choices = []
        for i, text in enumerate(texts):
            lp = self._logprobs(entries[i], chat, 0) if req.logprobs else None
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": i, "text": text}
            choices.append({**choice, "logprobs": lp, "finish_reason": reasons[i]})
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.options.model_id,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": produced,
                    "total_tokens": prompt_tokens + produced,
                },
            }
        )

    async def _collect(
        self,
        request: Request,
        seqs: list[GenSequence],
        events: EventInbox,
        texts: list[str],
        logprobs: tuple[list[PieceTracker | None], list[list[TokenLogprob]]],
        reasons: list[str | None],
    ) -> int | None:
        """Gather every sequence's output into ``texts``, ``reasons`` and (``logprobs``: per
        choice its tracker and entries) the entries; the tokens produced, or None when the
        client went away."""
        trackers, entries = logprobs
        try:
            produced = 0
            left = len(seqs)
            checked = time.monotonic()
            while left:
                if time.monotonic() - checked > 0.5:
                    # A client that went away frees its rows (the finally below).
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
                try:
                    batch = await asyncio.wait_for(events.take(), 0.5)
                except asyncio.TimeoutError:
                    continue
                for ev in batch:
                    texts[ev.index] += ev.text
                    entries[ev.index] += _take(trackers[ev.index], ev)
                    if ev.finish_reason is not None:
                        if ev.error:
                            raise APIError(500, ev.error, type_="server_error")
                        reasons[ev.index] = ev.finish_reason
                        produced += ev.completion_tokens
                        left -= 1
            return produced
        finally:
            for s in seqs:
                s.cancel()  # a no-op for finished ones; frees the rows of an abandoned request

    async def _stream(
        self,
        req: CompletionRequest,
        seqs: list[GenSequence],
        events: EventInbox,
        starts: list[PromptPlan],
        rid: str,
        prompt_tokens: int,
        chat: bool,
    ) -> AsyncGenerator[str, None]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        fmt = ChunkFormat(rid, kind, int(time.time()), self.options.model_id, chat)
        offsets = [0] * len(starts)  # characters of each choice's text sent so far
        trackers = self._trackers(req, starts)

        def choice_chunk(ev: Event, entries: list[TokenLogprob]) -> str:
            lp = self._logprobs(entries, chat, offsets[ev.index]) if req.logprobs else None
            offsets[ev.index] += len(ev.text)
            return fmt.event(fmt.choice(ev.index, ev.text, lp, ev.finish_reason))

        try:
            if chat:
                roles = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}}
                    | {"logprobs": None, "finish_reason": None}
                    for i in range(len(starts))
                ]
                yield fmt.event(fmt.objects(roles))
            if req.echo:
                reason = "length" if not seqs else None
                yield "".join(
                    choice_chunk(
                        Event(p.text, finish_reason=reason, index=i), list(p.logprobs or [])
                    )
                    for i, p in enumerate(starts)
                )
            produced = finished = 0
            async for merged in _merged_events(events, len(seqs)):
                out = []
                for ev in merged:
                    if ev.error:
                        err = APIError(500, ev.error, type_="server_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    produced += ev.completion_tokens
                    finished += ev.finish_reason is not None
                    entries = _take(trackers[ev.index], ev)
                    if ev.text or entries or ev.finish_reason is not None:
                        out.append(choice_chunk(ev, entries))
                if finished == len(seqs):
                    # The last chunks, the usage and [DONE] in one write: the same events, two
                    # fewer trips through the response's layers and the socket.
                    out.append(self._stream_end(fmt, req, prompt_tokens, produced))
                if out:
                    yield "".join(out)
            if not seqs:  # echo only: no sequence ever finishes
                yield self._stream_end(fmt, req, prompt_tokens, 0)
        finally:
            # Also reached when the client disconnects (the response task is cancelled).
            for s in seqs:
                s.cancel()

    @staticmethod
    def _stream_end(fmt: ChunkFormat, req: CompletionRequest, prompt: int, produced: int) -> str:
        """A stream's usage chunk (``include_usage``), then ``[DONE]``."""
        if not req.include_usage:
            return DONE
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": produced,
            "total_tokens": prompt + produced,
        }
        return fmt.event("", usage) + DONE


async def _merged_events(events: EventInbox, count: int) -> AsyncIterator[list[Event]]:
    """The events of ``count`` sequences until each has finished, in batches: everything already
    there is merged into one event per choice (when the client or the loop falls behind, fewer,
    larger chunks). An error event ends the batch and the stream."""
    left = count
    while left:
        merged: dict[int, Event] = {}
        for ev in await events.take():
            if ev.error:
                yield [ev]
                return
            if ev.finish_reason is not None:
                left -= 1
            into = merged.get(ev.index)
            # The first event of a choice goes as it is (the common case: one per choice).
            merged[ev.index] = ev if into is None else _joined(into, ev)
        yield list(merged.values())


def _joined(first: Event, then: Event) -> Event:
    """Two consecutive events of one choice as one (new lists: neither event is changed)."""
    return Event(
        first.text + then.text,
        first.tokens + then.tokens,
        first.logprobs + then.logprobs,
        first.top_logprobs + then.top_logprobs,
        then.finish_reason,
        first.completion_tokens + then.completion_tokens,
        index=then.index,
    )


def _take(tracker: PieceTracker | None, ev: Event) -> list[TokenLogprob]:
    """The logprob entries an event of a choice completes (none without logprobs)."""
    if tracker is None:
        return []
    final = ev.finish_reason is not None
    return tracker.take(ev.text, ev.tokens, ev.logprobs, ev.top_logprobs, final)
