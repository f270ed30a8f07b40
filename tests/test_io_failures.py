"""I/O failures and bad inputs at the command line (issue 12): each is one line and exit 2, a
failed save loses nothing, model files are readable by others; also perplexity on a text file
and the README's Python block."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.cli import main
from pldr_llm.tokenizer import load_tokenizer
from support import PAPER_TOKENIZER_MODEL

REPO = Path(__file__).resolve().parents[1]
HP = {
    "num_layers": 1,
    "d_model": 32,
    "num_heads": 2,
    "dff": 48,
    "num_reslayerA": 1,
    "num_denseA": 1,
    "A_dff": 16,
    "input_vocab_size": 32000,
    "max_seq_len": 32,
}


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """``pldr-llm train`` attaches its log handler to the stderr of its first run; under pytest
    that is an earlier test's capture, closed since. Each test starts without one."""
    import logging

    logging.getLogger("pldr_llm").handlers.clear()
    yield
    logging.getLogger("pldr_llm").handlers.clear()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, paper_tokenizer_dir: Path) -> Path:
    """A model in the project's format (config.json, model.safetensors, tokenizer.model)."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    PLDRModel(PLDRConfig.from_hpdict(HP)).eval().save(folder)
    shutil.copy(paper_tokenizer_dir / PAPER_TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder


def _one_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("pldr-llm: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "pldr_llm", *args],
        env=env,
        capture_output=kwargs.pop("capture", True),
        timeout=300,
        **kwargs,
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as Python does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# ------------------------------------------------------------------ corrupt model files


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, 20, 4000])
def test_truncated_model_file_is_one_line_naming_it(
    model_dir: Path, tmp_path: Path, capsys, size: int
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes((model_dir / "model.safetensors").read_bytes()[:size])
    commands = [
        ["generate", "--model", str(broken), "-p", "hi", "--max-new-tokens", "2"],
        ["inspect", "--model", str(broken), "-p", "hi"],
        ["convert", "--model", str(broken), "--out", str(tmp_path / "out")],
        ["compare", str(broken), str(model_dir)],
    ]
    for command in commands:
        assert main(command) == 2, command
        _one_line(capsys, str(weights), "truncated or corrupt")


# ------------------------------------------------------------------ failed writes lose nothing


@pytest.mark.slow
def test_file_size_limit_during_convert_keeps_the_previous_model(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(["convert", "--model", str(model_dir), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = _cli(
        "convert",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--force",
        preexec_fn=_limit_file_size(1 << 20),  # config fits, the 8 MB weights do not
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode().strip().splitlines()
    assert err[-1] == (
        f"pldr-llm: error: {out / 'model.safetensors'}: the file is larger than the file-size "
        "limit (ulimit -f): raise it or write elsewhere"
    )
    assert b"Traceback" not in result.stderr
    # Nothing lost, no temporary left behind.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_file_size_limit_during_hf_export(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    result = _cli(
        "convert", "--model", str(model_dir), "--out", str(out), "--to", "hf",
        preexec_fn=_limit_file_size(1 << 20),
    )  # fmt: skip
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert result.stderr.decode().strip().splitlines()[-1] == (
        f"pldr-llm: error: writing {out}: the file is larger than the file-size limit "
        "(ulimit -f): raise it or write elsewhere"
    )


def test_model_files_are_readable_by_others(model_dir: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        PLDRModel.load(model_dir).save(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.slow
def test_full_disk_json_and_stdout(model_dir: Path, capsys) -> None:
    assert main(["inspect", "--model", str(model_dir), "-p", "hi", "--json", "/dev/full"]) == 2
    _one_line(capsys, "/dev/full", "the disk is full")
    with open("/dev/full", "wb") as full:
        result = _cli(
            "generate", "--model", str(model_dir), "-p", "hi", "--max-new-tokens", "2",
            stdout=full, stderr=subprocess.PIPE, capture=False,
        )  # fmt: skip
    assert result.returncode == 2
    err = [x for x in result.stderr.decode().splitlines() if "error" in x.lower()]
    assert err == [
        "pldr-llm: error: writing the output: the disk is full: free some space or write elsewhere"
    ]


def test_unwritable_save_g(model_dir: Path, capsys) -> None:
    target = "/proc/g.safetensors"  # /proc takes no new files, even for root
    assert main(["inspect", "--model", str(model_dir), "-p", "hi", "--save-g", target]) == 2
    _one_line(capsys, target)


def test_train_out_is_a_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.write_text("keep me")
    assert main(["train", "--preset", "tiny", "--out", str(out)]) == 2
    _one_line(capsys, str(out), "is a file, not a folder")
    assert out.read_text() == "keep me"


def test_failed_start_leaves_no_run_yaml(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    missing = tmp_path / "nope.model"
    args = ["train", "--preset", "tiny", "--out", str(run), "--max-steps", "1"]
    assert main([*args, "--tokenizer.path", str(missing)]) == 2
    _one_line(capsys, str(missing))
    assert not (run / "run.yaml").exists()  # so the corrected command is not refused as a resume


def test_learning_rate_may_change_on_resume() -> None:
    """The advice after a divergence (lower the learning rate, resume) can be followed."""
    from pldr_llm.train.runconfig import check_resumable as _diff_for_resume

    saved = {"train": {"learning_rate": 1e-3, "seed": 1}}
    _diff_for_resume(saved, {"train": {"learning_rate": 5e-4, "seed": 1}})
    with pytest.raises(Exception, match="train.seed"):
        _diff_for_resume(saved, {"train": {"learning_rate": 1e-3, "seed": 2}})


# ------------------------------------------------------------------ bad inputs


@pytest.mark.slow
def test_non_utf8_prompts_name_the_byte(model_dir: Path, capsys, monkeypatch) -> None:
    bad = os.fsdecode(b"caf\xe9")  # what sys.argv holds for these bytes (surrogateescape)
    tok = str(model_dir / "tokenizer.model")
    for command in (
        ["generate", "--model", str(model_dir), "-p", bad, "--max-new-tokens", "2"],
        ["inspect", "--model", str(model_dir), "-p", bad],
        ["tokenizer", "encode", "-t", tok, bad],
    ):
        assert main(command) == 2, command
        _one_line(capsys, "not valid UTF-8: byte 0xE9 at character 3")
    result = _cli(
        "generate", "--model", str(model_dir), "--prompt-file", "-", "--max-new-tokens", "2",
        input=b"caf\xe9\n",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines()[-1] == (
        "pldr-llm: error: text is not valid UTF-8: byte 0xE9 at character 3; give UTF-8 text "
        "(e.g. convert it with iconv -t UTF-8)"
    )


def test_small_bad_values(model_dir: Path, tmp_path: Path, capsys) -> None:
    tok = str(model_dir / "tokenizer.model")
    assert main(["tokenizer", "decode", "-t", tok, "5", "32000"]) == 2
    _one_line(capsys, "id 32000 is outside the tokenizer's vocabulary (0..31999)")
    assert main(["eval", "--model", str(model_dir), "--limit", "-1"]) == 2
    _one_line(capsys, "--limit must be positive", "-1")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5, "acc')  # torn by a kill
    assert main(["plot", str(run), "--smooth", "-3"]) == 2
    _one_line(capsys, "--smooth", "-3")
    assert main(["plot", str(run)]) == 2
    _one_line(capsys, "holds no complete training step", "cut short")
    assert main(["tokenizer", "train", "--input", "/dev/null", "--vocab-size", "300",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 2  # fmt: skip
    _one_line(capsys, "hold no text")


def test_version(capsys) -> None:
    from pldr_llm import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"pldr-llm {__version__}"


# ------------------------------------------------------------------ perplexity


def _reference_nll(model: PLDRModel, ids: list[int], context: int, stride: int) -> float:
    """The strided recipe written out plainly: one window at a time, already-scored targets
    masked with -100, as in training (inputs ids[b:b+n], targets ids[b+1:b+n+1])."""
    total, scored = 0.0, 0  # targets 1..scored are done
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, stride):
            labels = ids[begin + 1 : begin + context + 1]
            inputs = ids[begin : begin + len(labels)]
            masked = [-100 if begin + 1 + i <= scored else y for i, y in enumerate(labels)]
            logits = model(torch.tensor([inputs])).logits[0].double()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits, torch.tensor(masked), ignore_index=-100, reduction="sum"
                )
            )
            scored = begin + len(labels)
            if scored >= len(ids) - 1:
                break
    return total


def test_perplexity_matches_brute_force(model_dir: Path) -> None:
    from pldr_llm.eval.perplexity import perplexity, strided_windows

    model = PLDRModel.load(model_dir)
    tok = load_tokenizer(model_dir / "tokenizer.model")
    text = "The list of things to do. A quick brown fox jumps over the lazy dog, twice."
    ids = [tok.eos_id, *tok.encode(text, add_eos=False)]
    assert len(ids) > 12
    # Every target scored exactly once, whatever the stride.
    for stride in (1, 3, 8):
        targets = [t for _, a, b in strided_windows(len(ids), 8, stride) for t in range(a, b + 1)]
        assert targets == list(range(1, len(ids)))
    # Same float32 logits, summed in float64 both ways: agreement to ~1e-9 relative; 1e-6 leaves
    # room for a different batch shape changing the float32 matmul order.
    for stride, batch_size in ((1, 1), (1, 4), (3, 2), (8, 3)):
        got = perplexity(model, tok, text, context=8, stride=stride, batch_size=batch_size)
        assert got.tokens == len(ids) - 1 and got.bytes == len(text.encode())
        assert got.nll == pytest.approx(_reference_nll(model, ids, 8, stride), rel=1e-6)
        assert got.bits_per_byte == pytest.approx(got.nll / math.log(2) / got.bytes)
    # One window: the training loss of the whole text (mean cross-entropy) times its length.
    whole = perplexity(model, tok, text, context=32, stride=32)
    assert whole.windows == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert whole.nll / whole.tokens == pytest.approx(float(loss), rel=1e-5)
    assert whole.perplexity == pytest.approx(math.exp(whole.nll / whole.tokens))


def test_eval_text_cli(model_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The list of things to do.\nA second line.\n", encoding="utf-8")
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--context", "8",
                 "--stride", "4", "--batch-size", "2"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert record["context"] == 8 and record["stride"] == 4
    assert record["perplexity"] == pytest.approx(math.exp(record["nll"] / record["tokens"]))
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--stride", "99"]) == 2
    _one_line(capsys, "--stride must be in 1..32")
    text.write_bytes(b"caf\xe9")
    assert main(["eval", "--model", str(model_dir), "--text", str(text)]) == 2
    _one_line(capsys, str(text), "not UTF-8")


# ------------------------------------------------------------------ the README


@pytest.mark.slow
def test_readme_python_block_runs(tmp_path: Path, monkeypatch) -> None:
    """The README's Python block runs as pasted (from a folder holding the files it names)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(REPO / "tests")  # the files it names, as from the repo root
    namespace: dict = {}
    try:
        exec(compile(block.group(1), "README.md", "exec"), namespace)
        assert isinstance(namespace["text"], str)
        work = namespace["work"]
        assert (work / "my-model" / "model.safetensors").stat().st_mode & 0o777 == 0o644 & ~(
            _umask()
        )
        # nothing written where it runs (the repository root, when pasted as it says)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tests"]
    finally:
        if "work" in namespace:
            shutil.rmtree(namespace["work"], ignore_errors=True)


