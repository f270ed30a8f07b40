"""``pldr-llm inspect --leak`` end to end (in process, through cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pldr_llm.bundle import load_bundle
from pldr_llm.cli import main
from pldr_llm.deductive import leak_audit
from support import PAPER_VOCAB_HP, make_bundle

HP = {**PAPER_VOCAB_HP, "max_seq_len": 24}
TEXT = (
    "The power law graph attention builds a metric tensor from every query of the sequence, "
    "so a teacher-forced loss may see tokens that generation never has."
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, paper_tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("leak") / "PLDRv51-Tiny-1"
    make_bundle(folder, paper_tokenizer_dir, HP)
    return folder


@pytest.mark.slow
def test_inspect_leak_json_matches_the_library(bundle: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "audit.json"
    rc = main(
        ["inspect", "--model", str(bundle), "--leak", "--text", str(text), "--prefix", "6"]
        + ["--block", "5", "--json", str(out)]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "causal - as trained" in captured.out
    assert "scoring the first 24" in captured.err  # the text is longer than max_seq_len
    data = json.loads(out.read_text())
    model, tokenizer = load_bundle(str(bundle))
    ids = list(tokenizer.encode(TEXT))[:24]
    audit = leak_audit(model, ids, prompt_len=6, block=5)
    assert data["num_tokens"] == 24 and data["prompt_len"] == 6
    assert len(data["loss_generation"]) == 24 - 6
    assert data["overall"] == pytest.approx(audit.overall, abs=1e-6)
    assert data["source"]["text"] == str(text)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--leak"], "--leak needs --model and --text"),
        (["--leak", "--text", "missing.txt"], "cannot read --text"),
        (["--text", "x.txt"], "--text goes with --leak"),
        (["--leak", "--text", "TEXTFILE", "--prefix", "0"], "prompt length"),
    ],
)
def test_inspect_leak_errors(bundle: Path, tmp_path: Path, capsys, extra, message) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    extra = [str(text) if x == "TEXTFILE" else x for x in extra]
    assert main(["inspect", "--model", str(bundle), *extra]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the notice that the text was cut
    assert last.startswith("pldr-llm: error: ") and message in last
