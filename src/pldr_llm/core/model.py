"""The PLDR-LLM decoder model.

Module names follow the original implementation's state-dict keys exactly
(``decoder.dec_layers.{i}.mha1.plgatt_layer.Wlst``, ``final_layer.weight``, ...), so
``model.state_dict()`` is the original checkpoint format and published weights load as they are.

Padding has two meanings, chosen by the caller:

* ``attention_mask=None`` reproduces the original: keys with id ``pad_id`` (0) are masked, but
  every position counts in the metric tensor A and in the rotary positions.
* an explicit ``attention_mask`` [B, L] (1 = token, 0 = padding, left or right) keeps padding out
  of A, out of the keys and out of the rotary positions, so each row of a batch computes exactly
  what it would alone. Batched generation uses this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cache import (
    GCacheEntry,
    LayerKV,
    PLDRCache,
    StaticLayerKV,
    register_pytree_dataclass,
)
from .config import ACTIVATION_CHECKPOINTING, PLDRConfig, check_token_range
from .errors import PLDRError
from .fileio import CONFIG_NAME, WEIGHTS_NAME, load_safetensors, save_safetensors
from .layers import GLU, PackedLinear, xavier_linear
from .plga import MASK_VALUE, Deductive, MetricRunner, PowerLawGraphAttention
from .rope import row_positions
from .state_dict import build_uninitialized, load_state_dict_strict


@dataclass
class PLDROutput:
    """What :meth:`PLDRModel.forward` returns."""

    logits: Tensor
    cache: PLDRCache
    deductive: list[Deductive] | None = None
    hidden_states: Tensor | None = None
    #: with ``labels``: mean cross-entropy over the non-padding labels (float32 scalar)
    loss: Tensor | None = None
    #: with ``labels``: arg-max hits on the non-padding labels (float32 scalar, no gradient)
    correct: Tensor | None = None


register_pytree_dataclass(PLDROutput)


@dataclass(eq=False)
class PackedLayer:
    """A decoder layer's projections packed for decoding (see :class:`PackedLinear`)."""

    qkv: PackedLinear  # mha1.wq | mha1.wk | mha1.wv
    gate_up: PackedLinear  # ffn.gluw1 | ffn.gluw2

    def refresh(self) -> None:
        self.qkv.refresh()
        self.gate_up.refresh()


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: ``LN1(x + PLGA(x))`` then ``LN2(h + SwiGLU_FFN(h))``."""

    def __init__(self, config: PLDRConfig) -> None:
        super().__init__()
        self.mha1 = PowerLawGraphAttention(config)
        self.ffn = GLU(
            config.d_model, config.dff, config.d_model, config.activation, config.glu_bias
        )
        self.layernorm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.layernorm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        #: one of :data:`~.config.ACTIVATION_CHECKPOINTING`; set by
        #: :meth:`PLDRModel.set_activation_checkpointing` (a plain attribute, not state)
        self.activation_checkpointing = "off"

    def forward(
        self, x: Tensor, packed: PackedLayer | None = None, **attention_kwargs: Any
    ) -> tuple[Tensor, LayerKV | None, GCacheEntry, Deductive | None]:
        mode = self.activation_checkpointing
        if mode == "off" or not (self.training and torch.is_grad_enabled()):
            qkv = packed.qkv if packed is not None else None
            attended, kv, g, deductive = self.mha1(x, packed_qkv=qkv, **attention_kwargs)
            hidden = self.layernorm1(x + attended)
            ffn = self.ffn(hidden, packed.gate_up if packed is not None else None)
            return self.layernorm2(hidden + ffn), kv, g, deductive
        # Recomputed in backward (non-reentrant: any inputs, keyword arguments and outputs; under
        # torch.compile, where :func:`compile_decoder_layers` puts it, the checkpoint is traced
        # and the compiler recomputes inside the layer's graph). The KV tensors are not returned
        # (the caller gets no KV-cache, as transformers does under checkpointing): returned, they
        # would stay alive through backward and undo much of the saving.
        if mode == "layer":
            out, g, deductive = checkpoint(
                self._layer_without_kv, x, use_reentrant=False, **attention_kwargs
            )
            return out, None, g, deductive
        attended, g, deductive = checkpoint(
            self._attention_without_kv, x, use_reentrant=False, **attention_kwargs
        )
        hidden = self.layernorm1(x + attended)
        return self.layernorm2(hidden + self.ffn(hidden)), None, g, deductive

    def _attention_without_kv(
        self, x: Tensor, **attention_kwargs: Any
    ) -> tuple[Tensor, GCacheEntry, Deductive | None]:
        attended, _, g, deductive = self.mha1(x, **attention_kwargs)
        return attended, g, deductive

    def _layer_without_kv(
        self, x: Tensor, **attention_kwargs: Any
    ) -> tuple[Tensor, GCacheEntry, Deductive | None]:
        attended, g, deductive = self._attention_without_kv(x, **attention_kwargs)
        hidden = self.layernorm1(x + attended)
        return self.layernorm2(hidden + self.ffn(hidden)), g, deductive

    def pack(self) -> PackedLayer:
        """This layer's projections packed for decoding (copies of the weights)."""
        attention = self.mha1
        return PackedLayer(
            PackedLinear((attention.wq, attention.wk, attention.wv)),
            PackedLinear((self.ffn.gluw1, self.ffn.gluw2)),
        )


