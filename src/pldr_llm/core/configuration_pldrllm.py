"""``PldrllmConfig``: the transformers configuration of a PLDR-LLM (``model_type = "pldrllm"``).

It stores the architecture under the key names of the authors' transformers implementation
(``hidden_size``, ``num_hidden_layers``, ``custom_G_type``, ``reference_rope``, ...), so a
``config.json`` written here is readable by theirs and theirs load here; the project's own names
(``d_model``, ``num_layers``, ``version``, ...) read through as aliases, and older exports that
stored those names still load. Besides the architecture it holds the transformers-side switches:
which caches ``generate()`` uses by default, and whether a forward call without
``attention_mask`` treats the pad id as padding.

The class is written in the classic ``__init__`` style (not as a dataclass) because that is the
form every transformers release accepts for code shipped with a model folder
(``trust_remote_code``). This file is copied, unchanged, into exported folders; of this package
it imports only the configuration core, as a sibling (``from .config import ...``).
"""

from typing import Any

from transformers import PretrainedConfig

from .config import HF_NAMES, PLDRConfig

# The project's names -> the stored (authors') attribute names; transformers resolves reads and
# writes of the left-hand names through this map.
_ATTRIBUTE_MAP = {ours: theirs for ours, theirs in HF_NAMES.items() if not ours.endswith("_id")}

# Every key's default. The architecture's are PLDRConfig's (the paper's 110M model) under the
# authors' names, so the two classes cannot disagree; ``head_dim`` None follows hidden_size /
# num_attention_heads. Then the transformers-side switches.
_DEFAULTS: dict[str, Any] = {
    **PLDRConfig().to_hf_dict(),
    "head_dim": None,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "output_pldr_attentions": False,
    "use_cache": True,
    "use_kvcache": True,
    "use_Gcache": True,
    "infer_padding_mask": True,
}
# The keys transformers' base class takes in its own __init__.
_BASE_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings")


class PldrllmConfig(PretrainedConfig):
    """Configuration of :class:`PldrllmForCausalLM` (the authors' keys; see the module docstring).

    Keyword arguments (each optional; the defaults are :class:`pldr_llm.core.config.PLDRConfig`'s):
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
            head_dim, hidden_act, max_position_embeddings, layer_norm_eps, rope_theta,
            rope_scaling, attention_bias, glu_bias, final_bias, reference_rope, num_reslayerA,
            num_denseA, A_dff, cache_first_G: the architecture (see
            :class:`pldr_llm.core.config.PLDRConfig`).
        custom_G_type: None for a learned G_LM (v510); ``"identity"``, ``"random"`` or
            ``"external"`` for a predefined G_LM per layer (v510G), stored in the weights as
            ``decoder.past_G_values``.
        pad_token_id / bos_token_id / eos_token_id: 0 / 2 / 3 in PLDR-LLM tokenizers.
        attention_dropout, output_pldr_attentions: kept for the authors' implementation
            (inference here has no dropout; deductive outputs are asked per call).
        use_kvcache: ``generate()`` keeps a KV-cache (one new token per step) unless told otherwise.
        use_Gcache: ``generate()`` infers G_LM on the first pass and reuses it.
        infer_padding_mask: a forward call with ``attention_mask=None`` whose ``input_ids`` contain
            the pad id treats those positions as padding, with per-row semantics (padding is kept
            out of the metric tensor A, the keys and the rotary positions). transformers callers
            such as lm-eval's ``hf`` model right-pad batches without a mask; with this on, every
            row scores exactly as it would alone. Off: the original's semantics (pad keys masked,
            but pad positions still count in A).
    """

    model_type = "pldrllm"
    attribute_map = _ATTRIBUTE_MAP

    def __init__(self, **kwargs: Any) -> None:
        # Older exports of this project stored the PLDRConfig names: read them as aliases.
        for ours, theirs in _ATTRIBUTE_MAP.items():
            if ours in kwargs:
                kwargs[theirs] = kwargs.pop(ours)
        if kwargs.pop("version", None) == "v510G" and kwargs.get("custom_G_type") is None:
            kwargs["custom_G_type"] = "external"
        values = {name: kwargs.pop(name, default) for name, default in _DEFAULTS.items()}
        if values["head_dim"] is None:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        # Set before the base __init__, the base class's keys too: some transformers releases
        # read them while initializing, and the base class only stores them on others.
        for name, value in values.items():
            setattr(self, name, value)
        super().__init__(**{name: values[name] for name in _BASE_KEYS}, **kwargs)

    # transformers 5 turns ``rope_scaling`` into a deprecated alias of ``rope_parameters`` (and
    # rewrites it); the authors' format stores the Llama-style dict under this name, as is.
    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        return self.__dict__.get("rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.__dict__["rope_scaling"] = value

    @property
    def version(self) -> str:
        """``"v510G"`` (predefined G_LM, ``custom_G_type`` set) or ``"v510"`` (learned G_LM)."""
        return "v510G" if self.custom_G_type is not None else "v510"

    def pldr_config(self) -> PLDRConfig:
        """The core configuration (checked: a bad value is a one-line PLDRError)."""
        data = {key: getattr(self, key, None) for key in _STORED_KEYS}
        return PLDRConfig.from_hf_dict(data)

    def architecture(self) -> dict[str, Any]:
        """The architecture hyperparameters under PLDRConfig's names."""
        return self.pldr_config().to_dict()

    @classmethod
    def from_architecture(cls, arch: dict[str, Any], **kwargs: Any) -> "PldrllmConfig":
        """Build from PLDRConfig fields (``PLDRConfig.to_dict()``); extra keys are ignored."""
        known = {k: v for k, v in arch.items() if k in PLDRConfig.__dataclass_fields__}
        known.pop("extra", None)
        values = PLDRConfig(**known).to_hf_dict()
        values.update(kwargs)
        return cls(**values)


# Every key PLDRConfig.from_hf_dict reads (the authors' names).
_STORED_KEYS = tuple(PLDRConfig().to_hf_dict())
