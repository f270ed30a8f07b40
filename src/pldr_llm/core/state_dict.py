"""Loading a state dict into a model strictly, with errors that say what does not match.

Every checkpoint reader (the project's folders, the original's ``.pth``, transformers folders,
``train.init_from``) ends here, so a mismatch always reads the same: which keys are missing or
unexpected, or which shape differs and from which hyperparameter it comes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from .errors import PLDRError

__all__ = ["load_state_dict_strict"]

# Prefixes that wrappers add to state-dict keys (torch.compile, DDP/FSDP1) and that mean nothing
# for the weights themselves.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def _names(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_SHAPE_HINTS = (
    ("embedding.weight", "input_vocab_size x d_model"),
    ("final_layer.weight", "input_vocab_size x d_model"),
    ("final_layer.bias", "input_vocab_size"),
    ("ffn.gluw1", "dff x d_model"),
    ("ffn.gluw3", "d_model x dff"),
    ("denseAs", "A_dff x d_model/num_heads"),
    ("plgatt_layer", "num_heads x d_model/num_heads x d_model/num_heads"),
    ("mha1.layernorm1", "d_model/num_heads"),
    ("reslayerAs", "d_model/num_heads"),
)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``: every key must match by name and shape, or a PLDRError says
    which keys are missing or unexpected, or which shape differs (and from which hyperparameter)."""
    state = _strip_prefixes(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        hint = ""
        layers_in_state = {k.split(".")[2] for k in state if k.startswith("decoder.dec_layers.")}
        config = getattr(model, "config", None)
        if config is not None and layers_in_state and len(layers_in_state) != config.num_layers:
            hint = (
                f" (checkpoint has {len(layers_in_state)} layers, num_layers={config.num_layers})"
            )
        raise PLDRError(f"{source} does not match the model: {'; '.join(parts)}{hint}")
    for key, tensor in state.items():
        want = expected[key].shape
        if tuple(tensor.shape) != tuple(want):
            hint = next((h for pattern, h in _SHAPE_HINTS if pattern in key), "")
            hint = f" [{hint}]" if hint else ""
            raise PLDRError(
                f"{source}: shape of {key} is {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(want)} from the hyperparameters{hint}"
            )
    model.load_state_dict(state, strict=True)
