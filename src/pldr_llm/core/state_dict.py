"""Loading a state dict into a model strictly, with errors that say what does not match.

Every checkpoint reader (the project's folders, the original's ``.pth``, transformers folders,
``train.init_from``) ends here, so a mismatch always reads the same: which keys are missing or
unexpected, or which shape differs and from which hyperparameter it comes.

A model that is built only to be loaded is built by :func:`build_uninitialized`: its
parameters are allocated on the device they are loaded to, but not drawn at random first (the
110M model's initialization took longer than reading its weights).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import PLDRError

__all__ = ["build_uninitialized", "load_state_dict_strict"]

M = TypeVar("M", bound=nn.Module)

#: ``torch.nn.init``'s initializers and the in-place draws and fills they run, by name.
_INITIALIZERS = frozenset(
    {
        "uniform_", "normal_", "trunc_normal_", "zero_", "zeros_", "ones_", "fill_",
        "constant_", "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
        "kaiming_normal_", "orthogonal_", "sparse_", "random_", "bernoulli_", "exponential_",
    }
)  # fmt: skip


class _SkipParameterInit(TorchFunctionMode):
    """Skips every initializer applied to a parameter; everything else (buffers, computed
    tables) runs as usual. A torch function mode is the calling thread's only."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        # nn.init's functions pass their tensor by keyword to the mode
        target = args[0] if args else kwargs.get("tensor")
        if isinstance(target, nn.Parameter) and getattr(func, "__name__", "") in _INITIALIZERS:
            return target
        return func(*args, **kwargs)


def build_uninitialized(build: Callable[[], M], device: torch.device) -> M:
    """``build()`` with its tensors created on ``device`` and its parameters left as allocated
    (their values are whatever the memory held): for a model that a strict load
    (:func:`load_state_dict_strict`, which fills every parameter) follows at once. Buffers are
    built as ``build`` builds them."""
    with torch.device(device), _SkipParameterInit():
        return build()


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
