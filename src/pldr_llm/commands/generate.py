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
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from pldr_llm.commands.common import (
    add_model_arguments,
    add_prompt_arguments,
    log,
    read_prompts,
)
from pldr_llm.core.errors import PLDRError

if TYPE_CHECKING:
    import torch

    from pldr_llm.generation import SamplingParams
    from pldr_llm.tokenizer import PLDRTokenizer


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
        help="print a JSON line of timings on stderr (generation, capture/compile, tokens/s)",
    )
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


# ---------------------------------------------------------------------- helpers


class TextStreamer:
    """Prints one row's text as its ids arrive (a ``streamer`` for :func:`pldr_llm.generate`):
    the prompt at once, then the deltas of a :class:`pldr_llm.generation.Detokenizer`, which
    add up to the text printed without ``--stream``."""

    def __init__(
        self,
        tokenizer: PLDRTokenizer,
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
        out: TextIO | None = None,
    ) -> None:
        from pldr_llm.generation import Detokenizer

        self.detok = Detokenizer(tokenizer, prompt_ids, stops, echo=True)
        self.out = out or sys.stdout
        self._write(self.detok.push([]))

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def __call__(self, next_ids: torch.Tensor) -> None:
        self._write(self.detok.push([int(next_ids.reshape(-1)[0])]))

    def final(self) -> None:
        """Print the rest of the text and a newline."""
        self._write(self.detok.finish() + "\n")


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
    import torch

    from pldr_llm.bundle import (
        bundle_summary,
        bundle_tokenizer,
        load_bundle,
        resolve_bundle,
        resolve_device,
        resolve_dtype,
    )
    from pldr_llm.generation import StopStrings, final_text, generate_details
    from pldr_llm.generation.warm import warm_up_in_background
    from pldr_llm.gfile import load_g_file

    # Everything the user typed is checked before the model is read.
    params = sampling_params(args)
    if args.logprobs is not None and not args.jsonl:
        raise PLDRError("--logprobs needs --jsonl (the log-probabilities go in its records)")
    if args.batch_size <= 0:
        raise PLDRError(f"--batch-size must be positive, got {args.batch_size}")
    if args.stop is not None and any(s == "" for s in args.stop):
        raise PLDRError("--stop strings must not be empty")
    if args.stream and args.jsonl:
        raise PLDRError("--stream and --jsonl do not go together")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    prompts = read_prompts(args.prompt, args.prompt_file, required=True)
    stops = list(args.stop or [])
    _configure_stdout()

    # Cheap checks that need the model's files, before its weights are read.
    files = resolve_bundle(args.model)
    config = files.config
    tokenizer = bundle_tokenizer(files, args.tokenizer)
    assert tokenizer is not None  # required=True
    prompt_ids = [tokenizer.prompt_ids(p) for p in prompts]
    longest = max(len(ids) for ids in prompt_ids)
    if longest + args.max_new_tokens > config.max_seq_len:
        raise PLDRError(
            f"prompt ({longest} tokens) + max_new_tokens ({args.max_new_tokens}) exceeds "
            f"max_seq_len={config.max_seq_len} of the model"
        )
    g_init = load_g_file(args.g_init, config) if args.g_init else None

    # The decoding loop's GPU code loads in the background while the weights are read; what is
    # left of it when they are is waited for inside the generation time below.
    warm = None
    if not (args.no_kv_cache or args.compile):
        # The first generation's batch: its prompts' lengths (equal or not) decide its kernels.
        first = prompt_ids[: 1 if args.stream else args.batch_size]
        length = max(len(ids) for ids in first) + args.max_new_tokens
        filters = replace(params, seed=None, max_new_tokens=64, min_new_tokens=0, logprobs=0)
        warm = warm_up_in_background(
            config, dtype, device, [len(ids) for ids in first], length, filters
        )
    model, _ = load_bundle(files, device=device, dtype=dtype, tokenizer=tokenizer)
    log(
        args,
        f"loaded {bundle_summary(files, model)} on {device} ({str(dtype).removeprefix('torch.')})",
    )

    if args.seed is not None:
        torch.manual_seed(args.seed)
    common: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "enable_kvcache": not args.no_kv_cache,
        "enable_Gcache": not args.no_g_cache,
        "G_init": g_init,
        "eos_id": config.eos_id,
        "seed": args.seed,
        "compile": args.compile,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "logit_bias": params.logit_bias,
        "min_new_tokens": params.min_new_tokens,
        "stop_token_ids": params.stop_token_ids,
        "logprobs": args.logprobs,
    }
    start = time.perf_counter()
    waited = 0.0
    if warm is not None:
        warm.join()
        waited = time.perf_counter() - start
        if warm.error:
            log(args, f"the kernel warm-up failed ({warm.error}); generation loads them itself")
    produced = 0
    capture = 0.0
    if args.stream:
        # One prompt at a time, so that its tokens can be shown as they come.
        for ids in prompt_ids:
            streamer = TextStreamer(tokenizer, ids, stops)
            criteria = StopStrings(tokenizer, [ids], stops) if stops else None
            out = generate_details(
                model, [ids], streamer=streamer, stopping_criteria=criteria, **common
            )
            new = out.new_ids[0]
            produced += len(new)
            capture += out.capture_seconds
            streamer.final()
    else:
        for first in range(0, len(prompt_ids), args.batch_size):
            chunk = prompt_ids[first : first + args.batch_size]
            criteria = StopStrings(tokenizer, chunk, stops) if stops else None
            out = generate_details(model, chunk, stopping_criteria=criteria, **common)
            capture += out.capture_seconds
            for offset, (ids, new) in enumerate(zip(chunk, out.new_ids)):
                produced += len(new)
                text = final_text(tokenizer, ids, new, stops)
                if args.jsonl:
                    record = {
                        "prompt": prompts[first + offset],
                        "text": text,
                        "prompt_ids": ids,
                        "new_ids": new,
                    }
                    if out.logprobs is not None and out.top_logprobs is not None:
                        record["logprobs"] = out.logprobs[offset]
                        if args.logprobs:
                            record["top_logprobs"] = out.top_logprobs[offset]
                    print(json.dumps(record, ensure_ascii=False), flush=True)
                else:
                    print(text, flush=True)
    seconds = time.perf_counter() - start
    rate = produced / seconds if seconds > 0 else float("inf")
    graphs = f", of which {capture:.2f}s capturing/compiling the decoding step" if capture else ""
    if warm is not None:
        graphs += f" and {waited:.2f}s finishing the kernel warm-up"
    log(
        args,
        f"{produced} new tokens for {len(prompts)} prompt(s) in {seconds:.2f}s{graphs} "
        f"({rate:.1f} tokens/s)",
    )
    if args.timing:
        timing = {
            "new_tokens": produced,
            "prompts": len(prompts),
            "seconds": round(seconds, 4),
            "capture_seconds": round(capture, 4),
            "warm_up_wait_seconds": round(waited, 4),
            "warm_up_error": warm.error if warm is not None else None,
            "tokens_per_s": round(rate, 2),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        }
        print(json.dumps(timing), file=sys.stderr, flush=True)
    return 0
