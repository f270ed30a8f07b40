"""``pldr-llm tokenizer``: train a SentencePiece tokenizer, or encode/decode with one.

``pldr-llm tokenizer train --input FILES --vocab-size N --out PREFIX`` trains a unigram model
with the original PLDR-LLM conventions (see :func:`pldr_llm.tokenizer.train_tokenizer`).
``pldr-llm tokenizer encode --tokenizer T TEXT`` prints the ids the original would feed the model.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "train or use a SentencePiece tokenizer"
DESCRIPTION = (
    "Train a SentencePiece tokenizer with the original PLDR-LLM conventions, "
    "or encode/decode text with one."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tokenizer`` command's options."""
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")

    train = sub.add_parser(
        "train",
        help="train a unigram tokenizer (pad 0, unk 1, start 2, end 3, [SEP], [CLS])",
        description="Train a unigram SentencePiece tokenizer: pad 0 [PAD], unk 1 [UNK], start 2 "
        "[START], end 3 [END], user pieces [SEP] [CLS], split digits, byte fallback. Inputs are "
        "streamed: plain text (one sentence per line; .gz/.bz2/.xz too), JSON lines and parquet "
        "(the text field is --column).",
    )
    # Each option's dest is the name of train_tokenizer's parameter it fills (options_for).
    train.add_argument(
        "--input",
        "-i",
        dest="inputs",
        nargs="+",
        required=True,
        metavar="FILE",
        help="input files",
    )
    train.add_argument(
        "--vocab-size", type=int, required=True, metavar="N", help="number of pieces"
    )
    train.add_argument(
        "--out",
        dest="out_prefix",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.model and PREFIX.vocab",
    )
    train.add_argument(
        "--column", default=None, help="text field of JSON-lines/parquet records (default: text)"
    )
    train.add_argument(
        "--input-sentence-size",
        type=int,
        default=5_000_000,
        metavar="N",
        help="lines SentencePiece samples for training (default: 5000000, as the original)",
    )
    train.add_argument("--character-coverage", type=float, default=0.9995, help="default: 0.9995")
    train.add_argument(
        "--threads", dest="num_threads", type=int, metavar="N", help="trainer threads"
    )
    train.add_argument("--seed", type=int, default=None, help="seed of the line sampling")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    train.set_defaults(func=run_train)

    encode = sub.add_parser("encode", help="print the ids of a text (end-of-text id appended)")
    encode.add_argument("--tokenizer", "-t", required=True, help=".model, folder or .tar.gz")
    encode.add_argument("text", help="text to encode")
    encode.add_argument("--no-eos", action="store_true", help="do not append the end-of-text id")
    encode.set_defaults(func=run_encode)

    decode = sub.add_parser("decode", help="print the text of ids (control ids dropped)")
    decode.add_argument("--tokenizer", "-t", required=True, help=".model, folder or .tar.gz")
    decode.add_argument("ids", nargs="+", help="ids, separated by spaces or commas, or a JSON list")
    decode.set_defaults(func=run_decode)

    parser.set_defaults(_parser=parser)  # for run(): the help of a missing action


def run(args: argparse.Namespace) -> int:
    """``pldr-llm tokenizer`` without an action: its help, exit 2."""
    args._parser.print_help(sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    """Train a tokenizer; prints the ``.model`` path on stdout."""
    from pldr_llm.commands.common import options_for
    from pldr_llm.tokenizer import train_tokenizer

    tok = train_tokenizer(**options_for(train_tokenizer, args), progress=not args.no_progress)
    print(f"trained a {tok.vocab_size}-piece unigram tokenizer: {tok.model_path}", file=sys.stderr)
    if tok.vocab_size < args.vocab_size:
        # The original trains with a soft vocabulary limit: a small corpus gives fewer pieces.
        print(
            f"note: the corpus supported only {tok.vocab_size} of the "
            f"{args.vocab_size} pieces asked",
            file=sys.stderr,
        )
    print(tok.model_path)
    return 0


def run_encode(args: argparse.Namespace) -> int:
    """Print the ids of a text as a JSON list."""
    from pldr_llm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(json.dumps(tok.encode(args.text, add_eos=not args.no_eos)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """Print the text of ids."""
    from pldr_llm.core.errors import PLDRError
    from pldr_llm.tokenizer import load_tokenizer

    text = " ".join(args.ids).replace(",", " ").replace("[", " ").replace("]", " ")
    try:
        ids = [int(tok) for tok in text.split()]
    except ValueError:
        raise PLDRError("ids must be integers") from None
    tok = load_tokenizer(args.tokenizer)
    outside = [i for i in ids if not 0 <= i < tok.vocab_size]
    if outside:
        # The library decodes these as the unknown piece (a model's embedding may be larger than
        # its tokenizer); a user typing ids wants to know.
        raise PLDRError(
            f"id {outside[0]} is outside the tokenizer's vocabulary (0..{tok.vocab_size - 1})"
        )
    print(tok.decode(ids))
    return 0
