"""Document sources: local txt/jsonl/parquet files, intervals and offsets, the default corpus,
Hugging Face datasets (when the optional package is installed), and configuration errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pldr_llm.core.errors import PLDRError
from pldr_llm.data import (
    DataConfig,
    ListSource,
    SliceSource,
    default_corpus,
    find_files,
    open_source,
    parse_split,
)
from pldr_llm.data.corpus import split_sections


def docs_of(cfg: DataConfig, which: str = "train") -> list[str]:
    source = open_source(cfg, which)
    assert source is not None
    return list(source.iter_documents())


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------- txt


def test_txt_blank_line_line_and_file_modes(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("first line\nstill first\n\n\n  \nsecond\n\nthird\n", encoding="utf-8")
    assert docs_of(DataConfig(source=str(f))) == ["first line\nstill first", "second", "third"]
    assert docs_of(DataConfig(source=str(f), txt_split="line")) == [
        "first line",
        "still first",
        "second",
        "third",
    ]
    g = tmp_path / "b.txt"
    g.write_text("other file\n", encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path), txt_split="file")
    assert docs_of(cfg) == [f.read_text().strip(), "other file"]


def test_folder_glob_and_gzip(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.txt").write_text("c\n\nd\n", encoding="utf-8")
    (tmp_path / "1.txt").write_text("a\n\nb\n", encoding="utf-8")
    with gzip.open(tmp_path / "3.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "e"}) + "\n")
    (tmp_path / "notes.bin").write_bytes(b"\x00")  # unknown extensions are ignored in folders
    assert docs_of(DataConfig(source=str(tmp_path))) == ["a", "b", "e", "c", "d"]
    assert docs_of(DataConfig(source=str(tmp_path / "**" / "*.txt"))) == ["a", "b", "c", "d"]
    assert docs_of(DataConfig(source=str(tmp_path), format="jsonl")) == ["e"]


def test_skipping_matches_slicing_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n\n".join(f"t{i}" for i in range(4)), encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"j{i}"} for i in range(3)])
    (tmp_path / "c.txt").write_text("", encoding="utf-8")  # a file with no document
    (tmp_path / "d.txt").write_text("t4\n\nt5", encoding="utf-8")
    source = open_source(DataConfig(source=str(tmp_path)))
    assert source is not None
    every = list(source.iter_documents())
    assert len(every) == 9
    for start in range(11):
        assert list(source.iter_documents(start)) == every[start:]
    assert source.count_documents() == 9


# --------------------------------------------------------------------------------- jsonl


def test_jsonl_column_and_errors(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "id": 1}, {"content": None}])
    assert docs_of(DataConfig(source=str(f), column="content")) == ["x", ""]
    # A missing column fails when the source is opened, naming file, line, column and columns.
    with pytest.raises(PLDRError, match=r"d\.jsonl:1: no column 'text' \(columns: content, id\)"):
        open_source(DataConfig(source=str(f)))
    bad = write_jsonl(tmp_path / "late.jsonl", [{"text": "ok"}, {"body": "no"}])
    source = open_source(DataConfig(source=str(bad)))
    assert source is not None
    with pytest.raises(PLDRError, match=r"late\.jsonl:2: no column 'text'"):
        list(source.iter_documents())
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    source = open_source(DataConfig(source=str(tmp_path / "broken.jsonl")))
    assert source is not None
    with pytest.raises(PLDRError, match=r"broken\.jsonl:2: not valid JSON"):
        list(source.iter_documents())
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(PLDRError, match="holds int, not text"):
        open_source(DataConfig(source=str(tmp_path / "num.jsonl")))


def test_json_array_file(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"text": "p"}, {"text": "q"}, {"text": "r"}]), encoding="utf-8")
    source = open_source(DataConfig(source=str(f)))
    assert source is not None
    assert list(source.iter_documents(1)) == ["q", "r"]


# ------------------------------------------------------------------------------- parquet


def test_parquet_column_rowgroups_and_errors(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i}" for i in range(25)]
    table = pa.table({"content": texts, "n": list(range(25))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"content": ["last"], "n": [0]}), tmp_path / "b.parquet")
    source = open_source(DataConfig(source=str(tmp_path), column="content"))
    assert source is not None
    assert source.num_documents() == 26
    every = list(source.iter_documents())
    assert every == [*texts, "last"]
    for start in (0, 3, 4, 9, 24, 25, 26):
        assert list(source.iter_documents(start)) == every[start:]
    with pytest.raises(PLDRError, match=r"a\.parquet: no column 'text' \(columns: content, n\)"):
        open_source(DataConfig(source=str(tmp_path / "a.parquet")))


# ------------------------------------------------------------------ intervals and offsets


def test_index_intervals_and_offsets_like_the_original(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc{i}"} for i in range(20)])
    cfg = DataConfig(source=str(f), train_interval=[2, 10], val_offset=3, test_offset=4)
    assert docs_of(cfg) == [f"doc{i}" for i in range(2, 10)]
    assert docs_of(cfg, "validation") == ["doc10", "doc11", "doc12"]
    assert docs_of(cfg, "test") == ["doc13", "doc14", "doc15", "doc16"]
    same = DataConfig(source=str(f), split="train[2:10]", val_offset=3)
    assert docs_of(same) == docs_of(cfg) and docs_of(same, "validation") == docs_of(
        cfg, "validation"
    )
    assert open_source(DataConfig(source=str(f)), "validation") is None


def test_percent_intervals(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc{i}"} for i in range(40)])
    cfg = DataConfig(source=str(f), split_style="percent", train_interval=[10, 50], val_offset=5)
    assert docs_of(cfg) == [f"doc{i}" for i in range(4, 20)]
    assert docs_of(cfg, "validation") == ["doc20", "doc21"]
    assert docs_of(DataConfig(source=str(f), split="train[90%:]")) == [
        "doc36",
        "doc37",
        "doc38",
        "doc39",
    ]
    assert docs_of(DataConfig(source=str(f), split="train[-2:]")) == ["doc38", "doc39"]


def test_parse_split() -> None:
    assert parse_split("train") == ("train", None)
    name, (a, b) = parse_split("train[10%:20%]")  # type: ignore[misc]
    assert name == "train" and (a.value, a.percent, b.value, b.percent) == (10, True, 20, True)
    name, (a, b) = parse_split("validation[:500]")  # type: ignore[misc]
    assert name == "validation" and a is None and (b.value, b.percent) == (500, False)
    with pytest.raises(PLDRError, match="split"):
        parse_split("train[1:2")


def test_slice_source_counts() -> None:
    base = ListSource([str(i) for i in range(10)])
    s = SliceSource(base, 3, 7)
    assert list(s.iter_documents()) == ["3", "4", "5", "6"]
    assert list(s.iter_documents(2)) == ["5", "6"]
    assert s.num_documents() == 4
    assert SliceSource(base, 8, 20).num_documents() == 2


# ---------------------------------------------------------------------------- errors


def test_missing_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(PLDRError, match="data file not found: .*nothing.jsonl"):
        open_source(DataConfig(source=str(tmp_path / "nothing.jsonl")))
    with pytest.raises(PLDRError, match="data file not found: ./corpus"):
        find_files("./corpus")
    with pytest.raises(PLDRError, match="no data files match"):
        find_files(str(tmp_path / "*.txt"))
    with pytest.raises(PLDRError, match="no .txt/.jsonl/.parquet data files in folder"):
        find_files(str(tmp_path))
    (tmp_path / "data.xyz").write_text("a", encoding="utf-8")
    with pytest.raises(PLDRError, match="cannot tell the format"):
        find_files(str(tmp_path / "data.xyz"))
    assert find_files(str(tmp_path / "data.xyz"), "txt") is not None
    assert find_files("tiiuae/falcon-refinedweb") is None  # a Hugging Face name, not a path


def test_config_from_original_keys_and_errors() -> None:
    cfg = DataConfig.from_dict(
        {
            "dataset_file": "tiiuae/falcon-refinedweb",
            "dataset_column_label": "content",
            "train_sample_interval": [0, 16000000],
            "val_sample_size": 160000,
            "shuffle_set": True,
            "shuffle_seed": None,
            "batch_agg_count": 100,
            "padding_type": "pack",
            "split_style": "index",
            "load_dataset": True,
        }
    )
    assert (cfg.source, cfg.column, cfg.train_interval, cfg.val_offset, cfg.shuffle) == (
        "tiiuae/falcon-refinedweb",
        "content",
        [0, 16000000],
        160000,
        True,
    )
    assert cfg.shuffle_seed == 0
    splits = DataConfig.from_dict({"split_names": ["tr", "va", "te"]})
    assert (splits.split, splits.val_split, splits.test_split) == ("tr", "va", "te")
    own = DataConfig.from_dict({"load_from_train": False, "val_sample_size": 5})
    assert own.val_split == "validation" and own.val_offset is None
    with pytest.raises(PLDRError, match="unknown data key 'colum'"):
        DataConfig.from_dict({"colum": "text"})
    with pytest.raises(PLDRError, match="padding_type"):
        DataConfig(padding_type="packed")
    with pytest.raises(PLDRError, match="'train_interval'"):
        DataConfig(train_interval=[5, 2])
    with pytest.raises(PLDRError, match="'val_offset'"):
        DataConfig(val_offset=0)
    with pytest.raises(PLDRError, match="both give an interval"):
        DataConfig(split="train[:5]", train_interval=[0, 5])
    with pytest.raises(PLDRError, match="needs the end of the train interval"):
        open_source(DataConfig(val_offset=5), "validation")


# ----------------------------------------------------------------------- default corpus


def test_default_corpus_is_nonempty_and_deterministic() -> None:
    docs = default_corpus()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 100_000
    assert all(d and d == d.strip() for d in docs)
    from pldr_llm.data import corpus

    corpus._default_corpus.cache_clear()
    assert default_corpus() == docs
    assert any('The "assert" statement' in d for d in docs)
    source = open_source(DataConfig())
    assert source is not None and list(source.iter_documents()) == docs


def test_split_sections() -> None:
    page = "Title\n*****\n\nintro " + "x" * 50 + "\n\nPart\n====\n\nbody " + "y" * 50 + "\n"
    assert split_sections(page, min_chars=10) == [
        "Title\n*****\n\nintro " + "x" * 50,
        "Part\n====\n\nbody " + "y" * 50,
    ]
    assert len(split_sections(page, min_chars=1000)) == 1  # short sections are merged


# ------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_dataset_from_local_json(tmp_path: Path, streaming: bool) -> None:
    pytest.importorskip("datasets")
    f = write_jsonl(tmp_path / "d.jsonl", [{"content": f"doc{i}", "n": i} for i in range(12)])
    cfg = DataConfig(
        source="json",
        format="hf",
        data_files=str(f),
        column="content",
        train_interval=[1, 6],
        val_offset=2,
        streaming=streaming,
        cache_dir=str(tmp_path / "hf-cache"),  # keep the user's cache clean
    )
    assert docs_of(cfg) == [f"doc{i}" for i in range(1, 6)]
    assert docs_of(cfg, "validation") == ["doc6", "doc7"]
    source = open_source(cfg)
    assert source is not None and list(source.iter_documents(3)) == ["doc4", "doc5"]
    with pytest.raises(PLDRError, match=r"no column 'text' \(columns: content, n\)"):
        open_source(
            DataConfig(
                source="json",
                format="hf",
                data_files=str(f),
                streaming=streaming,
                cache_dir=str(tmp_path / "hf-cache"),
            )
        )


def test_hf_missing_package_or_dataset_is_a_pldr_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(PLDRError, match=r"pip install 'pldr-llm\[data\]'"):
        open_source(DataConfig(source="some-org/some-dataset"))


@pytest.mark.slow
def test_default_tokenizer_model_is_cached_and_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("sentencepiece")
    from pldr_llm.data import default_tokenizer_model
    from pldr_llm.tokenizer import load_tokenizer

    a = default_tokenizer_model(tmp_path / "a", vocab_size=1000)
    assert a.is_file() and a.with_suffix(".vocab").is_file()
    mtime = a.stat().st_mtime_ns
    assert default_tokenizer_model(tmp_path / "a", vocab_size=1000) == a
    assert a.stat().st_mtime_ns == mtime  # cached, not retrained
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []
    b = default_tokenizer_model(tmp_path / "b", vocab_size=1000)
    text = default_corpus()[0]
    ta, tb = load_tokenizer(a), load_tokenizer(b)
    assert ta.vocab_size == 1000
    ids = ta.encode(text, add_eos=True)
    assert ids[-1] == 3 and ids == tb.encode(text, add_eos=True)
    assert len(ids) < len(text) / 2  # it learned pieces longer than characters
    with pytest.raises(PLDRError, match="vocab_size"):
        default_tokenizer_model(tmp_path, vocab_size=10)
