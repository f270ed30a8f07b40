"""``pldr-llm train``: pretrain a PLDR-LLM from a preset or a config file, on 1..N processes.

One configuration holds four sections -- ``model`` (:class:`~pldr_llm.core.config.PLDRConfig` keys),
``data`` (:class:`~pldr_llm.data.DataConfig` keys), ``tokenizer`` and ``train``
(:class:`~pldr_llm.train.TrainConfig` keys) -- read from a preset (``--preset tiny``), a YAML or
TOML file (``--config FILE``), or both (the file overrides the preset). Every key can then be
overridden on the command line as ``--section.key VALUE``, or ``--key VALUE`` / ``--key-name VALUE``
when the key name is unique, and the original's flags are accepted as aliases (``--batch_size``,
``--context_length``, ``--num_reslayerA``, ``--dk``, ``--DAG_reg_coeffs 0.05 0.05 0.05``,
``--fsdp_sharding_strategy``, ``--chkpt_batches ...``), so its sample scripts port by changing the
command name.

The run folder (``--out DIR``) receives ``run.yaml`` (the resolved config), ``tokenizer.model``,
``metrics.jsonl``, ``checkpoints/`` and, at the end, the trained model (``config.json`` +
``model.safetensors``, so ``pldr-llm generate --model DIR`` works) and ``original/``, the same model
in the original's bundle format (``.pth`` + ``_hyperparameters.py`` + tokenizer). Running the
command again on a folder that holds a run resumes it from its last complete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.presets import PRESETS

# pldr_llm.train.runconfig (with the data and training configs) is imported where it is used:
# the other commands build their parsers without it.

logger = logging.getLogger("pldr_llm.train")


# ---------------------------------------------------------------------- help
#: Help of the keys that are not fields of a config dataclass (they are defined in this module).
_EXTRA_KEY_HELP = {
    ("model", "dk"): "head size; gives d_model = dk * num_heads instead of d_model",
    ("model", "predefined_G"): "G_LM file of a v510G model (pldr-llm G file or the paper's pickle)",
    ("train", "context_length"): "tokens per training sequence (default: model.max_seq_len)",
}


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: first sentence}`` from the ``Attributes:`` section of a dataclass's docstring.

    The descriptions live next to the fields they describe (the class docstring) instead of a
    separate table that could drift; ``train --help`` shows them.
    """
    lines = (cls.__doc__ or "").splitlines()
    docs: dict[str, str] = {}
    current: list[str] = []
    inside, indent = False, None
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside or not stripped:
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        if width == indent and ":" in stripped:
            names, text = stripped.split(":", 1)
            current = [n.strip() for n in names.split(",")]
            for name in current:
                docs[name] = text.strip()
        else:
            for name in current:
                docs[name] += " " + stripped
    return {name: _first_sentence(text) for name, text in docs.items()}


def _first_sentence(text: str) -> str:
    text = text.replace("``", "")
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


def _key_help() -> dict[tuple[str, str], str]:
    """``(section, key) -> "description (default: value)"`` for ``train --help``."""
    from pldr_llm.core.config import PLDRConfig
    from pldr_llm.data.config import DataConfig
    from pldr_llm.train.config import TrainConfig
    from pldr_llm.train.runconfig import TokenizerSettings

    out = dict(_EXTRA_KEY_HELP)
    for section, cls in (
        ("model", PLDRConfig),
        ("data", DataConfig),
        ("tokenizer", TokenizerSettings),
        ("train", TrainConfig),
    ):
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name not in docs:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out[(section, f.name)] = f"{docs[f.name].rstrip('.')} (default: {_shown(default)})"
    return out


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value) if value else "none"
    return str(value)


