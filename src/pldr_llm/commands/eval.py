"""``pldr-llm eval``: score a model on lm-evaluation-harness tasks and print the table.

``pldr-llm eval --model X --tasks pldrllm_zeroshot`` runs the PLDR-LLM papers' zero-shot set
(arc_easy, arc_challenge, piqa, social_iqa, hellaswag, openbookqa, winogrande, truthfulqa_mc2)
with the native ``pldrllm`` lm-eval model (batched scoring). Any lm-eval task or group name works
too, and ``--include-path`` adds folders of task YAML files. Tasks whose datasets are not in the
local datasets cache need the Hugging Face Hub; offline, that is a one-line error naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import first_line

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# datasets' packaged builders: a task using one reads local files, never the Hub.
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "sql"})


HELP = "evaluate a model with lm-evaluation-harness (default: the paper's zero-shot set)"
DESCRIPTION = (
    "Score a model on lm-evaluation-harness tasks with the native, batched "
    "'pldrllm' lm-eval model and print the results table."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` command's options."""
    p.add_argument(
        "--model", "-m", required=True, metavar="X", help="model folder, hub id or HF export"
    )
    p.add_argument(
        "--tasks",
        default="pldrllm_zeroshot",
        help="comma-separated lm-eval task or group names (default: pldrllm_zeroshot)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        help="instead of tasks: perplexity and bits per byte on this UTF-8 text file (offline)",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="with --text: ids per window (default: the model's max_seq_len)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="with --text: ids between window starts; each token is scored once with at least "
        "N - S ids of context (default: N // 2)",
    )
    p.add_argument(
        "--limit", type=float, default=None, metavar="N", help="score only N examples per task"
    )
    p.add_argument(
        "--batch-size", type=int, default=16, metavar="B", help="requests per forward pass (16)"
    )
    p.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)"
    )
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)"
    )
    p.add_argument(
        "--tokenizer", default=None, metavar="PATH", help="tokenizer instead of the model's"
    )
    p.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        metavar="K",
        help="few-shot examples (tasks' default)",
    )
    p.add_argument(
        "--score-mode",
        choices=("full", "cached"),
        default="full",
        help="full: one pass over context + continuation (as the original harness); cached: the "
        "context runs first and the continuation runs on its KV/G caches",
    )
    p.add_argument(
        "--no-kvcache", action="store_true", help="generation (and cached scoring) without KV-cache"
    )
    p.add_argument(
        "--no-gcache", action="store_true", help="generation (and cached scoring) without G-cache"
    )
    p.add_argument(
        "--gcache-file", default=None, metavar="PATH", help="a G-cache file used in every pass"
    )
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="score every chunk with the eager forward (default on CUDA: chunks are padded to "
        "repeated shapes whose forwards are replayed from CUDA graphs)",
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of lm-eval task YAML files (repeatable)",
    )
    p.add_argument(
        "--output", "-o", default=None, metavar="FILE", help="also write the results as JSON"
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="with --output FILE: also write every scored example (lm-eval's per-sample "
        "records: arguments, responses, filtered responses, metrics) as JSON lines, one file per "
        "task, FILE's name + _samples_TASK.jsonl",
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite the --log-samples files if they exist"
    )


def _dataset_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(task, dataset)`` when ``exc`` was raised while lm-eval loaded a task's dataset.

    The datasets library fails in many ways without the Hub (ConnectionError, "not cached",
    even a TypeError when offline with a custom cache folder), so the failure is recognized by
    where it happened: inside lm-eval's ``Task.download``, whose task names its dataset.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        found = None
        while tb is not None:
            frame = tb.tb_frame
            config = getattr(frame.f_locals.get("self"), "config", None)
            if frame.f_code.co_name == "download" and (
                dataset_path := getattr(config, "dataset_path", None)
            ):
                found = (str(getattr(config, "task", "?")), str(dataset_path))
            tb = tb.tb_next
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _unknown(manager: Any, names: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not manager.match_tasks([n])]


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub's host answers a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout):
            return True
    except OSError:
        return False


def _go_offline_without_network() -> bool:
    """Without a network, turn on the Hub libraries' offline mode before they are imported.

    Otherwise ``datasets`` and ``huggingface_hub`` retry every request for about 40 s before a
    missing dataset fails; offline, a cached dataset loads and a missing one fails at once with
    the one-line message below. Must run before ``lm_eval`` (which imports them) is imported.
    """
    if any(os.environ.get(v, "").strip() for v in _OFFLINE_ENV):
        return False  # the user decided
    if _hub_reachable():
        return False
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    return True


