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
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PLDRError

# Activation names the model supports, with the spellings the original's files use.
ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "sigmoid")

MODEL_VERSIONS = ("v510", "v510G")
#: What :meth:`PLDRModel.set_activation_checkpointing` accepts (a way to run the model, not part
#: of its config): nothing recomputed, each decoder layer recomputed in backward, or only its
#: attention block (PLGA: projections, metric learner, power law, attention).
ACTIVATION_CHECKPOINTING = ("off", "layer", "selective")

# The switches of the authors' transformers implementation that the original hard-codes.
_SWITCHES = (
    "rope_theta",
    "reference_rope",
    "rope_scaling",
    "attention_bias",
    "glu_bias",
    "final_bias",
    "layer_norm_eps",
    "cache_first_G",
)

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
    *_SWITCHES,
    "causal_metric",
)

#: The sizes every stored configuration must state (no default stands in for a missing one).
REQUIRED_KEYS = ("num_layers", "d_model", "num_heads", "dff", "A_dff", "input_vocab_size")

# PLDRConfig fields -> their names in the authors' transformers config (``PldrllmConfig``,
# ``model_type: "pldrllm"``); the other architecture fields share their names.
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "num_heads": "num_attention_heads",
    "dff": "intermediate_size",
    "input_vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings",
    "activation": "hidden_act",
    "pad_id": "pad_token_id",
    "eos_id": "eos_token_id",
    "bos_id": "bos_token_id",
}
# How close (difflib's ratio) a key that is not the model's may come to a model key before it is
# taken for a misspelling of it; every key of the original's run settings stays below this
# (tests/test_config.py checks them all).
_MISSPELT = 0.85

# The authors' predefined-G kinds (``custom_G_type``); every one maps onto version v510G.
CUSTOM_G_TYPES = ("identity", "random", "external")

# rope_scaling types implemented (as in transformers' Llama); others are refused.
ROPE_SCALING_TYPES = ("default", "linear", "llama3")

