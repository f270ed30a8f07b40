"""Speed benchmark of PLDR-LLM on one GPU: the eager path, the optimized path, a Llama baseline.

``python -m pldr_llm.bench`` runs, in one process on one GPU, with the 110M configuration
(5 layers, d_model 896, 14 heads, dff 2389, A_dff 170, 8 residual units of 2 GLUs, vocab 32000):

* training tokens/s and peak memory at batch 16 and 32, context 1024, bf16 autocast, AdamW;
* a 200-step loss curve of the eager and the optimized path from the same initial weights;
* greedy decoding tokens/s at batch 1 and 64 (32-token prompt, 256 new tokens, KV+G cache, fp32)
  and whether the ids equal the eager path's;
* prefill latency of 1 x 1024 tokens (bf16 and fp32 weights);

each figure with its ratio against the eager path, and the same-size ``transformers`` Llama
(SDPA) when transformers is installed. It prints a table and writes JSON (``--json``).
``--quick`` is a small smoke run (it also runs on the CPU, without compile and CUDA graphs).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pldr_llm.config import PLDRConfig
from pldr_llm.fast import (
    CapturedForward,
    StaticDecoder,
    causal_lm_loss,
    compile_decoder_layers,
    packed_causal_lm_loss,
)
from pldr_llm.generation import generate
from pldr_llm.losses import masked_cross_entropy
from pldr_llm.model import PLDRModel

FULL_CONFIG = PLDRConfig().to_hpdict()  # the defaults are the paper's 110M configuration
QUICK_CONFIG = dict(
    num_layers=2,
    d_model=128,
    num_heads=4,
    dff=256,
    A_dff=32,
    num_reslayerA=2,
    num_denseA=2,
    input_vocab_size=1000,
    max_seq_len=128,
)
SECTIONS = ("train", "decode", "prefill", "curve")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def new_pldr(config: PLDRConfig, device: torch.device, seed: int = 0) -> PLDRModel:
    torch.manual_seed(seed)
    return PLDRModel(config).to(device)


def llama_config(config: PLDRConfig):
    """A transformers Llama of the same width, depth, heads, FFN size and vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.input_vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.dff,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )


def new_llama(config: PLDRConfig, device: torch.device, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(config)).to(device)


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------- training
LossFn = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def full_logits_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss: all logits, then the masked cross-entropy (what the eager path does)."""
    return masked_cross_entropy(model(inputs).logits, targets)


def llama_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return masked_cross_entropy(model(input_ids=inputs, use_cache=False).logits, targets)


def chunked_loss(compile_chunks: bool, packed: bool = False) -> LossFn:
    function = packed_causal_lm_loss if packed else causal_lm_loss

    def loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return function(model, inputs, targets, compile_chunks=compile_chunks)

    return loss


def train_step_fn(model, optimizer, loss_fn: LossFn, device: torch.device):
    """The benchmark's minimal training step: bf16 autocast, masked CE, backward, AdamW."""
    graphed = getattr(model, "uses_cudagraphs", False)

    def step(batch: torch.Tensor) -> torch.Tensor:
        if graphed:  # a new iteration: the CUDA-graph trees may reuse the last one's memory
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_optimizer(model, device: torch.device, lr: float = 3e-4):
    return torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda"
    )


def measure_training(
    build: Callable[[], Any],
    loss_fn: LossFn,
    batch: int,
    length: int,
    vocab: int,
    warmup: int,
    steps: int,
    device: torch.device,
    profile_path: Path | None = None,
) -> dict[str, Any]:
    free_memory(device)
    model = build()
    model.train()
    optimizer = make_optimizer(model, device)
    step = train_step_fn(model, optimizer, loss_fn, device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    # Random ids from 1 (no padding id): packed batches, so attention is plainly causal.
    batches = [
        torch.randint(1, vocab, (batch, length + 1), generator=generator).to(device)
        for _ in range(4)
    ]
    start = time.perf_counter()
    for i in range(warmup):
        step(batches[i % 4])
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step(batches[i % 4]) for i in range(steps)]
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {
        "tokens_per_s": batch * length * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_gib": peak_gib(device),
        "warmup_s": warmup_s,
        "last_loss": float(losses[-1]),
    }
    if profile_path is not None:
        result["profile"] = str(profile_training(step, batches, device, profile_path))
    del model, optimizer, step, batches, losses
    free_memory(device)
    return result


