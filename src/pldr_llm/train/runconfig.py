"""The run configuration of ``pldr-llm train`` and :func:`pldr_llm.train.run.run`: four sections.

``model`` (:class:`~pldr_llm.core.config.PLDRConfig` keys, plus ``dk`` and ``predefined_G``),
``data`` (:class:`~pldr_llm.data.DataConfig` keys), ``tokenizer`` (:class:`TokenizerSettings`) and
``train`` (:class:`~pldr_llm.train.TrainConfig` keys, plus ``context_length``), read from a
preset, a YAML or TOML file, and overrides, merged in that order, checked, and resolved into a
:class:`RunConfig`. Every key is accepted as ``section.key``, as ``key`` when no other section has
it, and under the original's name (:data:`~pldr_llm.train.config.ORIGINAL_ALIASES`, the one alias
table). Which settings a resumed run may change is declared on the fields
(:meth:`~pldr_llm.train.TrainConfig.resumable_fields`).

Nothing here imports torch, so a bad config fails before the (slow) torch import.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pldr_llm.core.errors import PLDRError
from pldr_llm.presets import load_preset
from pldr_llm.train.config import IGNORED_KEYS, ORIGINAL_ALIASES

__all__ = [
    "SECTIONS",
    "RUN_FILE",
    "TOKENIZER_FILE",
    "TokenizerSettings",
    "RunConfig",
    "prepare_run",
    "resolve",
    "check_resumable",
]

SECTIONS = ("model", "data", "tokenizer", "train")
RUN_FILE = "run.yaml"
TOKENIZER_FILE = "tokenizer.model"
# Original flags that mean nothing here (torchrun launches the processes); accepted and ignored.
IGNORED_FLAGS = tuple(sorted(IGNORED_KEYS))


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


# ---------------------------------------------------------------------- key registry
def _section_fields() -> dict[str, dict[str, str]]:
    """section -> {key: annotation string} (no torch import)."""
    from pldr_llm.core.config import PLDRConfig
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


@dataclass
class Option:
    section: str
    key: str
    annotation: str


def registry() -> tuple[dict[str, Option], dict[str, list[str]]]:
    """Every accepted option name -> target, and target -> its option strings (for help)."""
    fields = _section_fields()
    names: dict[str, Option] = {}
    flat_count = Counter(key for keys in fields.values() for key in keys)
    strings: dict[str, list[str]] = {}
    for section, keys in fields.items():
        for key, annotation in keys.items():
            option = Option(section, key, annotation)
            forms = [f"{section}.{key}"]
            if flat_count[key] == 1:
                forms.append(key)
                if "_" in key:
                    forms.append(key.replace("_", "-"))
            for form in forms:
                names[form] = option
            strings[f"{section}.{key}"] = forms
    for section, aliases in ORIGINAL_ALIASES.items():
        for alias, key in aliases.items():
            if alias == "train_batches_cnt":
                continue  # registered on its own: it also sets lr_total_steps
            option = Option(section, key, fields[section][key])
            names.setdefault(alias, option)
            strings[f"{section}.{key}"].append(alias)
    return names, strings


def is_list(annotation: str) -> bool:
    return annotation.startswith(("list", "tuple")) or "| list" in annotation


def is_bool(annotation: str) -> bool:
    return annotation.split("|")[0].strip() == "bool"


def parse_scalar(text: str) -> Any:
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
        parsed = parse_scalar(value)
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
        value = parse_scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------- config files
def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PLDRError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib
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


def normalize(raw: dict[str, Any], names: dict[str, Option], where: str) -> dict[str, dict]:
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
                    _steps_per_epoch(out, sub_value)
                    continue
                option = names.get(f"{key}.{sub}")
                if option is None and sub in ORIGINAL_ALIASES.get(key, {}):
                    option = names[sub]
                if option is None:
                    raise PLDRError(f"{where}: unknown key '{key}.{sub}'")
                out[key][option.key] = sub_value
            continue
        if key in IGNORED_FLAGS:
            continue
        if key == "train_batches_cnt":
            _steps_per_epoch(out, value)
            continue
        option = names.get(key)
        if option is None:
            raise PLDRError(f"{where}: unknown key {key!r}")
        out[option.section][option.key] = value
    return out


def _steps_per_epoch(sections: dict[str, dict[str, Any]], value: Any) -> None:
    """The original's ``train_batches_cnt``: steps per epoch and also the schedule's length."""
    sections["train"]["steps_per_epoch"] = value
    sections["train"].setdefault("lr_total_steps", value)


# Keys that describe the same thing: setting one in an overlay drops the other from the base.
_EXCLUSIVE = {("model", "dk"): ("model", "d_model"), ("model", "d_model"): ("model", "dk")}


def merge(base: dict[str, dict], overlay: dict[str, dict]) -> dict[str, dict]:
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
class RunConfig:
    """One run: the four sections after merging, every value checked, and the run folder.

    ``model`` holds :class:`~pldr_llm.core.config.PLDRConfig` keyword arguments
    (``input_vocab_size`` may still be ``None``: the tokenizer gives it when the run starts).
    ``run_dir`` and ``resuming`` are set by :func:`prepare_run` (a folder that holds a
    ``run.yaml`` is resumed).
    """

    sections: dict[str, dict[str, Any]]
    model: dict[str, Any]
    predefined_G: str | None
    data: Any  # DataConfig
    tokenizer: TokenizerSettings
    train: Any  # TrainConfig
    context_length: int
    run_dir: Path | None = None
    resuming: bool = False

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The complete, explicit config written to ``run.yaml`` (every default spelled out)."""
        train = self.train.to_dict()
        train["context_length"] = self.context_length
        model = dict(self.model)
        if self.predefined_G is not None:
            model["predefined_G"] = self.predefined_G
        return {
            "model": model,
            "data": self.data.to_dict(),
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "train": train,
        }

    def to_yaml(self) -> str:
        """:meth:`to_sections` as YAML, in section order."""
        import yaml

        return yaml.safe_dump(self.to_sections(), sort_keys=False, default_flow_style=None)