# ---------------------------------------------------------------------- parser
HELP = "pretrain a PLDR-LLM (CPU, one GPU, or torchrun + FSDP2)"
DESCRIPTION = (
    "Pretrain a PLDR-LLM. Settings come from --preset and/or --config (YAML or "
    "TOML with sections model, data, tokenizer, train); any key is overridden with "
    "--section.key VALUE (or --key VALUE when unambiguous); the original's flags are "
    "accepted. A folder that already holds a run is resumed. Multi-GPU: "
    "torchrun --nproc-per-node N -m pldr_llm train ..."
)
PARSER_OPTIONS = {
    "allow_abbrev": False,
    "usage": "pldr-llm train [--preset NAME] [--config FILE] --out DIR [--section.key VALUE ...]",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` command's options."""
    from pldr_llm.train.runconfig import (
        IGNORED_FLAGS,
        SECTIONS,
        is_bool,
        is_list,
        parse_scalar,
        registry,
    )

    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="built-in settings: tiny (CPU, minutes), paper-110m, pldr-350m, pldr-1b",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or TOML config file")
    p.add_argument("--out", metavar="DIR", help="run folder (created; resumed if it holds a run)")
    p.add_argument(
        "--checkpoint_path",
        "--checkpoint-path",
        dest="checkpoint_path",
        metavar="DIR",
        help=argparse.SUPPRESS,  # the original's name for the output root
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    names, strings = registry()
    from pldr_llm.data.config import IGNORED_ORIGINAL_DATA_KEYS, ORIGINAL_DATA_KEYS

    hidden_data = {*ORIGINAL_DATA_KEYS, *IGNORED_ORIGINAL_DATA_KEYS, "split_names"}
    groups = {
        s: p.add_argument_group(f"{s} keys", f"any {s} key: --{s}.KEY VALUE") for s in SECTIONS
    }
    seen: set[str] = set()
    key_help = _key_help()
    for target, forms in strings.items():
        option = names[forms[0]]
        kwargs: dict[str, Any] = {"dest": f"ov:{target}", "default": argparse.SUPPRESS}
        if (option.section, option.key) in key_help:
            kwargs["help"] = key_help[(option.section, option.key)].replace("%", "%%")
        if is_list(option.annotation):
            kwargs.update(nargs="+", type=parse_scalar, metavar="V")
        elif is_bool(option.annotation):
            kwargs.update(nargs="?", const=True, type=parse_scalar, metavar="BOOL")
        else:
            kwargs.update(type=parse_scalar, metavar="V")
        strings_for_target = [f"--{f}" for f in forms if f not in seen]
        seen.update(forms)
        if not strings_for_target:
            continue
        visible = strings_for_target[0]
        if option.section == "data" and option.key in hidden_data:
            kwargs["help"] = argparse.SUPPRESS  # the original's data flags: aliases only
        groups[option.section].add_argument(visible, **kwargs)
        kwargs.pop("help", None)
        for extra in strings_for_target[1:]:
            groups[option.section].add_argument(extra, help=argparse.SUPPRESS, **kwargs)
    p.add_argument(
        "--train_batches_cnt",
        dest="alias:train_batches_cnt",
        type=int,
        metavar="N",
        help=argparse.SUPPRESS,  # the original's steps per epoch, also its lr_total_steps
    )
    for flag in IGNORED_FLAGS:
        p.add_argument(
            f"--{flag}", dest=f"ignored:{flag}", nargs="?", const=True, help=argparse.SUPPRESS
        )


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    from pldr_llm.train.runconfig import SECTIONS

    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for dest, value in vars(args).items():
        if dest.startswith("ov:"):
            section, key = dest[3:].split(".", 1)
            out[section][key] = value
    batches = getattr(args, "alias:train_batches_cnt", None)
    if batches is not None:  # the original's steps per epoch, also the schedule's length
        out["train"]["train_batches_cnt"] = batches
    return out


def run(args: argparse.Namespace) -> int:
    """Resolve the config, then train (:func:`pldr_llm.train.run.run`; see the module docstring)."""
    from pldr_llm.train.runconfig import prepare_run

    started = time.perf_counter()
    out_dir = args.out
    if out_dir is None and args.checkpoint_path is not None:
        run_name = getattr(args, "ov:train.run_name", None)
        out_dir = os.path.join(args.checkpoint_path, run_name) if run_name else args.checkpoint_path
    if out_dir is None and not args.print_config:
        raise PLDRError("give the run folder with --out DIR")
    config = prepare_run(
        out_dir, preset=args.preset, config=args.config, overrides=_overrides(args)
    )
    if args.print_config:
        sys.stdout.write(config.to_yaml())
        return 0
    for dest, value in vars(args).items():
        if dest.startswith("ignored:") and value is not None:
            logger.info("ignoring the original's --%s (torchrun sets up the processes)", dest[8:])
    logger.debug("config resolved in %.2fs", time.perf_counter() - started)
    from pldr_llm.train.run import run as run_training

    result = run_training(config)
    if result.status == "interrupted":
        import signal

        return 128 + int(result.signal or signal.SIGTERM)
    return 0
