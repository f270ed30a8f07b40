"""transformers ``generate()`` speed with the options users pass (issue 24).

Builds the 110M configuration (``PLDRConfig()`` defaults) with random weights in bf16, wraps it
as ``PldrllmForCausalLM`` and measures, warm (the second call of each), batch 1, a 32-token
prompt and 256 new tokens:

* on the native decoding loop (what ``generate()`` routes there; target >= 2,000 tokens/s on an
  H200): greedy, ``repetition_penalty``, ``min_new_tokens`` (256, so every run is 256 tokens),
  a ``TextStreamer`` (collecting the text), ``stop_strings`` that never match,
  ``output_scores`` (one greedy row: the native loop returns the step logits), and with a
  repetition penalty (transformers' processor applied to them);
* on transformers' own loop (target >= 500 tokens/s): sampled ``output_scores`` (warped scores
  need it), and beam search is left out (it is another algorithm, not a loop speed).

Each row says which loop ran (the native loop's calls are counted), whether transformers' loop
ran its one-token passes on the static cache (``static``: ``pldr_llm.core.hf_static_cache``, on
CUDA by default; its steps are counted) and whether its ids equal a reference: for a native row,
transformers' own loop on the same call (forced with ``output_attentions=False``, which the
native loop does not take); for a transformers' loop row, the same seeded call on the
concatenating cache (``model.static_decode.enabled = False``). bf16: the fused step and the
eager forward may round differently, so a mismatch there is reported, not failed.

    python benchmarks/hf_generate_options.py --json hf_options.json
    python benchmarks/hf_generate_options.py --quick      # tiny model on the CPU, 16 tokens
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pldr_llm import PLDRConfig, PLDRModel

NEW_TOKENS = 256
PROMPT_TOKENS = 32
#: row name -> (generate() options, the loop it should run on, target tokens/s on an H200)
ROWS: dict[str, tuple[dict[str, Any], str, float]] = {
    "greedy": ({}, "native", 2000.0),
    "repetition_penalty 1.2": ({"repetition_penalty": 1.2}, "native", 2000.0),
    "min_new_tokens (all)": ({"min_new_tokens": NEW_TOKENS, "eos_token_id": 3}, "native", 2000.0),
    "streamer": ({"streamer": "text"}, "native", 2000.0),
    "stop_strings": ({"stop_strings": ["qqqqzzzzqqqq"]}, "native", 2000.0),
    "output_scores": (
        {"output_scores": True, "return_dict_in_generate": True},
        "native",
        2000.0,
    ),
    "scores + repetition_penalty": (
        {"output_scores": True, "return_dict_in_generate": True, "repetition_penalty": 1.2},
        "native",
        2000.0,
    ),
    "sampled scores (transformers)": (
        {"output_scores": True, "return_dict_in_generate": True, "do_sample": True, "top_p": 0.9},
        "transformers",
        500.0,
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(quick: bool, device: torch.device, dtype: torch.dtype, folder: Path) -> tuple[Any, Any]:
    """The model as ``PldrllmForCausalLM`` and a ``PldrllmTokenizer``."""
    from pldr_llm.core.modeling_pldrllm import PldrllmForCausalLM
    from pldr_llm.core.tokenization_pldrllm import PldrllmTokenizer
    from pldr_llm.data.default_tokenizer import default_tokenizer_model

    if quick:
        config = PLDRConfig(
            num_layers=2, d_model=64, num_heads=4, dff=170, A_dff=24, input_vocab_size=4096,
            max_seq_len=320,
        )  # fmt: skip
    else:
        config = PLDRConfig()
    torch.manual_seed(0)
    core = PLDRModel(config).to(device=device, dtype=dtype).eval()
    tokenizer = PldrllmTokenizer(str(default_tokenizer_model(folder, vocab_size=4096)))
    return PldrllmForCausalLM.from_core(core), tokenizer


class CollectingStreamer:
    """A ``TextStreamer`` that keeps the text instead of printing it."""

    def __new__(cls, tokenizer: Any) -> Any:
        from transformers import TextStreamer

        class Collect(TextStreamer):
            text = ""

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                self.text += text

        return Collect(tokenizer, skip_prompt=True)


def run_row(
    model: Any, tokenizer: Any, prompt: torch.Tensor, options: dict[str, Any], new_tokens: int
) -> dict:
    import pldr_llm.core.generate as native
    from pldr_llm.core import hf_static_cache

    calls = []
    real = native.generate_details  # what every native generate() call runs
    static_steps = []
    real_step = hf_static_cache.StaticDecoder.step  # a one-token pass on the static cache

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        static_steps.append(1)
        return real_step(*args, **kwargs)

    def call() -> torch.Tensor:
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None}
        kwargs.update(options)
        if "min_new_tokens" in kwargs:
            kwargs["min_new_tokens"] = new_tokens
        if kwargs.get("streamer") == "text":
            kwargs["streamer"] = CollectingStreamer(tokenizer)
        if "stop_strings" in kwargs:
            kwargs["tokenizer"] = tokenizer
        torch.manual_seed(5)  # (sampled rows: the reference draws the same numbers)
        out = model.generate(prompt, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.sequences

    native.generate_details = counted
    hf_static_cache.StaticDecoder.step = counted_step
    try:
        call()  # warm: capture, kernels
        sync(prompt.device)
        calls.clear()
        static_steps.clear()
        start = time.perf_counter()
        ids = call()
        sync(prompt.device)
        seconds = time.perf_counter() - start
    finally:
        native.generate_details = real
        hf_static_cache.StaticDecoder.step = real_step
    loop = "native" if calls else "transformers"
    reference = ids
    if loop == "transformers":  # the same call on the concatenating cache
        settings = model.static_decode
        model.static_decode = hf_static_cache.StaticDecodeSettings(enabled=False)
        try:
            reference = call()
        finally:
            model.static_decode = settings
    if loop == "native":  # the same call on transformers' own loop
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None}
        kwargs.update({k: v for k, v in options.items() if k != "streamer"})
        if "min_new_tokens" in kwargs:
            kwargs["min_new_tokens"] = new_tokens
        if "stop_strings" in kwargs:
            kwargs["tokenizer"] = tokenizer
        kwargs.update(return_dict_in_generate=True, output_attentions=False)
        reference = model.generate(prompt, **kwargs).sequences
    new = ids.shape[1] - prompt.shape[1]
    return {
        "loop": loop,
        "static_cache": bool(static_steps),
        "new_tokens": int(new),
        "seconds": round(seconds, 4),
        "tokens_per_s": round(new / seconds, 1),
        "ids_equal_transformers_loop": bool(torch.equal(ids, reference)),
        "ids_reference": "concatenating cache" if loop == "transformers" else "transformers' loop",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, seconds")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--static",
        choices=("auto", "on", "off"),
        default="auto",
        help="transformers' loop on the static cache: auto (CUDA), on (also the CPU), off (the "
        "concatenating cache: the speed before it)",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=None, help=f"default {NEW_TOKENS} (--quick: 16)"
    )
    args = parser.parse_args()
    new_tokens = args.new_tokens or (16 if args.quick else NEW_TOKENS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = build(args.quick, device, dtype, Path(folder))
    from pldr_llm.core.hf_static_cache import StaticDecodeSettings

    model.static_decode = StaticDecodeSettings(
        enabled={"auto": None, "on": True, "off": False}[args.static]
    )
    torch.manual_seed(1)
    vocab = min(model.config.vocab_size, 4096)
    prompt = torch.randint(4, vocab, (1, PROMPT_TOKENS), device=device)
    results = {
        "device": str(device), "dtype": args.dtype, "new_tokens": new_tokens,
        "static": args.static, "rows": {},
    }  # fmt: skip
    print(
        f"{'option':38} {'loop':13} {'static':>6} {'tokens/s':>9} {'target':>7} {'ok':>3} "
        f"{'ids = reference':>15}"
    )
    for name, (options, want_loop, target) in ROWS.items():
        row = run_row(model, tokenizer, prompt, options, new_tokens)
        row["target_tokens_per_s"] = target
        row["meets_target"] = row["tokens_per_s"] >= target and row["loop"] == want_loop
        results["rows"][name] = row
        print(
            f"{name:38} {row['loop']:13} {str(row['static_cache']):>6} "
            f"{row['tokens_per_s']:9.1f} {target:7.0f} {'yes' if row['meets_target'] else 'NO':>3} "
            f"{str(row['ids_equal_transformers_loop']):>15}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
