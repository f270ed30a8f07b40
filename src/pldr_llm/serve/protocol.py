"""Request validation and response shapes of the OpenAI API (completions, chat, errors).

Every check raises :class:`APIError`, which the app turns into the OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOPS = 4  # as the OpenAI API


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class CompletionRequest:
    """A validated ``/v1/completions`` (or, rendered, ``/v1/chat/completions``) request."""

    prompts: list[str]
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    logprobs: bool = False
    enable_kvcache: bool = True
    enable_gcache: bool = True
    include_usage: bool = False
    ignore_eos: bool = False

    def seeds(self) -> list[int]:
        """Seeds of the ``n`` choices: ``seed, seed + 1, ...`` (a random base when unset)."""
        base = self.seed if self.seed is not None else secrets.randbits(62)
        return [base + j for j in range(self.n)]


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a finite number, got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {value!r}", name)
    return value


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def check_model(body: dict[str, Any], model_id: str) -> None:
    """The ``model`` field must name the served model (the only one; it is fixed at start)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise bad("you must give 'model'", "model")
    if model != model_id:
        raise bad(
            f"the model '{model}' does not exist; this server serves '{model_id}'",
            "model",
            "model_not_found",
        )


# The numeric fields shared by completions and chat: how each is read, the values it allows and
# that rule in words (for the 400 that names the field). Unset fields take CompletionRequest's
# defaults.
_NUMBERS: dict[str, tuple[Callable[..., Any], Callable[[Any], bool], str]] = {
    "max_tokens": (_integer, lambda v: v is None or v >= 1, "at least 1"),
    "temperature": (_number, lambda v: 0.0 <= v <= 2.0, "in [0, 2]"),
    "top_p": (_number, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "top_k": (_integer, lambda v: v >= 0, ">= 0 (0: off)"),
    "seed": (_integer, lambda v: v is None or 0 <= v < 2**63 - MAX_N, f"in [0, 2^63 - {MAX_N})"),
    "n": (_integer, lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]"),
}
# The true/false fields, likewise.
_FLAGS = ("stream", "enable_kvcache", "enable_gcache", "ignore_eos")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CompletionRequest)}


def parse_sampling(body: dict[str, Any], prompts: list[str]) -> CompletionRequest:
    """The fields shared by completions and chat completions."""
    values: dict[str, Any] = {}
    for name, (read, allowed, rule) in _NUMBERS.items():
        key = name
        if name == "max_tokens" and body.get("max_completion_tokens") is not None:
            key = "max_completion_tokens"  # the newer name of the same limit
        value = read(body, key, _DEFAULTS[name])
        if not allowed(value):
            shown = f"{value:g}" if isinstance(value, float) else value
            raise bad(f"'{key}' must be {rule}, got {shown}", key)
        values[name] = value
    for name in _FLAGS:
        values[name] = _flag(body, name, _DEFAULTS[name])
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS or any(s == "" for s in stops):
        raise bad(f"'stop' takes up to {MAX_STOPS} non-empty strings", "stop")
    logprobs = body.get("logprobs")
    if logprobs is None or logprobs is False:
        want_logprobs = False
    elif logprobs is True or (isinstance(logprobs, int) and not isinstance(logprobs, bool)):
        if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs < 0:
            raise bad("'logprobs' must be >= 0", "logprobs")
        # The chosen tokens' logprobs only (alternatives are not reported).
        want_logprobs = logprobs is True or logprobs >= 0
    else:
        raise bad("'logprobs' must be an integer or a boolean", "logprobs")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return CompletionRequest(
        prompts=prompts,
        stop=stops,
        logprobs=want_logprobs,
        include_usage=bool(options.get("include_usage", False)),
        **values,
    )


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a ``/v1/completions`` body (the ``model`` field is checked separately)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) for p in prompt)
        and len(prompt) <= MAX_PROMPTS
    ):
        prompts = list(prompt)
    else:
        raise bad(f"'prompt' must be a string or a list of 1 to {MAX_PROMPTS} strings", "prompt")
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' is not supported", "best_of")
    return parse_sampling(body, prompts)


def parse_messages(body: Any) -> list[dict[str, str]]:
    """The ``messages`` of a chat request: a list of ``{"role", "content"}`` with text content."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise bad("each message needs a 'role' and a text 'content'", "messages")
        out.append({"role": m["role"], "content": m["content"]})
    return out
