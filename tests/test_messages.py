"""Messages that say what is wrong (issue #23, point 9): each names the real cause and the real
flag, as one ``pldr-llm: error:`` line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pldr_llm import PLDRConfig
from pldr_llm.cli import main
from pldr_llm.core.errors import PLDRError
from support import TINY_HPDICT, error_line


def test_config_without_num_heads_names_the_missing_key(model_dir: Path, capsys) -> None:
    """Not a default of 14 heads that then 'does not divide d_model'."""
    config = model_dir / "config.json"
    data = json.loads(config.read_text())
    del data["num_heads"]
    config.write_text(json.dumps(data))
    assert main(["generate", "--model", str(model_dir), "-p", "hi", "--max-new-tokens", "1"]) == 2
    line = error_line(capsys)
    assert f"{config}: the config lacks 'num_heads'" in line and "divisible" not in line


def test_transformers_config_without_heads_names_the_missing_key() -> None:
    data = PLDRConfig.from_hpdict(TINY_HPDICT).to_hf_dict()
    del data["num_attention_heads"]
    with pytest.raises(PLDRError, match="lacks 'num_attention_heads'"):
        PLDRConfig.from_hf_dict(data)


def test_directory_as_prompt_file_says_it_is_a_directory(model_dir: Path, capsys) -> None:
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(model_dir)]) == 2
    line = error_line(capsys)
    assert "is a directory" in line and "not found" not in line


def test_directory_as_eval_text_says_it_is_a_directory(model_dir: Path, capsys) -> None:
    assert main(["eval", "--model", str(model_dir), "--text", str(model_dir)]) == 2
    line = error_line(capsys)
    assert "is a directory" in line and "not found" not in line


def test_eval_non_utf8_text_names_the_byte(model_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 au lait".encode("latin-1"))  # é is the lone byte 0xe9
    assert main(["eval", "--model", str(model_dir), "--text", str(text)]) == 2
    assert "byte 0xe9 at offset 3" in error_line(capsys)


def test_sentencepiece_failure_names_the_real_flag(tmp_path: Path) -> None:
    """SentencePiece's own text says '--character_coverage'; the project's flag is
    '--character-coverage'. 2,000 distinct characters cannot fit 300 pieces at 100%."""
    from pldr_llm.tokenizer import train_tokenizer

    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    corpus = tmp_path / "cjk.txt"
    corpus.write_text(
        "\n".join("".join(rng.choice(chars) for _ in range(40)) for _ in range(300)),
        encoding="utf-8",
    )
    with pytest.raises(PLDRError) as err:
        train_tokenizer(
            [corpus], 300, tmp_path / "tok", character_coverage=1.0, num_threads=1, progress=False
        )
    text = str(err.value)
    assert "--character-coverage" in text and "--character_coverage" not in text
    assert "vocabulary size 300" in text


def test_resuming_is_said_only_when_a_checkpoint_exists(tmp_path: Path) -> None:
    from pldr_llm.train.run import _start_words

    class Env:
        is_main = True

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text("train: {}\n")
    assert _start_words(run, True, Env()).startswith("starting run afresh")
    assert _start_words(tmp_path / "new", False, Env()) == "starting run"
    checkpoint = run / "checkpoints" / "step_00000040"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("{}\n")
    assert _start_words(run, True, Env()) == "resuming run from step 40"
