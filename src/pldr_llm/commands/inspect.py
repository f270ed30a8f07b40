"""``pldr-llm inspect``: figures of a model's deductive outputs, or of a stored G_LM list.

``pldr-llm inspect --model X --prompt TEXT`` runs the model with and without KV-/G-cache and
reports per layer and head the singular values, numerical rank, ``log|det|`` with sign and RMS of
G_LM (A, A_LM, A_P in the JSON), and the RMSE between cached and uncached deductive outputs and
across prompts. ``pldr-llm inspect --g-file FILE`` does the same for a G file (the paper's
pickles, read with a restricted unpickler, or the project's safetensors G files).
``pldr-llm inspect --model X --leak --text FILE`` runs the causal-leak audit
(:func:`pldr_llm.deductive.leak_audit`). See docs/deductive.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pldr_llm.commands.common import (
    add_model_arguments,
    add_prompt_arguments,
    log,
    read_prompts,
)

HELP = "spectra, ranks, determinants and cache invariance of deductive outputs"
DESCRIPTION = (
    "Report per layer and head the singular values, numerical rank, log|det| "
    "and RMS of G_LM -- of a model (run on prompts with and without caches, with the RMSE "
    "between cached and uncached deductive outputs and across prompts) or of a stored G_LM "
    "list (--g-file: the paper's pickles or a pldr-llm safetensors G file)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``inspect`` command's options."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", "-m", metavar="X", help="model folder or hub repo id")
    source.add_argument(
        "--g-file", metavar="FILE", help="G_LM list: the paper's .pkl or a safetensors G file"
    )
    add_run_prompt_arguments(p)
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        metavar="N",
        help="greedy decoding steps compared across cache modes (default: 2)",
    )
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="OUT.png", help="draw heatmaps and singular-value spectra")
    p.add_argument(
        "--save-g",
        metavar="FILE",
        help="write the G-cache ((A_LM, G_LM) per layer) as safetensors, for generate --g-init "
        "and v510G training",
    )
    add_analysis_arguments(p)
    leak = p.add_argument_group("causal-leak audit (with --model)")
    leak.add_argument(
        "--leak",
        action="store_true",
        help="score --text as trained, causally (each prefix alone) and as generation does "
        "(A and G_LM frozen on the first --prefix tokens)",
    )
    leak.add_argument("--text", metavar="FILE", help="UTF-8 text scored by --leak")
    leak.add_argument(
        "--prefix",
        type=int,
        default=None,
        metavar="P",
        help="prompt length (tokens) on which generation freezes A and G_LM (default: half)",
    )
    leak.add_argument(
        "--block",
        type=int,
        default=16,
        metavar="N",
        help="prefixes per batch in the causal pass (default: 16)",
    )
    add_model_arguments(p, model=False)
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout, no logs")


# ---------------------------------------------------------------------- shared with compare


def add_run_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """The prompts a model runs on to show its deductive outputs (``inspect``, ``compare``)."""
    add_prompt_arguments(
        p,
        "prompt text (repeat to compare prompts); default: the end-of-text token alone",
        "one prompt per line (blank lines skipped)",
        ids=True,
    )


def add_analysis_arguments(p: argparse.ArgumentParser) -> None:
    """``--rtol`` and ``--batch-index``."""
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        metavar="R",
        help="rank tolerance relative to the largest singular value (default: "
        "max(m, n) * eps of the stored dtype, numpy's matrix_rank rule)",
    )
    p.add_argument(
        "--batch-index",
        type=int,
        default=0,
        metavar="B",
        help="batch row analysed when a G file holds several (default: 0)",
    )


def read_prompt_texts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
    """``--prompt`` values then the non-blank lines of ``--prompt-file`` (stripped)."""
    return [text.strip() for text in read_prompts(prompts, prompt_file)]


def parse_ids(text: str) -> list[int]:
    """``'12 7 99'``, ``'12,7,99'`` or ``'[12, 7, 99]'`` -> ``[12, 7, 99]``."""
    from pldr_llm.core.errors import PLDRError

    parts = text.replace("[", " ").replace("]", " ").replace(",", " ").split()
    try:
        ids = [int(x) for x in parts]
    except ValueError:
        raise PLDRError(f"--prompt-ids must be integers, got {text!r}") from None
    if not ids:
        raise PLDRError("--prompt-ids is empty")
    return ids


def load_model(
    args: argparse.Namespace, spec: str, require_tokenizer: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer or None)`` for ``spec`` through :func:`pldr_llm.bundle.load_bundle`;
    the tokenizer is required with ``require_tokenizer`` or when there are text prompts."""
    from pldr_llm.bundle import load_bundle

    # Prompts given as ids need no tokenizer, so a bare model folder (config + weights) works.
    texts = bool(getattr(args, "prompt", None) or getattr(args, "prompt_file", None))
    return load_bundle(
        spec,
        device=args.device,
        dtype=args.dtype,
        tokenizer=getattr(args, "tokenizer", None) or None,
        require_tokenizer=require_tokenizer or texts,
    )


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """The ids ``pldr-llm generate`` would feed the model for ``text``."""
    from pldr_llm.core.errors import PLDRError

    if tokenizer is None:
        raise PLDRError("this model has no tokenizer: give prompts with --prompt-ids")
    if hasattr(tokenizer, "prompt_ids"):
        return list(tokenizer.prompt_ids(text))
    return list(tokenizer.encode(text))


