"""``PldrllmForCausalLM``: a PLDR-LLM as a transformers ``PreTrainedModel`` + ``GenerationMixin``.

The class wraps the core :class:`pldr_llm.core.model.PLDRModel`; it has no model math of its
own. Its submodules *are* the core model's (``decoder``, ``final_layer``), so the state dict has
the original's key names and ``model.safetensors`` of a transformers folder is the same file as
the project's own format.

Caches in ``generate()``: the core's :class:`~pldr_llm.core.cache.PLDRCache` (KV-cache with the
metric tensor A, and the G-cache) travels between steps under transformers' model keyword
``cache``, in place of transformers' ``Cache`` classes, whose layout (one K/V pair per layer)
cannot hold A or G_LM. The model declares that it does not use transformers' default cache,
builds each step's inputs in :meth:`prepare_inputs_for_generation` and carries the cache forward
in :meth:`_update_model_kwargs_for_generation`, following ``pldr_llm.generate`` step for step:

* KV on: the prompt runs once, then one token per step;
* G on: G_LM inferred on the first pass is reused by every later pass;
* ``G_init``: a custom initial G-cache (every pass when G is off), as the original's
  ``Gcachelst_init``;
* batched rows with padding: the attention mask has the core's per-row semantics;
* on CUDA, transformers' own loop (``_sample``) runs the passes after the prompt's on static
  buffers, each a replayed CUDA graph of the core's one-token step (:mod:`.hf_static_cache`;
  ``model.static_decode`` says where).

``generate(..., enable_kvcache=False, enable_Gcache=False, G_init=...)`` selects the mode per
call; the defaults come from ``config.use_kvcache`` / ``config.use_Gcache`` (both on), and
``use_cache=False`` turns both off. Sampling applies the original's filters (temperature, then
top-p keeping the tokens whose cumulative probability stays <= p, then top-k) in place of
transformers' warpers, so a seeded sampling run draws the same ids as ``pldr_llm.generate``.
Beam search reorders the cache's rows (``PLDRCache.reorder_cache``); assisted and prompt-lookup
decoding crop rejected draft tokens from it (``PLDRCache.crop``), and their first pass runs the
prompt alone before the first draft, so that A and G_LM come from the prompt as in greedy
decoding.
"""

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessor
from transformers.utils import ModelOutput

from .cache import PLDRCache, prepare_g_init
from .code_bundle import AUTO_MAP_CONFIG, write_code_files
from .configuration_pldrllm import PldrllmConfig
from .continuations import remember_continuations
from .errors import PLDRError
from .hf_folder import (
    PAST_G_VALUES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    core_state_from_hf,
    hf_state_from_core,
)
from .hf_static_cache import StaticDecodeCache, StaticDecodeSettings, static_session, to_static
from .losses import masked_cross_entropy
from .model import Decoder, PLDRModel
from .plga import MASK_VALUE, Deductive
from .rope import RotaryEmbedding
from .sampling import filter_logits
from .text import StopStrings

try:  # the model keyword transformers carries a cache under: "cache" from 5.24, before that
    # "past_key_values" (beam search reorders, assisted decoding crops what it holds)
    from transformers.generation.utils import ALL_CACHE_NAMES

    CACHE_KEY = str(ALL_CACHE_NAMES[0])
except ImportError:  # pragma: no cover - every transformers 5 has the list
    CACHE_KEY = "past_key_values"


@dataclass
class PldrllmCausalLMOutput(ModelOutput):
    """Output of :meth:`PldrllmForCausalLM.forward`.

    ``cache`` is the core's cache of this pass (K/V/A per layer and the G-cache);
    ``deductive`` the per-layer deductive outputs (A, A_LM, A_P, G_LM, scores) when asked.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: PLDRCache | None = None
    deductive: list[Deductive] | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None

    @property
    def past_key_values(self) -> PLDRCache | None:
        """``cache`` under transformers' name before 5.24."""
        return self.cache


@dataclass
class PldrllmModelOutput(ModelOutput):
    """Output of :meth:`PldrllmModel.forward`: the last layer's hidden states [B, L, d_model],
    and, when asked, every layer's (embeddings first) and attention probabilities."""

    last_hidden_state: Tensor | None = None
    cache: PLDRCache | None = None
    deductive: list[Deductive] | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class PendingPrefill(PLDRCache):
    """The empty cache assisted decoding starts from: no pass has run yet. ``prompt_length``
    tells the first pass where the prompt ends; ``kv_on`` / ``g_on`` are the call's cache modes;
    ``g`` is the G_init, if any."""

    prompt_length: int = 0
    kv_on: bool = True
    g_on: bool = True


