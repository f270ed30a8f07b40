"""The same-size transformers Llama that the training benchmarks run beside PLDR-LLM: a baseline
only, built from a PLDR-LLM's hyperparameters and trained by a minimal loop (bf16 autocast, SDPA,
clip by value 1.0, the caller's optimizer), on a CUDA GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama_like(hp: Mapping[str, Any], context: int, **config: Any) -> LlamaForCausalLM:
    """A Llama of the shape of hyperparameters ``hp`` (the original's hpdict keys), ``context``
    positions, SDPA, untied head, seed 0, on the GPU; ``config`` adds LlamaConfig options."""
    llama_config = LlamaConfig(
        vocab_size=hp["input_vocab_size"],
        hidden_size=hp["d_model"],
        intermediate_size=hp["dff"],
        num_hidden_layers=hp["num_layers"],
        num_attention_heads=hp["num_heads"],
        num_key_value_heads=hp["num_heads"],
        max_position_embeddings=context,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        pad_token_id=0,
        **config,
    )
    device = torch.device("cuda")
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config).to(device)


def llama_train_step(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """One step on ``ids`` [B, L + 1] (its first L positions, as the batches' inputs): the loss
    under bf16 autocast through ``forward`` (default: the model; e.g. its compiled form),
    backward, gradients clipped by value 1.0, the optimizer's step. Returns the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (forward or model)(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