def resolve(sections: dict[str, dict[str, Any]], world_size: int = 1) -> RunConfig:
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
    # Checked now, before anything loads; the run's per-rank size is the trainer's
    # (``Trainer.batch_size``, resolved once there), which the data iterators take.
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
    from pldr_llm.core.config import PLDRConfig

    probe = dict(model)
    if probe.get("input_vocab_size") is None:
        probe["input_vocab_size"] = max(tokenizer.vocab_size, 8)
    try:
        PLDRConfig(**probe)
    except TypeError as exc:
        raise PLDRError(f"model: {exc}") from None

    from pldr_llm.data.config import DataConfig

    data = DataConfig.from_dict(dict(clean["data"]))
    return RunConfig(clean, model, predefined_G, data, tokenizer, train, context_length)


def check_resumable(saved: dict[str, dict], new: dict[str, dict]) -> None:
    """Refuse to resume a run with settings that change what it computes."""
    from pldr_llm.data.config import DataConfig
    from pldr_llm.train.config import TrainConfig

    resumable = {
        "train": TrainConfig.resumable_fields(),
        "data": frozenset(
            f.name for f in dataclasses.fields(DataConfig) if f.metadata.get("resumable")
        ),
    }
    for section in SECTIONS:
        old_s, new_s = saved.get(section, {}), new.get(section, {})
        for key in sorted(set(old_s) | set(new_s)):
            if key in resumable.get(section, ()):
                continue
            if _norm(old_s.get(key)) != _norm(new_s.get(key)):
                raise PLDRError(
                    f"the run folder was started with {section}.{key}={old_s.get(key)!r}, this "
                    f"command gives {new_s.get(key)!r}; resume with the same settings or use a "
                    "new --out"
                )


def _norm(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_norm(v) for v in value]
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def prepare_run(
    out: str | os.PathLike[str] | None,
    *,
    preset: str | None = None,
    config: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    world_size: int | None = None,
) -> RunConfig:
    """The run configuration of ``out`` from a preset, a config file and overrides, checked.

    ``overrides`` takes the forms a config file takes: ``{"train": {"max_steps": 20}}``, or flat
    keys (``{"train.max_steps": 20}``, ``{"max_steps": 20}``, the original's names). A folder that
    holds a run (``run.yaml``) is resumed: without ``preset`` and ``config`` its own settings are
    the base, and a setting that would change what it computes is refused (:class:`PLDRError`).
    Without either and without a saved run, the defaults are the original's (the paper's 110M
    model and training settings). ``out`` may be ``None`` to only resolve a config.
    """
    names, _ = registry()
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise PLDRError(
            f"--out {run_dir} is a file, not a folder: give a new folder or an existing run folder"
        )
    saved_path = run_dir / RUN_FILE if run_dir is not None else None
    saved = None
    if saved_path is not None and saved_path.is_file():
        saved = normalize(read_config_file(saved_path), names, str(saved_path))

    if preset is None and config is None:
        base = saved if saved is not None else {s: {} for s in SECTIONS}
    else:
        base = {s: {} for s in SECTIONS}
        if preset is not None:
            base = normalize(load_preset(preset), names, f"preset {preset}")
        if config is not None:
            path = Path(config)
            base = merge(base, normalize(read_config_file(path), names, str(path)))
    merged = merge(base, normalize(dict(overrides or {}), names, "overrides"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    resolved = resolve(merged, world_size)
    if saved is not None:
        check_resumable(resolve(saved, world_size).to_sections(), resolved.to_sections())
    resolved.run_dir = run_dir
    resolved.resuming = saved is not None
    return resolved
