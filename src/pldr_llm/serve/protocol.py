"""Request validation and response shapes of the OpenAI API (completions, chat, errors).

Every check raises :class:`APIError`, which the app turns into the OpenAI error object
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per request
MAX_STOPS = 16  # OpenAI takes 4; lm-eval's generation tasks send more (their "until" and the EOS)
MAX_TOP_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's is 5 or 20)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_COUNT = 2**31 - 1  # the largest count (max_tokens, top_k, min_tokens) taken
# A prompt longer than this many characters per token of the model's context is refused before
# it is tokenized: a piece of the tokenizers in use covers at most ~16 characters, so such a
# prompt cannot fit (only runs of whitespace, which SentencePiece folds, could) and tokenizing
# it would only cost time.
CHARS_PER_TOKEN = 32


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


Prompt = str | list[int]  # text, or token ids


@dataclass
class CompletionRequest:
    """A validated ``/v1/completions`` (or, rendered, ``/v1/chat/completions``) request."""

    prompts: list[Prompt]
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per token (with logprobs)
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens) comes first
    enable_kvcache: bool = True
    enable_gcache: bool = True
    include_usage: bool = False
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    min_tokens: int = 0

    def seeds(self) -> list[int]:
        """Seeds of the ``n`` choices: ``seed, seed + 1, ...`` (a random base when unset)."""
        base = self.seed if self.seed is not None else secrets.randbits(62)
        return [base + j for j in range(self.n)]


def _shown(value: Any) -> str:
    """``value`` for a one-line message: short, no control characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a finite number, got {_shown(value)}", name)
    try:
        number = float(value)  # an integer of 400 digits does not fit a float
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise bad(f"'{name}' must be a finite number, got {_shown(value)}", name)
    return number


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {_shown(value)}", name)
    return value


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_shown(value)}", name)
    return value


def check_text(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate: JSON's ``"\\ud800"``), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise bad(
            f"'{param}' is not valid Unicode: a lone surrogate U+{code:04X} at character "
            f"{exc.start}",
            param,
        ) from None


