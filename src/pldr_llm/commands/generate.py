"""``pldr-llm generate``: text from a PLDR-LLM, with every sampling option of the original.

Prompts are encoded as the original's ``generate_text`` does (end-of-text id appended, then dropped
unless the prompt is empty, so an empty prompt starts from the end-of-text id), and each result is
the prompt ids and the new ids decoded together. Several prompts (``--prompt`` repeated, or
``--prompt-file`` with one prompt per line) run as batches; each row gives the ids it would give
alone. stdout holds only the texts, one per prompt; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pldr_llm.commands.common import (
    add_model_arguments,
    add_prompt_arguments,
    log,
    read_prompts,
)
from pldr_llm.core.errors import PLDRError

if TYPE_CHECKING:
    from pldr_llm.generation import SamplingParams
    from pldr_llm.generation.texts import TextTimings


HELP = "generate text from a PLDR-LLM"
DESCRIPTION = (
    "Generate text from a PLDR-LLM (a published bundle folder, a pldr-llm folder, "
    "or a Hugging Face hub repository id). Sampling stacks as in the original: temperature, "
    "then top-p, then top-k; --temperature 0 or --top-k 1 is greedy. On a GPU the decoding "
    "step runs as a captured CUDA graph."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``generate`` command's options."""
    add_prompt_arguments(
        p,
        "prompt text (repeat for a batch; an empty prompt starts from end-of-text)",
        "one prompt per line (blank lines skipped), generated in batches; '-' reads stdin",
    )
    p.add_argument("--max-new-tokens", "-n", type=int, default=50, metavar="N", help="default: 50")
    _add_sampling_arguments(p)
    _add_decoding_arguments(p)
    add_model_arguments(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument(
        "--stop",
        nargs="+",
        default=None,
        metavar="STR",
        help="stop a row when its new text contains STR (the text is cut before it)",
    )
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="prompts per batch (16)")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--quiet", "-q", action="store_true", help="no logs on stderr")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """How the next token is chosen: sampling, penalties, biases, stop ids and log-probabilities."""
    p.add_argument(
        "--temperature",
        "-t",
        type=float,
        default=1.0,
        metavar="T",
        help=">= 0 (0: greedy); default: 1",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="keep the K largest logits (0: all; 1: greedy)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus probability in (0, 1] (1: off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        metavar="R",
        help="divide positive (multiply negative) logits of tokens already seen (prompt and "
        "new) by R (transformers' rule; 1: off)",
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        metavar="P",
        help="subtract P from the logits of generated tokens (OpenAI's rule, -2..2; 0: off)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        metavar="F",
        help="subtract F times its count from each generated token's logit (-2..2; 0: off)",
    )
    p.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit (repeatable)",
    )
    p.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        metavar="N",
        help="no end-of-text or stop id before N new tokens (0: off)",
    )
    p.add_argument(
        "--stop-id",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="end a row when it generates token ID (repeatable)",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="with --jsonl: each new token's log-probability and its top N alternatives (0-20)",
    )


def _add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """How the decoding loop runs: its caches, seed, compilation and timings."""
    p.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the whole sequence each step"
    )
    p.add_argument("--no-g-cache", action="store_true", help="recompute G_LM each step")
    p.add_argument(
        "--g-init",
        metavar="FILE",
        help="initial G-cache (the paper's G_LM pickles or a pldr-llm safetensors G file)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="seed for reproducible sampling (each prompt samples what it would alone)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step before capturing it (GPU; slower start)",
    )
    p.add_argument(
        "--timing",
        action="store_true",
        help="print a JSON line of timings on stderr: tokens/s and the seconds of each phase "
        "of the whole call, from the process's start (imports, weights, capture, generation...)",
    )


# ---------------------------------------------------------------------- helpers


def _configure_stdout() -> None:
    # A text that holds characters the terminal's encoding lacks must not end in a traceback.
    reconfigure: Callable[..., None] | None = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):  # pragma: no cover - detached or odd streams
            pass


# ---------------------------------------------------------------------- run


def parse_logit_bias(items: Sequence[str]) -> tuple[tuple[int, float], ...]:
    """``ID=BIAS`` items as (id, bias) pairs (one-line :class:`PLDRError` for a bad one)."""
    pairs = []
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise PLDRError(f"--logit-bias takes ID=BIAS (e.g. 50256=-100), got {item!r}") from None
    return tuple(sorted(pairs))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling settings of ``args``, checked (one-line :class:`PLDRError`)."""
    from pldr_llm.generation import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=tuple(args.stop_id),
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=parse_logit_bias(args.logit_bias),
        min_new_tokens=args.min_new_tokens,
        logprobs=args.logprobs or 0,
    )
    params.validate()
    return params


def run(args: argparse.Namespace) -> int:
    """Generate from every prompt and print the texts on stdout."""
    from pldr_llm.generation.texts import GenerationSettings, TextGenerator

    # Everything the user typed is checked before the model is read.
    params = sampling_params(args)
    if args.logprobs is not None and not args.jsonl:
        raise PLDRError("--logprobs needs --jsonl (the log-probabilities go in its records)")
    if args.stream and args.jsonl:
        raise PLDRError("--stream and --jsonl do not go together")
    settings = GenerationSettings(
        params,
        enable_kvcache=not args.no_kv_cache,
        enable_Gcache=not args.no_g_cache,
        g_init_file=args.g_init,
        compile=args.compile,
        batch_size=args.batch_size,
        stops=tuple(args.stop or ()),
        logprobs=args.logprobs,
    )
    settings.validate()
    prompts = read_prompts(args.prompt, args.prompt_file, required=True)
    _configure_stdout()
    generator = TextGenerator.load(
        args.model, prompts, settings, device=args.device, dtype=args.dtype,
        tokenizer=args.tokenizer, stream=args.stream, log=lambda message: log(args, message),
        clock=getattr(args, "clock", None),
    )  # fmt: skip
    for result in generator.generate(prompts, stream=sys.stdout if args.stream else None):
        if args.jsonl:
            record: dict[str, Any] = {
                "prompt": result.prompt,
                "text": result.text,
                "prompt_ids": result.prompt_ids,
                "new_ids": result.new_ids,
            }
            if result.logprobs is not None:
                record["logprobs"] = result.logprobs
                if args.logprobs:
                    record["top_logprobs"] = result.top_logprobs
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif not args.stream:
            print(result.text, flush=True)
    _log_timings(args, generator.timings, generator.warmed_up)
    return 0


def _log_timings(args: argparse.Namespace, timings: TextTimings, warmed_up: bool) -> None:
    """The log line of tokens/s (and, with ``--timing``, the JSON line) on stderr."""
    graphs = (
        f", of which {timings.capture_seconds:.2f}s capturing/compiling the decoding step"
        if timings.capture_seconds
        else ""
    )
    if warmed_up:
        graphs += f" and {timings.warm_up_wait_seconds:.2f}s finishing the kernel warm-up"
        if timings.warm_up_error:
            log(args, f"the kernel warm-up failed ({timings.warm_up_error}); generation loads "
                "them itself")  # fmt: skip
    log(
        args,
        f"{timings.new_tokens} new tokens for {timings.prompts} prompt(s) in "
        f"{timings.seconds:.2f}s{graphs} ({timings.tokens_per_s:.1f} tokens/s)",
    )
    if args.timing:
        print(json.dumps(timings.as_dict()), file=sys.stderr, flush=True)