def profile_training(step, batches, device: torch.device, path: Path) -> Path:
    """torch.profiler over 3 steps: the top operators by host time and by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            step(batches[i % 4])
        synchronize(device)
    averages = prof.key_averages()
    parts = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device.type == "cuda":
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                parts.append(averages.table(sort_by=key, row_limit=30))
                break
            except Exception:  # the key's name changed across torch versions
                continue
    path.write_text("\n\n".join(parts))
    return path


def training_variants(
    config: PLDRConfig, device: torch.device, use_compile: bool
) -> dict[str, tuple[Callable[[], Any], LossFn]]:
    def pldr(
        implementation: str, compiled: bool = False, cudagraphs: bool = False
    ) -> Callable[[], Any]:
        def build():
            model = new_pldr(config, device)
            model.attn_implementation = implementation
            if cudagraphs:
                # Inductor + CUDA-graph trees: each layer's forward and backward replay as one
                # graph, removing the per-kernel launch cost of the metric learner's small ops.
                compile_decoder_layers(model, mode="reduce-overhead")
                model.uses_cudagraphs = True
            elif compiled:
                compile_decoder_layers(model)
            return model

        return build

    on_gpu = device.type == "cuda"
    variants: dict[str, tuple[Callable[[], Any], LossFn]] = {
        "eager": (pldr("eager"), full_logits_loss),
        "sdpa": (pldr("sdpa"), full_logits_loss),
        "sdpa+chunked CE": (pldr("sdpa"), chunked_loss(compile_chunks=on_gpu and use_compile)),
    }
    if use_compile:
        variants["optimized (sdpa+CE+compile)"] = (
            pldr("sdpa", compiled=True),
            chunked_loss(compile_chunks=on_gpu),
        )
        variants["optimized+packed (no host syncs)"] = (
            pldr("sdpa", compiled=True),
            chunked_loss(compile_chunks=on_gpu, packed=True),
        )
        variants["optimized+packed+cudagraphs"] = (
            pldr("sdpa", cudagraphs=True),
            chunked_loss(compile_chunks=on_gpu, packed=True),
        )
    if have_transformers():
        variants["llama (transformers, sdpa)"] = (lambda: new_llama(config, device), llama_loss)
    return variants


def section_train(cfg: dict[str, Any], config: PLDRConfig, device: torch.device) -> dict:
    results: dict[str, Any] = {}
    variants = training_variants(config, device, cfg["compile"])
    if cfg["only"]:
        variants = {k: v for k, v in variants.items() if k == "eager" or k in cfg["only"]}
    profile_dir = cfg["profile_dir"]
    for batch in cfg["train_batches"]:
        key = f"batch {batch}"
        results[key] = {}
        for name, (build, loss_fn) in variants.items():
            log(f"train {key}: {name}")
            profile_path = None
            if profile_dir is not None and name.startswith("optimized"):
                slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
                profile_path = Path(profile_dir) / f"profile_b{batch}_{slug}.txt"
            try:
                results[key][name] = measure_training(
                    build,
                    loss_fn,
                    batch,
                    cfg["context"],
                    config.input_vocab_size,
                    cfg["train_warmup"],
                    cfg["train_steps"],
                    device,
                    profile_path,
                )
                log(f"  {results[key][name]}")
            except Exception as error:  # one failing variant must not stop the others
                results[key][name] = {"error": f"{type(error).__name__}: {error}"}
                log(traceback.format_exc())
                free_memory(device)
    return results


# ---------------------------------------------------------------------------------- curve
def markov_batches(
    steps: int, batch: int, length: int, vocab: int, device: torch.device, active: int = 2048
) -> torch.Tensor:
    """[steps, batch, length + 1] ids from a fixed random Markov chain: each of ``active`` ids has
    4 possible successors, so the loss can fall from ln(vocab) towards ln(4)."""
    generator = torch.Generator(device="cpu").manual_seed(7)
    active = min(active, vocab - 1)
    successors = torch.randint(1, active + 1, (active + 1, 4), generator=generator).to(device)
    rows = steps * batch
    ids = torch.empty(rows, length + 1, dtype=torch.long, device=device)
    ids[:, 0] = torch.randint(1, active + 1, (rows,), generator=generator).to(device)
    choice = torch.randint(0, 4, (rows, length + 1), generator=generator).to(device)
    for t in range(1, length + 1):
        ids[:, t] = successors[ids[:, t - 1], choice[:, t]]
    return ids.view(steps, batch, length + 1)


def section_curve(cfg: dict[str, Any], config: PLDRConfig, device: torch.device) -> dict:
    steps, batch, length = cfg["curve_steps"], cfg["curve_batch"], cfg["context"]
    data = markov_batches(steps, batch, length, config.input_vocab_size, device)
    on_gpu = device.type == "cuda"
    variants: dict[str, tuple[str, bool, LossFn]] = {
        "eager": ("eager", False, full_logits_loss),
        "optimized": (
            "sdpa",
            cfg["compile"],
            chunked_loss(compile_chunks=on_gpu and cfg["compile"]),
        ),
    }
    curves: dict[str, list[float]] = {}
    times: dict[str, float] = {}
    for name, (implementation, compiled, loss_fn) in variants.items():
        log(f"curve: {name} ({steps} steps, batch {batch})")
        free_memory(device)
        model = new_pldr(config, device, seed=3)
        model.attn_implementation = implementation
        if compiled:
            compile_decoder_layers(model)
        model.train()
        optimizer = make_optimizer(model, device, lr=5e-4)
        warm = max(1, steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s, warm=warm: min(1.0, (s + 1) / warm)
        )
        step = train_step_fn(model, optimizer, loss_fn, device)
        losses = []
        start = time.perf_counter()
        for i in range(steps):
            losses.append(step(data[i]))
            schedule.step()
        synchronize(device)
        times[name] = time.perf_counter() - start
        curves[name] = [float(v) for v in losses]
        del model, optimizer, step
    diffs = [abs(a - b) for a, b in zip(curves["eager"], curves["optimized"])]
    tail = max(1, steps // 4)
    return {
        "steps": steps,
        "batch": batch,
        "context": length,
        "curves": curves,
        "seconds": times,
        "max_abs_diff": max(diffs),
        "mean_abs_diff_last_quarter": statistics.fmean(diffs[-tail:]),
        "first_loss": {k: v[0] for k, v in curves.items()},
        "final_loss": {k: v[-1] for k, v in curves.items()},
        "max_rel_diff": max(d / max(abs(a), 1e-12) for d, a in zip(diffs, curves["eager"])),
    }


# ---------------------------------------------------------------------------------- decoding
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def ids_agreement(ids: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    same = ids.shape == reference.shape and bool(torch.equal(ids.cpu(), reference.cpu()))
    result: dict[str, Any] = {"ids_equal_eager": same}
    if not same and ids.shape == reference.shape:
        rows = (ids.cpu() != reference.cpu()).any(1)
        result["rows_differing"] = int(rows.sum())
        first = (ids.cpu() != reference.cpu()).long().argmax(1)[rows]
        result["first_difference_at"] = int(first.min())
    return result


def section_decode(cfg: dict[str, Any], config: PLDRConfig, device: torch.device) -> dict:
    torch.set_float32_matmul_precision("highest")  # fp32 decoding: no TF32, same ids expected
    prompt_len, new = cfg["prompt_len"], cfg["new_tokens"]
    free_memory(device)
    model = new_pldr(config, device).eval()
    llama = new_llama(config, device).eval() if have_transformers() else None
    results: dict[str, Any] = {}
    for batch in cfg["decode_batches"]:
        key = f"batch {batch}"
        row: dict[str, Any] = {}
        results[key] = row
        generator = torch.Generator(device="cpu").manual_seed(11 + batch)
        prompt = torch.randint(
            1, config.input_vocab_size, (batch, prompt_len), generator=generator
        ).to(device)
        reference = None
        for name, implementation in (("eager", "eager"), ("sdpa (generate)", "sdpa")):
            log(f"decode {key}: {name}")
            model.attn_implementation = implementation
            generate(model, prompt, 4, top_k=1, stop_at_eos=False)  # warm-up
            ids, seconds = timed(
                partial(generate, model, prompt, new, top_k=1, stop_at_eos=False), device
            )
            row[name] = {"tokens_per_s": batch * new / seconds, "seconds": seconds}
            if reference is None:
                reference = ids
            else:
                row[name].update(ids_agreement(ids, reference))
            log(f"  {row[name]}")
        model.attn_implementation = "sdpa"
        graph_variants = [("static+graph", False)]
        if cfg["compile"]:
            graph_variants.append(("static+graph+compile", True))
        for name, compiled in graph_variants:
            log(f"decode {key}: {name}")
            try:
                decoder, build_s = timed(
                    partial(StaticDecoder, model, batch, prompt_len + new, compile=compiled),
                    device,
                )
                decoder.generate(prompt, 4, stop_at_eos=False)  # warm-up
                (ids, _), seconds = timed(
                    partial(decoder.generate, prompt, new, stop_at_eos=False), device
                )
                row[name] = {
                    "tokens_per_s": batch * new / seconds,
                    "seconds": seconds,
                    "build_s": build_s,
                    **ids_agreement(ids, reference),
                }
                del decoder
            except Exception as error:
                row[name] = {"error": f"{type(error).__name__}: {error}"}
                log(traceback.format_exc())
            log(f"  {row[name]}")
        if cfg["compile"] and cfg["decode_bf16"]:
            # Not the fp32 reference: bf16 weights halve the bytes read per token.
            name = "static+graph+compile, bf16 weights"
            log(f"decode {key}: {name}")
            try:
                half = copy.deepcopy(model).to(torch.bfloat16)
                decoder = StaticDecoder(half, batch, prompt_len + new, compile=True)
                decoder.generate(prompt, 4, stop_at_eos=False)
                (ids, _), seconds = timed(
                    partial(decoder.generate, prompt, new, stop_at_eos=False), device
                )
                row[name] = {
                    "tokens_per_s": batch * new / seconds,
                    "seconds": seconds,
                    **ids_agreement(ids, reference),
                }
                del decoder, half
            except Exception as error:
                row[name] = {"error": f"{type(error).__name__}: {error}"}
                log(traceback.format_exc())
            log(f"  {row[name]}")
        if llama is not None:
            log(f"decode {key}: llama")
            run_llama = partial(
                llama.generate,
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                pad_token_id=0,
            )
            try:
                with torch.no_grad():
                    run_llama(max_new_tokens=4, min_new_tokens=4)
                    _, seconds = timed(
                        partial(run_llama, max_new_tokens=new, min_new_tokens=new), device
                    )
                row["llama (transformers generate)"] = {
                    "tokens_per_s": batch * new / seconds,
                    "seconds": seconds,
                }
            except Exception as error:
                row["llama (transformers generate)"] = {"error": f"{type(error).__name__}: {error}"}
                log(traceback.format_exc())
    del model, llama
    free_memory(device)
    return results


# ---------------------------------------------------------------------------------- prefill
def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _, seconds = timed(fn, device)
        samples.append(1000 * seconds)
    return statistics.median(samples)


def section_prefill(cfg: dict[str, Any], config: PLDRConfig, device: torch.device) -> dict:
    length = cfg["prefill_len"]
    results: dict[str, Any] = {}
    base = new_pldr(config, device).eval()
    llama_base = new_llama(config, device).eval() if have_transformers() else None
    generator = torch.Generator(device="cpu").manual_seed(5)
    ids = torch.randint(1, config.input_vocab_size, (1, length), generator=generator).to(device)
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        key = f"1x{length} {dtype_name}"
        row: dict[str, Any] = {}
        results[key] = row
        model = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            for name, implementation in (("eager", "eager"), ("sdpa (forward)", "sdpa")):
                log(f"prefill {key}: {name}")
                model.attn_implementation = implementation
                forward = partial(model, ids, logits_to_keep=1)
                row[name] = {"ms": median_ms(forward, device, cfg["repeats"])}
            model.attn_implementation = "sdpa"
            log(f"prefill {key}: graph")
            try:
                captured = CapturedForward(model, 1, length)
                row["captured graph"] = {
                    "ms": median_ms(partial(captured, ids), device, cfg["repeats"])
                }
                reference = model(ids, logits_to_keep=1).logits.float()
                got = captured(ids).logits.float()
                row["captured graph"]["max_abs_diff_vs_forward"] = float(
                    (got - reference).abs().max()
                )
                del captured
            except Exception as error:
                row["captured graph"] = {"error": f"{type(error).__name__}: {error}"}
                log(traceback.format_exc())
            if llama_base is not None:
                llama = copy.deepcopy(llama_base).to(dtype)
                row["llama (forward)"] = {
                    "ms": median_ms(
                        partial(llama, input_ids=ids, logits_to_keep=1, use_cache=True),
                        device,
                        cfg["repeats"],
                    )
                }
                del llama
        log(f"  {row}")
        del model
        free_memory(device)
    return results


# ---------------------------------------------------------------------------------- report
def ratio(value: float | None, reference: float | None, higher_is_better: bool) -> str:
    if value is None or reference is None or value == 0 or reference == 0:
        return ""
    r = value / reference if higher_is_better else reference / value
    return f"{r:.2f}x"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, variant, value, ratio vs eager) rows; speed-ups > 1 are better than eager."""
    rows: list[tuple[str, str, str, str]] = []
    for batch, variants in results.get("train", {}).items():
        eager = variants.get("eager", {})
        for name, r in variants.items():
            if "error" in r:
                rows.append((f"train {batch} tok/s", name, "ERROR", r["error"][:60]))
                continue
            rows.append(
                (
                    f"train {batch} tok/s",
                    name,
                    f"{r['tokens_per_s']:,.0f}",
                    ratio(r["tokens_per_s"], eager.get("tokens_per_s"), True),
                )
            )
            if r.get("peak_gib") is not None:
                rows.append(
                    (
                        f"train {batch} peak GiB",
                        name,
                        f"{r['peak_gib']:.1f}",
                        ratio(r["peak_gib"], eager.get("peak_gib"), False),
                    )
                )
    for batch, variants in results.get("decode", {}).items():
        eager = variants.get("eager", {})
        for name, r in variants.items():
            if "error" in r:
                rows.append((f"decode {batch} tok/s", name, "ERROR", r["error"][:60]))
                continue
            same = r.get("ids_equal_eager")
            note = "" if same is None else (" (ids = eager)" if same else " (ids DIFFER)")
            rows.append(
                (
                    f"decode {batch} tok/s",
                    name + note,
                    f"{r['tokens_per_s']:,.0f}",
                    ratio(r["tokens_per_s"], eager.get("tokens_per_s"), True),
                )
            )
    for key, variants in results.get("prefill", {}).items():
        eager = variants.get("eager", {})
        for name, r in variants.items():
            if "error" in r:
                rows.append((f"prefill {key} ms", name, "ERROR", r["error"][:60]))
                continue
            rows.append(
                (
                    f"prefill {key} ms",
                    name,
                    f"{r['ms']:.2f}",
                    ratio(r["ms"], eager.get("ms"), False),
                )
            )
    curve = results.get("curve")
    if curve and "error" not in curve:
        rows.append(
            (
                f"loss curve {curve['steps']} steps",
                "optimized vs eager",
                f"max |d| {curve['max_abs_diff']:.4f}",
                f"final {curve['final_loss']['eager']:.3f} / {curve['final_loss']['optimized']:.3f}",
            )
        )
    return rows


