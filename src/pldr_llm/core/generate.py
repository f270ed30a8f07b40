"""Text generation on the one decoding loop (:class:`~pldr_llm.core.engine.DecodeEngine`).

:func:`generate` / :func:`generate_details` take the prompt kinds of the original's
``generate_text`` (a vector, a [B, L] matrix, or a list of id lists of different lengths), run every
row as it would run alone, and return the same kind. :func:`stream_generate` yields ids as they
come, and :func:`generate_text` is text in, text out (ids become text in
:mod:`~pldr_llm.core.text`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .cache import GInit
from .config import PLDRConfig, check_token_range
from .engine import DecodeEngine
from .engine_cache import EngineSpec, borrow_engine, give_back_engine, lend_engine
from .errors import PLDRError
from .model import PLDRModel
from .sampling import SamplingParams, draw_seed
from .text import StopStrings, final_text

# Host reads of "is every row done?" while decoding without a streamer (graph replays between).
CHECK_EVERY = 32
#: Steps a streamer or a stopping criterion (without step logits) reads at once: one host sync
#: per block (the streamer still gets one call per step, in order, a block's calls together:
#: ~3 ms apart on an H200, far below what a reader notices); a row that stops inside it wastes
#: at most this many - 1 steps.
STOP_CHECK_BLOCK = 8


@dataclass
class GenerationOutput:
    """Ids (prompt + new, per the input's rank) and, when asked, the logits of every step."""

    ids: Tensor | list[list[int]]
    new_ids: list[list[int]]
    # [steps, B, V]: last-position raw logits (zeros for rows that had stopped)
    step_logits: Tensor | None = None
    capture_seconds: float = 0.0  # time this call spent capturing / compiling CUDA graphs
    # With ``logprobs``: per row, each new token's log-probability (the processed distribution
    # at temperature 1, see SamplingParams) and, when logprobs > 0, its top alternatives.
    logprobs: list[list[float]] | None = None
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None


def bias_pairs(
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] | None,
) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as :class:`SamplingParams` holds it: (id, bias) pairs, in id order."""
    if not logit_bias:
        return ()
    items = logit_bias.items() if isinstance(logit_bias, Mapping) else logit_bias
    try:
        return tuple(sorted((token, bias) for token, bias in items))
    except (TypeError, ValueError):
        raise PLDRError(f"logit_bias must map token ids to biases, got {logit_bias!r}") from None


def _prompt_rows(
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: Tensor | None,
    eos_id: int,
) -> tuple[list[list[int]], Tensor | None, str]:
    """(rows of ids each as it runs alone, the [B, L] input or None, kind: vector|matrix|list)."""
    if isinstance(prompt_ids, Tensor):
        ids = prompt_ids.long().cpu()
        kind = "vector" if ids.dim() == 1 else "matrix"
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        if ids.dim() != 2:
            raise PLDRError(f"prompt_ids must be [L] or [B, L], got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0:  # empty prompt: start from end-of-text, like the original
            ids = torch.full((ids.shape[0], 1), eos_id, dtype=torch.long)
            return ids.tolist(), ids, kind
        if attention_mask is None:
            return ids.tolist(), ids, kind
        if attention_mask.shape != ids.shape:
            raise PLDRError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from prompt shape "
                f"{tuple(ids.shape)}"
            )
        keep = attention_mask.cpu().bool()
        rows = [ids[r][keep[r]].tolist() or [eos_id] for r in range(ids.shape[0])]
        return rows, ids, kind
    items: list[Any] = list(prompt_ids)  # ids, or rows (sequences or tensors) of ids
    if not items:
        raise PLDRError("no prompt given")
    if isinstance(items[0], (list, tuple)) or (isinstance(items[0], Tensor) and items[0].dim() > 0):
        rows = [[int(t) for t in r] or [eos_id] for r in items]
        return rows, None, "list"
    return [[int(t) for t in items] or [eos_id]], None, "vector"


def _check_fits(config: PLDRConfig, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with ``max_new_tokens`` more, does not fit the model's window."""
    limit = config.max_seq_len
    if prompt_length > limit:
        raise PLDRError(f"prompt has {prompt_length} tokens, longer than max_seq_len={limit}")
    if prompt_length + max_new_tokens > limit:
        raise PLDRError(
            f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={limit}"
        )


def batch_bucket(batch: int) -> int:
    """The rows of the CUDA engine :func:`engine_spec` names for ``batch`` prompts: a power of
    two, so repeated calls of similar sizes replay the same graphs."""
    return 1 << (batch - 1).bit_length()


