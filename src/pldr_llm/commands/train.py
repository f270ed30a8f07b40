"""``pldr-llm train``: pretrain a PLDR-LLM from a preset or a config file, on 1..N processes.

One configuration holds four sections -- ``model`` (:class:`~pldr_llm.config.PLDRConfig` keys),
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pldr_llm.errors import PLDRError

logger = logging.getLogger("pldr_llm.train")

SECTIONS = ("model", "data", "tokenizer", "train")
RUN_FILE = "run.yaml"
TOKENIZER_FILE = "tokenizer.model"
PRESETS = ("tiny", "paper-110m")


@dataclass
class TokenizerSettings:
    """The ``tokenizer`` section.

    ``path``: an existing SentencePiece model (the original's ``tok_model``). Without it, a unigram
    tokenizer of ``vocab_size`` pieces is trained at the start of the run on up to ``train_docs``
    documents of the training data and saved as ``tokenizer.model`` in the run folder.

    Attributes:
        path: an existing SentencePiece .model (or folder, .tar.gz); null: train one.
        vocab_size: pieces of the tokenizer trained at the start of the run.
        train_docs: documents the tokenizer is trained on.
    """

    path: str | None = None
    vocab_size: int = 32000
    train_docs: int = 100_000

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            raise PLDRError(f"'tokenizer.vocab_size' must be an integer, got {self.vocab_size!r}")
        if not isinstance(self.train_docs, int) or self.train_docs < 1:
            raise PLDRError(
                f"'tokenizer.train_docs' must be a positive integer, got {self.train_docs!r}"
            )


# Keys of the model section besides PLDRConfig's fields.
MODEL_EXTRA_KEYS = ("dk", "predefined_G")

# Original flag -> (section, key). Data flags are passed to DataConfig, which knows their meaning.
ORIGINAL_ALIASES: dict[str, tuple[str, str]] = {
    "tok_model": ("tokenizer", "path"),
    "Adff": ("model", "A_dff"),
    "gcachelst": ("model", "predefined_G"),
    "DAG_reg_coeffs": ("train", "dag_reg_coeffs"),
    "chkpt_batches": ("train", "save_steps"),
    "chkpt_epochs": ("train", "save_epochs"),
    "verbose_freq": ("train", "log_every"),
    "val_verbose_freq": ("train", "val_every"),
    "train_batches_cnt": ("train", "steps_per_epoch"),
    "val_batches_cnt": ("train", "val_batches"),
    "load_ckpt": ("train", "init_from"),
    "save_model_path": ("train", "run_name"),
}
# Original flags that mean nothing here (torchrun launches the processes); accepted and ignored.
IGNORED_FLAGS = ("master_addr", "master_port", "is_train", "enable_full_dist_load")

# Train keys that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = frozenset(
    {
        # The trainer re-applies this run's learning rate to the restored schedule, so the advice
        # after a divergence ("lower train.learning_rate and resume") can be followed.
        "learning_rate",
        "max_steps",
        "epochs",
        "steps_per_epoch",
        "log_every",
        "val_every",
        "val_batches",
        "tensorboard",
        "progress",
        "save_every",
        "save_steps",
        "save_epochs",
        "save_at_end",
        "keep_last",
        "save_type",
        "export_pth",
        "max_nonfinite_steps",
        "device",
        "compile",
        "compile_layers",
        "chunked_loss",
        "cuda_graphs",
        "fused_optimizer",
        "attn_implementation",
        "prefetch_batches",
        "peak_tflops",
        "fsdp_sharding_strategy",
        "fsdp_cpu_offload",
        "disable_fsdp_mixed_precision",
        "fsdp_reduce_dtype",
        "backward_prefetch",
        "auto_size_minimum",
        "disable_amp",
        "batch_size",
        "init_from",
        "run_name",
    }
)


# ---------------------------------------------------------------------- key registry
def _section_fields() -> dict[str, dict[str, str]]:
    """section -> {key: annotation string} (no torch import)."""
    from pldr_llm.config import PLDRConfig
    from pldr_llm.train.config import TrainConfig

    out: dict[str, dict[str, str]] = {}
    out["model"] = {
        f.name: str(f.type) for f in dataclasses.fields(PLDRConfig) if f.name != "extra"
    }
    out["model"]["dk"] = "int | None"
    out["model"]["predefined_G"] = "str | None"
    out["model"]["input_vocab_size"] = "int | None"
    out["model"]["max_seq_len"] = "int | None"
    out["tokenizer"] = {f.name: str(f.type) for f in dataclasses.fields(TokenizerSettings)}
    out["train"] = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out["train"]["context_length"] = "int | None"
    out["data"] = _data_fields()
    return out


def _data_fields() -> dict[str, str]:
    from pldr_llm.data.config import (
        IGNORED_ORIGINAL_DATA_KEYS,
        ORIGINAL_DATA_KEYS,
        DataConfig,
    )

    fields = {f.name: str(f.type) for f in dataclasses.fields(DataConfig)}
    for alias, target in ORIGINAL_DATA_KEYS.items():
        fields[alias] = fields[target]
    for key in IGNORED_ORIGINAL_DATA_KEYS:
        fields[key] = "bool"
    fields["split_names"] = "list[str] | None"
    return fields


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
    from pldr_llm.config import PLDRConfig
    from pldr_llm.data.config import DataConfig
    from pldr_llm.train.config import TrainConfig

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


@dataclass
class _Option:
    section: str
    key: str
    annotation: str


def _registry() -> tuple[dict[str, _Option], dict[str, list[str]]]:
    """Every accepted option name -> target, and target -> its option strings (for help)."""
    fields = _section_fields()
    names: dict[str, _Option] = {}
    flat_count: dict[str, int] = {}
    for keys in fields.values():
        for key in keys:
            flat_count[key] = flat_count.get(key, 0) + 1
    strings: dict[str, list[str]] = {}
    for section, keys in fields.items():
        for key, annotation in keys.items():
            option = _Option(section, key, annotation)
            forms = [f"{section}.{key}"]
            if flat_count[key] == 1:
                forms.append(key)
                if "_" in key:
                    forms.append(key.replace("_", "-"))
            for form in forms:
                names[form] = option
            strings[f"{section}.{key}"] = forms
    for alias, (section, key) in ORIGINAL_ALIASES.items():
        if alias == "train_batches_cnt":
            continue  # registered on its own: it also sets lr_total_steps
        option = _Option(section, key, fields[section][key])
        names.setdefault(alias, option)
        strings[f"{section}.{key}"].append(alias)
    return names, strings


def _is_list(annotation: str) -> bool:
    return annotation.startswith(("list", "tuple")) or "| list" in annotation


def _is_bool(annotation: str) -> bool:
    return annotation.split("|")[0].strip() == "bool"


def _parse_scalar(text: str) -> Any:
    """A command-line value: int, float, bool, null, a YAML list, or the string itself."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip().startswith(("[", "{")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return text


def _coerce(value: Any, annotation: str) -> Any:
    """YAML reads ``1e-3`` as a string; turn numbers-as-strings into the field's type."""
    base = annotation.replace(" ", "")
    wants_float = base.startswith("float")
    wants_int = base.startswith("int") and not wants_float
    if isinstance(value, str) and (wants_float or wants_int or base.startswith("bool")):
        parsed = _parse_scalar(value)
        if base.startswith("bool"):
            if isinstance(parsed, bool):
                value = parsed
        elif isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            value = float(parsed) if wants_float else parsed
    if wants_int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list) and "float" in annotation:
        value = [_to_float(v) for v in value]
    return value


def _to_float(value: Any) -> Any:
    if isinstance(value, str):
        value = _parse_scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------- parser
def register(subparsers: Any) -> None:
    """Add the ``train`` command."""
    p = subparsers.add_parser(
        "train",
        help="pretrain a PLDR-LLM (CPU, one GPU, or torchrun + FSDP2)",
        description="Pretrain a PLDR-LLM. Settings come from --preset and/or --config (YAML or "
        "TOML with sections model, data, tokenizer, train); any key is overridden with "
        "--section.key VALUE (or --key VALUE when unambiguous); the original's flags are "
        "accepted. A folder that already holds a run is resumed. Multi-GPU: "
        "torchrun --nproc-per-node N -m pldr_llm train ...",
        allow_abbrev=False,
        usage="pldr-llm train [--preset NAME] [--config FILE] --out DIR [--section.key VALUE ...]",
    )
    p.add_argument(
        "--preset", choices=PRESETS, help="built-in settings: tiny (CPU, minutes), paper-110m"
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
    names, strings = _registry()
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
        if _is_list(option.annotation):
            kwargs.update(nargs="+", type=_parse_scalar, metavar="V")
        elif _is_bool(option.annotation):
            kwargs.update(nargs="?", const=True, type=_parse_scalar, metavar="BOOL")
        else:
            kwargs.update(type=_parse_scalar, metavar="V")
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
    p.set_defaults(func=run)


# ---------------------------------------------------------------------- config files
def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PLDRError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise PLDRError("reading TOML on Python 3.10 needs the 'tomli' package") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PLDRError(f"{path}: not valid TOML ({exc})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "syntax error"
            raise PLDRError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PLDRError(f"{path}: a config file must be a mapping of sections")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """The built-in preset ``name`` as a dict of sections."""
    from importlib import resources

    if name not in PRESETS:
        raise PLDRError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("pldr_llm.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    import yaml

    return yaml.safe_load(text) or {}


def _normalize(raw: dict[str, Any], names: dict[str, _Option], where: str) -> dict[str, dict]:
    """Sections from a file: section mappings, or flat keys (incl. the original's names)."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise PLDRError(f"{where}: section {key!r} must be a mapping")
            for sub, sub_value in value.items():
                if sub == "train_batches_cnt" and key == "train":
                    out["train"]["steps_per_epoch"] = sub_value
                    out["train"].setdefault("lr_total_steps", sub_value)
                    continue
                option = names.get(f"{key}.{sub}")
                if option is None and sub in ORIGINAL_ALIASES and ORIGINAL_ALIASES[sub][0] == key:
                    option = names[sub]
                if option is None:
                    raise PLDRError(f"{where}: unknown key '{key}.{sub}'")
                out[key][option.key] = sub_value
            continue
        if key in IGNORED_FLAGS:
            continue
        if key == "train_batches_cnt":  # the original: also the schedule's length
            out["train"]["steps_per_epoch"] = value
            out["train"].setdefault("lr_total_steps", value)
            continue
        option = names.get(key)
        if option is None:
            raise PLDRError(f"{where}: unknown key {key!r}")
        out[option.section][option.key] = value
    return out


# Keys that describe the same thing: setting one in an overlay drops the other from the base.
_EXCLUSIVE = {("model", "dk"): ("model", "d_model"), ("model", "d_model"): ("model", "dk")}


def _merge(base: dict[str, dict], overlay: dict[str, dict]) -> dict[str, dict]:
    merged = {s: dict(base.get(s, {})) for s in SECTIONS}
    for section in SECTIONS:
        for key in overlay.get(section, {}):
            other = _EXCLUSIVE.get((section, key))
            if other is not None and other[1] not in overlay.get(other[0], {}):
                merged[other[0]].pop(other[1], None)
        merged[section].update(overlay.get(section, {}))
    return merged


# ---------------------------------------------------------------------- resolution
@dataclass
class ResolvedConfig:
    """The four sections after merging, with every value checked."""

    sections: dict[str, dict[str, Any]]
    model: dict[str, Any]
    predefined_G: str | None
    data: Any  # DataConfig
    tokenizer: TokenizerSettings
    train: Any  # TrainConfig
    context_length: int


def resolve(sections: dict[str, dict[str, Any]], world_size: int = 1) -> ResolvedConfig:
    """Check every key of ``sections`` and build the typed configs (PLDRError names a bad key)."""
    from pldr_llm.train.config import TrainConfig

    fields = _section_fields()
    clean: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        clean[section] = {}
        for key, value in sections.get(section, {}).items():
            if key not in fields[section]:
                raise PLDRError(f"unknown key '{section}.{key}'")
            clean[section][key] = _coerce(value, fields[section][key])

    train_keys = dict(clean["train"])
    context_length = train_keys.pop("context_length", None)
    try:
        train = TrainConfig.from_dict(train_keys)
    except PLDRError as exc:
        raise PLDRError(f"train: {exc}") from None
    except TypeError as exc:
        raise PLDRError(f"train: {exc}") from None
    train.resolve_batch_size(world_size)

    tok_keys = dict(clean["tokenizer"])
    try:
        tokenizer = TokenizerSettings(**tok_keys)
    except TypeError as exc:
        raise PLDRError(f"tokenizer: {exc}") from None

    model = dict(clean["model"])
    predefined_G = model.pop("predefined_G", None)
    dk = model.pop("dk", None)
    if dk is not None:
        heads = model.get("num_heads")
        if not isinstance(heads, int):
            raise PLDRError("'model.dk' needs 'model.num_heads'")
        if "d_model" in model and model["d_model"] != heads * dk:
            raise PLDRError(
                f"'model.d_model' ({model['d_model']}) differs from num_heads * dk ({heads * dk})"
            )
        model["d_model"] = heads * dk
    if "d_model" in model and "num_heads" in model and isinstance(model["d_model"], int):
        depth = model["d_model"] // max(int(model["num_heads"]), 1)
        # The original's defaults when dff / A_dff are not given.
        model.setdefault("dff", int(model["d_model"] * 4 * 2 / 3))
        model.setdefault("A_dff", int(4 * depth * 2 / 3))
    if model.get("max_seq_len") is None:
        if context_length is None:
            raise PLDRError("give 'train.context_length' or 'model.max_seq_len'")
        model["max_seq_len"] = context_length
    if context_length is None:
        context_length = model["max_seq_len"]
    if not isinstance(context_length, int) or context_length < 1:
        raise PLDRError(
            f"'train.context_length' must be a positive integer, got {context_length!r}"
        )
    if context_length > model["max_seq_len"]:
        raise PLDRError(
            f"'train.context_length' ({context_length}) exceeds 'model.max_seq_len' "
            f"({model['max_seq_len']})"
        )
    if model.get("version", "v510") == "v510G" and predefined_G is None:
        raise PLDRError("'model.version' v510G needs 'model.predefined_G' (a G_LM file)")
    # Check the architecture now, with a stand-in vocabulary size when it comes from the tokenizer.
    from pldr_llm.config import PLDRConfig

    probe = dict(model)
    if probe.get("input_vocab_size") is None:
        probe["input_vocab_size"] = max(tokenizer.vocab_size, 8)
    try:
        PLDRConfig(**probe)
    except TypeError as exc:
        raise PLDRError(f"model: {exc}") from None

    from pldr_llm.data.config import DataConfig

    data = DataConfig.from_dict(dict(clean["data"]))
    return ResolvedConfig(clean, model, predefined_G, data, tokenizer, train, context_length)


def _overrides(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for dest, value in vars(args).items():
        if dest.startswith("ov:"):
            section, key = dest[3:].split(".", 1)
            out[section][key] = value
    batches = getattr(args, "alias:train_batches_cnt", None)
    if batches is not None:  # the original: also the schedule's length
        out["train"]["steps_per_epoch"] = batches
        out["train"].setdefault("lr_total_steps", batches)
    return out


def _diff_for_resume(saved: dict[str, dict], new: dict[str, dict]) -> None:
    """Refuse to resume a run with settings that change what it computes."""
    for section in SECTIONS:
        old_s, new_s = saved.get(section, {}), new.get(section, {})
        for key in sorted(set(old_s) | set(new_s)):
            if section == "train" and key in RESUMABLE_CHANGES:
                continue
            if section == "data" and key in ("cache_dir", "streaming"):
                continue
            if _norm(old_s.get(key)) != _norm(new_s.get(key)):
                raise PLDRError(
                    f"the run folder was started with {section}.{key}={old_s.get(key)!r}, this "
                    f"command gives {new_s.get(key)!r}; resume with the same settings or use a new --out"
                )


def _norm(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _canonical(resolved: ResolvedConfig) -> dict[str, dict[str, Any]]:
    """The complete, explicit config written to ``run.yaml`` (every default spelled out)."""
    train = resolved.train.to_dict()
    train["context_length"] = resolved.context_length
    model = dict(resolved.model)
    if resolved.predefined_G is not None:
        model["predefined_G"] = resolved.predefined_G
    return {
        "model": model,
        "data": resolved.data.to_dict(),
        "tokenizer": dataclasses.asdict(resolved.tokenizer),
        "train": train,
    }


def _dump_yaml(sections: dict[str, dict]) -> str:
    import yaml

    return yaml.safe_dump(
        {s: sections[s] for s in SECTIONS}, sort_keys=False, default_flow_style=None
    )


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Resolve the config, then train (see the module docstring)."""
    started = time.perf_counter()
    names, _ = _registry()
    out_dir = args.out
    if out_dir is None and args.checkpoint_path is not None:
        run_name = getattr(args, "ov:train.run_name", None)
        out_dir = os.path.join(args.checkpoint_path, run_name) if run_name else args.checkpoint_path
    if out_dir is None and not args.print_config:
        raise PLDRError("give the run folder with --out DIR")
    run_dir = Path(out_dir) if out_dir is not None else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise PLDRError(
            f"--out {run_dir} is a file, not a folder: give a new folder or an existing run folder"
        )
    saved_path = run_dir / RUN_FILE if run_dir is not None else None
    saved = None
    if saved_path is not None and saved_path.is_file():
        saved = _normalize(_read_file(saved_path), names, str(saved_path))

    if args.preset is None and args.config is None:
        # No preset or file: a folder's own run.yaml, else the defaults, which are the original's
        # (the paper's 110M model and training settings), so its sample scripts port as they are.
        base = saved if saved is not None else {s: {} for s in SECTIONS}
    else:
        base = {s: {} for s in SECTIONS}
        if args.preset is not None:
            base = _normalize(load_preset(args.preset), names, f"preset {args.preset}")
        if args.config is not None:
            path = Path(args.config)
            base = _merge(base, _normalize(_read_file(path), names, str(path)))
    merged = _merge(base, _overrides(args))
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    resolved = resolve(merged, world_size)
    canonical = _canonical(resolved)
    if saved is not None:
        _diff_for_resume(_canonical(resolve(saved, world_size)), canonical)
    if args.print_config:
        sys.stdout.write(_dump_yaml(canonical))
        return 0
    for dest, value in vars(args).items():
        if dest.startswith("ignored:") and value is not None:
            logger.info("ignoring the original's --%s (torchrun sets up the processes)", dest[8:])
    assert run_dir is not None
    logger.debug("config resolved in %.2fs", time.perf_counter() - started)
    return _train(resolved, canonical, run_dir, resuming=saved is not None)


def _setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger("pldr_llm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)


def _train(resolved: ResolvedConfig, canonical: dict, run_dir: Path, resuming: bool) -> int:
    import random

    import numpy as np
    import torch

    from pldr_llm.data import build_batches
    from pldr_llm.data.config import open_source
    from pldr_llm.train.distributed import barrier, cleanup_distributed, setup_distributed
    from pldr_llm.train.trainer import Trainer

    cfg = resolved.train
    # Open the data source before anything slow: a missing file or column fails now.
    open_source(resolved.data, "train")
    env = setup_distributed(cfg.device)
    try:
        _setup_logging(env.is_main)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            logger.info(
                "%s run in %s on %d process(es), device %s",
                "resuming" if resuming else "starting",
                run_dir,
                env.world_size,
                env.device,
            )
        barrier()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % (2**32))
        torch.manual_seed(cfg.seed)

        tokenizer, tokenizer_file = _tokenizer(resolved, run_dir, env)
        model = _build_model(resolved, tokenizer, run_dir=run_dir)
        if env.is_main:
            logger.info(
                "model: %s parameters, %d layers, d_model %d, %d heads, context %d",
                f"{model.num_parameters():,}",
                model.config.num_layers,
                model.config.d_model,
                model.config.num_heads,
                resolved.context_length,
            )
        trainer = Trainer(model, cfg, env=env)
        train_batches = build_batches(
            resolved.data,
            tokenizer,
            batch_size=trainer.batch_size,
            context_length=resolved.context_length,
            rank=env.rank,
            world_size=env.world_size,
            pad_id=model.config.pad_id,
        )
        val_batches = None
        if cfg.val_every:
            val_batches = build_batches(
                resolved.data,
                tokenizer,
                batch_size=trainer.batch_size,
                context_length=resolved.context_length,
                split="validation",
                rank=env.rank,
                world_size=env.world_size,
                pad_id=model.config.pad_id,
            )
            if val_batches is None and env.is_main:
                logger.warning(
                    "'train.val_every' is set but the data config has no validation split"
                )
        if env.is_main:
            # Written once the tokenizer, model and data are set up: a start that fails before
            # (a missing --tokenizer.path) leaves no run.yaml that would refuse the fixed command.
            tmp = run_dir / (RUN_FILE + ".tmp")
            tmp.write_text(_dump_yaml(canonical), encoding="utf-8")
            os.replace(tmp, run_dir / RUN_FILE)
        result = trainer.fit(
            train_batches,
            run_dir,
            val_data=val_batches,
            resume=True,
            tokenizer_file=tokenizer_file,
        )
        if result.status == "completed" and env.is_main:
            _export_original(trainer, resolved, run_dir, tokenizer_file)
        barrier()
        if env.is_main:
            metrics = result.last_metrics or {}
            logger.info(
                "%s at step %d%s",
                result.status,
                result.step,
                f": loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}"
                if metrics.get("loss") is not None
                else "",
            )
        if result.status == "interrupted":
            if env.is_main:
                logger.warning(
                    "stopped by a signal at step %d; run the same command to resume", result.step
                )
            import signal as _signal

            return 128 + int(result.signal or _signal.SIGTERM)
        if result.status == "diverged":
            raise PLDRError(
                f"training stopped at step {result.step}: more than "
                f"{cfg.max_nonfinite_steps} steps had a non-finite loss (the last good weights "
                "are in the last checkpoint): run the same command with a lower "
                f"--train.learning_rate (e.g. {cfg.learning_rate / 2:g}) to resume from there"
            )
        return 0
    finally:
        cleanup_distributed(env)


def _tokenizer(resolved: ResolvedConfig, run_dir: Path, env: Any) -> tuple[Any, Path]:
    """Load the configured tokenizer, the run's own, or train one (rank 0) on the training data."""
    from pldr_llm.tokenizer import load_tokenizer
    from pldr_llm.train.distributed import barrier

    settings = resolved.tokenizer
    if settings.path is not None:
        tok = load_tokenizer(settings.path)
        return tok, Path(tok.model_path)
    own = run_dir / TOKENIZER_FILE
    if not own.is_file():
        if env.is_main:
            _train_tokenizer(resolved, run_dir)
        barrier()
    tok = load_tokenizer(own)
    return tok, own


def _train_tokenizer(resolved: ResolvedConfig, run_dir: Path) -> None:
    import itertools
    import tempfile

    from pldr_llm.data.config import open_source
    from pldr_llm.tokenizer import train_tokenizer

    settings = resolved.tokenizer
    started = time.perf_counter()
    source = open_source(resolved.data, "train")
    assert source is not None
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tokenizer-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        count = 0
        with open(corpus, "w", encoding="utf-8") as fh:
            for doc in itertools.islice(source.iter_documents(), settings.train_docs):
                if doc:
                    fh.write(doc.rstrip("\n") + "\n")
                    count += 1
        if count == 0:
            raise PLDRError("the training data holds no text to train a tokenizer on")
        # One thread and a fixed seed: the same data always gives the same tokenizer, so a run
        # repeated from scratch reproduces its numbers.
        train_tokenizer(
            [corpus],
            settings.vocab_size,
            Path(tmp) / "tokenizer",
            num_threads=1,
            seed=resolved.train.seed,
            progress=False,
        )
        os.replace(Path(tmp) / "tokenizer.model", run_dir / TOKENIZER_FILE)
        vocab = Path(tmp) / "tokenizer.vocab"
        if vocab.is_file():
            os.replace(vocab, run_dir / "tokenizer.vocab")
    logger.info(
        "trained a %d-piece tokenizer on %d documents in %.1fs",
        settings.vocab_size,
        count,
        time.perf_counter() - started,
    )


def _build_model(resolved: ResolvedConfig, tokenizer: Any, run_dir: Path) -> Any:
    from pldr_llm.config import PLDRConfig
    from pldr_llm.model import PLDRModel

    model_keys = dict(resolved.model)
    if model_keys.get("input_vocab_size") is None:
        model_keys["input_vocab_size"] = tokenizer.vocab_size
    config = PLDRConfig(**model_keys)
    if tokenizer.vocab_size > config.input_vocab_size:
        raise PLDRError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but 'model.input_vocab_size' is "
            f"{config.input_vocab_size}"
        )
    model = PLDRModel(config)
    if resolved.predefined_G is not None:
        from pldr_llm.gfile import load_g_file

        model.set_predefined_G([g for _, g in load_g_file(resolved.predefined_G)])
    init_from = resolved.train.init_from
    has_checkpoint = (run_dir / "checkpoints").is_dir() and any(
        (p / "COMPLETE").is_file() for p in (run_dir / "checkpoints").glob("step_*")
    )
    if init_from and not has_checkpoint:
        _load_initial_weights(model, init_from)
    return model


def _load_initial_weights(model: Any, source: str) -> None:
    """Start from the weights of an original ``.pth``, a project folder or a DCP folder."""
    from pldr_llm.checkpoint import (
        load_state_dict_strict,
        reference_state_dict,
        safe_torch_load,
    )

    path = Path(source)
    if path.is_file():
        state = reference_state_dict(safe_torch_load(path), str(path))
        load_state_dict_strict(model, state, source=str(path))
    elif (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        load_state_dict_strict(model, load_file(str(path / "model.safetensors")), source=str(path))
    elif path.is_dir():
        import torch.distributed.checkpoint as dcp

        dcp_dir = path / "dcp" if (path / "dcp").is_dir() else path
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(dcp_dir))
        model.load_state_dict(state["model"])
    else:
        raise PLDRError(f"'train.init_from': no checkpoint at {path}")
    logger.info("initial weights from %s", path)


def _export_original(
    trainer: Any, resolved: ResolvedConfig, run_dir: Path, tokenizer_file: Path
) -> None:
    """Complete ``run_dir/original/`` (the .pth written by the trainer) into an original bundle."""
    import shutil

    from pldr_llm.fileio import atomic_write_text

    cfg = resolved.train
    if not cfg.export_pth:
        return
    name = cfg.run_name or "pldr-llm"
    target = run_dir / "original"
    if not (target / f"{name}-model-checkpoint.pth").is_file():
        return
    hp = trainer.model.config.to_hpdict()
    hp.update(cfg.to_hpdict())
    hp["save_model_path"] = name
    atomic_write_text(target / f"{name}_hyperparameters.py", _hyperparameters_py(hp))
    shutil.copyfile(tokenizer_file, target / TOKENIZER_FILE)


def _hyperparameters_py(hpdict: dict[str, Any]) -> str:
    """The original's ``*_hyperparameters.py`` layout: an import and one ``hpdict`` literal."""
    lines = ["import torch.nn.functional as F", "", "hpdict = {"]
    for key, value in hpdict.items():
        text = f"F.{value}" if key == "activation" else repr(value)
        lines.append(f"    {key!r}: {text},")
    lines.append("}")
    return "\n".join(lines) + "\n"