class PldrllmSamplingFilter(LogitsProcessor):
    """The original's sampling filters, applied by ``generate(do_sample=True)``.

    Temperature scales the logits (as transformers does for any value), then the core's
    :func:`pldr_llm.core.sampling.filter_logits` keeps the top-p nucleus (tokens whose cumulative
    probability stays <= p, at least one) and then the top-k, as ``pldr_llm.generate`` does.
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.temperature = float(temperature) if temperature else 1.0
        self.top_k = int(top_k or 0)
        self.top_p = float(top_p) if top_p is not None else 1.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits: Tensor = scores
        if self.temperature != 1.0:
            logits = logits / self.temperature
        # transformers types logits as torch.FloatTensor (a legacy class torch's ops never return)
        return cast(torch.FloatTensor, filter_logits(logits, 1.0, self.top_k, self.top_p))


class PldrllmPreTrainedModel(PreTrainedModel):
    """Base class: configuration class, weight loading rules and init of non-persistent buffers."""

    config_class = PldrllmConfig
    # The authors' predefined-G buffers are read by from_pretrained itself (see there).
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.past_G_values"]
    # No attribute of that name exists, so ``base_model`` is the model itself.
    base_model_prefix = "pldrllm"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    # gradient_checkpointing_enable() switches the core's own layer checkpointing (non-reentrant).
    supports_gradient_checkpointing = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights are initialized by the core modules' constructors (the original's scheme) or
        # come from the checkpoint. transformers creates models on the meta device while loading
        # and then asks for the buffers a checkpoint does not hold: the rotary tables.
        if isinstance(module, RotaryEmbedding):
            cos, sin = module.tables()
            with torch.no_grad():
                module.cos.copy_(cos.to(module.cos.device, module.cos.dtype))
                module.sin.copy_(sin.to(module.sin.device, module.sin.dtype))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The PLDR caches travel as ``cache`` (see the module docstring); transformers must
        # not create a DynamicCache of its own.
        return False

    #: The core's children this class registers as its own (state-dict prefixes).
    _core_children: tuple[str, ...] = ("decoder", "final_layer")
    decoder: Decoder  # the core's (registered by _attach_core)

    def _attach_core(self, config: PldrllmConfig) -> None:
        """Build the wrapped core model and register its children ``_core_children`` here."""
        core = PLDRModel(config.pldr_config())
        # The core is kept outside the module tree (not registered as a child), and its children
        # are registered here instead: parameters are owned once, and their names are the
        # original's state-dict keys (``decoder.*``, ``final_layer.*``).
        self.__dict__["_core"] = core
        for name in self._core_children:
            setattr(self, name, getattr(core, name))

    def _finish_init(self) -> None:
        """The end of each constructor: transformers' ``post_init``, then the core in step with
        this module (attention implementation, training mode)."""
        self.post_init()
        self._sync_attention()
        self.core.training = self.training

    @property
    def core(self) -> PLDRModel:
        """The wrapped core model (same parameters, buffers, training mode and attention).

        A plain accessor: the core is kept in step where things change -- a replaced child
        (:meth:`__setattr__`), :meth:`train` / ``eval()``, and the attention implementation
        (:meth:`_sync_attention`, at construction and in :meth:`set_attn_implementation`).
        """
        return self.__dict__["_core"]

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        core = self.__dict__.get("_core")
        # The core's children are ours: one replaced here (loading, from_core) is its too.
        if core is not None and name in ("decoder", "final_layer"):
            setattr(core, name, value)

    def train(self, mode: bool = True) -> "PldrllmPreTrainedModel":
        super().train(mode)
        self.__dict__["_core"].training = mode
        return self

    def set_attn_implementation(self, *args: Any, **kwargs: Any) -> Any:
        out = super().set_attn_implementation(*args, **kwargs)
        self._sync_attention()
        return out

    def _sync_attention(self) -> None:
        """transformers' ``config._attn_implementation`` -> the core's ("eager" or "sdpa")."""
        eager = getattr(self.config, "_attn_implementation", None) == "eager"
        self.__dict__["_core"].attn_implementation = "eager" if eager else "sdpa"

    # ------------------------------------------------------------------ checkpointing
    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Any = None, every_n_layers: int = 1
    ) -> None:
        """transformers' ``gradient_checkpointing_enable()`` / ``_disable()`` land here: they set
        the core's checkpointing of every decoder layer (``"layer"``, non-reentrant
        ``torch.utils.checkpoint``; :meth:`PLDRModel.set_activation_checkpointing`). What that
        cannot honour is refused: reentrant checkpointing, other checkpoint functions or options
        (offloading), checkpointing only every n-th layer."""
        if enable:
            options = dict(getattr(gradient_checkpointing_func, "keywords", None) or {})
            function = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
            if options.pop("use_reentrant", False):
                raise PLDRError(
                    "PLDR-LLM checkpoints its layers non-reentrantly; "
                    "use_reentrant=True is not supported"
                )
            if function not in (None, checkpoint) or options:
                raise PLDRError(
                    "PLDR-LLM checkpoints its layers with torch.utils.checkpoint and no options; "
                    f"got {getattr(function, '__name__', function)!r} with {sorted(options)}"
                )
            if every_n_layers != 1:
                raise PLDRError(
                    "PLDR-LLM checkpoints every decoder layer; every_n_layers must be 1"
                )
        self.core.set_activation_checkpointing("layer" if enable else "off")

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.core.activation_checkpointing != "off"

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    @classmethod
    def from_core(cls, model: PLDRModel, **config_kwargs: Any) -> Any:
        """A transformers model sharing the weights of a core :class:`PLDRModel`."""
        config = PldrllmConfig.from_architecture(model.config.to_dict(), **config_kwargs)
        with torch.device("meta"):
            hf_model = cls(config)
        for name in cls._core_children:
            setattr(hf_model, name, getattr(model, name))
        hf_model.__dict__["_core"] = model
        hf_model._sync_attention()
        hf_model.train(model.training)
        return hf_model

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.decoder.embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        if not isinstance(value, torch.nn.Embedding):
            raise PLDRError(f"the input embeddings must be a torch.nn.Embedding, got {type(value)}")
        self.decoder.embedding = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> torch.nn.Embedding:
        """transformers' resize; the core configuration's vocabulary follows (its id check and
        ``model.core.config.input_vocab_size`` see the new size)."""
        embedding = super().resize_token_embeddings(*args, **kwargs)
        core = self.core
        core.config = dataclasses.replace(
            core.config, input_vocab_size=int(embedding.weight.shape[0])
        )
        return embedding

    def _run_core(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        cache: PLDRCache | None,
        output_deductive: bool,
        output_hidden_states: bool,
        output_attentions: bool,
        logits_to_keep: int,
    ) -> tuple[Any, dict[str, Any]]:
        """The core's forward, plus transformers' per-layer outputs.

        Returns the core's output and the fields both output classes take from a pass:
        ``cache``, ``deductive`` (when asked), ``hidden_states`` and ``attentions``. Hidden states
        are num_layers + 1 tensors: the embeddings (after the embedding norm: the first layer's
        input), then each layer's output; the last is the LM head's input (the layers are
        post-norm, so it is normalised, as Llama's last hidden state is). Attentions are each
        layer's attention probabilities [B, H, L, S]; asking for them runs the eager attention
        (the core's deductive scores, masked and soft-maxed as the eager attention does).
        """
        collected: list[Tensor] = []
        hooks = []
        if output_hidden_states:
            decoder = self.core.decoder
            hooks.append(
                decoder.layernorm1.register_forward_hook(lambda m, i, o: collected.append(o))
            )
            for layer in decoder.dec_layers:
                hooks.append(layer.register_forward_hook(lambda m, i, o: collected.append(o[0])))
        try:
            out = self.core(
                input_ids,
                attention_mask=attention_mask,
                cache=cache,
                output_deductive=output_deductive or output_attentions,
                output_hidden_states=True,
                logits_to_keep=logits_to_keep,
            )
        finally:
            for hook in hooks:
                hook.remove()
        hidden = tuple(collected[: self.core.config.num_layers + 1]) if hooks else None
        attentions = None
        if output_attentions:
            past = cache.seq_len if cache is not None else 0
            bias, is_causal = self.core.attention_mask_bias(
                out.cache.key_valid, input_ids.shape[-1], past
            )
            attentions = tuple(
                attention_probabilities(d.scores, bias, is_causal) for d in out.deductive
            )
        return out, {
            "cache": out.cache,
            "deductive": out.deductive if output_deductive else None,
            "hidden_states": hidden,
            "attentions": attentions,
        }

    def _check_ids(
        self, input_ids: torch.LongTensor | None, kwargs: dict[str, Any]
    ) -> torch.LongTensor:
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None:
                raise PLDRError("PLDR-LLM takes input_ids, not inputs_embeds")
            raise PLDRError("input_ids is required")
        return input_ids


def attention_probabilities(scores: Tensor, bias: Tensor | None, is_causal: bool) -> Tensor:
    """Attention probabilities from the eager attention's scores (before mask and softmax), with
    the mask the model attended with (:meth:`PLDRModel.attention_mask_bias`), as
    :func:`pldr_llm.core.plga.attend` applies it."""
    weights = scores
    if bias is not None:
        weights = weights + bias
    elif is_causal:
        length, span = scores.shape[-2:]
        causal = torch.ones(length, span, dtype=torch.bool, device=scores.device).tril(
            span - length
        )
        weights = weights.masked_fill(~causal, MASK_VALUE)
    return torch.softmax(weights, dim=-1)


class _NoHead(torch.nn.Module):
    """An LM head with no outputs: [..., d_model] -> [..., 0]. ``weight`` is an empty buffer (not
    saved) that moves with the model, so ``core.device`` / ``core.dtype`` still read it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(0, width), persistent=False)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden[..., :0]


class PldrllmModel(PldrllmPreTrainedModel):
    """The PLDR-LLM decoder without its LM head (``AutoModel``): hidden states.

    It wraps a core :class:`PLDRModel` as :class:`PldrllmForCausalLM` does and registers only its
    ``decoder`` (state-dict keys ``decoder.*``; a causal-LM checkpoint's ``final_layer.*`` is
    not read).
    """

    _core_children = ("decoder",)
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.past_G_values", r"^final_layer\."]

    def __init__(self, config: PldrllmConfig) -> None:
        super().__init__(config)
        self._attach_core(config)
        # The core's LM head is replaced by one with no outputs: the base model computes no
        # logits and holds no head weights (its buffer follows .to() and gives the core's device
        # and dtype).
        self.no_head = _NoHead(config.hidden_size)
        self.core.final_layer = cast(torch.nn.Linear, self.no_head)  # what the core uses of it
        self._finish_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        cache: PLDRCache | None = None,
        output_deductive: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> PldrllmModelOutput | tuple:
        """Hidden states of ``input_ids`` [B, L] (arguments as :meth:`PldrllmForCausalLM.forward`;
        the attention mask is the one given: pad ids are not inferred)."""
        input_ids = self._check_ids(input_ids, kwargs)
        out, fields = self._run_core(
            input_ids,
            attention_mask,
            cache,
            output_deductive,
            bool(output_hidden_states),
            bool(output_attentions),
            1,
        )
        result = PldrllmModelOutput(last_hidden_state=out.hidden_states, **fields)
        return result.to_tuple() if return_dict is False else result


class PldrllmForCausalLM(PldrllmPreTrainedModel, GenerationMixin):
    """A PLDR-LLM causal language model for transformers (wraps :class:`PLDRModel`).

    ``model.core`` is the wrapped :class:`PLDRModel`: it shares every parameter and buffer with
    this module, so ``pldr_llm.generate(model.core, ...)`` and every other core function work on
    a model loaded through transformers.
    """

    def __init__(self, config: PldrllmConfig) -> None:
        super().__init__(config)
        self._attach_core(config)
        #: transformers' own loop on static buffers (:mod:`.hf_static_cache`; default: on CUDA)
        self.static_decode = StaticDecodeSettings()
        self._finish_init()

    # ------------------------------------------------------------------ embeddings
    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.final_layer

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.final_layer = value

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        cache: PLDRCache | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: PLDRCache | None = None,
        use_cache: bool | None = None,
        output_deductive: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        infer_padding_mask: bool | None = None,
        **kwargs: Any,
    ) -> PldrllmCausalLMOutput | tuple:
        """Logits of ``input_ids`` [B, L].

        Args:
            attention_mask: [B, L], 1 for tokens and 0 for padding (left or right); each row then
                computes exactly what it would alone. ``None``: see ``infer_padding_mask``.
            cache: a :class:`PLDRCache` from an earlier pass (KV part: continue that
                sequence; G part: skip the metric learner and reuse G_LM). ``past_key_values``
                is the same argument under transformers' name before 5.24.
            labels: [B, L] targets for the usual shifted causal-LM loss (-100 is ignored).
            output_deductive: also return every layer's A, A_LM, A_P, G_LM and scores.
            output_hidden_states: also return num_layers + 1 hidden states (embeddings, then
                each layer's output), as transformers models do.
            output_attentions: also return each layer's attention probabilities [B, H, L, S]
                (this pass runs the eager attention).
            logits_to_keep: > 0 computes the logits of the last that many positions only.
            infer_padding_mask: without ``attention_mask`` and ``cache``, treat pad ids in
                ``input_ids`` as padding (per-row semantics); ``None`` reads
                ``config.infer_padding_mask``. ``generate()`` turns it off, so its passes match
                ``pldr_llm.generate`` exactly.
        """
        input_ids = self._check_ids(input_ids, kwargs)
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, StaticDecodeCache) and cache.decoder is not None:
            plain = not (output_deductive or output_hidden_states or output_attentions)
            if plain and attention_mask is None and labels is None and cache.can_step():
                if input_ids.shape[1] == 1 and not torch.is_grad_enabled():
                    result = PldrllmCausalLMOutput(logits=cache.step(input_ids), cache=cache)
                    return result.to_tuple() if return_dict is False else result
            cache.materialize()  # anything else runs on the concatenating cache
        if isinstance(cache, PendingPrefill) and 0 < cache.prompt_length < input_ids.shape[1]:
            if labels is not None or output_attentions or output_hidden_states:
                raise PLDRError(
                    "labels, attentions and hidden states are not returned by the first pass of "
                    "assisted decoding"
                )
            logits, out_cache = self._prefill_then_draft(
                input_ids, attention_mask, cache, int(logits_to_keep or 0)
            )
            result = PldrllmCausalLMOutput(logits=logits, cache=out_cache)
            return result.to_tuple() if return_dict is False else result
        if infer_padding_mask is None:
            infer_padding_mask = bool(getattr(self.config, "infer_padding_mask", True))
        if attention_mask is None and cache is None and infer_padding_mask:
            pad = self.config.pad_token_id
            if pad is not None and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()
        out, fields = self._run_core(
            input_ids,
            attention_mask,
            cache,
            output_deductive,
            bool(output_hidden_states),
            bool(output_attentions),
            int(logits_to_keep or 0),
        )
        loss = None
        if labels is not None:
            # transformers' shifted causal-LM loss: labels -100 are ignored.
            loss = masked_cross_entropy(
                out.logits[:, :-1].float(), labels[:, 1:].to(out.logits.device), pad_id=-100
            )
        result = PldrllmCausalLMOutput(loss=loss, logits=out.logits, **fields)
        if return_dict is False:
            return result.to_tuple()
        return result

    def _prefill_then_draft(
        self, input_ids: Tensor, mask: Tensor | None, pending: "PendingPrefill", keep: int
    ) -> tuple[Tensor, PLDRCache]:
        """Assisted decoding's first pass (prompt + draft) as greedy decoding runs it: the prompt
        alone first (A and G_LM from the prompt), then the draft on that pass's caches."""
        core, split = self.core, pending.prompt_length
        drafted = input_ids.shape[1] - split
        first_keep = max(1, keep - drafted) if keep else 0
        first = core(
            input_ids[:, :split],
            attention_mask=None if mask is None else mask[:, :split],
            cache=PLDRCache(g=pending.g) if pending.g is not None else None,
            logits_to_keep=first_keep,
        )
        g = first.cache.g if pending.g_on else pending.g
        if pending.kv_on:
            second = core(
                input_ids[:, split:], cache=first.cache.with_g(g), logits_to_keep=min(keep, drafted)
            )
            if keep and keep <= drafted:
                return second.logits, second.cache
            return torch.cat((first.logits, second.logits), 1), second.cache
        second = core(
            input_ids,
            attention_mask=mask,
            cache=PLDRCache(g=g) if g is not None else None,
            logits_to_keep=keep,
        )
        return second.logits, second.cache

    def _assisted_decoding(self, input_ids: Tensor, *args: Any, **model_kwargs: Any) -> Any:
        """transformers' assisted / prompt-lookup decoding, with a :class:`PendingPrefill` cache
        (it needs a cache from the start; the first pass then runs as greedy decoding's)."""
        if model_kwargs.get(CACHE_KEY) is None:
            kv_on, g_on = self._cache_modes(
                model_kwargs.get("use_cache"),
                model_kwargs.get("enable_kvcache"),
                model_kwargs.get("enable_Gcache"),
            )
            if not (kv_on or g_on):
                raise PLDRError(
                    "assisted and prompt-lookup decoding need the KV or G cache: without them "
                    "every pass learns A from all of its tokens, drafts included, so a checked "
                    "draft is not what greedy decoding computes"
                )
            init = prepare_g_init(self.core, model_kwargs.get("G_init"), rows=input_ids.shape[0])
            model_kwargs[CACHE_KEY] = PendingPrefill(
                g=init, prompt_length=input_ids.shape[1], kv_on=kv_on, g_on=g_on
            )
        # transformers types self as a Protocol written for the `ty` checker (not mypy's)
        return super()._assisted_decoding(  # type: ignore[misc]
            cast(torch.LongTensor, input_ids), *args, **model_kwargs
        )

    # ------------------------------------------------------------------ generation
    def _cache_modes(
        self, use_cache: bool | None, enable_kvcache: bool | None, enable_Gcache: bool | None
    ) -> tuple[bool, bool]:
        on = True if use_cache is None else bool(use_cache)
        kv = self.config.use_kvcache if enable_kvcache is None else enable_kvcache
        g = self.config.use_Gcache if enable_Gcache is None else enable_Gcache
        return on and bool(kv), on and bool(g)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: PLDRCache | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: PLDRCache | None = None,
        enable_kvcache: bool | None = None,
        enable_Gcache: bool | None = None,
        G_init: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """This step's model inputs, as ``pldr_llm.generate`` builds them.

        With a KV-cache only the ids it does not hold run (one per step; a draft's ids in assisted
        decoding), the cache carrying the per-row positions and padding; without one, the whole
        sequence runs with the (grown) attention mask, and the G-cache or ``G_init`` when there
        is one. ``next_sequence_length`` (transformers' slicing hint) is not needed: the cache
        itself says what has run.
        """
        device = self.final_layer.weight.device
        cache = cache if cache is not None else past_key_values
        if cache is None or (cache.kv is None and cache.g is None):
            init = prepare_g_init(self.core, G_init, rows=input_ids.shape[0])
            if init is not None:
                cache = (
                    dataclasses.replace(cache, g=init) if cache is not None else PLDRCache(g=init)
                )
        inputs: dict[str, Any]
        if cache is not None and (cache.kv is not None or cache.seq_len):  # (static: no kv)
            inputs = {"input_ids": input_ids[:, cache.seq_len :], "attention_mask": None}
        else:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs["input_ids"] = inputs["input_ids"].to(device)
        if inputs["attention_mask"] is not None:
            inputs["attention_mask"] = inputs["attention_mask"].to(device)
        inputs.update(
            {CACHE_KEY: cache},
            logits_to_keep=1 if logits_to_keep is None else logits_to_keep,
            infer_padding_mask=False,
        )
        for key in ("output_deductive", "output_hidden_states", "output_attentions"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, *args, **kwargs
        )
        static = getattr(outputs, "cache", None)
        if isinstance(static, StaticDecodeCache) and static.decoder is not None:
            model_kwargs[CACHE_KEY] = static  # the same buffers, one position longer
            return model_kwargs
        kv_on, g_on = self._cache_modes(
            model_kwargs.get("use_cache"),
            model_kwargs.get("enable_kvcache"),
            model_kwargs.get("enable_Gcache"),
        )
        outputs = cast(PldrllmCausalLMOutput, outputs)  # this model's forward's output
        out_cache = outputs.cache
        assert out_cache is not None and outputs.logits is not None  # forward returns both
        # What pldr_llm.generate keeps between steps: the KV-cache when on; the G-cache of this
        # pass when on, else G_init (or nothing, so G_LM is recomputed).
        rows = outputs.logits.shape[0]
        g = out_cache.g if g_on else prepare_g_init(self.core, model_kwargs.get("G_init"), rows)
        if kv_on:  # on static buffers from here, inside transformers' _sample (hf_static_cache)
            model_kwargs[CACHE_KEY] = to_static(self.core, out_cache.with_g(g))
        elif g is not None:
            model_kwargs[CACHE_KEY] = PLDRCache(g=g)
        else:
            # no key at all: transformers' beam search reorders whatever cache the key holds
            model_kwargs.pop(CACHE_KEY, None)
        return model_kwargs

    def _sample(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' greedy / sampling loop, its one-token passes on static buffers after
        the prompt pass (:mod:`.hf_static_cache`; ``self.static_decode`` says where)."""
        from transformers import GenerationConfig

        configs = [a for a in (*args, *kwargs.values()) if isinstance(a, GenerationConfig)]
        max_length = getattr(configs[0], "max_length", None) if configs else None
        with static_session(self.core, self.static_decode, max_length):
            return cast(Any, super())._sample(*args, **kwargs)

    def _get_logits_processor(self, generation_config: Any, *args: Any, **kwargs: Any) -> Any:
        # Sampling: the original's filters replace transformers' temperature/top-k/top-p warpers
        # (transformers' top-p keeps the token that crosses p, and it filters top-k first).
        if not getattr(generation_config, "do_sample", False):
            # (Any: transformers' GenerativePreTrainedModel protocol, the self type of its
            # GenerationMixin methods, wants a settable device and dtype, which its own
            # PreTrainedModel makes read-only properties: no model matches it.)
            return cast(Any, super())._get_logits_processor(generation_config, *args, **kwargs)
        plain = copy.deepcopy(generation_config)
        temperature, top_k, top_p = plain.temperature, plain.top_k, plain.top_p
        plain.temperature, plain.top_k, plain.top_p = 1.0, 0, 1.0
        processors = cast(Any, super())._get_logits_processor(plain, *args, **kwargs)
        processors.append(PldrllmSamplingFilter(temperature or 1.0, top_k or 0, top_p or 1.0))
        return processors

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate()``, with the PLDR cache modes (see the module docstring).

        Greedy and sampled decoding of a [B, L] prompt run on the native decoding loop of
        :mod:`pldr_llm.generation` (the same ids as ``pldr_llm.generate``, with a CUDA-graph step
        on GPUs; ``compile=True`` adds torch.compile) with the arguments of :data:`LOOP_ARGS`:
        ``attention_mask``, ``max_new_tokens`` / ``max_length``, ``min_new_tokens``,
        ``repetition_penalty``, ``eos_token_id`` (one or several), ``stop_strings`` (with
        ``tokenizer``), ``streamer``, ``num_return_sequences`` (sampling),
        ``cache_implementation="static"``, the cache modes, ``G_init``, ``seed``, and the scores
        and logits of one greedy row. Other arguments (beam search, assisted decoding, logits
        processors, scores of a batch or of sampling, ...) use transformers' loop.
        """
        if args:
            kwargs = {"input_ids": args[0], **kwargs} if len(args) == 1 else kwargs
        _mark_streamer_continuation(kwargs.get("streamer"))
        prompt = kwargs.get("input_ids", kwargs.get("inputs"))
        output = self._generate(args, kwargs)
        if isinstance(prompt, Tensor) and prompt.dim() == 2:
            sequences = output if isinstance(output, Tensor) else getattr(output, "sequences", None)
            if isinstance(sequences, Tensor):
                remember_continuations(sequences, prompt.shape[1])
        return output

    def _generate(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """:meth:`generate` on the native loop when it can, else on transformers' loop."""
        if len(args) <= 1 and "generation_config" not in kwargs:
            routed = native_generate(self, kwargs)
            if routed is not None:
                return routed
            kwargs.pop("seed", None)
            kwargs.pop("compile", None)
        config = kwargs.get("generation_config") or self.generation_config
        do_sample = kwargs.get("do_sample", getattr(config, "do_sample", False))
        if do_sample and "top_k" not in kwargs and getattr(config, "top_k", None) is None:
            # pldr_llm.generate samples without a top-k filter unless asked; transformers'
            # global default would be 50.
            kwargs["top_k"] = 0
        if len(args) == 1:
            return super().generate(**kwargs)
        return super().generate(*args, **kwargs)

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``, plus the model's code (``trust_remote_code``).

        The weights are in the authors' layout: a v510G model's G_LM tensors are written as
        ``decoder.past_G_values`` (with ``custom_G_type`` in ``config.json``).
        """
        self.config.auto_map = dict(AUTO_MAP_CONFIG)
        if self.config.version == "v510G" and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = hf_state_from_core(self.state_dict(), self.core.config)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        write_code_files(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; a checkpoint that lacks weights is an error.

        transformers would fill missing weights with fresh values and only log it; for a
        PLDR-LLM that silently gives a different model.
        """
        want_info = bool(kwargs.get("output_loading_info", False))
        kwargs["output_loading_info"] = True
        # A (model, loading info) pair, with output_loading_info.
        loaded = cast(
            "tuple[PldrllmForCausalLM, dict[str, Any]]", super().from_pretrained(*args, **kwargs)
        )
        model, info = loaded
        missing = sorted(info.get("missing_keys") or [])
        if model.config.version == "v510G" and any(".predefined_G_LM" in k for k in missing):
            # The authors' predefined-G folders hold every layer's G_LM in one buffer,
            # decoder.past_G_values, which has no module of its own here: read it from the file.
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            _load_past_G_values(model, source, kwargs)
            missing = [k for k in missing if ".predefined_G_LM" not in k]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise PLDRError(f"the checkpoint lacks {len(missing)} weights of the model: {shown}")
        return (model, info) if want_info else model


# Arguments the native decoding loop takes over; any other argument (beam search, logits
# processors, scores in the output, ...) goes to transformers' own loop.
LOOP_ARGS = frozenset(
    {
        "input_ids",
        "inputs",
        "attention_mask",
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "repetition_penalty",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
        "stop_strings",
        "tokenizer",
        "streamer",
        "num_return_sequences",
        "use_cache",
        "cache_implementation",
        "enable_kvcache",
        "enable_Gcache",
        "G_init",
        "num_beams",
        "seed",
        "compile",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
    }
)
#: What a ``return_dict_in_generate`` output holds on the native loop.
OUTPUT_ARGS = ("output_scores", "output_logits", "return_dict_in_generate")


def native_generate(model: PldrllmForCausalLM, kwargs: dict[str, Any]) -> Tensor | None:
    """``generate()`` on :func:`pldr_llm.generate` (the one decoding loop: static caches, a
    CUDA-graph step on GPUs), or None when an argument needs transformers' loop."""
    if set(kwargs) - LOOP_ARGS or (kwargs.get("num_beams") or 1) > 1:
        return None
    if kwargs.get("cache_implementation") not in (None, "static"):
        return None
    ids = kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        return None
    config = model.generation_config
    options = _loop_options(model, kwargs, ids)
    if options is None:
        return None
    copies = int(kwargs.get("num_return_sequences", config.num_return_sequences) or 1)
    sampled = bool(kwargs.get("do_sample", config.do_sample))
    if copies > 1 and not sampled:
        return None  # transformers' own error: greedy returns one sequence per prompt
    mask = kwargs.get("attention_mask")
    if mask is not None and bool(mask.bool().all()):
        mask = None
    outputs = {k: bool(kwargs.get(k, getattr(config, k, False))) for k in OUTPUT_ARGS}
    if outputs["return_dict_in_generate"]:
        return _native_output(model, kwargs, ids, mask, options, copies, outputs)
    streamer = kwargs.get("streamer")
    if streamer is not None:
        if ids.shape[0] * copies != 1:
            return None  # transformers' streamers take one row
        streamer.put(ids.cpu())
        options["streamer"] = lambda tokens: streamer.put(tokens.cpu())
    from .generate import generate

    try:
        if copies == 1:
            # a [B, L] tensor prompt gives a [B, L'] tensor
            return cast(Tensor, generate(model.core, ids, attention_mask=mask, **options))
        return _sample_copies(model, ids, mask, copies, options, generate)
    finally:
        if streamer is not None:
            streamer.end()


def _native_output(
    model: PldrllmForCausalLM,
    kwargs: dict[str, Any],
    ids: Tensor,
    mask: Tensor | None,
    options: dict[str, Any],
    copies: int,
    outputs: dict[str, bool],
) -> Any:
    """transformers' ``GenerateDecoderOnlyOutput`` from the native loop: ``sequences`` and, per
    step, the [B, V] float32 ``scores`` / ``logits``; None where transformers' loop is needed.

    The native loop keeps each step's raw logits (transformers' ``logits``). Greedy, its
    ``scores`` are those after transformers' own processors for the options the loop took (a
    repetition penalty, ``min_new_tokens``), applied here to each step's raw logits and the ids
    before it, as its loop does; sampled, they are also warped (temperature, top-k, top-p), which
    stays on transformers' loop. The native loop stops computing a row at its end, where
    transformers' loop still scores the padding it feeds a finished row: one row only. No cache
    is returned (``cache`` is None)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from .generate import generate_details

    sampled = options.get("temperature") is not None
    if ids.shape[0] * copies != 1 or kwargs.get("streamer") is not None or sampled:
        return None
    keep = outputs["output_scores"] or outputs["output_logits"]
    out = generate_details(model.core, ids, attention_mask=mask, output_logits=keep, **options)
    steps = tuple(cast(Tensor, out.step_logits)) if keep else None
    scores = steps
    if steps is not None and outputs["output_scores"]:
        scores = _processed_scores(steps, cast(Tensor, out.ids), ids.shape[1], options)
    return GenerateDecoderOnlyOutput(
        sequences=cast(torch.LongTensor, out.ids),
        scores=scores if outputs["output_scores"] else None,
        logits=steps if outputs["output_logits"] else None,
    )


def _processed_scores(
    logits: tuple[Tensor, ...], sequences: Tensor, prompt_length: int, options: dict[str, Any]
) -> tuple[Tensor, ...]:
    """transformers' greedy ``scores``: each step's raw ``logits`` through its processors of a
    repetition penalty and ``min_new_tokens`` (the ones the native loop applied to choose the
    ids), given the ids before that step (``sequences``: prompt + new ids)."""
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    processors = LogitsProcessorList()
    if options["repetition_penalty"] != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options["repetition_penalty"]))
    eos = [options["eos_id"], *options["stop_token_ids"]] if options["eos_id"] is not None else []
    if options["min_new_tokens"] > 0 and eos:
        processors.append(
            MinNewTokensLengthLogitsProcessor(
                prompt_length, options["min_new_tokens"], eos, device=str(sequences.device)
            )
        )
    if not processors:
        return logits
    return tuple(
        processors(cast(torch.LongTensor, sequences[:, : prompt_length + t]), step.clone())
        for t, step in enumerate(logits)
    )


def _loop_options(model: PldrllmForCausalLM, kwargs: dict[str, Any], ids: Tensor) -> Any:
    """The native loop's options for a ``generate()`` call (None: transformers' loop)."""
    config = model.generation_config
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    eos_ids = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [eos]
    eos_ids = [e for e in eos_ids if e is not None]
    max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if max_new is None:
        max_length = kwargs.get("max_length", config.max_length)
        max_new = max(0, int(max_length) - ids.shape[1])
    kv_on, g_on = model._cache_modes(
        kwargs.get("use_cache"), kwargs.get("enable_kvcache"), kwargs.get("enable_Gcache")
    )
    options: dict[str, Any] = {
        "max_new_tokens": int(max_new),
        "enable_kvcache": kv_on,
        "enable_Gcache": g_on,
        "G_init": kwargs.get("G_init"),
        "eos_id": eos_ids[0] if eos_ids else None,
        "stop_token_ids": tuple(eos_ids[1:]),
        "stop_at_eos": bool(eos_ids),
        "min_new_tokens": int(kwargs.get("min_new_tokens", config.min_new_tokens) or 0),
        "repetition_penalty": float(
            _given(kwargs.get("repetition_penalty", config.repetition_penalty), 1.0)
        ),
        "seed": kwargs.get("seed"),
        "compile": bool(kwargs.get("compile", False)),
        "top_k": 1,
    }
    if kwargs.get("do_sample", config.do_sample):
        # transformers' global top-k default (50) is not the original's (no filter)
        top_k = kwargs.get("top_k", getattr(config, "top_k", None))
        options["temperature"] = float(_given(kwargs.get("temperature", config.temperature), 1.0))
        options["top_k"] = int(top_k or 0)
        options["top_p"] = float(_given(kwargs.get("top_p", config.top_p), 1.0))
    stops = kwargs.get("stop_strings", config.stop_strings)
    if stops:
        tokenizer = kwargs.get("tokenizer")
        if tokenizer is None:
            return None  # transformers' own error names the missing tokenizer
        options["stopping_criteria"] = _stop_string_check(
            tokenizer, [stops] if isinstance(stops, str) else list(stops), ids
        )
    return options


def _given(value: Any, default: float) -> Any:
    """``value``, or ``default`` where it is unset (None): a 0 the caller gave is kept, so that
    the native loop's checks refuse it as transformers does, not replace it silently."""
    return default if value is None else value


def _stop_string_check(tokenizer: Any, stops: list[str], ids: Tensor) -> Any:
    """A native stopping criterion: the newest token completes one of ``stops`` in the text of
    prompt + new ids (as transformers' ``StopStringCriteria``: a stop string may begin in the
    prompt or in earlier tokens, and must end in the newest).

    A PLDR-LLM tokenizer gets the incremental :class:`~.text.StopStrings` (each step decodes only
    the ids since the last whole character: decoding all the text each step made
    ``stop_strings`` the slowest native option); another tokenizer, whose decoding may not be
    piece by piece, decodes the whole text, once per step."""
    prompts = ids.tolist()
    unk = getattr(tokenizer, "unk_token_id", None)
    if getattr(tokenizer, "decodes_continuations", False) and isinstance(unk, int):
        return StopStrings(_AnchoredDecoder(tokenizer, unk), prompts, stops, stops_in_prompt=True)
    lengths = [len(tokenizer.decode(p)) for p in prompts]  # each row's text before the newest id

    def stop(row: int, new_ids: list[int]) -> bool:
        text = tokenizer.decode(prompts[row] + list(new_ids))
        before, lengths[row] = lengths[row], len(text)
        for s in stops:
            start = text.find(s, max(0, before - len(s) + 1))
            if start != -1 and start + len(s) > before:
                return True
        return False

    return stop


class _AnchoredDecoder:
    """A transformers tokenizer as :class:`~.text.Detokenizer` reads one: ``decode`` and the
    ``unk_id`` it decodes new ids after."""

    def __init__(self, tokenizer: Any, unk_id: int) -> None:
        self.decode = tokenizer.decode
        self.unk_id = unk_id


def _sample_copies(
    model: PldrllmForCausalLM,
    ids: Tensor,
    mask: Tensor | None,
    copies: int,
    options: dict[str, Any],
    generate: Any,
) -> Tensor:
    """``num_return_sequences`` sampled continuations of each row, in transformers' order (row 0
    copy 0, row 0 copy 1, ...). Copy ``j`` samples with seed ``seed + j`` (the native loop
    draws the same random numbers for every row of one seed)."""
    seed = options.pop("seed", None)
    if seed is None:
        from .sampling import draw_seed

        seed = draw_seed()
    outputs = [
        generate(model.core, ids, attention_mask=mask, seed=seed + j, **options)
        for j in range(copies)
    ]
    width = max(o.shape[1] for o in outputs)
    pad = model.config.pad_token_id or 0
    padded = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outputs]
    return torch.stack(padded, 1).reshape(ids.shape[0] * copies, width)


