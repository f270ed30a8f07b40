"""Decoding speed where users generate text, in one run on one device (issue 11).

Builds the 110M configuration (``PLDRConfig()`` defaults) with random weights, saves it with a
tokenizer in the project format to a temporary folder, and measures, for a 32-token prompt and
256 new tokens:

(a) the ``pldr-llm generate`` CLI as a subprocess (one call, as a user runs it): generation wall
    time including CUDA-graph capture and what was left of the kernel warm-up (read from
    ``--timing``), and the whole process's wall time, fp32 and bf16, greedy and top-p 0.9, 1
    prompt and 64 prompts; each twice, since a configuration's first call on a machine also
    compiles the fused step's Triton kernels into Triton's disk cache;
(b) ``pldr_llm.generate`` warm (second call in the process), same grid;
(c) transformers ``PldrllmForCausalLM.generate()`` batch 1 greedy, static cache, warm;
(d) with ``--anchor DIR`` (a copy of the shared ``anchor`` folder): the original implementation's
    decoding loop (KV+G cache, fp32, batch 1);
(e) ids checks (fp32): the captured loop against the eager loop (``cuda_graph=False``) for greedy
    and top-p with a seed, batch 1 and a mixed-length batch; and greedy against the op-by-op
    step (``DecodeEngine(fused=False)``), which the fused kernels replace.

(f) with ``--processing``, only this: ``pldr_llm.generate`` warm, batch 1, each dtype, greedy and
    top-p, without and with logit processing (repetition, presence and frequency penalties,
    ``logit_bias`` and ``min_new_tokens``, see :data:`PROCESSING`), and the captured processed
    loop's ids against the eager loop's (fp32).

    python benchmarks/decode_speed.py --json decode.json [--anchor .anchor] [--compile]
    python benchmarks/decode_speed.py --processing --json processing.json
    python benchmarks/decode_speed.py --quick          # tiny model on the CPU, seconds

Prints a table last and writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.generation import generate_details

SAMPLING = {"greedy": {"top_k": 1}, "top-p 0.9": {"top_p": 0.9}}
#: Every logit-processing option at once (what --processing measures against none).
PROCESSING = {
    "repetition_penalty": 1.2,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {11: 2.0, 12: -100.0, 13: 1.5},
    "min_new_tokens": 32,
}
WORDS = (
    "the model reads a long story about rivers and mountains where every village keeps a small "
    "library of maps letters and songs that travellers copy by hand before they leave at dawn"
).split()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(quick: bool, folder: Path) -> tuple[PLDRConfig, Path]:
    """A random model and a tokenizer in ``folder`` (the project's format)."""
    from pldr_llm.data.default_tokenizer import default_tokenizer_model

    if quick:
        config = PLDRConfig.from_hpdict(
            {
                "num_layers": 2,
                "d_model": 64,
                "num_heads": 4,
                "dff": 170,
                "input_vocab_size": 4096,
                "A_dff": 24,
                "num_reslayerA": 2,
                "num_denseA": 2,
                "max_seq_len": 128,
            }
        )
    else:
        config = PLDRConfig()
    torch.manual_seed(0)
    PLDRModel(config).save(folder)
    tokenizer = default_tokenizer_model(folder / "tok-cache", vocab_size=4096)
    for suffix in (".model", ".vocab"):
        target = folder / f"tokenizer{suffix}"
        target.write_bytes(tokenizer.with_suffix(suffix).read_bytes())
    return config, folder / "tokenizer.model"


def prompt_texts(tokenizer_path: Path, count: int, length: int) -> list[str]:
    """``count`` different texts of about ``length`` tokens each."""
    from pldr_llm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    texts = []
    for i in range(count):
        words: list[str] = []
        k = i
        while len(tok.prompt_ids(" ".join(words))) < length:
            words.append(WORDS[k % len(WORDS)])
            k += 7
        texts.append(" ".join(words))
    return texts


def cli_run(
    folder: Path, device: str, dtype: str, sampling: str, texts: list[str], new: int, compile: bool
) -> dict:
    """One ``pldr-llm generate`` call; its --timing JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(texts) + "\n")
        prompt_file = handle.name
    flags = ["--top-k", "1"] if sampling == "greedy" else ["--top-p", "0.9", "--seed", "1"]
    command = [
        sys.executable,
        "-m",
        "pldr_llm",
        "generate",
        "--model",
        str(folder),
        "--prompt-file",
        prompt_file,
        "-n",
        str(new),
        "--device",
        device,
        "--dtype",
        dtype,
        "--batch-size",
        str(len(texts)),
        "--timing",
        "-q",
        *flags,
    ] + (["--compile"] if compile else [])
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    os.unlink(prompt_file)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:]}
    timing = json.loads(result.stderr.strip().splitlines()[-1])
    timing["process_seconds"] = round(wall, 2)
    return timing


def median_cli_run(repeats: int, *args) -> dict:
    """``cli_run(*args)`` ``repeats`` times: the call of the median rate, with every rate."""
    timings = [cli_run(*args) for _ in range(max(1, repeats))]
    if repeats <= 1 or any("error" in t for t in timings):
        return timings[0]
    timings.sort(key=lambda t: t["tokens_per_s"])
    return {
        **timings[len(timings) // 2],
        "tokens_per_s_calls": [t["tokens_per_s"] for t in timings],
    }


def api_run(
    model: PLDRModel, prompts: list[list[int]], new: int, sampling: dict, compile: bool
) -> dict:
    """``pldr_llm.generate`` warm: a first call captures, the second is timed."""
    kwargs = {"stop_at_eos": False, "seed": 1, "compile": compile, **sampling}
    first = generate_details(model, prompts, new, **kwargs)
    sync(model.device)
    start = time.perf_counter()
    out = generate_details(model, prompts, new, **kwargs)
    sync(model.device)
    seconds = time.perf_counter() - start
    produced = sum(len(n) for n in out.new_ids)
    return {
        "tokens_per_s": round(produced / seconds, 1),
        "seconds": round(seconds, 4),
        "first_call_capture_seconds": round(first.capture_seconds, 3),
    }


def hf_run(model: PLDRModel, prompt: list[int], new: int) -> dict:
    """transformers ``generate()`` with the static cache, batch 1 greedy, warm."""
    try:
        from pldr_llm.core.modeling_pldrllm import PldrllmForCausalLM
    except ImportError as error:  # transformers missing
        return {"error": str(error)}
    hf = PldrllmForCausalLM.from_core(model)
    ids = torch.tensor([prompt], device=model.device)
    kwargs = {
        "max_new_tokens": new,
        "do_sample": False,
        "cache_implementation": "static",
        "eos_token_id": None,
    }
    hf.generate(ids, **kwargs)
    sync(model.device)
    start = time.perf_counter()
    out = hf.generate(ids, **kwargs)
    sync(model.device)
    seconds = time.perf_counter() - start
    native = generate_details(model, [prompt], new, top_k=1, stop_at_eos=False).ids[0]
    return {
        "tokens_per_s": round((out.shape[1] - len(prompt)) / seconds, 1),
        "ids_equal_native": out[0].tolist() == native,
    }


def anchor_run(anchor: Path, quick: bool, device: torch.device, new: int) -> dict:
    """The original's generation loop (KV+G cache, fp32, batch 1), as bench_original.py runs it."""
    sys.path[:0] = [str(anchor / "shim"), str(anchor / "original")]
    import pldr_model_v510 as pm  # type: ignore[import-not-found]

    config = (
        dict(
            num_layers=2,
            d_model=64,
            num_heads=4,
            dff=170,
            input_vocab_size=4096,
            A_dff=24,
            num_reslayerA=2,
            num_denseA=2,
            max_seq_len=128,
        )
        if quick
        else dict(
            num_layers=5,
            d_model=896,
            num_heads=14,
            dff=2389,
            input_vocab_size=32000,
            A_dff=170,
            num_reslayerA=8,
            num_denseA=2,
            max_seq_len=1024,
        )
    )
    torch.manual_seed(0)
    model = pm.PLDR_Model(**config, device=device).to(device).eval()
    seq = torch.randint(4, config["input_vocab_size"], (1, 32 if not quick else 8), device=device)

    def masks(inp: torch.Tensor) -> torch.Tensor:
        length = inp.size(1)
        look = (1 - torch.tril(torch.ones(length, length))).to(device)
        pad = torch.eq(inp, 0).to(dtype=torch.float32)[:, None, None, :]
        return torch.maximum(pad, look)

    @torch.no_grad()
    def run(n: int) -> None:
        seq_in, kvl, gl, cached = seq, None, None, False
        for _ in range(n):
            mask = masks(seq_in) if not cached else None
            pred, _, att, kvn = model([seq_in, mask], kvcachelst=kvl, Gcachelst=gl)
            kvl, cached = kvn, True
            gl = [[t[0], t[4]] for t in att]
            logits = pred[:, -1, :]
            top, _ = torch.topk(logits, 1)
            logits = torch.where(logits < top[:, -1:], torch.full_like(logits, -1e10), logits)
            seq_in = torch.distributions.categorical.Categorical(logits=logits).sample()[None, :]

    run(4)
    sync(device)
    start = time.perf_counter()
    run(new)
    sync(device)
    return {"tokens_per_s": round(new / (time.perf_counter() - start), 1)}


def op_by_op_ids(model: PLDRModel, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy ids of the uncaptured loop with the op-by-op step (``fused=False``)."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    engine = DecodeEngine(model, len(prompts), max(map(len, prompts)) + new, cuda_graph=False,
                          fused=False)  # fmt: skip
    params = SamplingParams(top_k=1, max_new_tokens=new, stop_at_eos=False)
    slots = engine.add_many(prompts, [params] * len(prompts))
    engine.advance(new - 1)
    return [engine.generated(s) for s in slots]


def ids_checks(model: PLDRModel, prompts: list[list[int]], new: int) -> dict:
    """The captured loop against the eager loop (fp32): equal ids, greedy and seeded top-p; and
    the captured loop's greedy ids against the op-by-op step's (the fused kernels' check)."""
    mixed = [p[: 8 + 3 * i] for i, p in enumerate(prompts[:4])]
    checks = {}
    for name, sampling in SAMPLING.items():
        for label, batch in (("batch 1", prompts[:1]), ("mixed batch", mixed)):
            kwargs = {"stop_at_eos": False, "seed": 7, **sampling}
            fast = generate_details(model, batch, new, **kwargs).new_ids
            eager = generate_details(model, batch, new, cuda_graph=False, **kwargs).new_ids
            checks[f"{name}, {label}"] = fast == eager
            if name == "greedy":
                checks[f"greedy, {label}, against the op-by-op step"] = fast == op_by_op_ids(
                    model, batch, new
                )
    return checks


def processing_rows(
    model: PLDRModel, dtype: str, prompts: list[list[int]], new: int, compile: bool
) -> list[dict]:
    """``pldr_llm.generate`` warm at batch 1, greedy and top-p, without and with every logit
    processing option."""
    rows = []
    for name, sampling in SAMPLING.items():
        for label, extra in (("none", {}), ("penalties+bias+min", PROCESSING)):
            if extra:
                extra = {**extra, "min_new_tokens": min(new, extra["min_new_tokens"])}
            timing = api_run(model, prompts[:1], new, {**sampling, **extra}, compile)
            rows.append(
                {
                    "path": f"pldr_llm.generate (warm), processing: {label}",
                    "dtype": dtype,
                    "sampling": name,
                    "batch": 1,
                    **timing,
                }
            )
    return rows


def processing_ids_checks(model: PLDRModel, prompts: list[list[int]], new: int) -> dict:
    """The captured processed loop against the eager one (fp32), batch 1 and a mixed batch."""
    mixed = [p[: 8 + 3 * i] for i, p in enumerate(prompts[:4])]
    checks = {}
    for name, sampling in SAMPLING.items():
        for label, batch in (("batch 1", prompts[:1]), ("mixed batch", mixed)):
            kwargs = {"stop_at_eos": False, "seed": 7, **sampling, **PROCESSING}
            kwargs["min_new_tokens"] = min(new, PROCESSING["min_new_tokens"])
            fast = generate_details(model, batch, new, **kwargs).new_ids
            eager = generate_details(model, batch, new, cuda_graph=False, **kwargs).new_ids
            checks[f"processed {name}, {label}"] = fast == eager
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, seconds")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--anchor", type=Path, default=None, help="the shared anchor folder")
    parser.add_argument("--compile", action="store_true", help="torch.compile before capture")
    parser.add_argument(
        "--api-compile",
        action="store_true",
        help="also time pldr_llm.generate(compile=True) warm, batch 1 greedy, each dtype",
    )
    parser.add_argument(
        "--cli-repeats",
        type=int,
        default=3,
        help="later CLI calls at batch 1, of which the median is reported (each call's "
        "generation is ~0.15 s, where one slow launch moves the figure by 10%%)",
    )
    parser.add_argument(
        "--processing",
        action="store_true",
        help="only the warm API at batch 1 without and with penalties, logit_bias and "
        "min_new_tokens (and their ids check)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        device = torch.device(args.device or "cpu")
    prompt_len, new = (8, 8) if args.quick else (32, 256)
    batches = [1, 4] if args.quick else [1, 64]
    dtypes = ["float32"] if args.quick and device.type == "cpu" else ["float32", "bfloat16"]
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "rows": [],
    }
    rows = results["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        config, tokenizer = build(args.quick, folder)
        texts = prompt_texts(tokenizer, max(batches), prompt_len)
        generator = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(4, config.input_vocab_size, (prompt_len,), generator=generator).tolist()
            for _ in range(max(batches))
        ]
        for dtype in dtypes:
            if args.processing:
                break
            for name in SAMPLING:
                for batch in batches:
                    if args.quick and (name, batch) not in (("greedy", 1), ("top-p 0.9", 4)):
                        continue
                    # Twice: the first call of a configuration on a machine may also compile
                    # Triton's kernels (cached on disk for every later process).
                    for path in ("CLI (one call, with capture)", "CLI again (disk caches warm)"):
                        repeats = args.cli_repeats if "again" in path and batch == 1 else 1
                        timing = median_cli_run(
                            repeats,
                            folder,
                            device.type,
                            dtype,
                            name,
                            texts[:batch],
                            new,
                            args.compile,
                        )
                        rows.append(
                            {
                                "path": path,
                                "dtype": dtype,
                                "sampling": name,
                                "batch": batch,
                                **timing,
                            }
                        )
        for dtype in dtypes:
            model = PLDRModel.load(folder, map_location=device, dtype=getattr(torch, dtype)).eval()
            if args.processing:
                rows += processing_rows(model, dtype, prompts, new, args.compile)
                if dtype == "float32":
                    results["ids_equal_eager"] = processing_ids_checks(model, prompts, min(new, 64))
                del model
                continue
            for name, sampling in SAMPLING.items():
                for batch in batches:
                    timing = api_run(model, prompts[:batch], new, sampling, args.compile)
                    rows.append(
                        {
                            "path": "pldr_llm.generate (warm)",
                            "dtype": dtype,
                            "sampling": name,
                            "batch": batch,
                            **timing,
                        }
                    )
            if args.api_compile and not args.compile:
                timing = api_run(model, prompts[:1], new, SAMPLING["greedy"], True)
                rows.append(
                    {
                        "path": "pldr_llm.generate compile=True (warm)",
                        "dtype": dtype,
                        "sampling": "greedy",
                        "batch": 1,
                        **timing,
                    }
                )
            if dtype == "float32":
                rows.append(
                    {
                        "path": "transformers generate() static (warm)",
                        "dtype": dtype,
                        "sampling": "greedy",
                        "batch": 1,
                        **hf_run(model, prompts[0], new),
                    }
                )
                results["ids_equal_eager"] = ids_checks(model, prompts, min(new, 64))
            del model
        if args.anchor is not None and not args.processing:
            rows.append(
                {
                    "path": "original implementation (KV+G)",
                    "dtype": "float32",
                    "sampling": "greedy",
                    "batch": 1,
                    **anchor_run(args.anchor, args.quick, device, new),
                }
            )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"device {results['device']}, torch {results['torch']}, prompt {prompt_len}, new {new}")
    print(
        f"{'path':58} {'dtype':9} {'sampling':10} {'batch':>5} {'tok/s':>10} {'capture s':>9} "
        f"{'wait s':>7} {'process s':>9}"
    )
    for row in rows:
        rate = row.get("tokens_per_s", row.get("error", "?"))
        capture = row.get("capture_seconds", row.get("first_call_capture_seconds", ""))
        # the CLI's wait for its background kernel warm-up (counted in its generation time)
        wait = row.get("warm_up_wait_seconds", "")
        print(
            f"{row['path']:58} {row['dtype']:9} {row['sampling']:10} {row['batch']:>5} "
            f"{rate!s:>10} {capture!s:>9} {wait!s:>7} {row.get('process_seconds', '')!s:>9}"
        )
    for row in rows:
        if row.get("warm_up_error"):
            print(f"warm-up failed in {row['path']} {row['dtype']}: {row['warm_up_error']}")
    print("ids equal to the eager loop:", results.get("ids_equal_eager"))


if __name__ == "__main__":
    main()
