"""``pldr-llm convert``: write a model in the project's own format, or as a Hugging Face export.

``--to pldr`` (default) writes ``config.json``, ``model.safetensors`` and ``tokenizer.model``
(plus ``tokenizer.vocab`` when the source has one): a folder ``--model`` accepts and that loads
without unpickling anything. ``--to hf`` hands the model to :func:`pldr_llm.hf.export.export_hf`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.vocab")
#: Files of a transformers export whose presence means DIR already holds a model.
HF_OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "configuration_pldrllm.py",
    "modeling_pldrllm.py",
)


HELP = "convert a model to the pldr-llm folder format (or a Hugging Face export)"
DESCRIPTION = (
    "Read a model (published bundle folder, pldr-llm folder or hub repository id) "
    "and write it as config.json + model.safetensors + tokenizer.model (--to pldr), or as a "
    "Hugging Face transformers folder (--to hf)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``convert`` command's options."""
    p.add_argument("--model", "-m", required=True, metavar="X", help="model folder or hub repo id")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--to", choices=("pldr", "hf"), default="pldr", help="output format (default: pldr)"
    )
    p.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer instead of the model's")
    p.add_argument(
        "--dtype",
        default=None,
        help="store weights as float32, bfloat16 or float16 (default: as they are)",
    )
    p.add_argument("--force", action="store_true", help="overwrite a model already in DIR")


def _export_hf() -> Any:
    from pldr_llm.core.errors import PLDRError

    try:
        from pldr_llm.hf.export import export_hf
    except ModuleNotFoundError as exc:
        if exc.name in ("pldr_llm.hf", "pldr_llm.hf.export"):
            raise PLDRError("--to hf needs pldr_llm.hf.export, which this build lacks") from None
        if exc.name and exc.name.split(".")[0] in ("transformers", "huggingface_hub"):
            raise PLDRError(f"--to hf needs '{exc.name}': pip install 'pldr-llm[hf]'") from None
        raise
    except ImportError as exc:
        raise PLDRError(f"--to hf is unavailable: {exc}") from None
    return export_hf


def run(args: argparse.Namespace) -> int:
    """Convert; prints the output folder on stdout."""
    from pldr_llm.bundle import bundle_summary, load_bundle, resolve_bundle, resolve_dtype
    from pldr_llm.commands.common import progress_bars_only_on_a_terminal
    from pldr_llm.core.errors import PLDRError

    progress_bars_only_on_a_terminal()

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise PLDRError(f"--out must be a folder, and {out_dir} is a file")
    dtype = resolve_dtype(args.dtype)
    export_hf = _export_hf() if args.to == "hf" else None
    if not args.force:
        names = OUTPUT_FILES if args.to == "pldr" else HF_OUTPUT_FILES
        present = [name for name in names if (out_dir / name).exists()]
        if present:
            raise PLDRError(
                f"{out_dir} already holds {', '.join(present)}; pass --force to overwrite"
            )
    files = resolve_bundle(args.model)
    if out_dir.exists() and out_dir.resolve() == files.root.resolve():
        raise PLDRError("--out must differ from the model's own folder")
    model, tokenizer = load_bundle(files, device="cpu", dtype=dtype, tokenizer=args.tokenizer)
    assert tokenizer is not None
    print(f"pldr-llm: loaded {bundle_summary(files, model)}", file=sys.stderr)

    if export_hf is not None:
        result = export_hf(model, tokenizer, out_dir)
        written = Path(result) if result is not None else out_dir
    else:
        model.save(out_dir)
        tokenizer.save(out_dir, name="tokenizer")
        stale = out_dir / "tokenizer.vocab"
        if tokenizer.vocab_path is None and stale.exists():  # left by an earlier --force run
            stale.unlink()
        written = out_dir
    print(f"pldr-llm: wrote {args.to} format to {written}", file=sys.stderr)
    print(written)
    return 0
