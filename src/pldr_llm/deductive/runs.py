"""Running a model for its deductive outputs: one pass, every cache mode, inspection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pldr_llm.core.cache import GCacheEntry
from pldr_llm.core.errors import PLDRError
from pldr_llm.deductive.stats import (
    DEDUCTIVE_NAMES,
    DeductiveReport,
    LayerTensors,
    analyze_deductive,
    compare,
    layer_tensors,
)

#: Cache modes of :func:`cache_mode_runs`, named like the golden data: KV-cache on/off, G-cache
#: on/off. ``kv0_g0`` (no cache at all, everything recomputed) is the yardstick.
CACHE_MODES = ("kv1_g1", "kv1_g0", "kv0_g1", "kv0_g0")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_ids(ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    t = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise PLDRError("give one prompt at a time (shape [L] or [1, L])")
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise PLDRError("a prompt must be a non-empty sequence of token ids")
    return t.to(device=device, dtype=torch.long)[None]


def _cpu_layers(deductive: Sequence[Any] | None) -> list[LayerTensors]:
    if not deductive:
        raise PLDRError("the model returned no deductive outputs")
    return layer_tensors(list(deductive))


class _EvalMode:
    """``with _EvalMode(model):`` runs in eval mode and restores the training flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def deductive_outputs(
    model: Any, input_ids: Sequence[int] | Tensor, cache: Any = None
) -> list[LayerTensors]:
    """One forward pass with ``output_deductive=True`` (no cache unless given), on the CPU."""
    with _EvalMode(model):
        ids = _as_ids(input_ids, _model_device(model))
        out = model(ids, cache=cache, output_deductive=True)
    return _cpu_layers(out.deductive)


@dataclass
class CacheRuns:
    """Deductive outputs of one prompt and a fixed continuation in every cache mode.

    ``prompt`` is the uncached pass over the prompt (which is also what fills the G-cache);
    ``steps[mode][k]`` the outputs of decoding step ``k + 1`` (the prompt plus ``k + 1``
    continuation tokens) in ``mode`` (see :data:`CACHE_MODES`). ``g_cache`` is the G-cache of
    the prompt pass (A_LM, G_LM per layer, on the CPU).
    """

    prompt_ids: list[int]
    continuation: list[int]
    prompt: list[LayerTensors]
    steps: dict[str, list[list[LayerTensors]]]
    g_cache: list[GCacheEntry]


#: (KV-cache, G-cache) of each mode on :class:`~pldr_llm.generation.DecodeEngine`
_ENGINE_MODES = {
    "kv1_g1": (True, True),
    "kv1_g0": (True, False),
    "kv0_g1": (False, True),
    "kv0_g0": (False, False),
}


def _engine_walk(
    model: Any, prompt: list[int], steps: int, mode: str, forced: list[int] | None
) -> tuple[list[LayerTensors], list[list[LayerTensors]], list[int]]:
    """Decode ``steps`` tokens in ``mode`` on the one decoding loop, recording the deductive
    outputs: (prompt pass, one per step, the generated ids). ``forced`` fixes the tokens
    (teacher forcing); without it the tokens are greedy."""
    from pldr_llm.core.engine_cache import EngineSpec, build_engine
    from pldr_llm.generation import SamplingParams

    kv, g = _ENGINE_MODES[mode]
    # A fresh engine: its recorded passes are this walk's alone.
    engine = build_engine(model, EngineSpec(1, len(prompt) + steps, kv, g, record_deductive=True))
    params = SamplingParams(temperature=0.0, max_new_tokens=steps, stop_at_eos=False)
    slot = engine.add(prompt, params, forced_ids=forced)
    for _ in range(steps):
        engine.step()
    records = engine.deductive
    if len(records) != steps + 1 or any(slot not in r.outputs for r in records):
        raise PLDRError(f"the decoding loop recorded {len(records)} passes, expected {steps + 1}")
    # Clones made here are ordinary tensors (the loop runs in inference mode).
    layers = [
        [{k: v.clone() for k, v in layer.items()} for layer in _cpu_layers(r.outputs[slot])]
        for r in records
    ]
    return layers[0], layers[1:], engine.generated(slot)


