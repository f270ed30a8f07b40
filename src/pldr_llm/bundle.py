"""Resolve ``--model X`` into a model and its tokenizer.

``X`` may be:

* a **published bundle** folder, as on the PLDR-LLM hub pages: ``<name>-model-checkpoint.pth``
  (the original's ``torch.save`` format), ``<name>_hyperparameters.py`` (the ``hpdict`` literal,
  parsed, never executed) and a tokenizer ``*.tar.gz`` (or a ``.model`` file);
* a folder in the project's **own format**: ``config.json``, ``model.safetensors`` and
  ``tokenizer.model`` (what ``pldr-llm convert`` and training write), or a transformers folder
  (``model_type: "pldrllm"``: the authors' hub repos, or what ``pldr-llm convert --to hf``
  writes; read without transformers, ``tokenizer_config.json``'s ``add_bos_token`` /
  ``add_eos_token`` respected);
* a **Hugging Face hub repository id** (``owner/name``, optionally ``owner/name@revision``),
  fetched with ``huggingface_hub.snapshot_download`` into the hub's normal cache. With
  ``HF_HUB_OFFLINE=1`` the cached copy is used without network access.

:func:`resolve_weights` reads the weights of the same specs (and of a single ``.pth`` or
``.safetensors`` file) without building a model: ``train.init_from`` starts a run from them.

Everything is checked before weights are read: a missing or ambiguous file, a tokenizer whose
vocabulary does not fit the model's embedding, or an unusable device is a one-line
:class:`~pldr_llm.core.errors.PLDRError`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pldr_llm.core.config import PLDRConfig
from pldr_llm.core.errors import PLDRError, first_line
from pldr_llm.core.fileio import (
    CHECKPOINT_SUFFIX,
    CONFIG_NAME,
    HYPERPARAMETERS_SUFFIX,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    read_json_object,
)
from pldr_llm.devices import resolve_device

if TYPE_CHECKING:  # heavy imports only where the model is loaded
    import torch

    from pldr_llm.clock import CallClock
    from pldr_llm.core.model import PLDRModel
    from pldr_llm.tokenizer import PLDRTokenizer

__all__ = [
    "BundleFiles",
    "resolve_model_dir",
    "inspect_bundle",
    "resolve_bundle",
    "resolve_weights",
    "bundle_state",
    "load_bundle",
    "bundle_tokenizer",
    "check_vocab",
    "resolve_device",
    "resolve_dtype",
    "HUB_ALLOW_PATTERNS",
]

log = logging.getLogger(__name__)


# What a hub download fetches: the files of both folder formats, nothing else (published repos
# may hold large extra files such as other checkpoints' exports).
HUB_ALLOW_PATTERNS = [
    "*.pth",
    "*_hyperparameters.py",
    "*.tar.gz",
    "*.tgz",
    "*.model",
    "*.vocab",
    CONFIG_NAME,
    "tokenizer_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
]

# owner/name[@revision], the hub's repository id syntax.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BundleFiles:
    """The files a model folder resolved to (nothing loaded yet but the configuration).

    ``kind`` is ``"reference"`` (published ``.pth`` bundle), ``"pldr"`` (own format) or ``"hf"``
    (a transformers folder written by ``pldr-llm convert --to hf``; read without transformers).
    """

    kind: str
    root: Path
    weights: Path
    config: PLDRConfig
    tokenizer: Path | None
    hyperparameters: Path | None = None
    source: str = ""


# ---------------------------------------------------------------------- devices and dtypes


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) as a torch dtype; None and
    ``"auto"`` (keep the stored dtype) give None."""
    import torch

    if spec is None or isinstance(spec, torch.dtype):
        return spec
    if str(spec).strip().lower() == "auto":
        return None
    name = str(spec).strip().lower().removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise PLDRError(f"unknown dtype {spec!r}: use {', '.join(DTYPES)}")
    return getattr(torch, name)


