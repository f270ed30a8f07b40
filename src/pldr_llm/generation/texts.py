"""Text generation as a notebook (or ``pldr-llm generate``) runs it: a model folder and prompts
in, texts and timings out.

:meth:`TextGenerator.load` checks the settings, finds the model's files and tokenizer, starts
loading the decoding step's GPU code in the background (:mod:`~pldr_llm.generation.warm`) and
reads the weights; :meth:`TextGenerator.generate` runs the prompts in batches (each row gives
what it gives alone), optionally streaming each prompt's text as its tokens come, and yields one
:class:`TextResult` per prompt; :attr:`TextGenerator.timings` says how long it took. The command
only parses its arguments into :class:`GenerationSettings` and prints.

    from pldr_llm.generation.texts import GenerationSettings, TextGenerator
    from pldr_llm.generation import SamplingParams

    settings = GenerationSettings(SamplingParams(temperature=0, max_new_tokens=40))
    generator = TextGenerator.load("runs/tiny", ["The list"], settings)
    for result in generator.generate(["The list"]):
        print(result.text)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, TextIO

from pldr_llm.clock import CallClock
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from pldr_llm.core.model import PLDRModel
    from pldr_llm.generation.warm import WarmUp


@dataclass(frozen=True)
class GenerationSettings:
    """How prompts are decoded: ``params`` (sampling, processing, max_new_tokens; ``seed`` None
    draws one), the cache modes, a G-cache file to start from, torch.compile, prompts per
    batch, stop strings and log-probabilities (None: none; n >= 0: each token's and its top n)."""

    params: SamplingParams = field(default_factory=SamplingParams)
    enable_kvcache: bool = True
    enable_Gcache: bool = True
    g_init_file: str | None = None
    compile: bool = False
    batch_size: int = 16
    stops: tuple[str, ...] = ()
    logprobs: int | None = None

    def validate(self) -> None:
        """Raise a one-line :class:`PLDRError` for the first bad setting."""
        self.params.validate()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise PLDRError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.batch_size <= 0:
            raise PLDRError(f"--batch-size must be positive, got {self.batch_size}")
        if any(s == "" for s in self.stops):
            raise PLDRError("--stop strings must not be empty")
        if self.logprobs is not None and self.logprobs != self.params.logprobs:
            raise PLDRError("logprobs and params.logprobs differ")


@dataclass
class TextResult:
    """One prompt's result: its text (prompt and new ids decoded together, cut before a stop
    string), ids and, when asked, log-probabilities."""

    prompt: str
    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


#: The phases of a call that ``--timing`` reports (``<phase>_seconds``), in the order they run:
#: the process's start-up to the command line's entry (``pldr-llm`` only), parsing the options,
#: importing torch and the generation code, finding the model's files, loading the tokenizer
#: and encoding the prompts, reading the weights into the model, making the device ready and
#: moving what was not loaded onto it, waiting for the kernel warm-up (CUDA), capturing or
#: compiling the decoding step, and generating. They do not overlap: they add up to at most
#: ``total_seconds`` (the rest: printing, and steps too short to name).
PHASES = (
    "startup", "parse", "import", "resolve", "tokenizer", "weights", "device",
    "warm_up_wait", "capture", "generation",
)  # fmt: skip

#: The phases :meth:`TextGenerator.load` and the command line measure as laps of a CallClock.
LOAD_PHASES = PHASES[:7]


@dataclass
class TextTimings:
    """What a call took (seconds), for ``--timing``: ``seconds`` is :meth:`TextGenerator.generate`
    (warm-up wait and capture included; ``generation_seconds`` is it without them), and
    ``<phase>_seconds`` each of :data:`PHASES`; ``total_seconds`` runs from the clock's start (the
    process's, for ``pldr-llm generate``) to the last result."""

    new_tokens: int = 0
    prompts: int = 0
    seconds: float = 0.0
    capture_seconds: float = 0.0  # capturing / compiling the decoding step
    warm_up_wait_seconds: float = 0.0  # finishing the background kernel warm-up
    warm_up_error: str | None = None
    tokens_per_s: float = 0.0
    device: str = ""
    dtype: str = ""
    startup_seconds: float = 0.0
    parse_seconds: float = 0.0
    import_seconds: float = 0.0
    resolve_seconds: float = 0.0
    tokenizer_seconds: float = 0.0
    weights_seconds: float = 0.0
    device_seconds: float = 0.0
    generation_seconds: float = 0.0
    total_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The timings as the ``--timing`` JSON line holds them (rounded)."""
        out = asdict(self)
        for key, value in out.items():
            if key.endswith("seconds"):
                out[key] = round(value, 4)
        out["tokens_per_s"] = round(out["tokens_per_s"], 2)
        return out


class TextStreamer:
    """Prints one row's text as its ids arrive (a ``streamer`` for :func:`pldr_llm.generate`):
    the prompt at once, then the deltas of a :class:`pldr_llm.generation.Detokenizer`, which
    add up to the text printed without streaming."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
        out: TextIO | None = None,
    ) -> None:
        from pldr_llm.core.text import Detokenizer

        self.detok = Detokenizer(tokenizer, prompt_ids, stops, echo=True)
        self.out = out or sys.stdout
        self._write(self.detok.push([]))

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def __call__(self, next_ids: torch.Tensor) -> None:
        self._write(self.detok.push([int(next_ids.reshape(-1)[0])]))

    def final(self) -> None:
        """Print the rest of the text and a newline."""
        self._write(self.detok.finish() + "\n")