def format_table(results: dict[str, Any]) -> str:
    rows = [("figure", "variant", "value", "vs eager")] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if index == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "command": "python -m pldr_llm.bench " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def raise_recompile_limits(limit: int = 64) -> None:
    """One process compiles several shapes (batch 16 and 32, decode batches): let dynamo keep
    them all instead of falling back to eager after its default 8 entries."""
    import torch._dynamo.config as dynamo_config

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pldr_llm.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (CPU allowed)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--curve-steps", type=int, default=None, help="loss-curve steps (200)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--train-batches", default=None, help="comma-separated (16,32)")
    parser.add_argument(
        "--only", default="", help="comma-separated training variants to run (eager always runs)"
    )
    parser.add_argument("--profile-dir", default=None, help="profile the optimized steps here")
    parser.add_argument(
        "--decode-bf16", action="store_true", help="also decode with bf16 weights (compiled)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"pldr_llm.bench: error: unknown sections {unknown}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.quick:
        device = torch.device("cpu")
        log("no CUDA device: running the --quick smoke run on the CPU (no compile, no graphs)")
    else:
        print(
            "pldr_llm.bench: error: no CUDA GPU found; the benchmark measures GPU speed "
            "(use --quick for a CPU smoke run)",
            file=sys.stderr,
        )
        return 2
    on_gpu = device.type == "cuda"
    raise_recompile_limits()
    config = PLDRConfig.from_hpdict(QUICK_CONFIG if args.quick else FULL_CONFIG)
    cfg: dict[str, Any] = {
        "compile": on_gpu and not args.no_compile,
        "context": 64 if args.quick else 1024,
        "train_batches": (2, 4) if args.quick else (16, 32),
        "train_warmup": 2 if args.quick else 3,
        "train_steps": 2 if args.quick else 10,
        "curve_steps": 6 if args.quick else 200,
        "curve_batch": 2 if args.quick else 16,
        "prompt_len": 8 if args.quick else 32,
        "new_tokens": 16 if args.quick else 256,
        "decode_batches": (1, 4) if args.quick else (1, 64),
        "prefill_len": 64 if args.quick else 1024,
        "repeats": 3 if args.quick else 20,
    }
    if args.curve_steps is not None:
        cfg["curve_steps"] = args.curve_steps
    if args.train_steps is not None:
        cfg["train_steps"] = args.train_steps
    if args.train_batches:
        cfg["train_batches"] = tuple(int(b) for b in args.train_batches.split(","))
    cfg["only"] = [v.strip() for v in args.only.split(",") if v.strip()]
    cfg["profile_dir"] = args.profile_dir
    cfg["decode_bf16"] = args.decode_bf16
    results: dict[str, Any] = {
        "meta": environment(device, argv),
        "config": config.to_hpdict(),
        "settings": cfg,
    }
    log(f"{results['meta']}")
    path = Path(args.json)
    runners = {
        "train": section_train,
        "curve": section_curve,
        "decode": section_decode,
        "prefill": section_prefill,
    }
    for name in sections:
        start = time.perf_counter()
        try:
            results[name] = runners[name](cfg, config, device)
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            log(traceback.format_exc())
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        log(f"section {name} done in {results['section_seconds'][name]:.1f} s")
        path.write_text(json.dumps(results, indent=1))
    print(format_table(results))
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