def _mark_streamer_continuation(streamer: Any) -> None:
    """A streamer that skips the prompt decodes the new ids alone: with a PLDR-LLM tokenizer, ask
    it to keep their first leading space (see :mod:`.tokenization_pldrllm`)."""
    tokenizer = getattr(streamer, "tokenizer", None)
    decode_kwargs = getattr(streamer, "decode_kwargs", None)
    if (
        getattr(streamer, "skip_prompt", False)
        and isinstance(decode_kwargs, dict)
        and getattr(tokenizer, "decodes_continuations", False)
    ):
        decode_kwargs.setdefault("continuation", True)


def _load_past_G_values(model: PldrllmForCausalLM, source: Any, kwargs: dict[str, Any]) -> None:
    """Set a v510G model's per-layer G_LM from ``decoder.past_G_values`` of its checkpoint."""
    import json
    import os

    from safetensors import safe_open
    from transformers.utils import cached_file

    hub = {
        k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs
    }
    subfolder = kwargs.get("subfolder", "") or ""

    def local(name: str) -> str | None:
        if os.path.isdir(str(source)):
            path = os.path.join(str(source), subfolder, name)
            return path if os.path.isfile(path) else None
        try:
            return cached_file(str(source), name, subfolder=subfolder, **hub)
        except OSError:
            return None

    weights = local(WEIGHTS_NAME)
    if weights is None:
        index_file = local(WEIGHTS_INDEX_NAME)
        if index_file is not None:
            with open(index_file, encoding="utf-8") as handle:
                shard = json.load(handle)["weight_map"].get(PAST_G_VALUES)
            weights = local(shard) if shard else None
    past_G = None
    if weights is not None:
        with safe_open(weights, framework="pt") as handle:
            if PAST_G_VALUES in handle.keys():
                past_G = handle.get_tensor(PAST_G_VALUES)
    if past_G is None:
        raise PLDRError(
            f"{source}: a predefined-G model (custom_G_type {model.config.custom_G_type!r}) "
            f"needs its G_LM tensors, and the checkpoint has neither {PAST_G_VALUES} nor "
            "per-layer predefined_G_LM buffers"
        )
    core = model.core
    state = core_state_from_hf({PAST_G_VALUES: past_G}, core.config)
    with torch.no_grad():
        for index, layer in enumerate(core.decoder.dec_layers):
            g = state[f"decoder.dec_layers.{index}.mha1.predefined_G_LM"]
            buffer = layer.mha1.predefined_G_LM
            if buffer.is_meta:
                layer.mha1.predefined_G_LM = g.to(model.dtype)
            else:
                buffer.copy_(g.to(buffer.device, buffer.dtype))