def model_prompts(
    args: argparse.Namespace, model: Any, tokenizer: Any
) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt, and a label for each (the text, or the ids)."""
    texts = read_prompt_texts(args.prompt, args.prompt_file)
    ids = [encode_prompt(tokenizer, t) for t in texts]
    labels = list(texts)
    for spec in args.prompt_ids or []:
        ids.append(parse_ids(spec))
        labels.append(spec)
    if not ids:
        # The original's v510Gi infers G_LM from the end-of-text token alone: a neutral default.
        eos = int(getattr(model.config, "eos_id", 3))
        ids, labels = [[eos]], [f"<end-of-text id {eos}>"]
    return ids, labels


def write_json(path: str, data: Any) -> None:
    """Write standard JSON (no NaN/Infinity) to ``path`` ('-': stdout)."""
    import json

    text = json.dumps(data, indent=1, allow_nan=False)
    if path == "-":
        sys.stdout.write(text + "\n")
    else:
        from pldr_llm.core.fileio import atomic_write_text

        atomic_write_text(path, text + "\n")  # atomic; /dev/full errors name the path


# ---------------------------------------------------------------------- run


def _rmse_summary(rmse: dict[str, Any]) -> list[str]:
    lines = []
    cached = rmse.get("cached_vs_uncached")
    if cached:
        lines.append(
            "cached vs uncached (overall RMSE per tensor; vs prompt pass | vs same step uncached):"
        )
        for mode, steps in cached["modes"].items():
            for step in steps:
                vp = step["vs_prompt"]["overall"]
                vu = step.get("vs_uncached", {}).get("overall", {})
                cells = []
                for name, value in vp.items():
                    other = f"{vu[name]:.3e}" if name in vu else "-"
                    cells.append(f"{name} {value:.3e} | {other}")
                lines.append(f"  {mode} step {step['step']}: " + "; ".join(cells))
    across = rmse.get("across_prompts")
    if across and across["pairs"]:
        lines.append("across prompts (overall RMSE vs prompt 0):")
        for pair in across["pairs"]:
            cells = [f"{n} {v:.3e}" for n, v in pair["overall"].items()]
            lines.append(f"  prompt {pair['b']}: " + "; ".join(cells))
    return lines


def run(args: argparse.Namespace) -> int:
    """Inspect a model or a G file; prints a table on stdout, writes --json/--plot/--save-g."""
    from pldr_llm.core.errors import PLDRError

    if args.steps < 1:
        raise PLDRError(f"--steps must be at least 1, got {args.steps}")
    if args.rtol is not None and not args.rtol > 0:
        raise PLDRError(f"--rtol must be positive, got {args.rtol}")
    if args.plot:
        _check_matplotlib()
    if args.leak or args.text:
        return _run_leak(args)
    if args.g_file:
        if args.prompt or args.prompt_file or args.prompt_ids:
            raise PLDRError("prompts go with --model, not with --g-file")
        return _run_g_file(args)
    return _run_model(args)


def _check_matplotlib() -> None:
    from pldr_llm.core.errors import PLDRError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PLDRError("--plot needs matplotlib: pip install 'pldr-llm[plot]'") from None


def _run_g_file(args: argparse.Namespace) -> int:
    from pldr_llm.deductive import analyze_g_list, plot_deductive
    from pldr_llm.gfile import load_g_file, save_g_file

    entries = load_g_file(args.g_file)
    report = analyze_g_list(
        entries,
        rtol=args.rtol,
        batch_index=args.batch_index,
        source={"kind": "g_file", "path": str(args.g_file)},
    )
    _emit(args, report.summary(), report.to_dict())
    if args.plot:
        summary = plot_deductive(
            args.plot,
            entries,
            report=report,
            batch_index=args.batch_index,
            title=Path(args.g_file).name,
        )
        log(args, f"wrote {summary.path} ({summary.width}x{summary.height})")
    if args.save_g:
        out = save_g_file(args.save_g, entries, metadata={"source": str(args.g_file)})
        log(args, f"wrote G-cache {out}")
    return 0


def _emit(args: argparse.Namespace, table: str, data: dict[str, Any]) -> None:
    if not args.quiet and args.json != "-":
        print(table)
    if args.json:
        write_json(args.json, data)
        if args.json != "-":
            log(args, f"wrote {args.json}")


def _run_model(args: argparse.Namespace) -> int:
    from pldr_llm.deductive import inspect_model, plot_deductive
    from pldr_llm.gfile import save_g_file

    model, tokenizer = load_model(args, args.model)
    prompts, labels = model_prompts(args, model, tokenizer)
    source = {"kind": "model", "model": str(args.model), "prompts": labels, "steps": args.steps}
    result = inspect_model(model, prompts, steps=args.steps, rtol=args.rtol, source=source)
    report = result.report
    table = "\n".join([report.summary(), *_rmse_summary(report.rmse)])
    _emit(args, table, report.to_dict())
    if args.plot:
        summary = plot_deductive(
            args.plot, result.prompt_outputs[0], report=report, title=f"{args.model}: {labels[0]}"
        )
        log(args, f"wrote {summary.path} ({summary.width}x{summary.height})")
    if args.save_g:
        out = save_g_file(
            args.save_g,
            result.g_cache,
            metadata={"source": str(args.model), "prompt": labels[0], "prompt_ids": prompts[0]},
        )
        log(args, f"wrote G-cache {out}")
    return 0


def _run_leak(args: argparse.Namespace) -> int:
    from pldr_llm.core.errors import PLDRError
    from pldr_llm.deductive import leak_audit, plot_leak

    if not args.leak:
        raise PLDRError("--text goes with --leak")
    if not args.model or not args.text:
        raise PLDRError("--leak needs --model and --text")
    if args.prompt or args.prompt_file or args.prompt_ids:
        raise PLDRError("--leak scores --text; prompts do not apply")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PLDRError(f"cannot read --text {args.text}: {exc}") from None
    model, tokenizer = load_model(args, args.model, require_tokenizer=True)
    ids = list(tokenizer.encode(text))
    max_len = int(model.config.max_seq_len)
    if len(ids) > max_len:
        log(args, f"--text has {len(ids)} tokens; scoring the first {max_len} (max_seq_len)")
        ids = ids[:max_len]
    source = {"kind": "model", "model": str(args.model), "text": str(args.text)}
    audit = leak_audit(model, ids, prompt_len=args.prefix, block=args.block, source=source)
    _emit(args, audit.summary(), audit.to_dict())
    if args.plot:
        summary = plot_leak(args.plot, audit, title=f"{args.model}: {Path(args.text).name}")
        log(args, f"wrote {summary.path} ({summary.width}x{summary.height})")
    return 0
