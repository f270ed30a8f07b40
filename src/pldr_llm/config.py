"""Model configuration: :class:`PLDRConfig` and the original's hyperparameter dictionaries/files.

The original implementation describes a model with a hyperparameter dictionary (``hpdict``) that
mixes architecture keys with training keys, and publishes it as a Python file
(``<name>_hyperparameters.py``: ``import torch.nn.functional as F`` then ``hpdict={...}``). We read
those files without executing them: the dictionary literal is parsed with :mod:`ast` and the only
non-literal values allowed are the activation functions (``F.silu`` and friends).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pldr_llm.errors import PLDRError

# Activation names the model supports, with the spellings the original's files use.
ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "sigmoid")

MODEL_VERSIONS = ("v510", "v510G")

# The architecture fields of PLDRConfig that transformers' PldrllmConfig and hpdicts share.
ARCHITECTURE_KEYS = (
    "num_layers",
    "d_model",
    "num_heads",
    "dff",
    "A_dff",
    "num_reslayerA",
    "num_denseA",
    "input_vocab_size",
    "max_seq_len",
    "activation",
    "version",
)

# hpdict keys that describe training or the run, not the architecture; accepted and ignored here
# (the trainer reads them through ``TrainConfig.from_hpdict``).
TRAINING_KEYS = frozenset(
    {
        "epochs",
        "save_model_path",
        "warmup_steps",
        "lr_total_steps",
        "learning_rate",
        "lr_alpha",
        "adamw_decay",
        "disable_amp",
        "auto_size_minimum",
        "disable_fsdp_mixed_precision",
        "fsdp_cpu_offload",
        "fsdp_sharding_strategy",
        "backward_prefetch",
        "save_type",
        "device",
        "batch_size",
        "context_length",
        "dag_reg_coeffs",
        "DAG_reg_coeffs",
    }
)


@dataclass
class PLDRConfig:
    """Every architecture hyperparameter of a PLDR-LLM (the original's key names).

    ``depth`` (dk) is ``d_model // num_heads``. ``version`` is ``"v510"`` for the learned power law
    graph attention and ``"v510G"`` for a model whose G_LM is predefined per layer (no metric
    learner weights).

    Attributes:
        num_layers: decoder layers.
        d_model: model width.
        num_heads: attention heads (dk = d_model / num_heads).
        dff: hidden size of each layer's SwiGLU feed-forward net.
        A_dff: hidden size of the residual GLU units that refine the metric tensor A.
        num_reslayerA: residual units refining A per layer.
        num_denseA: GLU layers per residual unit.
        input_vocab_size: vocabulary size (null in a run config: the tokenizer's).
        max_seq_len: longest sequence (context) the model accepts.
        activation: activation of the GLU units (silu).
        version: v510 (learned G_LM) or v510G (predefined G_LM).
        pad_id: padding id (masked as a key).
        eos_id: end-of-text id.
    """

    num_layers: int = 5
    d_model: int = 896
    num_heads: int = 14
    dff: int = 2389
    A_dff: int = 170
    num_reslayerA: int = 8
    num_denseA: int = 2
    input_vocab_size: int = 32000
    max_seq_len: int = 1024
    activation: str = "silu"
    version: str = "v510"
    pad_id: int = 0
    eos_id: int = 3
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        ints = (
            "num_layers",
            "d_model",
            "num_heads",
            "dff",
            "A_dff",
            "input_vocab_size",
            "max_seq_len",
        )
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PLDRError(
                    f"hyperparameter {name!r} must be a positive integer, got {value!r}"
                )
        for name in ("num_reslayerA", "num_denseA"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PLDRError(
                    f"hyperparameter {name!r} must be a non-negative integer, got {value!r}"
                )
        if self.d_model % self.num_heads:
            raise PLDRError(
                f"hyperparameter 'd_model' ({self.d_model}) must be divisible by 'num_heads' ({self.num_heads})"
            )
        if self.depth % 2:
            raise PLDRError(
                f"head size d_model/num_heads = {self.depth} must be even for rotary position embedding"
            )
        if self.activation not in ACTIVATIONS:
            raise PLDRError(
                f"hyperparameter 'activation' must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.version not in MODEL_VERSIONS:
            raise PLDRError(
                f"model 'version' must be one of {MODEL_VERSIONS}, got {self.version!r}"
            )
        for name in ("pad_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.input_vocab_size:
                raise PLDRError(f"{name!r} must be an id inside the vocabulary, got {value!r}")

    @property
    def depth(self) -> int:
        """Head size dk = d_model / num_heads."""
        return self.d_model // self.num_heads

    # ------------------------------------------------------------------ hpdict
    @classmethod
    def from_hpdict(cls, hpdict: dict[str, Any], **overrides: Any) -> PLDRConfig:
        """Build a config from the original's hyperparameter dictionary.

        Training keys are accepted and ignored; an unknown key is an error that names it.
        """
        arch = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for key, value in hpdict.items():
            if key in arch:
                kwargs[key] = value
            elif key in TRAINING_KEYS:
                continue
            else:
                raise PLDRError(f"unknown hyperparameter {key!r}")
        if "activation" in kwargs:
            kwargs["activation"] = _activation_name(kwargs["activation"])
        kwargs.update(overrides)
        missing = [
            k
            for k in ("num_layers", "d_model", "num_heads", "dff", "A_dff", "input_vocab_size")
            if k not in kwargs
        ]
        if missing:
            raise PLDRError(
                f"hyperparameter dictionary lacks {', '.join(repr(m) for m in missing)}"
            )
        return cls(**kwargs)

    def to_hpdict(self) -> dict[str, Any]:
        """The architecture keys of the original's hyperparameter dictionary."""
        return {
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "dff": self.dff,
            "A_dff": self.A_dff,
            "num_reslayerA": self.num_reslayerA,
            "num_denseA": self.num_denseA,
            "input_vocab_size": self.input_vocab_size,
            "max_seq_len": self.max_seq_len,
            "activation": self.activation,
        }

    @classmethod
    def from_hyperparameters_file(cls, path: str | Path) -> PLDRConfig:
        """Read a published ``*_hyperparameters.py`` file without executing it."""
        return cls.from_hpdict(read_hyperparameters_file(path))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not data.get("extra"):
            data.pop("extra", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PLDRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PLDRError(f"unknown config key {unknown[0]!r}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PLDRConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PLDRError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PLDRError("config JSON must be an object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from pldr_llm.fileio import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PLDRConfig:
        path = Path(path)
        if not path.is_file():
            raise PLDRError(f"config file not found: {path}")
        return cls.from_json(path.read_text())


def _activation_name(value: Any) -> str:
    if callable(value):
        value = getattr(value, "__name__", repr(value))
    if not isinstance(value, str):
        raise PLDRError(f"hyperparameter 'activation' must be an activation name, got {value!r}")
    name = value.rsplit(".", 1)[-1].lower()
    if name not in ACTIVATIONS:
        raise PLDRError(f"unsupported activation {value!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


_ALLOWED_MODULE_ALIASES = {"F", "nn", "torch", "functional"}


def _literal(node: ast.AST, path: Path) -> Any:
    """Evaluate a literal AST node; attribute chains like ``F.silu`` become activation names."""
    if isinstance(node, ast.Attribute):
        parts = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in _ALLOWED_MODULE_ALIASES:
            name = parts[0]
            if name in ACTIVATIONS:
                return name
        raise PLDRError(f"{path}: unsupported expression {ast.unparse(node)!r} in hyperparameters")
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise PLDRError(f"{path}: '**' expansion is not allowed in hyperparameters")
            out[_literal(k, path)] = _literal(v, path)
        return out
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, path) for e in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return ast.literal_eval(node)
    if isinstance(node, ast.Constant):
        return node.value
    raise PLDRError(f"{path}: unsupported expression {ast.unparse(node)!r} in hyperparameters")


def read_hyperparameters_file(path: str | Path) -> dict[str, Any]:
    """Parse the ``hpdict = {...}`` literal of a published hyperparameters file (never executed).

    Only imports, and one assignment of a dictionary literal to ``hpdict``, are allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise PLDRError(f"hyperparameters file not found: {path}")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise PLDRError(
            f"{path}: not a valid hyperparameters file ({exc.msg}, line {exc.lineno})"
        ) from None
    hpdict = None
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Dict)
        ):
            hpdict = _literal(stmt.value, path)
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring
        raise PLDRError(
            f"{path}: only imports and one 'hpdict = {{...}}' are allowed (line {stmt.lineno})"
        )
    if not isinstance(hpdict, dict):
        raise PLDRError(f"{path}: no 'hpdict = {{...}}' dictionary found")
    return hpdict
