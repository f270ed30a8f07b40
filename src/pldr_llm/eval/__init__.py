"""Evaluation of PLDR-LLMs with lm-evaluation-harness.

* :mod:`pldr_llm.eval.lm_eval_model`: the native lm-eval model ``pldrllm`` (needs ``lm-eval``).
* ``tasks/``: the task group ``pldrllm_zeroshot``, the paper's zero-shot benchmark set, for
  lm-eval's ``--include_path`` (:data:`TASKS_DIR`).

``pldr-llm eval`` (:mod:`pldr_llm.commands.eval`) runs both. This package imports nothing heavy.
"""

from pathlib import Path

#: Folder of the task configurations shipped with the package (``--include_path`` for lm-eval).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: The paper's zero-shot benchmark group and its tasks (lm-eval's own task names).
ZEROSHOT_GROUP = "pldrllm_zeroshot"
ZEROSHOT_TASKS = (
    "arc_easy",
    "arc_challenge",
    "piqa",
    "social_iqa",
    "hellaswag",
    "openbookqa",
    "winogrande",
    "truthfulqa_mc2",
)

__all__ = ["TASKS_DIR", "ZEROSHOT_GROUP", "ZEROSHOT_TASKS"]
