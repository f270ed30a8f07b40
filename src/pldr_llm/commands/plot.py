"""``pldr-llm plot RUN_DIR``: loss, accuracy and learning-rate curves of a run, as a PNG
(drawn by :func:`pldr_llm.train.curves.plot_run`)."""

from __future__ import annotations

import argparse

from pldr_llm.core.errors import PLDRError

HELP = "draw a run's loss/accuracy/lr curves to a PNG"
DESCRIPTION = (
    "Draw the loss, accuracy and learning-rate curves of a training run "
    "(RUN_DIR/metrics.jsonl) to a PNG file."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``plot`` command's options."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of 'pldr-llm train'")
    p.add_argument(
        "--out", "-o", metavar="FILE", help="PNG file to write (default: RUN_DIR/curves.png)"
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=0,
        metavar="N",
        help="also draw a moving average of N steps (default: 0, off)",
    )


def run(args: argparse.Namespace) -> int:
    """Draw the curves and print the PNG's path."""
    from pldr_llm.train.curves import plot_run

    if args.smooth < 0:  # named as the user typed it (plot_run names its parameter)
        raise PLDRError(f"--smooth must be 0 (off) or a number of steps, got {args.smooth}")
    target = plot_run(args.run_dir, args.out, args.smooth)
    print(target)
    return 0
