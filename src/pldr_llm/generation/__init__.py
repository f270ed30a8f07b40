"""Generation: one decoding loop for every path that produces text.

* :class:`DecodeEngine`, :class:`SamplingParams`, :class:`StepOutput` (and :class:`BlockOutput`,
  a block of steps per slot): the static, slot-based loop (KV-cache allocated once, CUDA-graph
  step with sampling inside) -- see :mod:`pldr_llm.core.engine`; :class:`DeductiveRecord`: what
  it records with ``record_deductive`` (the deductive cache-mode runs).
* :func:`generate`, :func:`generate_details`, :func:`stream_generate`, :func:`generate_text`: the
  user-facing calls, all on that loop.
* :func:`final_text`, :func:`find_stop`, :class:`StopStrings`: a row's text and its stop strings;
  :class:`Detokenizer`: the same text as deltas while ids arrive (streaming) -- see
  :mod:`pldr_llm.core.text`.
* :func:`filter_logits` & co: the original's sampling filters (:mod:`~.sampling`);
  :class:`SamplingParams` also holds the logit processing (penalties, ``logit_bias``,
  ``min_new_tokens``) and ``logprobs``, applied inside the decoding step
  (:mod:`pldr_llm.core.processing`), and checks every field in :meth:`SamplingParams.validate`.
"""

from pldr_llm.core.cache import GInit
from pldr_llm.core.engine import BlockOutput, DecodeEngine, DeductiveRecord, StepOutput
from pldr_llm.core.generate import (
    GenerationOutput,
    generate,
    generate_details,
    generate_text,
    stream_generate,
)
from pldr_llm.core.graphs import sdpa_backends
from pldr_llm.core.sampling import (
    FILTERED_LOGIT,
    MAX_LOGPROBS,
    SamplingParams,
    filter_logits,
    filter_rows,
    inverse_cdf,
    sample_rows,
    top_k_filter,
    top_p_filter,
    uniform_draws,
)
from pldr_llm.core.text import Detokenizer, StopStrings, final_text, find_stop

__all__ = [
    "FILTERED_LOGIT",
    "MAX_LOGPROBS",
    "BlockOutput",
    "DecodeEngine",
    "DeductiveRecord",
    "Detokenizer",
    "GInit",
    "GenerationOutput",
    "SamplingParams",
    "StepOutput",
    "StopStrings",
    "filter_logits",
    "filter_rows",
    "final_text",
    "find_stop",
    "generate",
    "generate_details",
    "generate_text",
    "inverse_cdf",
    "sample_rows",
    "uniform_draws",
    "sdpa_backends",
    "stream_generate",
    "top_k_filter",
    "top_p_filter",
]
