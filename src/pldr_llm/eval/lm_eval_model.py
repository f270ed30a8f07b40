"""``pldrllm``: a native lm-evaluation-harness model for PLDR-LLMs.

Registered under the name ``pldrllm`` (``lm_eval.api.registry.register_model``) when this module
is imported: ``pldr-llm eval`` and ``lm_eval.simple_evaluate(model="pldrllm", ...)`` after
``import pldr_llm.eval.lm_eval_model`` use it. lm-eval's own command line reads no plugins, so
the shell form is lm-eval's command line run through this package (:mod:`pldr_llm.eval.__main__`)::

    python -m pldr_llm.eval run --model pldrllm --model_args pretrained=X,batch_size=32 --tasks ...

where ``X`` is anything ``pldr-llm --model`` accepts: a published bundle folder, a ``pldr-llm
convert`` folder, a Hugging Face hub id, or a folder written by ``pldr-llm convert --to hf``.

Scoring (``loglikelihood``) is batched over requests: requests are sorted by length, padded on
the right with the core model's per-row attention mask (padding kept out of the metric tensor A,
the keys and the rotary positions, so every request scores exactly as it would alone), requests
with the same input run once, and logits are computed only at the scored positions. How a
continuation is scored:

* ``score_mode=full`` (default): one pass over context + continuation, the way the original's
  harness and lm-eval's ``hf`` model score; the metric tensor A then sees the whole input.
  On CUDA (``cuda_graph``, default on there) shapes repeat: a chunk's padded width is rounded
  up to a multiple of ``width_multiple`` (64 there, at most max_seq_len) and a short last chunk
  is filled with padding rows, so a run uses a handful of [batch_size, width] shapes; a shape's
  forward is captured in a CUDA graph the second time it comes
  (:class:`pldr_llm.generation.captured.CapturedForward`, one per shape, a few kept) and
  replayed from then on (:mod:`pldr_llm.eval.full_scoring`). Elsewhere every chunk runs ``model.forward``, padded only to its
  longest input (``width_multiple`` 1). Padding is masked per row, so neither changes a
  request's log-probabilities beyond float rounding.
* ``score_mode=cached``: the decoding loop itself (:class:`pldr_llm.generation.DecodeEngine`)
  prefills the context and emits the continuation token by token (teacher-forced), in the
  cache modes ``kvcache`` / ``gcache``: each continuation token gets exactly the probability
  the generator gives it.

``gcache_file=PATH`` (a G-cache file, see :func:`pldr_llm.gfile.load_g_file`) replaces the
G-cache in every pass of scoring and generation (the paper's predefined G_LM experiments).
``kvcache`` and ``gcache`` (both on by default) are the cache modes of ``generate_until``, which
runs a batch of requests at once on the one decoding loop (:mod:`pldr_llm.generation`: static
caches, a CUDA-graph step on GPUs).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval only does it when empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import Tensor

from pldr_llm.core.cache import GCacheEntry, prepare_g_init
from pldr_llm.core.errors import PLDRError
from pldr_llm.eval.full_scoring import DEFAULT_WIDTH_MULTIPLE, FullScorer
from pldr_llm.eval.model_args import (
    DEFAULT_BATCH_SIZE,
    as_bool,
    batch_size_arg,
    load_pretrained,
    positive_int,
)
from pldr_llm.generation import find_stop, generate_details

log = logging.getLogger(__name__)

SCORE_MODES = ("full", "cached")

# One scoring request after tokenization: (request key, context ids, continuation ids).
TokenRequest = tuple[Any, list[int], list[int]]


@register_model("pldrllm")
class PLDRLLMEvalModel(TemplateLM):
    """lm-eval model running a PLDR-LLM natively (no transformers involved).

    Model arguments (``--model_args k=v,...``):
        pretrained: model to load (see :func:`load_pretrained`).
        tokenizer: a tokenizer to use instead of the model's own.
        device: ``cuda``, ``cuda:N``, ``cpu`` (default: cuda when available).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (as stored).
        batch_size: requests per forward pass (default 16).
        max_length: context length (default: the model's max_seq_len).
        max_gen_toks: default generation budget of ``generate_until`` (256).
        kvcache, gcache: the cache modes of generation and of ``score_mode=cached`` (on).
        gcache_file: a G-cache file that replaces the G-cache everywhere.
        score_mode: ``full`` (default) or ``cached`` (see the module docstring).
        width_multiple: ``score_mode=full`` pads each chunk to a width that is a multiple of
            this (capped at max_seq_len) and to ``batch_size`` rows, so shapes repeat; 1 pads
            a chunk only to its longest input (default: 64 with ``cuda_graph``, else 1).
        cuda_graph: replay ``score_mode=full`` forwards of a repeated shape from a CUDA graph
            (default: on when the model is on CUDA). On another device ``true`` runs the same
            graph-ready forward without a graph (what the CPU tests check).
    """

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> PLDRLLMEvalModel:
        """``--model_args k=v,...`` plus lm-eval's own settings (``--device``,
        ``--batch_size``); see :meth:`create_from_arg_obj`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> PLDRLLMEvalModel:
        """The model from its arguments. A ``device`` or ``batch_size`` named in the model
        arguments wins over lm-eval's setting of the same name (whose ``device`` always has a
        value, ``cuda:0`` by default), so ``--model_args device=cpu`` works as the table above
        says; lm-eval itself passes both and the constructor would get the name twice."""
        args = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key in args:
                if str(args[key]) != str(value):
                    log.info("pldrllm: model argument %s=%s is used, not %s", key, args[key], value)
                continue
            args[key] = value
        return cls(**args)

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        device: Any = None,
        dtype: Any = None,
        batch_size: Any = DEFAULT_BATCH_SIZE,
        max_batch_size: Any = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        kvcache: Any = True,
        gcache: Any = True,
        gcache_file: str | None = None,
        score_mode: str = "full",
        width_multiple: Any = None,
        cuda_graph: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("pldrllm ignores model arguments %s", ", ".join(sorted(kwargs)))
        from pldr_llm.bundle import resolve_device

        # lm-eval's convention: no device given means the GPU when there is one
        self._device = resolve_device(device if device is not None else "auto")
        self.model, self.tokenizer = load_pretrained(pretrained, tokenizer, self._device, dtype)
        self.batch_size = batch_size_arg(batch_size)
        self.kvcache = as_bool(kvcache, "kvcache")
        self.gcache = as_bool(gcache, "gcache")
        if score_mode not in SCORE_MODES:
            raise PLDRError(
                f"score_mode must be one of {', '.join(SCORE_MODES)}, got {score_mode!r}"
            )
        self.score_mode = score_mode
        self._max_length = int(max_length) if max_length else int(self.model.config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self.g_init: list[GCacheEntry] | None = None
        if gcache_file:
            from pldr_llm.gfile import load_g_file

            # checked against the model, errors naming the file; then cast to its device/dtype
            self.g_init = prepare_g_init(self.model, load_g_file(gcache_file, self.model.config))
        on_cuda = self._device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else as_bool(cuda_graph, "cuda_graph")
        # Bucketed shapes only pay off where a repeated shape is replayed from a graph; eagerly
        # the extra padding would be computed for nothing.
        if width_multiple is None:
            width_multiple = DEFAULT_WIDTH_MULTIPLE if self.cuda_graph else 1
        self.width_multiple = positive_int(width_multiple, "width_multiple")
        #: ``score_mode=full``'s padded chunks and their captured forwards
        self.full_scorer = FullScorer(
            self.model,
            self.batch_size,
            self.width_multiple,
            self.cuda_graph,
            self.g_init,
            filler_id=self.eot_token_id,
        )

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        # The original never adds a start id; documents end with the end-of-text id, so that is
        # the context of a text's first token (as lm-eval's hf model does without a BOS token).
        # A transformers folder whose tokenizer_config.json sets add_bos_token starts texts with
        # the start id instead, as lm-eval's hf model does with a BOS token.
        if getattr(self.tokenizer, "add_bos", False):
            return int(self.tokenizer.bos_id)
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "model_path", "pldrllm"))

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        return self.tokenizer.encode(string, add_eos=False)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    @property
    def shape_uses(self) -> Counter[tuple[int, int]]:
        """How often each [rows, width] chunk shape of ``score_mode=full`` ran."""
        return self.full_scorer.shape_uses

    @property
    def captured_shapes(self) -> list[tuple[int, int]]:
        """The [rows, width] shapes whose captured forwards are kept now."""
        return self.full_scorer.captured_shapes

    def _score_cached(self, contexts: list[list[int]], conts: list[list[int]]) -> list[Tensor]:
        """Log-probabilities of each continuation as the generator gives them: the decoding loop
        (:class:`~pldr_llm.generation.DecodeEngine`, this model's cache modes and G-cache file)
        prefills the context and then emits the continuation, forced token by token."""
        from pldr_llm.core.generate import engine_for
        from pldr_llm.generation import SamplingParams

        limit = self.model.config.max_seq_len
        # The loop holds prompt + new tokens within max_seq_len: drop the oldest context token
        # when the request uses the whole window plus one.
        contexts = [
            ctx[max(0, len(ctx) + len(cont) - limit) :] for ctx, cont in zip(contexts, conts)
        ]
        if any(not ctx for ctx in contexts):
            raise PLDRError(f"a continuation fills the whole context of {limit} tokens")
        longest = max(len(c) + len(t) for c, t in zip(contexts, conts))
        engine = engine_for(
            self.model, len(contexts), longest, self.kvcache, self.gcache, False, True, None
        )
        params = [
            SamplingParams(temperature=0, max_new_tokens=len(cont), stop_at_eos=False)
            for cont in conts
        ]
        slots: list[int] = []
        try:
            slots = engine.add_many(contexts, params, self.g_init, forced_ids=conts)
            logits: dict[int, list[Tensor]] = {slot: [] for slot in slots}
            while engine.active_slots:
                out = engine.step()
                assert out.logits is not None
                for i, slot in enumerate(out.slots):
                    logits[slot].append(out.logits[i])
        finally:
            for slot in slots:
                engine.release(slot)
        return [F.log_softmax(torch.stack(logits[slot]), dim=-1) for slot in slots]

    def _prepare(self, context: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate context + continuation to the model's context (as lm-eval's hf does)."""
        if not cont:
            raise PLDRError("a loglikelihood request has an empty continuation")
        if len(cont) > self.max_length:
            raise PLDRError(
                f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}"
            )
        whole = (context + cont)[-(self.max_length + 1) :]
        return whole[: len(whole) - len(cont)], cont

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Batched scoring of tokenized requests; results in the order of ``requests``."""
        from tqdm.auto import tqdm

        prepared = [self._prepare(list(ctx), list(cont)) for _, ctx, cont in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if self.score_mode == "full":
            # Requests with the same input (context + continuation minus its last token) share
            # one row: one pass scores every single-token choice of a question.
            groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for index, (ctx, cont) in enumerate(prepared):
                groups[tuple(ctx + cont[:-1])].append(index)
            units = sorted(groups.items(), key=lambda item: -len(item[0]))
        else:
            units = sorted(
                ((tuple(ctx + cont[:-1]), [i]) for i, (ctx, cont) in enumerate(prepared)),
                key=lambda item: -len(item[0]),
            )
        bar = tqdm(
            total=len(requests),
            disable=disable_tqdm or not sys.stderr.isatty(),
            desc="pldrllm loglikelihood",
        )
        for start in range(0, len(units), self.batch_size):
            chunk = units[start : start + self.batch_size]
            if self.score_mode == "full":
                inputs = [list(key) for key, _ in chunk]
                # A row scores the longest continuation of its group; shorter ones share its tail.
                longest = [max(len(prepared[i][1]) for i in members) for _, members in chunk]
                spans = [(len(x) - n, len(x)) for x, n in zip(inputs, longest)]
                logprobs = self.full_scorer.score(inputs, spans)
                for (_, members), lp in zip(chunk, logprobs):
                    for index in members:
                        results[index] = self._answer(lp, prepared[index][1])
            else:
                members = [m[0] for _, m in chunk]
                logprobs = self._score_cached(
                    [prepared[i][0] for i in members], [prepared[i][1] for i in members]
                )
                for index, lp in zip(members, logprobs):
                    results[index] = self._answer(lp, prepared[index][1])
            bar.update(sum(len(m) for _, m in chunk))
        bar.close()
        out = [r for r in results if r is not None]
        assert len(out) == len(requests)
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    @staticmethod
    def _answer(logprobs: Tensor, cont: list[int]) -> tuple[float, bool]:
        tail = logprobs[-len(cont) :]
        target = torch.tensor(cont, dtype=torch.long, device=tail.device)
        picked = tail.gather(1, target[:, None]).squeeze(1)
        greedy = bool((tail.argmax(dim=-1) == target).all())
        return float(picked.sum()), greedy

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of the model's context, batched together."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[TokenRequest] = []
        owner: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _sampling(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        do_sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not do_sample or temperature == 0.0:
            return {"top_k": 1}
        return {
            "temperature": temperature,
            "top_k": int(gen_kwargs.get("top_k", 0) or 0),
            "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0),
        }

    @torch.inference_mode()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate for a batch of requests at once, stopping each at its ``until`` strings."""
        from tqdm.auto import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(index)
        bar = tqdm(
            total=len(requests),
            disable=disable_tqdm or not sys.stderr.isatty(),
            desc="pldrllm generate_until",
        )
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            sampling = self._sampling(gen_kwargs)
            budget = max(1, self.max_length - max_new)
            prompts = {i: self._prompt(requests[i].args[0], budget) for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = self._generate_chunk([prompts[i] for i in chunk], max_new, until, sampling)
                for index, text in zip(chunk, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    def _prompt(self, context: str, budget: int) -> list[int]:
        ids = self.tok_encode(context)[-budget:]
        return ids if ids else [self.eot_token_id]

    def _generate_chunk(
        self, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict[str, Any]
    ) -> list[str]:
        longest = max(len(p) for p in prompts)
        max_new = max(0, min(max_new, self.max_length - longest))

        def stop(row: int, new_ids: list[int]) -> bool:
            return find_stop(self.tok_decode(new_ids), until) is not None

        out = generate_details(
            self.model,
            prompts,
            max_new,
            enable_kvcache=self.kvcache,
            enable_Gcache=self.gcache,
            G_init=self.g_init,
            stop_at_eos=True,
            stopping_criteria=stop if until else None,
            **sampling,
        )
        texts = []
        for prompt, new_ids in zip(prompts, out.new_ids):
            ids = [i for i in new_ids if i != self.eot_token_id]
            # The continuation as it reads after the prompt (a leading space kept), what
            # `pldr-llm generate` and the server return: the whole text past the prompt's text.
            start = len(self.tok_decode(prompt))
            text = self.tok_decode(list(prompt) + ids)[start:]
            cut = find_stop(text, until)
            texts.append(text if cut is None else text[:cut])
        return texts