def run_text(args: argparse.Namespace) -> int:
    """``--text FILE``: perplexity and bits per byte, printed as one JSON object."""
    from pldr_llm.bundle import load_bundle
    from pldr_llm.commands.common import read_text_file
    from pldr_llm.eval.perplexity import perplexity

    text = read_text_file(args.text, "--text file")
    model, tokenizer = load_bundle(
        args.model, device=args.device or "cpu", dtype=args.dtype, tokenizer=args.tokenizer
    )
    result = perplexity(
        model, tokenizer, text, context=args.context, stride=args.stride, batch_size=args.batch_size
    )
    record = {"text": str(Path(args.text)), "model": args.model, **result.to_dict()}
    print(json.dumps(record))
    if args.output:
        from pldr_llm.core.fileio import atomic_write_text

        atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate; prints the results table on stdout."""
    from pldr_llm.core.errors import PLDRError

    _check_options(args)
    if args.text is not None:
        return run_text(args)
    if args.context is not None or args.stride is not None:
        raise PLDRError("--context and --stride go with --text FILE")
    from pldr_llm.commands.common import progress_bars_only_on_a_terminal

    progress_bars_only_on_a_terminal()
    auto_offline = _go_offline_without_network()

    try:
        from lm_eval import simple_evaluate
        from lm_eval.utils import make_table
    except ModuleNotFoundError as exc:
        raise PLDRError(f"pldr-llm eval needs '{exc.name}': pip install 'pldr-llm[eval]'") from None

    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    names, manager = _tasks(args)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)

    lm = PLDRLLMEvalModel(
        pretrained=args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        kvcache=not args.no_kvcache,
        gcache=not args.no_gcache,
        gcache_file=args.gcache_file,
        score_mode=args.score_mode,
        cuda_graph=False if args.no_cuda_graph else None,
    )
    try:
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=bool(args.log_samples),
        )
    except PLDRError:
        raise
    except Exception as exc:
        error = _dataset_error(exc, names, auto_offline)
        if error is None:
            raise
        raise error from None
    if results is None:  # non-zero ranks of a distributed run
        return 0
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        _write_results(args, results)
    if args.log_samples:
        write_samples(results.get("samples") or {}, Path(args.output), args.force)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """The option values no evaluation can run with, as a :class:`PLDRError`."""
    from pldr_llm.core.errors import PLDRError

    if args.limit is not None and not args.limit > 0:
        raise PLDRError(
            f"--limit must be positive (a count, or a fraction of each task below 1), got "
            f"{args.limit:g}"
        )
    if args.batch_size < 1:
        raise PLDRError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.text is None and args.log_samples and not args.output:
        raise PLDRError(
            "--log-samples needs --output FILE (the sample files are written beside it)"
        )


def _tasks(args: argparse.Namespace) -> tuple[list[str], Any]:
    """``--tasks``' names, each known to the returned lm-eval ``TaskManager``."""
    from lm_eval.tasks import TaskManager

    from pldr_llm.core.errors import PLDRError
    from pldr_llm.eval import TASKS_DIR

    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise PLDRError(f"--include-path {folder} is not a folder")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise PLDRError("--tasks names no task")
    paths = [str(TASKS_DIR), *args.include_path]
    # Indexing lm-eval's own few thousand task files takes seconds: skip it when the task folders
    # given define every name asked for as a plain task (a group may name lm-eval's tasks).
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(names) <= set(manager.all_subtasks):
        manager = TaskManager(include_path=paths)
    unknown = _unknown(manager, names)
    if unknown:
        raise PLDRError(f"unknown lm-eval task(s): {', '.join(unknown)} (see 'lm_eval ls tasks')")
    return names, manager


def _dataset_error(exc: Exception, names: list[str], auto_offline: bool) -> Exception | None:
    """The one-line error for a task whose dataset could not be loaded, or None if ``exc`` is
    not that (it is then re-raised as it is)."""
    from pldr_llm.core.errors import PLDRError

    failed = _dataset_failure(exc)
    if failed is None:
        return None
    task, dataset = failed
    if dataset in _LOCAL_BUILDERS or Path(dataset).exists():
        return PLDRError(f"task {task} could not load its dataset ({dataset}): {first_line(exc)}")
    offline = [
        v
        for v in _OFFLINE_ENV
        if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
    ]
    where = (
        "the Hub could not be reached"
        if auto_offline or not offline
        else f"offline mode is on ({', '.join(offline)})"
    )
    return PLDRError(
        f"task {task} (of {', '.join(names)}) needs the dataset {dataset} from the "
        f"Hugging Face Hub and {where}: {first_line(exc)}. Run once with network access "
        "(the datasets cache keeps it) or point HF_DATASETS_CACHE at a cache that holds it"
    )


def _write_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``--output``: the results, groups and task configurations as JSON."""
    from pldr_llm.core.fileio import atomic_write_text

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep: dict[str, Any] = {
        k: results[k]
        for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot")
        if k in results
    }
    keep["model"] = {"pretrained": args.model, "score_mode": args.score_mode}
    atomic_write_text(out, json.dumps(keep, indent=2, default=str) + "\n")
    print(f"pldr-llm: results written to {out}", file=sys.stderr)


def samples_path(output: Path, task: str) -> Path:
    """Where ``--log-samples`` writes ``task``'s records: beside ``--output``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return output.with_name(f"{output.stem}_samples_{safe}.jsonl")


def write_samples(samples: dict[str, list[dict[str, Any]]], output: Path, force: bool) -> None:
    """Write lm-eval's per-sample records, one JSON object a line per task (as ``lm_eval
    --log_samples`` does; values JSON cannot hold are written as lm-eval writes them)."""
    from lm_eval.utils import handle_non_serializable

    from pldr_llm.core.errors import PLDRError
    from pldr_llm.core.fileio import atomic_write_text

    paths = {task: samples_path(output, task) for task in samples}
    present = [str(p) for p in paths.values() if p.exists()]
    if present and not force:
        raise PLDRError(f"{', '.join(present)} already exist(s); pass --force to overwrite")
    for task, records in samples.items():
        lines = [
            json.dumps(r, default=handle_non_serializable, ensure_ascii=False) for r in records
        ]
        atomic_write_text(paths[task], "".join(line + "\n" for line in lines))
        print(
            f"pldr-llm: {len(records)} samples of {task} written to {paths[task]}", file=sys.stderr
        )