def span_bucket(config: PLDRConfig, length: int) -> int:
    """The positions of the CUDA engine :func:`engine_spec` names for ``length`` tokens: a power
    of two (at least 64, at most the model's context), for the same reason."""
    return min(config.max_seq_len, max(64, 1 << (length - 1).bit_length()))


def engine_spec(
    model: PLDRModel,
    batch: int,
    length: int,
    kv: bool = True,
    g: bool = True,
    compile: bool = False,
    keep_logits: bool = False,
    cuda_graph: bool | None = None,
    output_logprobs: bool = False,
) -> EngineSpec:
    """The engine for ``batch`` rows of up to ``length`` tokens: exactly that on the CPU (a
    fresh engine is cheap), on CUDA the shape bucket (rows and positions rounded up to powers of
    two), so that later calls of similar sizes replay its captured graphs."""
    use_graph = model.device.type == "cuda" and kv if cuda_graph is None else cuda_graph
    if not use_graph:
        return EngineSpec(
            batch, max(2, length), kv, g, cuda_graph=False, keep_logits=keep_logits,
            output_logprobs=output_logprobs,
        )  # fmt: skip
    return EngineSpec(
        batch_bucket(batch), span_bucket(model.config, length), kv, g, cuda_graph=True,
        compile=bool(compile), keep_logits=keep_logits, output_logprobs=output_logprobs,
        # One step per graph: at batch 1 a step is ~0.6 ms of GPU work against ~15 us to
        # launch a replay, so longer graphs only cost capture time (0.15 s for 8 steps
        # against 0.085 s for one, on an H200).
        steps_per_graph=1,
    )  # fmt: skip


def engine_for(
    model: PLDRModel,
    batch: int,
    length: int,
    kv: bool,
    g: bool,
    compile: bool,
    keep_logits: bool,
    cuda_graph: bool | None,
    output_logprobs: bool = False,
) -> DecodeEngine:
    """The model's cached engine of :func:`engine_spec` (or a new one), left in the cache: for a
    caller on one thread that releases its slots before anyone else decodes; others
    :func:`~pldr_llm.core.engine_cache.borrow_engine` one."""
    spec = engine_spec(model, batch, length, kv, g, compile, keep_logits, cuda_graph,
                       output_logprobs)  # fmt: skip
    engine = lend_engine(model, spec)
    give_back_engine(model, engine)
    return engine


def generate_details(
    model: PLDRModel,
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    enable_kvcache: bool = True,
    enable_Gcache: bool = True,
    G_init: GInit | None = None,
    stop_at_eos: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
    stopping_criteria: Callable[[int, list[int]], bool] | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    output_logits: bool = False,
    seed: int | None = None,
    compile: bool = False,
    cuda_graph: bool | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] | None = None,
    min_new_tokens: int = 0,
    stop_token_ids: Sequence[int] = (),
    logprobs: int | None = None,
) -> GenerationOutput:
    """:func:`generate` with the new ids per row, the step logits, the capture time and (with
    ``logprobs``: 0 for each token's own, n > 0 with its top-n alternatives) the
    log-probabilities."""
    config = model.config
    eos = config.eos_id if eos_id is None else eos_id
    stops = tuple(int(t) for t in stop_token_ids)
    if stop_at_eos and eos != config.eos_id:
        stops += (eos,)
    # Every setting is checked before anything is drawn or read, even with max_new_tokens 0.
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        max_new_tokens=max_new_tokens,
        stop_at_eos=stop_at_eos and eos == config.eos_id,
        stop_token_ids=stops,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=bias_pairs(logit_bias),
        min_new_tokens=min_new_tokens,
        logprobs=logprobs or 0,
    )
    params.validate()
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise PLDRError(f"logprobs must be an integer >= 0 or None, got {logprobs!r}")
    rows, matrix, kind = _prompt_rows(prompt_ids, attention_mask, eos)
    longest = max(len(r) for r in rows)
    _check_fits(config, longest, max_new_tokens)
    flat = [t for r in rows for t in r]
    check_token_range(min(flat), max(flat), config.input_vocab_size)
    if seed is None:
        # One seed for every row: each row samples what it would alone with that seed.
        cpu = generator is not None and generator.device.type == "cpu"
        params = replace(params, seed=draw_seed(generator if cpu else None))
    out = GenerationOutput([], [[] for _ in rows])
    if logprobs is not None:
        out.logprobs = [[] for _ in rows]
        out.top_logprobs = [[] for _ in rows]
    step_logits: list[Tensor] = []
    if max_new_tokens > 0:
        spec = engine_spec(
            model, len(rows), longest + max_new_tokens, enable_kvcache, enable_Gcache, compile,
            output_logits, cuda_graph, output_logprobs=logprobs is not None,
        )  # fmt: skip
        host_loop = streamer is not None or stopping_criteria is not None or output_logits
        with borrow_engine(model, spec) as engine:
            captured_before = engine.capture_seconds
            _run(engine, rows, params, G_init, out, step_logits, streamer, stopping_criteria,
                 host_loop)  # fmt: skip
            out.capture_seconds = engine.capture_seconds - captured_before
    if output_logits:
        out.step_logits = (
            torch.stack(step_logits)
            if step_logits
            else torch.zeros(0, len(rows), config.input_vocab_size, device=model.device)
        )
    out.ids = _full_ids(model, rows, matrix, kind, out.new_ids)
    return out


