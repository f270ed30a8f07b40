"""``pldr-llm generate`` end to end: a bundle built exactly like the published ones (original
``.pth`` checkpoint, ``*_hyperparameters.py``, the paper tokenizer as ``.tar.gz``), run through a
subprocess, must print what the model core's ids decode to. Bad inputs: one line, exit code 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from pldr_llm import PLDRModel, generate, generate_details
from pldr_llm.tokenizer import PLDRTokenizer, load_tokenizer
from support import PAPER_TOKENIZER_MODEL as MODEL_NAME
from support import PAPER_VOCAB_HP, copy_folder, make_bundle, run_cli

HP = {**PAPER_VOCAB_HP, "max_seq_len": 96}
PROMPT = "Write a letter requesting that people use language models responsibly."
NEW = 12


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, paper_tokenizer_dir: Path
) -> tuple[Path, PLDRModel, PLDRTokenizer]:
    folder = tmp_path_factory.mktemp("published") / "PLDRv51-Tiny-1"
    model = make_bundle(folder, paper_tokenizer_dir, HP)
    return folder, model, load_tokenizer(paper_tokenizer_dir / MODEL_NAME)


def _generate_cli(
    folder: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = run_cli("generate", "--model", str(folder), *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result


def _greedy_ids(model: PLDRModel, tok: PLDRTokenizer, steps: int, **options) -> list[int]:
    """The library's greedy ids (prompt included) of ``PROMPT``."""
    prompt = torch.tensor(tok.prompt_ids(PROMPT))
    return generate(model, prompt, max_new_tokens=steps, top_k=1, **options).tolist()