class Decoder(nn.Module):
    """Embedding * sqrt(d_model), LayerNorm, then the decoder layers."""

    def __init__(self, config: PLDRConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.input_vocab_size, config.d_model)
        # A ModuleList (it registers the layers), typed by what it holds: its stubs say Module.
        self.dec_layers = cast(
            Sequence[DecoderLayer],
            nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers)),
        )
        self.layernorm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.embedding_scale = math.sqrt(config.d_model)


class PLDRModel(nn.Module):
    """A PLDR-LLM: decoder-only LM with Power Law Graph Attention, KV-cache and G-cache.

    Every model version of the original is this one class: ``config.version == "v510"`` learns
    G_LM (and supports the DAG regularizer through its deductive outputs), ``"v510G"`` attends
    with a predefined G_LM per layer (see :func:`pldr_llm.predefined_G_model`).
    """

    def __init__(self, config: PLDRConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.final_layer = xavier_linear(config.d_model, config.input_vocab_size, config.final_bias)
        #: ``"sdpa"`` (fused kernels) or ``"eager"`` (explicit scores, the original's arithmetic).
        self.attn_implementation = "sdpa"

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: PLDRCache | None = None,
        output_deductive: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        *,
        labels: Tensor | None = None,
        output_scores: bool = True,
        key_padding: bool | None = None,
        check_ids: bool = True,
        metric_runners: Sequence[MetricRunner] | None = None,
    ) -> PLDROutput:
        """Run the model on ``input_ids`` [B, L] (or [L]).

        ``cache``: a :class:`PLDRCache` from an earlier call. Its KV part makes this call continue
        that sequence; its G part is used instead of the metric learner. ``output_deductive``
        returns A, A_LM, A_P, G_LM and, with ``output_scores`` (the default), the attention scores
        of every layer; scores need the eager attention, so ``output_scores=False`` keeps the
        fused kernel (what the DAG loss uses: it reads only A_LM, A_P and G_LM).
        ``logits_to_keep`` > 0 computes logits for the last that many positions only.

        ``labels`` [B, L] (the next tokens; ``pad_id`` ignored): the output's ``loss`` is the mean
        cross-entropy computed chunk by chunk from the hidden states by
        :func:`pldr_llm.core.losses.linear_cross_entropy` (the [B, L, vocab] logits never
        exist), and ``correct`` counts arg-max hits; ``logits`` then covers the last position
        only unless ``logits_to_keep`` says otherwise. Inside ``forward`` so that FSDP sees the
        LM head.

        Host reads (each one waits for the GPU): ``check_ids=False`` skips the id range check
        (the caller checked, e.g. the trainer on the CPU batch); ``key_padding`` says whether
        ``input_ids`` holds ``pad_id`` (no ``attention_mask``: original semantics), and True
        with an ``attention_mask`` (no cache) that the mask has a 0, instead of finding out.
        ``metric_runners``: see :meth:`run_layers`."""
        input_ids, attention_mask = self._checked_inputs(
            input_ids, attention_mask, labels, check_ids
        )
        device = input_ids.device
        past_len = cache.seq_len if cache is not None else 0
        per_row = attention_mask is not None or (cache is not None and cache.per_row)
        new_valid, positions, next_position, key_valid = self._token_positions(
            input_ids, attention_mask, cache, per_row
        )
        known = key_padding is not None and past_len == 0  # True with a mask: not all valid
        known_valid = not key_padding if known and (key_padding or not per_row) else None
        bias, is_causal = self.attention_mask_bias(
            key_valid, input_ids.shape[1], past_len, known_valid
        )
        query_valid = new_valid if per_row else None

        hidden, kv_entries, g_entries, deductive = self.run_layers(
            input_ids,
            positions,
            bias,
            is_causal,
            kv=cache.kv if cache is not None else None,
            g=cache.g if cache is not None else None,
            query_valid=query_valid,
            output_deductive=output_deductive,
            output_scores=output_scores,
            metric_runners=metric_runners,
        )
        loss = correct = None
        if labels is not None:
            from .losses import linear_cross_entropy

            head = self.final_layer
            loss, correct = linear_cross_entropy(
                hidden,
                head.weight,
                head.bias,
                labels.to(device),
                pad_id=self.config.pad_id,
                compile_chunks=hidden.is_cuda,
                return_correct=True,
            )
            logits_to_keep = logits_to_keep or 1
        head_input = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.final_layer(head_input)
        new_cache = PLDRCache(
            kv=kv_entries or None,
            g=g_entries,
            key_valid=key_valid,
            next_position=next_position,
            per_row=per_row,
        )
        return PLDROutput(
            logits=logits,
            cache=new_cache,
            deductive=deductive if output_deductive else None,
            hidden_states=hidden if output_hidden_states else None,
            loss=loss,
            correct=correct,
        )

    def _checked_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        labels: Tensor | None,
        check_ids: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``input_ids`` and ``attention_mask`` as [B, L], or a :class:`PLDRError` saying why not."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        if input_ids.dim() != 2:
            raise PLDRError(
                f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise PLDRError("input_ids is empty")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise PLDRError(f"input_ids must be integer ids, got {input_ids.dtype}")
        if check_ids:  # both bounds in one read from the device
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()
            check_token_range(low, high, self.config.input_vocab_size)
        for name, other in (("labels", labels), ("attention_mask", attention_mask)):
            if other is not None and other.shape != input_ids.shape:
                raise PLDRError(
                    f"{name} shape {tuple(other.shape)} differs from input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
        return input_ids, attention_mask

    def _token_positions(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        cache: PLDRCache | None,
        per_row: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Which new positions are tokens (not padding), their rotary positions, each row's next
        position (per-row sequences only) and which keys, cached and new, are tokens."""
        batch, length = input_ids.shape
        device = input_ids.device
        past_len = cache.seq_len if cache is not None else 0
        if past_len + length > self.config.max_seq_len:
            raise PLDRError(
                f"sequence length {past_len + length} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if attention_mask is not None:
            new_valid = attention_mask.to(device=device, dtype=torch.bool)
        elif per_row:
            new_valid = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            new_valid = input_ids != self.config.pad_id
        if per_row:
            start = (
                cache.next_position.to(device)
                if cache is not None and cache.next_position is not None
                else torch.zeros(batch, dtype=torch.long, device=device)
            )
            positions = start[:, None] + row_positions(new_valid)
            next_position = start + new_valid.long().sum(1)
        else:
            positions = torch.arange(past_len, past_len + length, device=device)
            next_position = None
        past_valid = cache.key_valid if cache is not None and cache.key_valid is not None else None
        if past_len and past_valid is None:
            past_valid = torch.ones(batch, past_len, dtype=torch.bool, device=device)
        key_valid = (
            new_valid if past_valid is None else torch.cat((past_valid.to(device), new_valid), 1)
        )
        return new_valid, positions, next_position, key_valid

    def run_layers(
        self,
        input_ids: Tensor,
        positions: Tensor,
        bias: Tensor | None,
        is_causal: bool,
        kv: list[LayerKV] | list[StaticLayerKV] | None = None,
        g: list[GCacheEntry] | None = None,
        query_valid: Tensor | None = None,
        output_deductive: bool = False,
        output_scores: bool = True,
        packed: list[PackedLayer] | None = None,
        metric_runners: Sequence[MetricRunner] | None = None,
    ) -> tuple[Tensor, list[LayerKV], list[GCacheEntry], list[Deductive]]:
        """Embedding, decoder layers -> (hidden [B, L, d_model], KV, G, deductive per layer).

        The body of :meth:`forward` without its checks and mask building: it reads no device
        value on the host, so the decoding loop (:mod:`pldr_llm.core.engine`) and the captured
        prefill can compile it or capture it in a CUDA graph.
        ``positions``, ``bias`` and ``is_causal`` are what :meth:`forward` derives from the ids.
        ``packed`` (:meth:`DecoderLayer.pack` of each layer) is what the decoding loop passes,
        ``metric_runners`` (each layer's metric learner, replayed) what its prompt pass passes.
        """
        hidden = self.decoder.embedding(input_ids) * self.decoder.embedding_scale
        hidden = self.decoder.layernorm1(hidden)

        layers = self.decoder.dec_layers
        rotation = layers[0].mha1.rotary.rotation(positions)  # the same in every layer
        kv_entries: list[LayerKV] = []
        g_entries: list[GCacheEntry] = []
        deductive: list[Deductive] = []
        for index, layer in enumerate(layers):
            hidden, layer_kv, layer_g, layer_deductive = layer(
                hidden,
                rotation=rotation,
                bias=bias,
                is_causal=is_causal,
                past=kv[index] if kv is not None else None,
                g_entry=g[index] if g is not None else None,
                query_valid=query_valid,
                implementation=self.attn_implementation,
                need_deductive=output_deductive,
                need_scores=output_scores,
                packed=packed[index] if packed is not None else None,
                metric_runner=metric_runners[index] if metric_runners is not None else None,
            )
            if layer_kv is not None:  # None under activation checkpointing (no KV-cache)
                kv_entries.append(layer_kv)
            g_entries.append(layer_g)
            if layer_deductive is not None:
                deductive.append(layer_deductive)
        return hidden, kv_entries, g_entries, deductive

    @staticmethod
    def attention_mask_bias(
        key_valid: Tensor, length: int, past_len: int, all_valid: bool | None = None
    ) -> tuple[Tensor | None, bool]:
        """Additive mask [B, 1, L, S] (0 or -1e9, like the original) or ``None`` + causal flag.

        ``all_valid`` (whether every key is a token), when the caller knows it, saves a host read.
        """
        span = past_len + length
        if all_valid is None:
            all_valid = bool(key_valid.all())
        if all_valid and length == 1:
            return None, False  # one new token may see every cached key
        if all_valid and past_len == 0:
            return None, True  # plain causal: lets SDPA pick its fused causal kernels
        causal = torch.ones(length, span, dtype=torch.bool, device=key_valid.device).tril(past_len)
        allowed = causal[None, None] & key_valid[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=key_valid.device)
        return bias.masked_fill_(~allowed, MASK_VALUE), False

    # ------------------------------------------------------------------ utilities
    @property
    def device(self) -> torch.device:
        return self.final_layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.weight.dtype

    @property
    def activation_checkpointing(self) -> str:
        """The decoder layers' activation checkpointing (:meth:`set_activation_checkpointing`)."""
        layers = self.decoder.dec_layers
        return layers[0].activation_checkpointing if len(layers) else "off"

    def set_activation_checkpointing(self, mode: str) -> None:
        """Recompute activations in backward instead of keeping them: ``"off"``, ``"layer"``
        (each decoder layer keeps only its input) or ``"selective"`` (only the attention block:
        PLGA's projections, metric learner, power law and attention; the feed-forward's
        activations are kept). Applies to training passes with gradients only; the gradients
        are those of ``"off"``. The forward of a checkpointed pass returns no KV-cache."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise PLDRError(
                f"activation checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                f"got {mode!r}"
            )
        for layer in self.decoder.dec_layers:
            layer.activation_checkpointing = mode

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def predefined_G(self) -> list[Tensor]:
        """The G_LM buffers of a v510G model, one [1, H, dk, dk] per layer."""
        if self.config.version != "v510G":
            raise PLDRError("only a v510G model has predefined G_LM tensors")
        return [layer.mha1.predefined_G_LM for layer in self.decoder.dec_layers]

    def set_predefined_G(self, g_list: list[Tensor]) -> None:
        """Set the per-layer G_LM of a v510G model ([H, dk, dk] or [1, H, dk, dk] each)."""
        layers = self.decoder.dec_layers
        if len(g_list) != len(layers):
            raise PLDRError(f"G list has {len(g_list)} layers, the model has {len(layers)}")
        for index, (layer, g) in enumerate(zip(layers, g_list)):
            g = torch.as_tensor(g).detach()
            g = g.unsqueeze(0) if g.dim() == 3 else g
            buffer = layer.mha1.predefined_G_LM
            if g.shape[0] != 1 or g.shape[1:] != buffer.shape[1:]:
                raise PLDRError(
                    f"predefined G_LM of layer {index} has shape {tuple(g.shape)}, "
                    f"the model needs {tuple(buffer.shape)}"
                )
            buffer.copy_(g.to(buffer.dtype))

    # ------------------------------------------------------------------ own format
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # Atomic and 0644 (pldr_llm.core.fileio): a failed save leaves the previous files intact.
        save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        self.config.save(directory / CONFIG_NAME)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> PLDRModel:
        """Load a model written by :meth:`save` (no pickle involved)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise PLDRError(
                    f"{path} not found (a saved model has {CONFIG_NAME} and {WEIGHTS_NAME})"
                )
        config = PLDRConfig.load(config_path)
        model = build_uninitialized(lambda: cls(config), torch.device("cpu"))  # the load fills it
        state = load_safetensors(weights_path)  # a truncated file is a PLDRError naming it
        load_state_dict_strict(model, state, source=str(weights_path))
        model.to(device=map_location)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()