# ------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of the tiny preset, a checkpoint after each."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    code = main(
        ["train", "--preset", "tiny", "--out", str(out), "--max-steps", "2", "--save_every", "1",
         "--log_every", "1", "--val_every", "1000", "--progress", "false"]
    )  # fmt: skip
    assert code == 0
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        # metrics, TensorBoard events and run.yaml (its max_steps) legitimately grow on resume;
        # .lock holds the PID of the last trainer
        if p.is_file()
        and "tensorboard" not in p.parts
        and p.name not in ("metrics.jsonl", "run.yaml", ".lock")
    }


@pytest.mark.slow
def test_file_size_limit_during_training_keeps_the_checkpoints(
    short_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = _snapshot(run)
    result = _cli(
        "train", "--out", str(run), "--max-steps", "3", "--progress", "false",
        preexec_fn=_limit_file_size(2 << 20),  # the step-3 checkpoint (~12 MB) cannot be written
    )  # fmt: skip
    assert result.returncode == 2, result.stderr.decode()[-2000:]
    assert b"Traceback" not in result.stderr
    errors = [x for x in result.stderr.decode().splitlines() if x.startswith("pldr-llm: error")]
    assert errors == [
        f"pldr-llm: error: could not write checkpoint {run / 'checkpoints' / 'step_00000003'} "
        "(the write failed); the disk may be full or a file-size limit (ulimit -f) reached: free "
        "space and run the same command to resume from the last complete checkpoint"
    ]
    assert _snapshot(run) == before  # the model, the exports and both checkpoints untouched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000001",
        "step_00000002",
    ]