@torch.no_grad()
def cache_mode_runs(model: Any, prompt_ids: Sequence[int] | Tensor, steps: int = 2) -> CacheRuns:
    """Decode ``steps`` greedy tokens after the prompt and record deductive outputs per mode.

    Every mode runs on the one decoding loop (:class:`~pldr_llm.generation.DecodeEngine` with
    ``record_deductive``, eager attention). The continuation is fixed first (greedy on full
    recomputation, ``kv0_g0``), then every other mode decodes that same token sequence (teacher
    forcing), so differences come only from caching:

    * ``kv0_g0``: no cache; each step recomputes A, A_LM, A_P, G_LM over the grown sequence.
    * ``kv1_g1``: KV- and G-cache of the prompt pass; only the new token is run, G_LM reused.
    * ``kv1_g0``: KV-cache only; the metric tensor A cached with the keys is reused, the power
      law recomputed from it.
    * ``kv0_g1``: G-cache only; the grown sequence is recomputed with the prompt's G_LM.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PLDRError("steps must be at least 1")
    ids = _as_ids(prompt_ids, _model_device(model))
    prompt_list = [int(i) for i in ids[0].tolist()]
    max_len = int(getattr(getattr(model, "config", None), "max_seq_len", 0) or 0)
    if max_len and ids.shape[1] + steps > max_len:
        raise PLDRError(
            f"prompt of {ids.shape[1]} tokens plus {steps} steps exceeds max_seq_len={max_len}"
        )
    with _EvalMode(model):
        prompt, reference, continuation = _engine_walk(model, prompt_list, steps, "kv0_g0", None)
        runs = {"kv0_g0": reference}
        for mode in ("kv1_g1", "kv1_g0", "kv0_g1"):
            runs[mode] = _engine_walk(model, prompt_list, steps, mode, continuation)[1]
    # The prompt pass's (A_LM, G_LM) are what fills the G-cache.
    g_cache = [GCacheEntry(layer.get("A_LM"), layer["G_LM"]) for layer in prompt]
    return CacheRuns(
        prompt_ids=prompt_list,
        continuation=continuation,
        prompt=prompt,
        steps={m: runs[m] for m in CACHE_MODES},
        g_cache=g_cache,
    )


def cache_invariance(runs: CacheRuns, names: Sequence[str] | None = None) -> dict[str, Any]:
    """RMSE sections of :func:`cache_mode_runs`: for every mode and step, the deductive outputs
    against the prompt pass (``vs_prompt``: 0 where the G-cache or the cached A is reused) and
    against the uncached step (``vs_uncached``: the same step recomputed with caches off)."""
    modes: dict[str, Any] = {}
    for mode in CACHE_MODES:
        per_step = []
        for k, layers in enumerate(runs.steps[mode]):
            entry: dict[str, Any] = {"step": k + 1}
            entry["vs_prompt"] = compare(layers, runs.prompt, _shared(layers, runs.prompt, names))
            if mode != "kv0_g0":
                ref = runs.steps["kv0_g0"][k]
                entry["vs_uncached"] = compare(layers, ref, _shared(layers, ref, names))
            per_step.append(entry)
        modes[mode] = per_step
    return {
        "description": (
            "RMSE of the deductive outputs of each decoding step, per cache mode (kv1_g1: KV- and "
            "G-cache; kv1_g0: KV-cache only; kv0_g1: G-cache only; kv0_g0: none), against the "
            "uncached prompt pass (vs_prompt) and against the same step without caches "
            "(vs_uncached)"
        ),
        "prompt_ids": runs.prompt_ids,
        "continuation": runs.continuation,
        "modes": modes,
    }


def _shared(
    a: Sequence[LayerTensors], b: Sequence[LayerTensors], names: Sequence[str] | None
) -> list[str]:
    have = [n for n in DEDUCTIVE_NAMES if all(n in x for x in a) and all(n in x for x in b)]
    return have if names is None else [n for n in have if n in names]


def compare_across_prompts(prompt_outputs: Sequence[Sequence[LayerTensors]]) -> dict[str, Any]:
    """RMSE between the deductive outputs of the first prompt and of each other prompt."""
    pairs = []
    for j in range(1, len(prompt_outputs)):
        pairs.append({"a": 0, "b": j, **compare(prompt_outputs[0], prompt_outputs[j])})
    return {
        "description": "RMSE between the uncached deductive outputs of prompt 0 and prompt b",
        "pairs": pairs,
    }


@dataclass
class InspectResult:
    """What :func:`inspect_model` found: the report, and the tensors behind it."""

    report: DeductiveReport
    prompt_outputs: list[list[LayerTensors]]  # uncached pass over each prompt
    runs: CacheRuns

    @property
    def g_cache(self) -> list[GCacheEntry]:
        """The G-cache (A_LM, G_LM per layer) of the first prompt (for ``save_g_file``)."""
        return self.runs.g_cache


def inspect_model(
    model: Any,
    prompts: Sequence[Sequence[int] | Tensor],
    steps: int = 2,
    rtol: float | None = None,
    source: Mapping[str, Any] | None = None,
) -> InspectResult:
    """Figures of a model's deductive outputs over ``prompts`` (token ids, one list per prompt).

    The report's heads describe G_LM of the uncached pass over the first prompt (A, A_LM, A_P as
    extra sections); ``rmse.cached_vs_uncached`` compares cache modes over ``steps`` greedy
    decoding steps of the first prompt (:func:`cache_invariance`); ``rmse.across_prompts``
    compares each prompt's uncached outputs with the first prompt's.
    """
    if not prompts:
        raise PLDRError("give at least one prompt")
    runs = cache_mode_runs(model, prompts[0], steps=steps)
    outputs = [runs.prompt] + [deductive_outputs(model, p) for p in prompts[1:]]
    report = analyze_deductive(runs.prompt, rtol=rtol, source=source)
    report.rmse = {
        "cached_vs_uncached": cache_invariance(runs),
        "across_prompts": compare_across_prompts(outputs),
    }
    return InspectResult(report=report, prompt_outputs=outputs, runs=runs)