def _run(
    engine: DecodeEngine,
    rows: list[list[int]],
    params: SamplingParams,
    g_init: GInit | None,
    out: GenerationOutput,
    step_logits: list[Tensor],
    streamer: Callable[[Tensor], None] | None,
    stopping_criteria: Callable[[int, list[int]], bool] | None,
    host_loop: bool,
) -> None:
    """Decode ``rows`` on ``engine`` into ``out`` (new ids and log-probabilities)."""
    slots: list[int] = []
    try:
        slots = engine.add_many(rows, [params] * len(rows), g_init)
        if host_loop:
            _host_loop(engine, slots, out, step_logits, engine.config.pad_id, streamer,
                       stopping_criteria)  # fmt: skip
            return
        # The longest row needs max_new_tokens - 1 steps after its first token; every
        # CHECK_EVERY steps one host read says whether all rows stopped early.
        remaining = params.max_new_tokens - 1
        while remaining > 0 and not engine.all_done():
            count = min(CHECK_EVERY, remaining)
            engine.advance(count)
            remaining -= count
        out.new_ids = engine.generated_many(slots)
        if out.logprobs is not None:
            out.logprobs, out.top_logprobs = engine.logprobs_many(slots)
    finally:
        for slot in slots:
            engine.release(slot)


def _full_ids(
    model: PLDRModel,
    rows: list[list[int]],
    matrix: Tensor | None,
    kind: str,
    new_ids: list[list[int]],
) -> Tensor | list[list[int]]:
    """Prompt + new ids in the prompt's kind (a list, or a [L] / [B, L] tensor padded with the
    pad id after rows that stopped early)."""
    if kind == "list":
        return [p + n for p, n in zip(rows, new_ids)]
    batch = len(rows)
    steps = max((len(n) for n in new_ids), default=0)
    generated = torch.full((batch, steps), model.config.pad_id, dtype=torch.long)
    for r, n in enumerate(new_ids):
        generated[r, : len(n)] = torch.tensor(n, dtype=torch.long)
    base = matrix if matrix is not None else torch.tensor(rows, dtype=torch.long)
    full = torch.cat((base, generated), dim=1).to(model.device)  # where the model is, as before
    return full[0] if kind == "vector" else full


def _host_loop(
    engine: DecodeEngine,
    slots: list[int],
    out: GenerationOutput,
    step_logits: list[Tensor],
    pad_id: int,
    streamer: Callable[[Tensor], None] | None,
    stopping_criteria: Callable[[int, list[int]], bool] | None,
) -> None:
    """Step by step, for streamers, stopping criteria and step logits. Step logits read each
    step (one host sync per step); streamers and stopping criteria read a block of
    :data:`STOP_CHECK_BLOCK` steps at once and drop what a row generated past its stop (the
    streamer is called for each step in which a row took a token)."""
    row_of = {slot: row for row, slot in enumerate(slots)}
    batch = len(slots)
    vocab = engine.config.input_vocab_size
    new_ids = out.new_ids
    block = 1 if engine.keep_logits else STOP_CHECK_BLOCK
    stopped: set[int] = set()  # slots a stopping criterion ended inside the current block
    while engine.active_slots:
        for step in engine.step_many(block) if block > 1 else [engine.step()]:
            tokens = [pad_id] * batch
            took = False  # a row took a token at this step (not every row stopped before it)
            if step.logits is not None:
                logits = torch.zeros(batch, vocab, device=step.logits.device)
            for i, (slot, token, finished) in enumerate(
                zip(step.slots, step.token_ids, step.finished)
            ):
                if slot in stopped:
                    continue  # generated past its stop in this block: dropped
                row = row_of[slot]
                tokens[row] = token
                took = True
                new_ids[row].append(token)
                if out.logprobs is not None and step.logprobs is not None:
                    out.logprobs[row].append(step.logprobs[i])
                if out.top_logprobs is not None:
                    out.top_logprobs[row].append(step.top_logprobs[i] if step.top_logprobs else [])
                if step.logits is not None:
                    logits[row] = step.logits[i]
                stop = stopping_criteria is not None and stopping_criteria(row, new_ids[row])
                if stop and not finished:
                    engine.finish(slot)
                    stopped.add(slot)
            if step.logits is not None:
                step_logits.append(logits)
            if streamer is not None and took:
                streamer(torch.tensor(tokens, dtype=torch.long))
        stopped.clear()


