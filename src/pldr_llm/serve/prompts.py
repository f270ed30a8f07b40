"""Preparing a prompt: the chat template's rendering, and where prompts are tokenized.

A short prompt is tokenized (a chat rendered) on the event loop: it takes tens of microseconds,
less than the round trip to a worker thread and back, which would also add a thread that wants
the interpreter lock the decoding worker needs. A long one goes to a thread, so that a large body
does not hold up the other streams.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pldr_llm.serve.protocol import bad

T = TypeVar("T")

#: Prompts (and chat messages) up to this many characters are prepared on the event loop.
INLINE_PROMPT_CHARS = 4096


async def off_loop(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` for a prompt of ``chars`` characters: here when short, else on a thread."""
    if chars <= INLINE_PROMPT_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str) -> Any:
    """The chat template compiled once (in a sandbox: it comes from the model folder)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, str]]) -> str:
    """The prompt text of ``messages`` through the model's chat template (sandboxed Jinja)."""
    try:
        return _compiled_template(template).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
        )
    except Exception as exc:  # a template error is the request's (its messages') problem
        raise bad(f"the chat template failed on these messages: {exc}", "messages") from None