def _greedy_cli(folder: Path, steps: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``pldr-llm generate`` of ``PROMPT``, greedy (``--top-k 1``), then ``args``."""
    return _generate_cli(folder, "--prompt", PROMPT, "--top-k", "1", "-n", str(steps), *args)


def _greedy_by_hand(model: PLDRModel, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with full forward passes only: no caches, no generate()."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == 3:
                break
    return seq


MODES = {
    "kv+g": [],
    "kv": ["--no-g-cache"],
    "g": ["--no-kv-cache"],
    "none": ["--no-kv-cache", "--no-g-cache"],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_greedy_text_equals_core_ids_in_every_cache_mode(
    published: tuple[Path, PLDRModel, PLDRTokenizer], mode: str
) -> None:
    folder, model, tok = published
    flags = MODES[mode]
    prompt_ids = tok.prompt_ids(PROMPT)
    assert prompt_ids == tok.encode(PROMPT)[:-1]  # the original drops the end-of-text id
    ids = _greedy_ids(
        model,
        tok,
        NEW,
        enable_kvcache="--no-kv-cache" not in flags,
        enable_Gcache="--no-g-cache" not in flags,
    )
    assert ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids)
    if mode == "none":  # the cache-free mode is plain greedy decoding
        assert ids == _greedy_by_hand(model, prompt_ids, NEW)
    expected = tok.decode(ids)
    assert expected.startswith(PROMPT) and len(expected) > len(PROMPT)

    result = _generate_cli(
        folder, "--prompt", PROMPT, "--top-k", "1", "--max-new-tokens", str(NEW), *flags
    )
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr  # logs go to stderr


@pytest.mark.slow
def test_empty_prompt_starts_from_end_of_text(
    published: tuple[Path, PLDRModel, PLDRTokenizer],
) -> None:
    folder, model, tok = published
    ids = generate(model, torch.tensor([3]), max_new_tokens=6, top_k=1).tolist()
    assert ids[0] == 3 and len(ids) > 1
    result = _generate_cli(folder, "--prompt", "", "--top-k", "1", "-n", "6", "--jsonl", "-q")
    record = json.loads(result.stdout)
    assert record["prompt_ids"] == [3] and record["prompt_ids"] + record["new_ids"] == ids
    assert record["text"] == tok.decode(ids)
    assert result.stderr == ""  # --quiet


@pytest.mark.slow
def test_prompt_file_is_batched_and_each_row_equals_its_lone_run(
    published: tuple[Path, PLDRModel, PLDRTokenizer], tmp_path: Path
) -> None:
    folder, model, tok = published
    prompts = ["Hello", "", PROMPT, "The quick brown fox jumps over the lazy dog."]
    expected = []
    for text in prompts:
        ids = generate(
            model, torch.tensor(tok.prompt_ids(text)), max_new_tokens=8, top_k=1
        ).tolist()
        expected.append(tok.decode(ids))
    # the empty prompt goes through --prompt; the file holds the others (and a blank line)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{prompts[2]}\n\n{prompts[3]}\n")
    result = _generate_cli(
        folder,
        *("--prompt", prompts[0], "--prompt", prompts[1], "--prompt-file", str(prompt_file)),
        *("--top-k", "1", "-n", "8", "--batch-size", "4"),
    )
    assert result.stdout.splitlines() == expected
    assert "for 4 prompt(s)" in result.stderr
    # stdin works as a prompt file too
    piped = _generate_cli(
        folder, "--prompt-file", "-", "--top-k", "1", "-n", "8", stdin=prompt_file.read_text()
    )
    assert piped.stdout.splitlines() == expected[2:]


@pytest.mark.slow
def test_stream_prints_the_same_text(published: tuple[Path, PLDRModel, PLDRTokenizer]) -> None:
    folder, model, tok = published
    ids = _greedy_ids(model, tok, NEW)
    result = _greedy_cli(folder, NEW, "--stream")
    assert result.stdout == tok.decode(ids) + "\n"


@pytest.mark.slow
def test_streamer_writes_as_tokens_come(published: tuple[Path, PLDRModel, PLDRTokenizer]) -> None:
    from pldr_llm.generation.texts import TextStreamer

    _, model, tok = published

    class Recorder(io.StringIO):
        writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return super().write(s)

    out = Recorder()
    prompt = tok.prompt_ids(PROMPT)
    streamer = TextStreamer(tok, prompt, out=out)
    assert out.getvalue() == PROMPT  # the prompt shows at once
    ids = generate(
        model, torch.tensor(prompt), max_new_tokens=NEW, top_k=1, streamer=streamer
    ).tolist()
    assert len(out.writes) > NEW // 2  # piece by piece, not once at the end
    streamer.final()
    assert out.getvalue() == tok.decode(ids) + "\n"


@pytest.mark.slow
def test_stop_strings(published: tuple[Path, PLDRModel, PLDRTokenizer]) -> None:
    folder, model, tok = published
    full = tok.decode(_greedy_ids(model, tok, NEW))
    words = full[len(PROMPT) :].split()
    assert len(words) >= 3
    stop = words[2]
    cut = full.index(stop, len(PROMPT))
    for extra in ([], ["--stream"]):
        result = _greedy_cli(folder, NEW, "--stop", "@@never@@", stop, *extra)
        assert result.stdout == full[:cut] + "\n"
    assert "new tokens" in result.stderr


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(published: tuple[Path, PLDRModel, PLDRTokenizer]) -> None:
    folder, model, tok = published
    sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95}
    ids = generate(
        model,
        torch.tensor(tok.prompt_ids(PROMPT)),
        max_new_tokens=NEW,
        seed=1234,
        **sampling,
    ).tolist()
    args = (
        "--prompt",
        PROMPT,
        "-n",
        str(NEW),
        "--seed",
        "1234",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
    )
    first = _generate_cli(folder, *args)
    assert first.stdout == tok.decode(ids) + "\n"
    assert _generate_cli(folder, *args).stdout == first.stdout


@pytest.mark.slow
def test_g_init_file(published: tuple[Path, PLDRModel, PLDRTokenizer], tmp_path: Path) -> None:
    from pldr_llm.gfile import save_g_file

    folder, model, tok = published
    with torch.no_grad():
        deductive = model(
            torch.tensor([tok.prompt_ids("A different text.")]), output_deductive=True
        ).deductive
    entries = [(d.A_LM, d.G_LM) for d in deductive]
    g_file = save_g_file(tmp_path / "g.safetensors", entries)
    ids = _greedy_ids(model, tok, 8, G_init=entries, enable_Gcache=False)
    plain = _greedy_ids(model, tok, 8, enable_Gcache=False)
    assert ids != plain  # the initial G-cache matters
    result = _greedy_cli(folder, 8, "--no-g-cache", "--g-init", str(g_file))
    assert result.stdout == tok.decode(ids) + "\n"


@pytest.mark.slow
def test_bfloat16_runs(published: tuple[Path, PLDRModel, PLDRTokenizer]) -> None:
    result = _greedy_cli(published[0], 4, "--dtype", "bfloat16")
    assert result.stdout.startswith(PROMPT) and "bfloat16" in result.stderr


# ---------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_exit_code_2(
    published: tuple[Path, PLDRModel, PLDRTokenizer],
    tmp_path: Path,
    paper_tokenizer_dir: Path,
    paper_g_dir: Path,
) -> None:
    folder = published[0]
    two = copy_folder(folder, tmp_path / "two")
    (two / "Copy-model-checkpoint.pth").write_bytes(
        (folder / "PLDRv51-Tiny-1-model-checkpoint.pth").read_bytes()
    )
    tampered = copy_folder(folder, tmp_path / "tampered", skip=(".tar.gz",))
    with tarfile.open(tampered / "tokenizer.tar.gz", "w:gz") as tar:
        tar.add(paper_tokenizer_dir / MODEL_NAME, arcname="../../../escaped.model")
    no_tokenizer = copy_folder(folder, tmp_path / "no_tokenizer", skip=(".tar.gz",))
    small_vocab = tmp_path / "small_vocab"
    make_bundle(small_vocab, paper_tokenizer_dir, {**HP, "input_vocab_size": 500})
    paper_g = paper_g_dir / "Gcachelst_init_mismatched_identity_NAB1_ablation.pkl"

    cases = [
        (["--model", str(tmp_path / "missing")], "model folder not found"),
        (["--model", str(no_tokenizer)], "no tokenizer in"),
        (
            ["--model", str(folder), "--prompt-file", str(tmp_path / "none.txt")],
            "prompt file not found",
        ),
        (["--model", str(two)], "holds 2 checkpoints"),
        (["--model", str(tampered)], "escapes the target folder"),
        (["--model", str(small_vocab)], "32000 pieces but the model"),
        (["--model", str(folder), "--device", "tpu"], "unknown device 'tpu'"),
        (["--model", str(folder), "--temperature", "-1"], "temperature must be a finite number"),
        (["--model", str(folder), "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--model", str(folder), "-n", "500"], "exceeds max_seq_len=96"),
        (["--model", str(folder), "--logit-bias", "5"], "--logit-bias takes ID=BIAS"),
        (["--model", str(folder), "--presence-penalty", "3"], "presence_penalty must be in"),
        (["--model", str(folder), "--logprobs", "2"], "--logprobs needs --jsonl"),
    ]
    if paper_g.is_file():
        cases.append(
            (["--model", str(folder), "--g-init", str(paper_g)], "has 5 layers, the model has 2")
        )
    # Independent processes: start them all, then check each (two CPUs halve the wait).
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    running = []
    for args, message in cases:
        if "--prompt-file" not in args:
            args = [*args, "--prompt", "hello"]
        command = [sys.executable, "-m", "pldr_llm", "generate", *args]
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        running.append((args, message, proc))
    for args, message, proc in running:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, stderr)
        assert stdout == "", args
        assert "Traceback" not in stderr, args
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pldr-llm: error:"), (args, stderr)
        assert message in lines[0], (args, lines[0])
    assert not (tmp_path / "escaped.model").exists() and not Path("/escaped.model").exists()


@pytest.mark.slow
def test_temperature_zero_is_greedy_and_timing_is_json(
    published: tuple[Path, PLDRModel, PLDRTokenizer],
) -> None:
    folder, model, tok = published
    ids = _greedy_ids(model, tok, NEW)
    result = _generate_cli(
        folder, "--prompt", PROMPT, "--temperature", "0", "-n", str(NEW), "--timing", "-q"
    )
    assert result.stdout == tok.decode(ids) + "\n"
    timing = json.loads(result.stderr.strip().splitlines()[-1])
    assert timing["new_tokens"] == len(ids) - len(tok.prompt_ids(PROMPT))
    assert timing["capture_seconds"] == 0.0  # no CUDA graph on the CPU
    assert timing["tokens_per_s"] > 0 and timing["device"] == "cpu"


@pytest.mark.slow
def test_processing_flags_and_logprobs_equal_the_library(
    published: tuple[Path, PLDRModel, PLDRTokenizer],
) -> None:
    folder, model, tok = published
    options = {
        "repetition_penalty": 1.5,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {260: 4.0, 300: -100.0},
        "min_new_tokens": 5,
        "stop_token_ids": (7,),
    }
    ids = tok.prompt_ids(PROMPT)
    want = generate_details(model, [ids], NEW, top_k=1, logprobs=2, **options)
    result = _greedy_cli(
        folder, NEW, "--jsonl", "--logprobs", "2",
        "--repetition-penalty", "1.5", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
        "--logit-bias", "260=4", "--logit-bias", "300=-100", "--min-new-tokens", "5",
        "--stop-id", "7", "-q",
    )  # fmt: skip
    record = json.loads(result.stdout)
    assert record["new_ids"] == want.new_ids[0]
    assert record["new_ids"] != generate_details(model, [ids], NEW, top_k=1).new_ids[0]
    assert record["logprobs"] == pytest.approx(want.logprobs[0], abs=1e-6)
    assert [[t for t, _ in top] for top in record["top_logprobs"]] == [
        [t for t, _ in top] for top in want.top_logprobs[0]
    ]


@pytest.mark.slow
def test_the_library_call_behind_the_command(
    published: tuple[Path, PLDRModel, PLDRTokenizer],
) -> None:
    """What `pldr-llm generate` runs, called as a notebook would: same texts as the command."""
    from pldr_llm import PLDRError
    from pldr_llm.generation import SamplingParams
    from pldr_llm.generation.texts import GenerationSettings, TextGenerator

    folder, model, tok = published
    prompts = [PROMPT, "Hello there"]
    params = SamplingParams(top_k=1, max_new_tokens=NEW, repetition_penalty=1.3, logprobs=1)
    settings = GenerationSettings(params, batch_size=1, logprobs=1)
    generator = TextGenerator.load(str(folder), prompts, settings)
    results = list(generator.generate(prompts))
    for prompt, result in zip(prompts, results):
        ids = tok.prompt_ids(prompt)
        want = generate_details(model, [ids], NEW, top_k=1, repetition_penalty=1.3, logprobs=1)
        assert result.new_ids == want.new_ids[0] and result.prompt_ids == ids
        assert result.text == tok.decode(ids + want.new_ids[0])
        assert result.logprobs == pytest.approx(want.logprobs[0], abs=1e-6)
        assert len(result.top_logprobs) == len(result.new_ids)
    timings = generator.timings
    assert timings.prompts == 2 and timings.new_tokens == sum(len(r.new_ids) for r in results)
    assert timings.as_dict()["device"] == "cpu" and not generator.warmed_up
    with pytest.raises(PLDRError, match="batch-size must be positive"):
        TextGenerator.load(str(folder), prompts, GenerationSettings(params, batch_size=0))
    with pytest.raises(PLDRError, match="exceeds max_seq_len"):
        TextGenerator.load(str(folder), ["word " * 200], GenerationSettings(params))