@pytest.mark.slow
def test_truncated_distcp_on_resume(short_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    damaged = run / "checkpoints" / "step_00000002"
    shard = next((damaged / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["train", "--out", str(run), "--max-steps", "3", "--progress", "false"]) == 2
    _one_line(capsys, f"checkpoint {damaged} cannot be read", "EOFError", "remove that folder")
    shutil.rmtree(damaged)  # the advice, followed: resumes from step 1
    assert main(["train", "--out", str(run), "--max-steps", "3", "--progress", "false"]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("event") is None][-2:] == [2, 3]


def test_train_help_describes_every_key(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    sections = re.findall(r"^(\w+) keys:$", text, re.M)
    assert sections == ["model", "data", "tokenizer", "train"]
    # Each key's entry: the option, then a description (wrapped onto following lines).
    entries = re.findall(r"^  (--(\w+)\.(\w+))(.*?)(?=^  --|^\S|\Z)", text, re.M | re.S)
    assert len(entries) > 60
    for option, section, key, rest in entries:
        words = " ".join(rest.split())
        assert len(words) > 10, option  # a description, not just a metavar
        if (section, key) not in {("model", "dk"), ("model", "predefined_G")} and key not in (
            "context_length",
        ):
            assert "(default: " in words, option
    assert "peak learning rate of the schedule (AdamW) (default: 0.001)" in " ".join(text.split())


def test_test_data_is_self_contained() -> None:
    """The suite reads only tests/data: small files, no checkpoints or pickles (project policy)."""
    data = REPO / "tests" / "data"
    files = [p for p in data.rglob("*") if p.is_file()]
    assert (data / "README.md") in files
    for path in files:
        assert path.stat().st_size < 2 << 20, path
        assert path.suffix not in (".pth", ".pkl", ".pt", ".bin"), path
        assert path.name in (data / "README.md").read_text() or path.name == "README.md", path


@pytest.mark.slow
def test_divergence_advice_can_be_followed(short_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    common = ["train", "--out", str(run), "--max-steps", "4", "--progress", "false"]
    # A learning rate of 1e30 blows the weights up: the next losses are NaN.
    assert main([*common, "--train.learning_rate", "1e30", "--max_nonfinite_steps", "0"]) == 2
    _one_line(capsys, "non-finite loss", "run the same command with a lower --train.learning_rate")
    # The advice, followed: the same command with a lower rate resumes (it is not refused).
    assert main([*common, "--train.learning_rate", "1e-4"]) == 0
    capsys.readouterr()