# ---------------------------------------------------------------------- locating the folder


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the form of a hub repository id (``owner/name[@revision]``)."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise PLDRError(
            f"{repo_id!r} is not a local folder, and fetching it from the Hugging Face hub needs "
            "'huggingface_hub': pip install 'pldr-llm[hf]'"
        ) from None
    where = f"{repo_id}@{revision}" if revision else repo_id
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        path = huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except hub_errors.RepositoryNotFoundError:
        raise PLDRError(
            f"{repo_id!r} is neither a local folder nor a Hugging Face hub repository "
            "you can access"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise PLDRError(f"hub repository {repo_id!r} has no revision {revision!r}") from None
    except hub_errors.GatedRepoError:
        raise PLDRError(
            f"hub repository {repo_id!r} is gated: accept its terms and log in"
        ) from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        if offline:
            raise PLDRError(
                f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it once with network access"
            ) from None
        raise PLDRError(
            f"could not fetch {where} from the Hugging Face hub (no network?) and it is not cached"
        ) from None
    except hub_errors.HFValidationError as exc:
        raise PLDRError(
            f"{repo_id!r} is not a valid hub repository id ({first_line(exc)})"
        ) from None
    except Exception as exc:  # network stacks raise many classes (httpx, OSError, hub HTTP errors)
        raise PLDRError(
            f"could not fetch {where} from the Hugging Face hub: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from None
    return Path(path)


def resolve_model_dir(spec: str | os.PathLike[str]) -> Path:
    """The local folder of ``spec``: the folder itself, or the hub snapshot of a repository id."""
    text = os.fspath(spec)
    if not text.strip():
        raise PLDRError("no model given")
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PLDRError(f"--model takes a folder (or a hub repository id), not a file: {path}")
    if looks_like_hub_id(text):
        repo_id, _, revision = text.partition("@")
        return _download(repo_id, revision or None)
    raise PLDRError(f"model folder not found: {path}")


# ---------------------------------------------------------------------- reading the folder


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _pick_hyperparameters(folder: Path, checkpoint: Path) -> Path:
    candidates = sorted(p for p in folder.glob(f"*{HYPERPARAMETERS_SUFFIX}") if p.is_file())
    if not candidates:
        raise PLDRError(
            f"{folder} has the checkpoint {checkpoint.name} but no '*{HYPERPARAMETERS_SUFFIX}' file"
        )
    if len(candidates) == 1:
        return candidates[0]
    # Published names differ only in separators: "PLDRv51-110M-2-model-checkpoint.pth" goes with
    # "PLDRv51_110M_2_hyperparameters.py".
    stem = _normalized(
        checkpoint.name.removesuffix(CHECKPOINT_SUFFIX).removesuffix("-model-checkpoint")
    )
    matching = [
        p for p in candidates if _normalized(p.name.removesuffix(HYPERPARAMETERS_SUFFIX)) == stem
    ]
    if len(matching) == 1:
        return matching[0]
    names = ", ".join(p.name for p in candidates)
    raise PLDRError(f"{folder} holds several hyperparameter files ({names}); keep one")


def _tokenizer_in(folder: Path) -> Path | None:
    from pldr_llm.tokenizer import find_tokenizer_file

    try:
        return find_tokenizer_file(folder)
    except PLDRError as exc:
        if str(exc).startswith("no tokenizer in"):
            return None
        raise


def _read_config_json(path: Path) -> tuple[str, PLDRConfig]:
    """``("pldr", config)`` for the project's config, ``("hf", config)`` for a transformers one."""
    data = read_json_object(path)
    if "model_type" in data or "architectures" in data:
        from pldr_llm.core.hf_folder import is_hf_config, pldr_config_from_hf

        if not is_hf_config(data):
            raise PLDRError(
                f"{path.parent} is a transformers folder of model type "
                f"{data.get('model_type')!r}, not a PLDR-LLM"
            )
        kind, read = "hf", pldr_config_from_hf
    else:
        kind, read = "pldr", PLDRConfig.from_dict
    try:
        return kind, read(data)
    except PLDRError as exc:
        raise PLDRError(f"{path}: {exc}") from None


def inspect_bundle(folder: str | Path, source: str = "") -> BundleFiles:
    """Find the checkpoint, configuration and tokenizer of a model folder (no weights read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PLDRError(f"model folder not found: {folder}")
    checkpoints = sorted(p for p in folder.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file())
    has_config = (folder / CONFIG_NAME).is_file()
    has_weights = (folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()

    if has_config or has_weights:
        if checkpoints:
            raise PLDRError(
                f"{folder} mixes the project's format ({CONFIG_NAME}/{WEIGHTS_NAME}) with a "
                f"'.pth' checkpoint ({checkpoints[0].name}); keep one model per folder"
            )
        if not has_weights:
            raise PLDRError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        if not has_config:
            raise PLDRError(f"{folder} has {WEIGHTS_NAME} but no {CONFIG_NAME}")
        kind, config = _read_config_json(folder / CONFIG_NAME)
        if kind == "pldr" and not (folder / WEIGHTS_NAME).is_file():
            raise PLDRError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        weights = folder / WEIGHTS_NAME
        return BundleFiles(
            kind=kind,
            root=folder,
            weights=weights if weights.is_file() else folder / WEIGHTS_INDEX_NAME,
            config=config,
            tokenizer=_tokenizer_in(folder),
            source=source or str(folder),
        )

    if len(checkpoints) > 1:
        names = ", ".join(p.name for p in checkpoints)
        raise PLDRError(
            f"{folder} holds {len(checkpoints)} checkpoints ({names}); keep exactly one"
        )
    if not checkpoints:
        raise PLDRError(
            f"no model in {folder}: expected '<name>-model-checkpoint.pth' with "
            f"'<name>{HYPERPARAMETERS_SUFFIX}', or {CONFIG_NAME} with {WEIGHTS_NAME}"
        )
    checkpoint = checkpoints[0]
    hyperparameters = _pick_hyperparameters(folder, checkpoint)
    return BundleFiles(
        kind="reference",
        root=folder,
        weights=checkpoint,
        config=PLDRConfig.from_hyperparameters_file(hyperparameters),
        tokenizer=_tokenizer_in(folder),
        hyperparameters=hyperparameters,
        source=source or str(folder),
    )


def resolve_bundle(spec: str | os.PathLike[str]) -> BundleFiles:
    """:func:`resolve_model_dir` then :func:`inspect_bundle`."""
    return inspect_bundle(resolve_model_dir(spec), source=os.fspath(spec))


def check_vocab(tokenizer: PLDRTokenizer, config: PLDRConfig, where: str = "") -> None:
    """Fail if the tokenizer has ids the model's embedding lacks; warn on other id mismatches."""
    if tokenizer.vocab_size > config.input_vocab_size:
        source = f" of {where}" if where else ""
        raise PLDRError(
            f"tokenizer {tokenizer.model_path.name} has {tokenizer.vocab_size} pieces but the model"
            f"{source} embeds only input_vocab_size={config.input_vocab_size}: "
            "they do not belong together"
        )
    if tokenizer.eos_id != config.eos_id or tokenizer.pad_id != config.pad_id:
        log.warning(
            "tokenizer ids (pad %d, end %d) differ from the model's (pad %d, end %d)",
            tokenizer.pad_id,
            tokenizer.eos_id,
            config.pad_id,
            config.eos_id,
        )


# ---------------------------------------------------------------------- loading


def bundle_tokenizer(
    files: BundleFiles,
    tokenizer: str | os.PathLike[str] | PLDRTokenizer | None = None,
    required: bool = True,
) -> PLDRTokenizer | None:
    """The tokenizer of ``files`` (or ``tokenizer`` instead), checked against the model's config."""
    from pldr_llm.tokenizer import PLDRTokenizer, load_tokenizer

    if isinstance(tokenizer, PLDRTokenizer):
        tok: PLDRTokenizer | None = tokenizer
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif files.tokenizer is not None:
        tok = load_tokenizer(files.tokenizer)
    elif required:
        raise PLDRError(
            f"no tokenizer in {files.root}: expected a '.model' file or a tokenizer '.tar.gz' "
            "(or pass one with --tokenizer)"
        )
    else:
        return None
    assert tok is not None
    if files.kind == "hf" and not isinstance(tokenizer, PLDRTokenizer):
        from pldr_llm.core.hf_folder import read_tokenizer_flags

        tok.add_bos, tok.add_eos = read_tokenizer_flags(files.root)
    check_vocab(tok, files.config, files.source)
    return tok


def load_bundle(
    spec: str | os.PathLike[str] | BundleFiles,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    tokenizer: str | os.PathLike[str] | PLDRTokenizer | None = None,
    require_tokenizer: bool = True,
    clock: CallClock | None = None,
) -> tuple[PLDRModel, PLDRTokenizer | None]:
    """Load the model and tokenizer of ``spec`` (a folder, a hub id or resolved files).

    Args:
        spec: what ``--model`` names (see the module docstring).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch dtype, or None (as stored).
        tokenizer: a tokenizer (path or loaded) to use instead of the folder's own.
        require_tokenizer: fail when no tokenizer is found (else return None for it).
        clock: where to record the time of reading the weights (lap ``"weights"``) and of
            converting and moving them to the device (lap ``"device"``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``.
    """
    import torch

    target = resolve_device(device)  # a torch.device is checked too (CUDA present, index valid)
    torch_dtype = resolve_dtype(dtype)
    files = spec if isinstance(spec, BundleFiles) else resolve_bundle(spec)
    tok = bundle_tokenizer(files, tokenizer, required=require_tokenizer)

    from pldr_llm.core.model import PLDRModel
    from pldr_llm.core.state_dict import build_uninitialized, load_state_dict_strict

    if files.kind == "reference" and files.config.version == "v510G":
        # The original keeps a v510G model's G_LM outside its checkpoint.
        raise PLDRError("a v510G checkpoint needs G_list, the predefined G_LM of every layer")
    if target.type == "cuda":
        torch.empty(1, device=target)  # the CUDA context (unless the warm-up made it), timed apart
    if clock is not None:
        clock.lap("device")
    # Mapped, not read ahead: each tensor is read as it is copied into the model's parameter,
    # which is built on the target device without drawing values that the load overwrites.
    state, where = bundle_state(files)
    model = build_uninitialized(lambda: PLDRModel(files.config), target)
    load_state_dict_strict(model, state, source=where)
    if clock is not None:
        clock.lap("weights")
    if torch_dtype is not None:
        model = model.to(dtype=torch_dtype)
    model = model.to(device=target)
    if clock is not None:
        clock.lap("device")
    return model.eval(), tok


def bundle_state(files: BundleFiles) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of resolved model files under the core's key names, and the file (or folder)
    they came from: the original's ``.pth`` (its pickle read by the restricted reader), the
    project's ``model.safetensors``, or a transformers folder's (single or sharded) safetensors."""
    if files.kind == "reference":
        from pldr_llm.checkpoint import reference_state_dict
        from pldr_llm.core.fileio import safe_torch_load

        where = str(files.weights)
        return reference_state_dict(safe_torch_load(files.weights, mmap=True), where), where
    if files.kind == "hf":
        from pldr_llm.core.hf_folder import core_state_from_hf, read_hf_state

        tied = bool(read_json_object(files.root / CONFIG_NAME).get("tie_word_embeddings", False))
        return core_state_from_hf(read_hf_state(files.root), files.config, tied), str(files.root)
    from pldr_llm.core.fileio import load_safetensors

    return load_safetensors(files.weights), str(files.weights)


def resolve_weights(
    spec: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], PLDRConfig | None, str]:
    """The weights ``spec`` names: ``(state dict under the core's key names, the model's config
    or None for a bare file, where they came from)``.

    ``spec`` is anything ``--model`` takes (a published bundle, a project or transformers folder,
    sharded or not, a hub repository id) or a single weights file: an original ``.pth`` or a
    ``.safetensors`` file with the core's key names.
    """
    path = Path(os.fspath(spec)).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == CHECKPOINT_SUFFIX:
            from pldr_llm.checkpoint import reference_state_dict
            from pldr_llm.core.fileio import safe_torch_load

            return reference_state_dict(safe_torch_load(path), str(path)), None, str(path)
        if suffix == ".safetensors":
            from pldr_llm.core.fileio import load_safetensors

            return load_safetensors(path), None, str(path)
        raise PLDRError(
            f"{path} is not a weights file: give a '{CHECKPOINT_SUFFIX}' or '.safetensors' file, "
            "or a model folder"
        )
    files = resolve_bundle(spec)
    state, where = bundle_state(files)
    return state, files.config, where


def bundle_summary(files: BundleFiles, model: Any | None = None) -> str:
    """One line describing what was loaded (for logs)."""
    cfg = files.config
    what = {"reference": "published checkpoint", "hf": "transformers folder"}.get(
        files.kind, "pldr-llm folder"
    )
    params = f", {model.num_parameters() / 1e6:.1f}M parameters" if model is not None else ""
    return (
        f"{what} {files.weights.name} from {files.source}: {cfg.num_layers} layers, d_model "
        f"{cfg.d_model}, {cfg.num_heads} heads, vocabulary {cfg.input_vocab_size}{params}"
    )
