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
(``trust_remote_code``). This file is copied into exported folders; it imports nothing from
``pldr_llm`` at module level but the configuration core (rewritten to a relative import there).
"""

from typing import Any

from transformers import PretrainedConfig

from pldr_llm.config import HF_NAMES, PLDRConfig

# The project's names -> the stored (authors') attribute names; transformers resolves reads and
# writes of the left-hand names through this map.
_ATTRIBUTE_MAP = {ours: theirs for ours, theirs in HF_NAMES.items() if not ours.endswith("_id")}


class PldrllmConfig(PretrainedConfig):
    """Configuration of :class:`PldrllmForCausalLM` (the authors' keys; see the module docstring).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
            head_dim, hidden_act, max_position_embeddings, layer_norm_eps, rope_theta,
            rope_scaling, attention_bias, glu_bias, final_bias, reference_rope, num_reslayerA,
            num_denseA, A_dff, cache_first_G: the architecture (see
            :class:`pldr_llm.config.PLDRConfig`).
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

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 896,
        intermediate_size: int = 2389,
        num_hidden_layers: int = 5,
        num_attention_heads: int = 14,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 1024,
        layer_norm_eps: float = 1e-6,
        pad_token_id: int = 0,
        bos_token_id: int | None = 2,
        eos_token_id: int = 3,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        attention_bias: bool = True,
        glu_bias: bool = True,
        final_bias: bool = True,
        reference_rope: bool = True,
        attention_dropout: float = 0.0,
        num_reslayerA: int = 8,
        num_denseA: int = 2,
        A_dff: int = 170,
        custom_G_type: str | None = None,
        cache_first_G: bool = False,
        output_pldr_attentions: bool = False,
        use_cache: bool = True,
        use_kvcache: bool = True,
        use_Gcache: bool = True,
        infer_padding_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        # Older exports of this project stored the PLDRConfig names: read them as aliases.
        legacy = {ours: kwargs.pop(ours) for ours in _ATTRIBUTE_MAP if ours in kwargs}
        hidden_size = legacy.get("d_model", hidden_size)
        num_attention_heads = legacy.get("num_heads", num_attention_heads)
        if kwargs.pop("version", None) == "v510G" and custom_G_type is None:
            custom_G_type = "external"
        self.vocab_size = legacy.get("input_vocab_size", vocab_size)
        self.hidden_size = hidden_size
        self.intermediate_size = legacy.get("dff", intermediate_size)
        self.num_hidden_layers = legacy.get("num_layers", num_hidden_layers)
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = legacy.get("activation", hidden_act)
        self.max_position_embeddings = legacy.get("max_seq_len", max_position_embeddings)
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.glu_bias = glu_bias
        self.final_bias = final_bias
        self.reference_rope = reference_rope
        self.attention_dropout = attention_dropout
        self.num_reslayerA = num_reslayerA
        self.num_denseA = num_denseA
        self.A_dff = A_dff
        self.custom_G_type = custom_G_type
        self.cache_first_G = cache_first_G
        self.output_pldr_attentions = output_pldr_attentions
        self.use_cache = use_cache
        self.use_kvcache = use_kvcache
        self.use_Gcache = use_Gcache
        self.infer_padding_mask = infer_padding_mask
        # Set before the base __init__ too: some transformers releases read them while
        # initializing, and the base class only stores them on others.
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

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