def generate(
    model: PLDRModel,
    prompt_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    **options: Any,
) -> Tensor | list[list[int]]:
    """Generate up to ``max_new_tokens`` ids after ``prompt_ids``.

    ``prompt_ids`` is [L] or [B, L] (returns the same rank, new ids appended; rows that stopped
    early are filled with the pad id), or a list of id lists of different lengths (returns a list,
    each prompt + its new ids). Every row computes what it would alone (``attention_mask`` marks
    the padding of a [B, L] tensor, which is dropped). An empty prompt starts from the end-of-text
    id, like the original. Sampling: temperature (0: greedy), then top-p, then top-k; ``seed``
    (or one drawn from ``generator`` / torch's default generator) makes it reproducible, the same
    for every row and on every device. On CUDA the step runs as a captured graph
    (``compile=True``: torch.compile first); ``cuda_graph=False`` runs it eagerly.

    Before sampling, the logits can be processed (see :class:`SamplingParams` for the rules):
    ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (a dict
    of token id to bias, or pairs), ``min_new_tokens``; ``stop_token_ids`` end a row as
    end-of-text does.

    ``options`` are the keyword arguments of :func:`generate_details` (temperature, top_k, top_p,
    enable_kvcache, enable_Gcache, G_init, stop_at_eos, eos_id, generator, attention_mask,
    stopping_criteria, streamer, seed, compile, cuda_graph, the processing options above,
    logprobs), whose defaults apply: one signature for both calls.
    """
    return generate_details(model, prompt_ids, max_new_tokens, **options).ids


def stream_generate(
    model: PLDRModel,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_at_eos: bool = True,
    stop_token_ids: Sequence[int] = (),
    enable_kvcache: bool = True,
    enable_Gcache: bool = True,
    G_init: GInit | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] | None = None,
    min_new_tokens: int = 0,
) -> Iterator[int]:
    """Yield the new ids of one prompt as they are produced (the same ids :func:`generate`
    returns for that seed and options). Closing the iterator early frees the slot."""
    ids = [
        int(t)
        for t in (prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, Tensor) else prompt_ids)
    ] or [model.config.eos_id]
    # seed None: the engine draws one when it adds the row.
    params = SamplingParams(
        temperature,
        top_k,
        top_p,
        seed,
        max_new_tokens,
        stop_at_eos,
        tuple(int(t) for t in stop_token_ids),
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=bias_pairs(logit_bias),
        min_new_tokens=min_new_tokens,
    )
    params.validate()
    if max_new_tokens == 0:
        return
    _check_fits(model.config, len(ids), max_new_tokens)
    spec = engine_spec(model, 1, len(ids) + max_new_tokens, enable_kvcache, enable_Gcache)
    with borrow_engine(model, spec) as engine:
        slot = engine.add(ids, params, G_init)
        try:
            while slot in engine.active_slots:
                out = engine.step()
                for s, token, finished in zip(out.slots, out.token_ids, out.finished):
                    if s == slot:
                        yield token
                        if finished:
                            return
        finally:
            engine.release(slot)


def generate_text(
    model: PLDRModel,
    tokenizer: Any,
    prompt: str | list[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    **kwargs: Any,
) -> str | list[str]:
    """Text in, text out: each prompt's text followed by its generated text, cut before the
    earliest of ``stop``. Prompts are encoded as the original does (an empty prompt starts from
    end-of-text); ``kwargs`` go to :func:`generate_details`."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise PLDRError("no prompt given")
    stops = [s for s in (stop or []) if s]
    rows = [tokenizer.prompt_ids(p) for p in prompts]
    criteria = StopStrings(tokenizer, rows, stops) if stops else None
    out = generate_details(
        model,
        rows,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stopping_criteria=criteria,
        **kwargs,
    )
    texts = [final_text(tokenizer, r, n, stops) for r, n in zip(rows, out.new_ids)]
    return texts[0] if single else texts
