"""``pldr-llm generate --timing``: the breakdown of the whole call (issue 25), from the process's
start to the last text, and what a plain call does not import."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pldr_llm import PLDRModel
from pldr_llm.generation.texts import PHASES
from support import PAPER_TOKENIZER_MODEL, PAPER_VOCAB_HP, make_bundle, run_cli

PROMPT = "The list of things"
#: Keys the --timing line held before the breakdown; tools read them (benchmarks/decode_speed.py).
EARLIER_KEYS = {
    "new_tokens", "prompts", "seconds", "capture_seconds", "warm_up_wait_seconds",
    "warm_up_error", "tokens_per_s", "device", "dtype",
}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, paper_tokenizer_dir: Path) -> tuple:
    """A random model, and its folders: a published bundle (.pth) and the project's format."""
    root = tmp_path_factory.mktemp("timing")
    model = make_bundle(root / "published", paper_tokenizer_dir, PAPER_VOCAB_HP)
    own = model.save(root / "own")
    tokenizer = (paper_tokenizer_dir / PAPER_TOKENIZER_MODEL).read_bytes()
    (own / "tokenizer.model").write_bytes(tokenizer)
    return model, [root / "published", own]


@pytest.fixture(scope="module")
def folders(saved: tuple) -> list[Path]:
    return saved[1]


def _timing_line(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", [0, 1], ids=["published", "own-format"])
def test_timing_reports_every_phase_of_the_whole_call(folders: list[Path], kind: int) -> None:
    start = time.perf_counter()
    result = run_cli(
        "generate", "--model", str(folders[kind]), "--prompt", PROMPT, "-n", "6", "--top-k", "1",
        "--timing", "-q",
    )  # fmt: skip
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    timing = _timing_line(result.stderr)
    assert EARLIER_KEYS <= set(timing)
    phases = {name: timing[f"{name}_seconds"] for name in PHASES}
    for name, seconds in phases.items():
        assert isinstance(seconds, float) and seconds >= 0.0, (name, seconds)
    total = timing["total_seconds"]
    # Rounded to 1e-4 each; the phases never overlap.
    assert sum(phases.values()) <= total + 1e-3, (phases, total)
    # The generation's own seconds hold its warm-up wait, capture and generation.
    parts = phases["warm_up_wait"] + phases["capture"] + phases["generation"]
    assert parts == pytest.approx(timing["seconds"], abs=1e-3)
    # From the process's start (a clock tick's resolution), within the wall time seen here.
    assert total <= wall + 0.05
    if sys.platform == "linux":
        assert phases["startup"] > 0.0
    # What a call cannot do without: importing torch and reading the weights.
    assert phases["import"] > 0.0 and phases["weights"] > 0.0 and phases["generation"] > 0.0


def test_the_library_times_its_own_steps(folders: list[Path]) -> None:
    """Without the command line's clock, TextGenerator.load starts one: no start-up or parsing."""
    from pldr_llm.generation import SamplingParams
    from pldr_llm.generation.texts import GenerationSettings, TextGenerator

    settings = GenerationSettings(SamplingParams(top_k=1, max_new_tokens=3))
    generator = TextGenerator.load(str(folders[1]), [PROMPT], settings)
    results = list(generator.generate([PROMPT]))
    timing = generator.timings.as_dict()
    assert len(results) == 1 and timing["startup_seconds"] == timing["parse_seconds"] == 0.0
    assert timing["weights_seconds"] > 0.0 and timing["tokenizer_seconds"] > 0.0
    assert sum(timing[f"{name}_seconds"] for name in PHASES) <= timing["total_seconds"] + 1e-3


#: Imported by other commands or extras, never needed to generate text on the CPU.
NOT_NEEDED = (
    "transformers", "datasets", "starlette", "uvicorn", "matplotlib", "tensorboard",
    "huggingface_hub", "lm_eval", "triton", "torch._dynamo", "torch._inductor", "sympy",
    "pldr_llm.train", "pldr_llm.data", "pldr_llm.serve", "pldr_llm.eval", "pldr_llm.deductive",
    "pldr_llm.gfile", "pldr_llm.tensor_pickle",
)  # fmt: skip

CHECK = """
import sys
from pldr_llm.cli import main
code = main({argv!r})
print(code, *sorted(m for m in {modules!r} if m in sys.modules))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", [0, 1], ids=["published", "own-format"])
def test_a_plain_generate_call_imports_nothing_it_does_not_use(
    folders: list[Path], kind: int
) -> None:
    argv = ["generate", "--model", str(folders[kind]), "--prompt", PROMPT, "-n", "2", "-q"]
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(argv=argv, modules=NOT_NEEDED)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    code, *imported = result.stdout.strip().splitlines()[-1].split()
    assert code == "0" and imported == []


def test_the_model_is_not_initialized_before_its_weights_are_read(saved: tuple) -> None:
    """Random initial values that the checkpoint overwrites are not drawn: loading leaves the
    random generator as it was, and gives the saved weights."""
    import torch

    from pldr_llm.bundle import load_bundle

    expected, folders = saved
    for folder in folders:
        state = torch.get_rng_state()
        model, _ = load_bundle(folder)
        assert torch.equal(torch.get_rng_state(), state)
        assert isinstance(model, PLDRModel)
        for key, value in expected.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_each_prompt_is_encoded_once(folders: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from pldr_llm.generation import SamplingParams
    from pldr_llm.generation.texts import GenerationSettings, TextGenerator
    from pldr_llm.tokenizer import PLDRTokenizer

    encoded: list[str] = []
    original = PLDRTokenizer.prompt_ids

    def spy(self: PLDRTokenizer, text: str) -> list[int]:
        encoded.append(text)
        return original(self, text)

    monkeypatch.setattr(PLDRTokenizer, "prompt_ids", spy)
    prompts = [PROMPT, "Hello", ""]
    settings = GenerationSettings(SamplingParams(top_k=1, max_new_tokens=2), batch_size=2)
    generator = TextGenerator.load(str(folders[1]), prompts, settings)
    results = list(generator.generate(prompts))
    assert sorted(encoded) == sorted(prompts)
    assert [r.prompt_ids for r in results] == [original(generator.tokenizer, p) for p in prompts]
