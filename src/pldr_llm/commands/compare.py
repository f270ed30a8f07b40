"""``pldr-llm compare A B``: deductive outputs of two models or G files side by side.

Each of A and B is a G file (the paper's ``.pkl`` pickles, read with a restricted unpickler, or a
pldr-llm safetensors G file) or a model (folder, checkpoint or hub repo id), run once without
caches on the prompt. Prints per layer and head the RMSE between the two G_LM and both spectra's
figures (rank, log|det|, largest singular value); ``--json`` and ``--plot`` write all of it.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path
from typing import Any

from pldr_llm.commands.inspect import (
    add_analysis_arguments,
    add_model_arguments,
    add_run_prompt_arguments,
    load_model,
    log,
    model_prompts,
    write_json,
)

_G_KEY = re.compile(r"^layer\d+\.G_LM$")


HELP = "compare the deductive outputs of two models or G files"
DESCRIPTION = (
    "Per layer and head RMSE between the G_LM (and A_LM, A, A_P where both have "
    "them) of A and B, with their spectra side by side. A and B are G files (.pkl, .pickle, "
    "or safetensors with layer{i}.G_LM keys) or models (run without caches on the first "
    "prompt; default prompt: the end-of-text token)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``compare`` command's options."""
    p.add_argument("a", metavar="A", help="model or G file")
    p.add_argument("b", metavar="B", help="model or G file")
    p.add_argument(
        "--tensor",
        default="G_LM",
        choices=["A", "A_LM", "A_P", "G_LM"],
        help="tensor whose spectra are shown (default: G_LM)",
    )
    add_run_prompt_arguments(p)
    p.add_argument("--json", metavar="OUT", help="write reports and RMSE as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="OUT.png", help="draw A - B heatmaps and overlaid spectra")
    add_analysis_arguments(p)
    add_model_arguments(p, model=False)
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout, no logs")


def is_g_file(spec: str) -> bool:
    """True when ``spec`` names a G file rather than a model.

    ``.pkl``/``.pickle`` files are G files; a ``.safetensors`` file is one when it has
    ``layer{i}.G_LM`` keys. Folders, other files (``.pth`` checkpoints) and hub ids are models.
    """
    path = Path(spec)
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return True
    if suffix != ".safetensors":
        return False
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size:
                return False
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError):
        return False
    return isinstance(header, dict) and any(_G_KEY.match(k) for k in header)


def _side(args: argparse.Namespace, spec: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Deductive tensors of one side, and a description of where they came from."""
    from pldr_llm.deductive import deductive_outputs, layer_tensors

    if is_g_file(spec):
        return layer_tensors(spec), {"kind": "g_file", "path": spec}
    model, tokenizer = load_model(args, spec)
    prompts, labels = model_prompts(args, model, tokenizer)
    log(args, f"{spec}: running prompt {labels[0]!r} without caches")
    return deductive_outputs(model, prompts[0]), {
        "kind": "model",
        "model": spec,
        "prompt": labels[0],
        "prompt_ids": prompts[0],
    }


def run(args: argparse.Namespace) -> int:
    """Compare A and B; prints a table on stdout, writes --json/--plot."""
    from pldr_llm.core.errors import PLDRError
    from pldr_llm.deductive import analyze_deductive, compare, plot_compare

    if args.rtol is not None and not args.rtol > 0:
        raise PLDRError(f"--rtol must be positive, got {args.rtol}")
    if args.plot:
        from pldr_llm.commands.inspect import _check_matplotlib

        _check_matplotlib()
    layers_a, source_a = _side(args, args.a)
    layers_b, source_b = _side(args, args.b)
    others = [n for n in ("A", "A_LM", "A_P", "G_LM") if n != args.tensor]
    report_a, report_b = (
        analyze_deductive(
            layers,
            rtol=args.rtol,
            batch_index=args.batch_index,
            tensor=args.tensor,
            others=others,
            source=source,
        )
        for layers, source in ((layers_a, source_a), (layers_b, source_b))
    )
    if (report_a.num_layers, report_a.num_heads, report_a.dk) != (
        report_b.num_layers,
        report_b.num_heads,
        report_b.dk,
    ):
        raise PLDRError(
            f"A has {report_a.num_layers} layers x {report_a.num_heads} heads, dk={report_a.dk}; "
            f"B has {report_b.num_layers} x {report_b.num_heads}, dk={report_b.dk}"
        )
    rmse = compare(layers_a, layers_b)
    if not args.quiet and args.json != "-":
        print(_table(args.tensor, rmse, report_a, report_b))
    if args.json:
        write_json(args.json, {"a": report_a.to_dict(), "b": report_b.to_dict(), "rmse": rmse})
        if args.json != "-":
            log(args, f"wrote {args.json}")
    if args.plot:
        summary = plot_compare(
            args.plot,
            layers_a,
            layers_b,
            labels=(Path(args.a).name or args.a, Path(args.b).name or args.b),
            tensor=args.tensor,
            report_a=report_a,
            report_b=report_b,
            batch_index=args.batch_index,
        )
        log(args, f"wrote {summary.path} ({summary.width}x{summary.height})")
    return 0


def _table(tensor: str, rmse: dict[str, Any], a: Any, b: Any) -> str:
    overall = "; ".join(f"{n} {v:.4e}" for n, v in rmse["overall"].items())
    lines = [
        f"RMSE A vs B (overall): {overall}",
        f"{tensor} per head: rank, log|det| and s_max of A | B",
        f"{'layer':>5} {'head':>4} {'rmse':>11} {'rank':>9} {'log|det| A':>12} {'log|det| B':>12} "
        f"{'s_max A':>10} {'s_max B':>10}",
    ]
    for i, layer in enumerate(rmse["layers"]):
        per_head = layer.get(tensor)
        for h in range(a.num_heads):
            sa, sb = a.layers[i][h], b.layers[i][h]
            value = f"{per_head[h]:>11.4e}" if per_head is not None else f"{'-':>11}"
            lines.append(
                f"{i:>5} {h:>4} {value} {f'{sa.rank}|{sb.rank}':>9} {sa.log_abs_det:>12.5g} "
                f"{sb.log_abs_det:>12.5g} {sa.singular_values[0]:>10.4g} {sb.singular_values[0]:>10.4g}"
            )
    return "\n".join(lines)
