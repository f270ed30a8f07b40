"""Tokenizer: the paper tokenizer's ids, safe archive extraction, and training with the original's
conventions (library and ``pldr-llm tokenizer train``)."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from pldr_llm.core.errors import PLDRError
from pldr_llm.tokenizer import (
    PLDRTokenizer,
    extract_tokenizer_archive,
    iter_text,
    load_tokenizer,
    train_tokenizer,
)
from support import PAPER_TOKENIZER_MODEL as MODEL_NAME
from support import PAPER_TOKENIZER_VOCAB as VOCAB_NAME
from support import run_cli as _cli


@pytest.fixture(scope="module")
def cases(paper_tokenizer_dir: Path) -> dict:
    return json.loads((paper_tokenizer_dir / "tokenizer_cases.json").read_text())


def _pack(path: Path, members: dict[str, Path]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for arcname, source in members.items():
            tar.add(source, arcname=arcname)
    return path


def _check_cases(tok: PLDRTokenizer, cases: dict) -> None:
    assert cases["encode"] == {"add_bos": False, "add_eos": True}
    for case in cases["cases"]:
        ids = tok.encode(case["text"])
        assert ids == case["ids"], case["text"]
        assert tok.decode(ids[:-1]) == case["decoded_without_eos"]
        # decode drops the control id 3 itself, as the original's decode does
        assert tok.decode(ids) == case["decoded_without_eos"]


# ---------------------------------------------------------------------- the paper tokenizer


def test_paper_cases_from_model_file(paper_tokenizer_dir: Path, cases: dict) -> None:
    tok = load_tokenizer(paper_tokenizer_dir / cases["model_file"])
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (32000, 0, 1, 2, 3)
    assert len(tok) == 32000
    _check_cases(tok, cases)


@pytest.mark.slow
def test_paper_cases_from_folder_and_archive(
    paper_tokenizer_dir: Path, cases: dict, tmp_path: Path
) -> None:
    _check_cases(load_tokenizer(paper_tokenizer_dir), cases)
    archive = _pack(
        tmp_path / "tokenizer.tar.gz",
        {
            f"pldr-tokenizer/{MODEL_NAME}": paper_tokenizer_dir / MODEL_NAME,
            f"pldr-tokenizer/{VOCAB_NAME}": paper_tokenizer_dir / VOCAB_NAME,
        },
    )
    tok = load_tokenizer(archive)
    _check_cases(tok, cases)
    assert tok.model_path.name == MODEL_NAME and tok.model_path.is_file()
    assert tok.vocab_path is not None and tok.vocab_path.name == VOCAB_NAME
    # a folder holding only the archive resolves to it
    _check_cases(load_tokenizer(tmp_path), cases)


def test_encode_without_eos_and_prompt_ids(paper_tokenizer_dir: Path, cases: dict) -> None:
    tok = load_tokenizer(paper_tokenizer_dir / MODEL_NAME)
    first = cases["cases"][0]
    assert tok.encode(first["text"], add_eos=False) == first["ids"][:-1]
    # generate_text: encode with end-of-text, then drop it -- except for an empty prompt
    assert tok.prompt_ids(first["text"]) == first["ids"][:-1]
    assert tok.prompt_ids("") == [3]
    assert tok.encode("") == [3]


def test_decode_drops_control_ids_and_tolerates_foreign_ids(paper_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(paper_tokenizer_dir / MODEL_NAME)
    ids = tok.encode("The quick brown fox", add_eos=False)
    assert tok.decode([0, 2] + ids + [3, 0, 0]) == "The quick brown fox"
    assert all(tok.is_control(i) for i in (0, 2, 3)) and not tok.is_control(ids[0])
    # an id beyond the tokenizer (a larger model embedding) decodes as the unknown piece
    assert tok.decode(ids + [32005]) == tok.decode(ids + [tok.unk_id])
    import torch

    assert tok.decode(torch.tensor(ids)) == "The quick brown fox"


def test_save_copies_model_and_vocab(paper_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(paper_tokenizer_dir)
    written = tok.save(tmp_path / "out")
    assert written == tmp_path / "out" / "tokenizer.model"
    assert written.read_bytes() == (paper_tokenizer_dir / MODEL_NAME).read_bytes()
    assert (tmp_path / "out" / "tokenizer.vocab").read_bytes() == (
        paper_tokenizer_dir / VOCAB_NAME
    ).read_bytes()
    assert load_tokenizer(tmp_path / "out").encode("abc") == tok.encode("abc")


def test_load_errors(tmp_path: Path, paper_tokenizer_dir: Path) -> None:
    with pytest.raises(PLDRError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PLDRError, match="no tokenizer in"):
        load_tokenizer(tmp_path / "empty")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(PLDRError, match="not a SentencePiece model"):
        load_tokenizer(junk)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.model", "b.model"):
        (two / name).write_bytes((paper_tokenizer_dir / MODEL_NAME).read_bytes())
    with pytest.raises(PLDRError, match="several tokenizer models"):
        load_tokenizer(two)
    not_tar = tmp_path / "fake.tar.gz"
    not_tar.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(PLDRError, match="not a readable tar archive"):
        load_tokenizer(not_tar)


# ---------------------------------------------------------------------- archive safety


def _raw_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """Write a tar with hand-made headers (tarfile.add would refuse or normalize them)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.slow
@pytest.mark.parametrize(
    ("member", "data", "message"),
    [
        (_file("../escaped.model"), b"x", "escapes the target folder"),
        (_file("tok/../../escaped.model"), b"x", "escapes the target folder"),
        (_file("/tmp/pldr_llm_absolute.model"), b"x", "absolute path"),
        (_special("tok/link.model", tarfile.SYMTYPE, "/etc/passwd"), None, "is a link"),
        (_special("tok/hard.model", tarfile.LNKTYPE, "/etc/passwd"), None, "is a link"),
        (_special("tok/dev", tarfile.CHRTYPE), None, "special file"),
        (_special("tok/fifo", tarfile.FIFOTYPE), None, "special file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "fifo"],
)
def test_tampered_archive_is_refused_before_anything_is_written(
    tmp_path: Path,
    paper_tokenizer_dir: Path,
    member: tarfile.TarInfo,
    data: bytes | None,
    message: str,
) -> None:
    good = (paper_tokenizer_dir / MODEL_NAME).read_bytes()
    archive = _raw_tar(tmp_path / "evil.tar.gz", [(_file("tok/good.model"), good), (member, data)])
    target = tmp_path / "nest" / "target"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(PLDRError, match=message):
        extract_tokenizer_archive(archive, target)
    with pytest.raises(PLDRError, match=message):
        load_tokenizer(archive)
    # nothing was extracted: not even the good member, and nothing beside the target
    assert not (target / "tok").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not Path("/tmp/pldr_llm_absolute.model").exists()


def test_archive_needs_exactly_one_model(tmp_path: Path, paper_tokenizer_dir: Path) -> None:
    vocab_only = _pack(tmp_path / "v.tar.gz", {"t/x.vocab": paper_tokenizer_dir / VOCAB_NAME})
    with pytest.raises(PLDRError, match="holds no '.model' file"):
        load_tokenizer(vocab_only)
    two = _pack(
        tmp_path / "two.tar.gz",
        {
            "a.model": paper_tokenizer_dir / MODEL_NAME,
            "b/b.model": paper_tokenizer_dir / MODEL_NAME,
        },
    )
    with pytest.raises(PLDRError, match="several '.model' files"):
        load_tokenizer(two)


def test_extract_writes_only_file_contents(tmp_path: Path, paper_tokenizer_dir: Path) -> None:
    info = _file("tok/x.model")
    info.mode = 0o4777  # setuid + world-writable in the archive: not restored
    data = (paper_tokenizer_dir / MODEL_NAME).read_bytes()
    archive = _raw_tar(tmp_path / "t.tar.gz", [(info, data)])
    model = extract_tokenizer_archive(archive, tmp_path / "out")
    assert model == (tmp_path / "out" / "tok" / "x.model").resolve()
    assert model.read_bytes() == data
    assert not os.stat(model).st_mode & 0o4000


# ---------------------------------------------------------------------- training


WORDS = (
    "power law graph attention learns a metric tensor from the queries and the energy curvature "
    "tensor follows from it while the decoder predicts the next token of the text"
).split()


def _corpus(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        + f" {rng.randint(0, 99999)}."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # parquet inputs need pyarrow (the "data" extra); CI should install it so this never skips
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    root = tmp_path_factory.mktemp("corpus")
    lines = _corpus(1500, 0)
    files = {
        "txt": root / "a.txt",
        "gz": root / "b.txt.gz",
        "jsonl": root / "c.jsonl",
        "parquet": root / "d.parquet",
    }
    files["txt"].write_text("\n".join(lines[:500]) + "\n\n")
    with gzip.open(files["gz"], "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[500:800]))
    with open(files["jsonl"], "w", encoding="utf-8") as f:
        for line in lines[800:1100]:
            f.write(json.dumps({"id": 1, "content": line}) + "\n")
    pq.write_table(pa.table({"content": lines[1100:], "n": list(range(400))}), files["parquet"])
    return files


def test_iter_text_streams_every_format(corpus_files: dict[str, Path]) -> None:
    lines = _corpus(1500, 0)
    got = list(iter_text([corpus_files["txt"], corpus_files["gz"]], progress=False))
    assert got == lines[:800]  # the trailing blank lines are skipped
    got = list(
        iter_text(
            [corpus_files["jsonl"], corpus_files["parquet"]], column="content", progress=False
        )
    )
    assert got == lines[800:]
    stream = iter_text([corpus_files["txt"]], progress=False)
    assert next(stream) == lines[0]  # a generator: one line without reading the rest


def test_iter_text_reads_bz2_and_xz_and_keeps_each_line_as_written(tmp_path: Path) -> None:
    """The tokenizer trainer reads through the training data's reader (data.sources): every
    compression it knows, and text lines with their indentation (code keeps its spaces)."""
    import bz2
    import lzma

    text = "  indented line\n\n   \nplain line  \n"
    (tmp_path / "a.txt.bz2").write_bytes(bz2.compress(text.encode()))
    (tmp_path / "b.txt.xz").write_bytes(lzma.compress(text.encode()))
    (tmp_path / "c.md").write_text(text)
    records = [{"text": "  first\nsecond"}]
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(json.dumps(records).encode()))
    files = [tmp_path / n for n in ("a.txt.bz2", "b.txt.xz", "c.md", "d.jsonl.xz")]
    expected = ["  indented line", "plain line  "] * 3 + ["  first", "second"]
    assert list(iter_text(files, progress=False)) == expected


def test_iter_text_splits_multiline_records(tmp_path: Path) -> None:
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps({"text": "first line\n\nsecond line"}) + "\n\n")
    assert list(iter_text([path], progress=False)) == ["first line", "second line"]


def test_iter_text_errors(corpus_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        PLDRError, match=r"c\.jsonl:1: no column 'text' \(columns: id, content\); use --column"
    ):
        list(iter_text([corpus_files["jsonl"]], progress=False))
    with pytest.raises(PLDRError, match="no column 'text'"):
        list(iter_text([corpus_files["parquet"]], progress=False))
    with pytest.raises(PLDRError, match="input file not found"):
        list(iter_text([tmp_path / "missing.txt"], progress=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(PLDRError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_text([bad], progress=False))


def test_train_tokenizer_original_conventions(
    corpus_files: dict[str, Path], tmp_path: Path
) -> None:
    tok = train_tokenizer(
        [corpus_files["txt"], corpus_files["gz"], corpus_files["jsonl"], corpus_files["parquet"]],
        vocab_size=320,
        out_prefix=tmp_path / "tok" / "pldr.v1",
        column="content",
        seed=1,
        progress=False,
    )
    assert tok.model_path == (tmp_path / "tok" / "pldr.v1.model").resolve()
    assert (tmp_path / "tok" / "pldr.v1.vocab").is_file()
    pieces = [tok.id_to_piece(i) for i in range(6)]
    assert pieces == ["[PAD]", "[UNK]", "[START]", "[END]", "[SEP]", "[CLS]"]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 262 < tok.vocab_size <= 320
    # end-of-text appended, no start id
    ids = tok.encode("the decoder predicts")
    assert ids[-1] == 3 and 2 not in ids
    # split digits: no piece holds two digits
    number_ids = tok.encode("tensor 123456", add_eos=False)
    assert all(sum(c.isdigit() for c in tok.id_to_piece(i)) <= 1 for i in number_ids)
    # byte fallback: unseen characters become byte pieces and decode back exactly
    unseen = "東京 ✓"
    unseen_ids = tok.encode(unseen, add_eos=False)
    assert tok.unk_id not in unseen_ids
    assert any(tok.id_to_piece(i).startswith("<0x") for i in unseen_ids)
    assert tok.decode(unseen_ids) == unseen
    # user symbols are kept whole
    assert 4 in tok.encode("a [SEP] b") and 5 in tok.encode("[CLS]")


def test_train_tokenizer_errors(corpus_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PLDRError, match=">= 262"):
        train_tokenizer(
            [corpus_files["txt"]], vocab_size=100, out_prefix=tmp_path / "t", progress=False
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PLDRError, match="hold no text"):
        train_tokenizer([empty], vocab_size=300, out_prefix=tmp_path / "t", progress=False)
    # an error met while SentencePiece consumes the stream surfaces unchanged
    bad = tmp_path / "late.jsonl"
    bad.write_text('{"text": "fine line"}\n{"other": 1}\n')
    with pytest.raises(PLDRError, match=r"late.jsonl:2: no column 'text' \(columns: other\)"):
        train_tokenizer([bad], vocab_size=300, out_prefix=tmp_path / "t", progress=False)
    # the trainer's own settings are checked before anything is read
    for setting, message in [
        ({"input_sentence_size": 0}, "input_sentence_size must be a positive integer"),
        ({"character_coverage": 1.5}, r"character_coverage must be in \(0, 1\]"),
        ({"num_threads": 0}, "num_threads must be positive"),
    ]:
        with pytest.raises(PLDRError, match=message):
            train_tokenizer([empty], vocab_size=300, out_prefix=tmp_path / "t", **setting)


@pytest.mark.slow
def test_cli_tokenizer_train(corpus_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli" / "tok"
    result = _cli(
        "tokenizer", "train", "--input", str(corpus_files["jsonl"]), str(corpus_files["parquet"]),
        "--column", "content", "--vocab-size", "300", "--out", str(out), "--seed", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out.with_name("tok.model").resolve())
    assert "c.jsonl" in result.stderr and "d.parquet" in result.stderr  # progress bars, on stderr
    tok = load_tokenizer(out.with_name("tok.model"))
    assert [tok.id_to_piece(i) for i in range(6)] == [
        "[PAD]",
        "[UNK]",
        "[START]",
        "[END]",
        "[SEP]",
        "[CLS]",
    ]

    encoded = _cli("tokenizer", "encode", "-t", str(out.with_name("tok.model")), "the text")
    assert json.loads(encoded.stdout) == tok.encode("the text")
    decoded = _cli("tokenizer", "decode", "-t", str(out.with_name("tok.model")), encoded.stdout)
    assert decoded.stdout == "the text\n"


@pytest.mark.slow
def test_cli_tokenizer_train_errors(corpus_files: dict[str, Path], tmp_path: Path) -> None:
    for args, message in [
        (
            ["--input", str(corpus_files["jsonl"])],
            "no column 'text' (columns: id, content); use --column",
        ),
        (["--input", str(tmp_path / "nothing.txt")], "input file not found"),
        (["--input", str(corpus_files["txt"]), "--threads", "0"], "num_threads must be positive"),
    ]:
        result = _cli(
            "tokenizer",
            "train",
            *args,
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "t"),
            "--no-progress",
        )
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith("pldr-llm: error:") and message in result.stderr
        assert "Traceback" not in result.stderr


def test_cli_tokenizer_train_passes_every_option(monkeypatch, tmp_path: Path) -> None:
    import functools

    import pldr_llm.tokenizer
    from pldr_llm.cli import main

    seen: dict = {}

    @functools.wraps(pldr_llm.tokenizer.train_tokenizer)  # its signature, which the CLI reads
    def record(**options):
        seen.update(options)
        raise PLDRError("recorded")

    monkeypatch.setattr(pldr_llm.tokenizer, "train_tokenizer", record)
    argv = [
        "tokenizer", "train", "-i", "a.txt", "b.txt", "--vocab-size", "300", "--out", "p",
        "--column", "body", "--input-sentence-size", "50", "--character-coverage", "0.99",
        "--threads", "2", "--seed", "7", "--no-progress", "--verbose",
    ]  # fmt: skip
    assert main(argv) == 2
    assert seen == {
        "inputs": ["a.txt", "b.txt"],
        "vocab_size": 300,
        "out_prefix": "p",
        "column": "body",
        "input_sentence_size": 50,
        "character_coverage": 0.99,
        "num_threads": 2,
        "seed": 7,
        "progress": False,
        "verbose": True,
    }
