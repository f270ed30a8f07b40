"""``python -m pldr_llm.eval ARGS``: lm-eval's own command line with the ``pldrllm`` model.

lm-eval's ``lm_eval`` command reads no plugins (0.4.x), so ``lm_eval --model pldrllm`` cannot find
this package's model. This runs the same command line after registering it::

    python -m pldr_llm.eval run --model pldrllm \\
        --model_args pretrained=FOLDER,device=cpu,batch_size=32 --tasks arc_easy

Every argument is lm-eval's (``python -m pldr_llm.eval --help``); ``pldr-llm eval`` is the
project's own, shorter front end.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default: ``sys.argv[1:]``); returns its status."""
    from pldr_llm.commands.common import progress_bars_only_on_a_terminal

    progress_bars_only_on_a_terminal()  # before lm-eval imports tqdm
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as exc:
        print(
            f"pldr-llm: error: this needs '{exc.name}': pip install 'pldr-llm[eval]'",
            file=sys.stderr,
        )
        return 2
    import pldr_llm.eval.lm_eval_model  # noqa: F401  (registers "pldrllm")

    saved = sys.argv
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