class TextGenerator:
    """A model and its tokenizer, loaded for :meth:`generate` (see the module docstring)."""

    def __init__(
        self,
        model: PLDRModel,
        tokenizer: Any,
        settings: GenerationSettings,
        g_init: Any = None,
        warm: WarmUp | None = None,
        clock: CallClock | None = None,
        encoded: dict[str, list[int]] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.g_init = g_init
        self._warm = warm
        #: whether the GPU code was loading in the background (it was on CUDA)
        self.warmed_up = warm is not None
        #: the call's clock (started by :meth:`load`, or by the command line before it)
        self.clock = clock or CallClock()
        self._encoded = encoded or {}  # prompt -> ids, as load() checked them
        self.timings = TextTimings(
            device=str(model.device), dtype=str(model.dtype).removeprefix("torch.")
        )
        for phase in LOAD_PHASES:
            setattr(self.timings, f"{phase}_seconds", self.clock.phases.get(phase, 0.0))

    @classmethod
    def load(
        cls,
        model: str,
        prompts: Sequence[str],
        settings: GenerationSettings,
        *,
        device: str | None = None,
        dtype: str | None = None,
        tokenizer: str | None = None,
        stream: bool = False,
        log: Callable[[str], None] | None = None,
        clock: CallClock | None = None,
    ) -> TextGenerator:
        """Check ``settings`` and the ``prompts`` against the model's files, start the kernel
        warm-up for the first batch (or the first prompt when streaming) and load the model
        (``device``, ``dtype`` as ``--device`` and ``--dtype`` take them). ``clock`` (default:
        one started now) times the steps as laps (:data:`LOAD_PHASES`); what ran since its
        previous lap counts as importing."""
        clock = clock or CallClock()
        clock.lap("import")
        from pldr_llm.bundle import (
            bundle_summary,
            bundle_tokenizer,
            load_bundle,
            resolve_bundle,
            resolve_device,
            resolve_dtype,
        )
        from pldr_llm.generation.warm import warm_up_in_background

        clock.lap("import")
        settings.validate()
        torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
        files = resolve_bundle(model)
        config = files.config
        clock.lap("resolve")
        tok = bundle_tokenizer(files, tokenizer)
        if tok is None:
            raise PLDRError(f"no tokenizer for {model}: give one with --tokenizer")
        prompt_ids = [tok.prompt_ids(p) for p in prompts] or [[config.eos_id]]
        new = settings.params.max_new_tokens
        longest = max(len(ids) for ids in prompt_ids)
        if longest + new > config.max_seq_len:
            raise PLDRError(
                f"prompt ({longest} tokens) + max_new_tokens ({new}) exceeds "
                f"max_seq_len={config.max_seq_len} of the model"
            )
        clock.lap("tokenizer")
        g_init = None
        if settings.g_init_file:
            from pldr_llm.gfile import load_g_file  # and the restricted unpickler: only for this

            g_init = load_g_file(settings.g_init_file, config)
        clock.lap("weights")
        # The decoding loop's GPU code loads in the background while the weights are read; what
        # is left of it when they are is waited for inside the generation time.
        warm = None
        if settings.enable_kvcache and not settings.compile:
            # The first generation's batch: its prompts' lengths decide its kernels.
            first = prompt_ids[: 1 if stream else settings.batch_size]
            # Its filters and processing (their kernels), no seed of the user's.
            filters = replace(
                settings.params, seed=None, max_new_tokens=64, min_new_tokens=0, logprobs=0
            )
            warm = warm_up_in_background(
                config, torch_dtype, torch_device, [len(ids) for ids in first],
                max(len(ids) for ids in first) + new, filters,
            )  # fmt: skip
        clock.lap("device")
        loaded, _ = load_bundle(
            files, device=torch_device, dtype=torch_dtype, tokenizer=tok, clock=clock
        )
        if log is not None:
            summary = bundle_summary(files, loaded)
            log(f"loaded {summary} on {torch_device} ({str(torch_dtype).removeprefix('torch.')})")
        return cls(loaded, tok, settings, g_init, warm, clock, dict(zip(prompts, prompt_ids)))

    def _options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pldr_llm.generate_details` for these settings."""
        s, p = self.settings, self.settings.params
        return {
            "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "enable_kvcache": s.enable_kvcache, "enable_Gcache": s.enable_Gcache,
            "G_init": self.g_init, "eos_id": self.model.config.eos_id, "seed": p.seed,
            "compile": s.compile, "repetition_penalty": p.repetition_penalty,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "logit_bias": p.logit_bias, "min_new_tokens": p.min_new_tokens,
            "stop_token_ids": p.stop_token_ids, "logprobs": s.logprobs,
        }  # fmt: skip

    def generate(
        self, prompts: Sequence[str], stream: TextIO | None = None
    ) -> Iterator[TextResult]:
        """One :class:`TextResult` per prompt, in order: in batches of ``batch_size``, or one
        prompt at a time printing its text to ``stream`` as the tokens come. Updates
        :attr:`timings` as it goes (complete once the iterator is exhausted)."""
        import torch

        from pldr_llm.core.generate import generate_details
        from pldr_llm.core.text import StopStrings, final_text

        if self.settings.params.seed is not None:
            torch.manual_seed(self.settings.params.seed)
        timings, tok, stops = self.timings, self.tokenizer, list(self.settings.stops)
        start = time.perf_counter()
        if self._warm is not None:
            self._warm.join()
            timings.warm_up_wait_seconds = time.perf_counter() - start
            timings.warm_up_error = self._warm.error
            self._warm = None
        size = 1 if stream is not None else self.settings.batch_size
        for first in range(0, len(prompts), size):
            chunk = list(prompts[first : first + size])
            ids = [list(self._encoded.get(p) or tok.prompt_ids(p)) for p in chunk]
            streamer = TextStreamer(tok, ids[0], stops, stream) if stream is not None else None
            criteria = StopStrings(tok, ids, stops) if stops else None
            out = generate_details(
                self.model, ids, streamer=streamer, stopping_criteria=criteria, **self._options()
            )
            if streamer is not None:
                streamer.final()
            timings.capture_seconds += out.capture_seconds
            for row, (prompt, prompt_ids, new) in enumerate(zip(chunk, ids, out.new_ids)):
                timings.new_tokens += len(new)
                timings.prompts += 1
                timings.seconds = time.perf_counter() - start
                rate = timings.new_tokens / timings.seconds if timings.seconds > 0 else 0.0
                timings.tokens_per_s = rate
                timings.generation_seconds = max(
                    timings.seconds - timings.capture_seconds - timings.warm_up_wait_seconds, 0.0
                )
                timings.total_seconds = self.clock.elapsed()
                yield TextResult(
                    prompt, final_text(tok, prompt_ids, new, stops), prompt_ids, new,
                    out.logprobs[row] if out.logprobs is not None else None,
                    out.top_logprobs[row] if out.top_logprobs is not None else None,
                )  # fmt: skip
