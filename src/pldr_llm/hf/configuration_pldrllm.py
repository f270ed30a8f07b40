"""``PldrllmConfig``: the transformers configuration of a PLDR-LLM (``model_type = "pldrllm"``).

It carries every architecture hyperparameter of :class:`pldr_llm.config.PLDRConfig` under the
same names, plus the transformers-side switches: which caches ``generate()`` uses by default, and
whether a forward call without ``attention_mask`` treats the pad id as padding.

The class is written in the classic ``__init__`` style (not as a dataclass) because that is the
form every transformers release accepts for code shipped with a model folder
(``trust_remote_code``). This file is copied into exported folders; it imports nothing from
``pldr_llm`` at module level so that it stays importable there.
"""

from typing import Any

from transformers import PretrainedConfig

from pldr_llm.config import ARCHITECTURE_KEYS

# HF-standard attribute names -> this config's own names (transformers reads hidden_size,
# vocab_size, max_position_embeddings ... generically, e.g. lm-eval's context length).
_ATTRIBUTE_MAP = {
    "hidden_size": "d_model",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "dff",
    "vocab_size": "input_vocab_size",
    "max_position_embeddings": "max_seq_len",
}


class PldrllmConfig(PretrainedConfig):
    """Configuration of :class:`PldrllmForCausalLM`.

    Args:
        num_layers, d_model, num_heads, dff, A_dff, num_reslayerA, num_denseA, input_vocab_size,
            max_seq_len, activation, version: the architecture, as in
            :class:`pldr_llm.config.PLDRConfig`.
        pad_token_id: padding id (0 in PLDR-LLM tokenizers).
        eos_token_id: end-of-text id (3 in PLDR-LLM tokenizers).
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
        num_layers: int = 5,
        d_model: int = 896,
        num_heads: int = 14,
        dff: int = 2389,
        A_dff: int = 170,
        num_reslayerA: int = 8,
        num_denseA: int = 2,
        input_vocab_size: int = 32000,
        max_seq_len: int = 1024,
        activation: str = "silu",
        version: str = "v510",
        pad_token_id: int = 0,
        eos_token_id: int = 3,
        bos_token_id: int | None = None,
        use_cache: bool = True,
        use_kvcache: bool = True,
        use_Gcache: bool = True,
        infer_padding_mask: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.num_layers = num_layers
        self.d_model = d_model
        self.num_heads = num_heads
        self.dff = dff
        self.A_dff = A_dff
        self.num_reslayerA = num_reslayerA
        self.num_denseA = num_denseA
        self.input_vocab_size = input_vocab_size
        self.max_seq_len = max_seq_len
        self.activation = activation
        self.version = version
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

    def architecture(self) -> dict[str, Any]:
        """The architecture hyperparameters (PLDRConfig's names, with pad_id and eos_id)."""
        arch = {key: getattr(self, key) for key in ARCHITECTURE_KEYS}
        arch["pad_id"] = int(self.pad_token_id if self.pad_token_id is not None else 0)
        arch["eos_id"] = int(self.eos_token_id if self.eos_token_id is not None else 3)
        return arch

    @classmethod
    def from_architecture(cls, arch: dict[str, Any], **kwargs: Any) -> "PldrllmConfig":
        """Build from PLDRConfig-style fields (``PLDRConfig.to_dict()``); extra keys are ignored."""
        values = {key: arch[key] for key in ARCHITECTURE_KEYS if key in arch}
        if "pad_id" in arch:
            values["pad_token_id"] = arch["pad_id"]
        if "eos_id" in arch:
            values["eos_token_id"] = arch["eos_id"]
        values.update(kwargs)
        return cls(**values)
