"""What a decoding engine is built with and what it admits: its options' checks and choices
(graph capture, the fused step, packed projections), the checks of the rows added to it and
how their prompts are grouped for the prefill."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import check_token_range
from .errors import PLDRError
from .fused import available as fused_available
from .fused import supports as fused_supports
from .model import PackedLayer, PLDRModel
from .sampling import SamplingParams


def check_rows(
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    forced_ids: Sequence[Sequence[int]] | None,
    vocab: int,
    max_len: int,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """The prompts and forced ids as int lists, each checked with its params (one-line
    :class:`PLDRError`)."""
    if len(prompts) != len(params):
        raise PLDRError(f"{len(prompts)} prompts but {len(params)} sampling params")
    rows: list[list[int]] = []
    for prompt, p in zip(prompts, params):
        if not isinstance(p, SamplingParams):
            raise PLDRError(f"params must be SamplingParams, got {type(p).__name__}")
        p.validate()
        row = [int(t) for t in prompt]
        if not row:
            raise PLDRError("empty prompt (start from the end-of-text id instead)")
        check_token_range(min(row), max(row), vocab)
        if p.max_new_tokens < 1:
            raise PLDRError("max_new_tokens must be >= 1 for a decoding slot")
        named = [t for t, _ in p.logit_bias] + list(p.stop_token_ids)
        if named:  # logit_bias and stop ids index [B, V] buffers
            check_token_range(min(named), max(named), vocab)
        if len(row) + p.max_new_tokens > max_len:
            raise PLDRError(
                f"prompt ({len(row)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds "
                f"max_len={max_len}"
            )
        rows.append(row)
    if forced_ids is None:
        return rows, None
    forced = [[int(t) for t in f] for f in forced_ids]
    if len(forced) != len(rows):
        raise PLDRError(f"{len(rows)} prompts but {len(forced)} forced id lists")
    for f, p in zip(forced, params):
        if len(f) > p.max_new_tokens or any(t < 0 or t >= vocab for t in f):
            raise PLDRError("forced ids must be vocabulary ids, at most max_new_tokens")
    return rows, forced


def check_engine_options(
    model: PLDRModel,
    max_batch: int,
    max_len: int | None,
    steps_per_graph: int,
    record_deductive: bool,
    compile: bool | dict[str, Any],
    cuda_graph: bool | None,
) -> int:
    """Refuse bad engine options (one-line :class:`PLDRError`); returns ``max_len``."""
    config = model.config
    if record_deductive and (compile or cuda_graph):
        raise PLDRError(
            "record_deductive runs the eager step: it cannot be combined with cuda_graph or compile"
        )
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise PLDRError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    max_len = config.max_seq_len if max_len is None else max_len
    if not 2 <= max_len <= config.max_seq_len:
        raise PLDRError(f"max_len must be in [2, max_seq_len={config.max_seq_len}], got {max_len}")
    if steps_per_graph < 1:
        raise PLDRError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
    return max_len


def packed_projections(
    model: PLDRModel, pack: bool | None, fused: bool, on_cuda_with_kv: bool
) -> list[PackedLayer] | None:
    """Each layer's wq|wk|wv and gluw1|gluw2 packed into one matrix each (copies, refreshed when
    the weights change): five matrix-vector products a layer instead of seven. On by default on
    CUDA with the KV-cache, where a decoding step is a chain of small kernels, and with the fused
    step; the CPU keeps the model's own projections (and so exactly model.forward's
    arithmetic)."""
    if pack is None:
        pack = on_cuda_with_kv
    if not (pack or fused):
        return None
    layers: Any = model.decoder.dec_layers  # DecoderLayers (typed as a Module attribute)
    return [layer.pack() for layer in layers]


def check_block_size(k: int) -> None:
    """A block of steps needs k >= 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PLDRError(f"a block needs k >= 1 steps, got {k!r}")


def choose_fused(
    model: PLDRModel,
    fused: bool | None,
    compile: bool | dict[str, Any],
    enable_kvcache: bool,
    enable_Gcache: bool,
    record_deductive: bool,
) -> bool:
    """Whether an engine runs the fused step. By default wherever the fused kernels run
    (pldr_llm.core.fused: nine kernels a layer instead of ~17), with or without CUDA graphs (so
    the captured and the uncaptured loop compute the same), but not with torch.compile, which
    fuses the step itself; ``fused=True`` where they cannot run is refused."""
    why_not = why_not_fused(model, enable_kvcache, enable_Gcache, record_deductive)
    if fused is None:
        return why_not is None and model.device.type == "cuda" and not compile
    if fused and why_not is not None:
        raise PLDRError(f"fused decoding cannot run here: {why_not}")
    return fused


def why_not_fused(
    model: PLDRModel, enable_kvcache: bool, enable_Gcache: bool, record_deductive: bool
) -> str | None:
    """Why the fused step cannot run an engine of these options (None: it can)."""
    if not fused_available(model.device):
        return "it needs Triton and a CUDA device"
    if not (enable_kvcache and enable_Gcache):
        return "it needs the KV-cache and the G-cache"
    if record_deductive:
        return "record_deductive runs the eager step"
    return fused_supports(model)


def check_free(count: int, free: int, max_batch: int) -> None:
    """``count`` new rows fit in the ``free`` slots (one-line :class:`PLDRError`)."""
    if count > free:
        raise PLDRError(f"{count} prompt(s) but only {free} free slot(s) (max_batch={max_batch})")


def check_g_init(given: bool, recorded: bool, causal_running: bool) -> None:
    """A G_init (``given``) is refused where it cannot apply: with the deductive recorder over
    the KV-cache (``recorded``), or with a causal metric's running sum (``causal_running``)."""
    if given and recorded:
        raise PLDRError("record_deductive with the KV-cache takes no G_init")
    if given and causal_running:
        raise PLDRError("G_init with a causal metric needs the G-cache on (or no KV-cache)")


def padding_groups(
    rows: Sequence[Sequence[int]], params: Sequence[SamplingParams], slots: int
) -> list[list[int]]:
    """The indices of ``rows`` to prefill together. A row left-padded to its group's longest
    prompt has its keys start after the padding, and every step writes a row's next key, its
    last one included, at its write index: padded + ``max_new_tokens`` must not pass ``slots``.
    So the longest row left starts a group and takes every other row that fits beside it; the
    rows that do not wait for a group of shorter prompts (the longest row always fits alone, as
    :func:`check_rows` checked). One group when all fit."""
    left = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    groups = []
    while left:
        longest = len(rows[left[0]])
        group = [i for i in left if longest + params[i].max_new_tokens <= slots]
        groups.append(sorted(group))
        taken = set(group)
        left = [i for i in left if i not in taken]
    return groups