def check_model(body: dict[str, Any], model_id: str) -> None:
    """The ``model`` field must name the served model (the only one; it is fixed at start):
    another name is 404 ``model_not_found``, as OpenAI and vLLM answer."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise bad("you must give 'model'", "model")
    if model != model_id:
        raise APIError(
            404,
            f"the model {_shown(model)} does not exist; this server serves '{model_id}'",
            param="model",
            code="model_not_found",
        )


# The numeric fields shared by completions and chat: how each is read, the values it allows and
# that rule in words (for the 400 that names the field). Unset fields take CompletionRequest's
# defaults.
_NUMBERS: dict[str, tuple[Callable[..., Any], Callable[[Any], bool], str]] = {
    "max_tokens": (_integer, lambda v: v is None or 0 <= v <= MAX_COUNT, "at least 1"),
    "temperature": (_number, lambda v: 0.0 <= v <= 2.0, "in [0, 2]"),
    "top_p": (_number, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "top_k": (_integer, lambda v: 0 <= v <= MAX_COUNT, f"in [0, {MAX_COUNT}] (0: off)"),
    "seed": (_integer, lambda v: v is None or 0 <= v < 2**63 - MAX_N, f"in [0, 2^63 - {MAX_N})"),
    "n": (_integer, lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]"),
    "presence_penalty": (_number, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
    "frequency_penalty": (_number, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
    "repetition_penalty": (_number, lambda v: 0.0 < v <= 10.0, "in (0, 10] (1: off)"),
    "min_tokens": (_integer, lambda v: 0 <= v <= MAX_COUNT, f"in [0, {MAX_COUNT}]"),
}
# The true/false fields, likewise.
_FLAGS = ("stream", "enable_kvcache", "enable_gcache", "ignore_eos")
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(CompletionRequest)}

# The fields each endpoint reads; any other (not null) is refused with a 400 naming it rather
# than ignored, so a client never gets an answer that silently lacks what it asked for.
_SHARED_FIELDS = frozenset(
    {"model", "max_tokens", "max_completion_tokens", "stream_options", "stop", "user"}
    | set(_NUMBERS)
    | set(_FLAGS)
    | {"logit_bias"}
)
COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = _SHARED_FIELDS | {
    "messages",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
}
# Fields of the API this server does not implement: the one value that asks for nothing (taken)
# and why any other is refused.
_NO_OP_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (lambda v: v == 1 and not isinstance(v, bool), "no best-of search; use 'n'"),
    "suffix": (lambda v: v == "", "no fill-in-the-middle"),
    "tools": (lambda v: v == [], "no tool calls"),
    "tool_choice": (lambda v: v == "none", "no tool calls"),
    "functions": (lambda v: v == [], "no function calls"),
    "function_call": (lambda v: v == "none", "no function calls"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "no tool calls"),
    "response_format": (lambda v: v == {"type": "text"}, "text only: no JSON mode or schema"),
    "user": (lambda v: isinstance(v, str), "'user' must be a string (an end-user id)"),
}


def check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    """Refuse (400, naming it) a field this endpoint does not implement, or a value of an API
    field that the server cannot honour; null fields are absent."""
    for name, value in body.items():
        if value is None:
            continue
        if name not in known:
            raise bad(
                f"the field {_shown(name)} is not supported by this server (refused rather "
                "than ignored)",
                name if len(name) <= 60 and name.isprintable() else None,
                "unsupported_field",
            )
        rule = _NO_OP_ONLY.get(name)
        if rule is not None and not rule[0](value):
            raise bad(
                f"'{name}' = {_shown(value)} is not supported: {rule[1]}", name, "unsupported_field"
            )


def _stops(body: dict[str, Any]) -> list[str]:
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
    for s in stops:
        check_text(s, "stop")
    return stops


_TOKEN_KEY = re.compile(r"[0-9]{1,10}")


def _logit_bias(body: dict[str, Any], vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` with biases in [-100, 100] (-100 bans the token), ids in the
    vocabulary."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise bad(
            f"'logit_bias' must be an object of up to {MAX_LOGIT_BIAS} token ids to biases",
            "logit_bias",
        )
    out = []
    for key, bias in value.items():
        if not _TOKEN_KEY.fullmatch(key) or (vocab_size is not None and int(key) >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise bad(
                f"'logit_bias' keys must be token ids in {limit}, got {_shown(key)}", "logit_bias"
            )
        number = _number({"logit_bias": bias}, "logit_bias", 0.0)
        if not -100.0 <= number <= 100.0:
            raise bad(f"'logit_bias' values must be in [-100, 100], got {number:g}", "logit_bias")
        out.append((int(key), number))
    if len({token for token, _ in out}) < len(out):  # "7" and "007"
        raise bad("'logit_bias' names a token id twice", "logit_bias")
    return tuple(sorted(out))


def parse_sampling(
    body: dict[str, Any],
    prompts: list[Prompt],
    *,
    vocab_size: int | None = None,
    echo: bool = False,
    top_logprobs: int | None = None,
) -> CompletionRequest:
    """The fields shared by completions and chat completions. ``echo``: ``max_tokens`` may be 0
    (score the prompt only). ``top_logprobs``: the chat's reading of logprobs (None: the
    completions' integer ``logprobs``)."""
    values: dict[str, Any] = {}
    for name, (read, allowed, rule) in _NUMBERS.items():
        key = name
        if name == "max_tokens" and body.get("max_completion_tokens") is not None:
            key = "max_completion_tokens"  # the newer name of the same limit
        value = read(body, key, _DEFAULTS[name])
        if not allowed(value) or (name == "max_tokens" and value == 0 and not echo):
            shown = f"{value:g}" if isinstance(value, float) else value
            if name == "max_tokens" and value is not None and value >= 0:
                rule = f"in [1, {MAX_COUNT}] (0 only with 'echo')"
            raise bad(f"'{key}' must be {rule}, got {shown}", key)
        values[name] = value
    if values["max_tokens"] is not None and values["min_tokens"] > values["max_tokens"]:
        raise bad("'min_tokens' must not exceed 'max_tokens'", "min_tokens")
    for name in _FLAGS:
        values[name] = _flag(body, name, _DEFAULTS[name])
    if top_logprobs is None:
        want_logprobs, top_logprobs = _completion_logprobs(body)
    else:
        want_logprobs = bool(body.get("logprobs"))
    options = body.get("stream_options") or {}
    if (
        not isinstance(options, dict)
        or not set(options) <= {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise bad("'stream_options' takes only 'include_usage' (true or false)", "stream_options")
    return CompletionRequest(
        prompts=prompts,
        stop=_stops(body),
        logprobs=want_logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
        logit_bias=_logit_bias(body, vocab_size),
        include_usage=bool(options.get("include_usage", False)),
        **values,
    )


def _completion_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    """``logprobs`` of /v1/completions: the number of alternatives per token (true: 0)."""
    logprobs = body.get("logprobs")
    if logprobs is None or logprobs is False:
        return False, 0
    if logprobs is True:
        return True, 0
    if not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise bad(
            f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {_shown(logprobs)}",
            "logprobs",
        )
    return True, logprobs


def _token_ids(value: Any, vocab_size: int | None, empty: bool = False) -> list[int] | None:
    """``value`` as a prompt of token ids, or None when it is not a list of integers (``empty``:
    an empty list is one, the empty prompt)."""
    if not isinstance(value, list) or not (value or empty):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None
    limit = vocab_size if vocab_size is not None else MAX_COUNT + 1
    for t in value:
        if not 0 <= t < limit:
            raise bad(
                f"'prompt' holds the token id {_shown(t)}, outside this model's vocabulary "
                f"[0, {limit})",
                "prompt",
            )
    return list(value)


def _prompts(prompt: Any, vocab_size: int | None) -> list[Prompt]:
    """A string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif (ids := _token_ids(prompt, vocab_size)) is not None:
        prompts = [ids]
    elif isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS:
        if all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            # An empty one is the empty prompt (as ""): lm-eval sends an empty context so.
            lists = [_token_ids(p, vocab_size, empty=True) for p in prompt]
            if any(ids is None for ids in lists):
                prompts = []
            else:
                prompts = [ids for ids in lists if ids is not None]
    else:
        prompts = []
    if not prompts:
        raise bad(
            f"'prompt' must be a string, a list of 1 to {MAX_PROMPTS} strings, a non-empty "
            f"list of token ids or a list of 1 to {MAX_PROMPTS} lists of token ids",
            "prompt",
        )
    for p in prompts:
        if isinstance(p, str):
            check_text(p, "prompt")
    return prompts


def parse_completion(body: Any, vocab_size: int | None = None) -> CompletionRequest:
    """Validate a ``/v1/completions`` body (the ``model`` field is checked separately)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    prompts = _prompts("" if prompt is None else prompt, vocab_size)
    echo = _flag(body, "echo", False)
    return parse_sampling(body, prompts, vocab_size=vocab_size, echo=echo)


def parse_chat(body: Any, vocab_size: int | None = None) -> CompletionRequest:
    """Validate the sampling fields of a ``/v1/chat/completions`` body; the prompt (rendered
    from :func:`parse_messages`) is filled in later."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_fields(body, CHAT_FIELDS)
    logprobs = _flag(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None)
    if top is not None:
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad(
                f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs"
            )
        if not logprobs:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return parse_sampling(body, [], vocab_size=vocab_size, top_logprobs=top or 0)


def check_prompt_chars(prompts: list[Prompt], max_len: int) -> None:
    """Refuse, before tokenizing, a text prompt too long to fit the context in any tokenization
    (:data:`CHARS_PER_TOKEN`)."""
    limit = CHARS_PER_TOKEN * max_len
    for p in prompts:
        if isinstance(p, str) and len(p) > limit:
            raise bad(
                f"the prompt has {len(p)} characters; at most {limit} are taken ({CHARS_PER_TOKEN} "
                f"per token of this model's {max_len}-token context)",
                "prompt",
                "context_length_exceeded",
            )


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
        check_text(m["role"], "messages")
        check_text(m["content"], "messages")
        out.append({"role": m["role"], "content": m["content"]})
    return out