_LLAMA3_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclass
class PLDRConfig:
    """Every architecture hyperparameter of a PLDR-LLM (the original's key names).

    ``depth`` (dk) is ``d_model // num_heads``. ``version`` is ``"v510"`` for the learned power law
    graph attention and ``"v510G"`` for a model whose G_LM is predefined per layer (no metric
    learner weights). ``causal_metric`` (not in the original; off by default) builds the metric
    tensor of position t from positions <= t only, so the loss cannot see the future through A
    (see docs/deductive.md).

    The remaining fields are the switches of the authors' transformers implementation
    (``PldrllmConfig``); their defaults are the original's fixed choices:

    * ``rope_theta``: rotary base. ``reference_rope``: True is the original's interleaved-pair
      rotation; False is transformers' rotate-half rotation, which alone takes ``rope_scaling``
      (``{"rope_type": "linear" | "llama3", "factor": ...}`` as in transformers' Llama).
    * ``attention_bias`` (wq, wk, wv, dense), ``glu_bias`` (every GLU: FFN and metric learner),
      ``final_bias`` (LM head): False drops those biases.
    * ``layer_norm_eps``: epsilon of every LayerNorm.
    * ``cache_first_G``: the G-cache keeps the first row's A_LM/G_LM for the whole batch.

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
        bos_id: start-of-text id.
        rope_theta: rotary base.
        reference_rope: true = the original's interleaved-pair rotary embedding; false = rotate-half.
        rope_scaling: transformers-style rotary scaling (rotate-half only), e.g. {rope_type: linear, factor: 2}.
        attention_bias: biases on wq, wk, wv and dense.
        glu_bias: biases on every GLU (feed-forward net and metric learner).
        final_bias: bias on the LM head.
        layer_norm_eps: epsilon of every LayerNorm.
        cache_first_G: the G-cache keeps the first row's A_LM/G_LM for the whole batch.
        causal_metric: build A at position t from positions <= t only (not in the original).
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
    bos_id: int = 2
    rope_theta: float = 10000.0
    reference_rope: bool = True
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = True
    glu_bias: bool = True
    final_bias: bool = True
    layer_norm_eps: float = 1e-6
    cache_first_G: bool = False
    causal_metric: bool = False
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
        for name in ("pad_id", "eos_id", "bos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.input_vocab_size:
                raise PLDRError(f"{name!r} must be an id inside the vocabulary, got {value!r}")
        bools = ("reference_rope", "attention_bias", "glu_bias", "final_bias", "cache_first_G")
        for name in (*bools, "causal_metric"):
            if not isinstance(getattr(self, name), bool):
                raise PLDRError(f"{name!r} must be true or false, got {getattr(self, name)!r}")
        for name in ("rope_theta", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise PLDRError(f"{name!r} must be a positive number, got {value!r}")
        self.rope_theta = float(self.rope_theta)
        self.layer_norm_eps = float(self.layer_norm_eps)
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise PLDRError(f"'rope_scaling' must be an object or null, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_SCALING_TYPES:
            raise PLDRError(
                f"rope_scaling type {kind!r} is not supported; supported: "
                f"{', '.join(ROPE_SCALING_TYPES)}"
            )
        if kind != "default" and self.reference_rope:
            # The authors' reference rotation has no scaling: a scaled config there is a mistake.
            raise PLDRError("'rope_scaling' applies only with reference_rope=false (rotate-half)")
        needed = {"linear": ("factor",), "llama3": _LLAMA3_KEYS}.get(kind, ())
        for key in needed:
            value = scaling.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise PLDRError(f"rope_scaling {kind!r} needs a positive {key!r}, got {value!r}")

    @property
    def depth(self) -> int:
        """Head size dk = d_model / num_heads."""
        return self.d_model // self.num_heads

    # ------------------------------------------------------------------ hpdict
    @classmethod
    def from_hpdict(cls, hpdict: dict[str, Any], **overrides: Any) -> PLDRConfig:
        """Build a config from the original's hyperparameter dictionary.

        The dictionary mixes the model's keys with the run's (``learning_rate``, ``epochs``, ...):
        the model's are read here, the others are left to the trainer
        (``pldr_llm.train.config.TrainConfig.from_hpdict`` reads and checks them) -- the model
        knows nothing of training. A key that is not the model's but is spelt like one of its
        keys (``num_layrs``) is an error that names it, so a misspelt model key is never
        silently dropped.
        """
        arch = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for key, value in hpdict.items():
            if key in arch:
                kwargs[key] = value
                continue
            close = difflib.get_close_matches(str(key), sorted(arch), n=1, cutoff=_MISSPELT)
            if close:
                raise PLDRError(f"unknown hyperparameter {key!r} (did you mean {close[0]!r}?)")
        if "activation" in kwargs:
            kwargs["activation"] = _activation_name(kwargs["activation"])
        kwargs.update(overrides)
        missing = [k for k in REQUIRED_KEYS if k not in kwargs]
        if missing:
            raise PLDRError(
                f"hyperparameter dictionary lacks {', '.join(repr(m) for m in missing)}"
            )
        return cls(**kwargs)

    def to_hpdict(self) -> dict[str, Any]:
        """The architecture keys of the original's hyperparameter dictionary.

        Switches the original lacks (rope, biases, eps, ...) are added only where they differ
        from its fixed choices, so that an original model's dictionary stays the original's and
        another model's is not read back as a different function (:meth:`from_hpdict` reads them).
        """
        extra = {
            name: getattr(self, name)
            for name in _SWITCHES
            if getattr(self, name) != PLDRConfig.__dataclass_fields__[name].default
        }
        base = {
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
        return base | extra

    # ------------------------------------------------------------------ transformers config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture under the authors' transformers key names (``config.json``).

        A v510G model is written as ``custom_G_type: "external"``: its G_LM tensors travel in the
        weights as ``decoder.past_G_values``.
        """
        keys = [k for k in ARCHITECTURE_KEYS if k != "version"] + ["pad_id", "eos_id", "bos_id"]
        data = {HF_NAMES.get(k, k): getattr(self, k) for k in keys}
        data["head_dim"] = self.depth
        data["custom_G_type"] = "external" if self.version == "v510G" else None
        return data

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> PLDRConfig:
        """The architecture of a transformers ``config.json`` of a PLDR-LLM.

        Reads the authors' key names (``hidden_size``, ``custom_G_type``, ...) and the older
        exports of this project (``d_model``, ``version``, ...). Unrelated keys are ignored.
        """
        values: dict[str, Any] = {}
        legacy = "d_model" in data
        # A missing size must be named, not replaced by a default that then conflicts.
        missing = [
            key if legacy else HF_NAMES.get(key, key)
            for key in REQUIRED_KEYS
            if data.get(key if legacy else HF_NAMES.get(key, key)) is None
        ]
        if missing:
            raise PLDRError(f"the config lacks {', '.join(repr(m) for m in missing)}")
        for key in ARCHITECTURE_KEYS + ("pad_id", "eos_id", "bos_id"):
            name = key if legacy and key in ARCHITECTURE_KEYS else HF_NAMES.get(key, key)
            if key == "version" and not legacy:
                continue
            if data.get(name) is not None or (key == "rope_scaling" and name in data):
                values[key] = data[name]
        for key in ("pad_id", "eos_id", "bos_id"):
            if isinstance(values.get(key), list):  # transformers allows several end ids
                ids = values[key]
                if not ids:
                    values.pop(key)
                else:
                    values[key] = ids[0]
        if "activation" in values:
            values["activation"] = _activation_name(values["activation"])
        if not legacy:
            custom = data.get("custom_G_type")
            if custom is not None and custom not in CUSTOM_G_TYPES:
                raise PLDRError(
                    f"custom_G_type must be null or one of {', '.join(CUSTOM_G_TYPES)}, "
                    f"got {custom!r}"
                )
            values["version"] = "v510G" if custom is not None else "v510"
        try:
            config = cls(**values)
        except TypeError as exc:
            raise PLDRError(f"bad transformers config: {exc}") from None
        head_dim = data.get("head_dim")
        if head_dim is not None and head_dim != config.depth:
            raise PLDRError(
                f"head_dim={head_dim} differs from hidden_size/num_attention_heads = {config.depth}"
            )
        return config

    @classmethod
    def from_hyperparameters_file(cls, path: str | Path) -> PLDRConfig:
        """Read a published ``*_hyperparameters.py`` file without executing it."""
        return cls.from_hpdict(read_hyperparameters_file(path))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not data.get("extra"):
            data.pop("extra", None)
        if not data["causal_metric"]:  # the original's behaviour: config files stay as they were
            data.pop("causal_metric")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PLDRConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PLDRError(f"unknown config key {unknown[0]!r}")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:  # named, not replaced by a default that then conflicts with the others
            raise PLDRError(f"the config lacks {', '.join(repr(m) for m in missing)}")
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
        from .fileio import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PLDRConfig:
        path = Path(path)
        if not path.is_file():
            raise PLDRError(f"config file not found: {path}")
        return cls.from_json(path.read_text())


def check_token_range(low: int, high: int, vocab: int) -> None:
    """Raise a one-line :class:`PLDRError` unless ids from ``low`` to ``high`` (a batch's
    smallest and largest) are ids of a vocabulary of ``vocab`` entries."""
    if low < 0 or high >= vocab:
        raise PLDRError(
            f"token id {low if low < 0 else high} is outside the vocabulary [0, {vocab})"
        )


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


def hyperparameters_file_text(hpdict: dict[str, Any]) -> str:
    """The original's ``*_hyperparameters.py`` layout: an import and one ``hpdict`` literal."""
    lines = ["import torch.nn.functional as F", "", "hpdict = {"]
    for key, value in hpdict.items():
        text = f"F.{value}" if key == "activation" else repr(value)
        lines.append(f"    {key!r}: {text},")
    lines.append("}")
    return "\n".join(lines) + "\n"
