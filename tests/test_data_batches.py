"""Packing, batching, exact resumption and per-rank sharding of the data pipeline."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from pldr_llm.core.errors import PLDRError
from pldr_llm.data import (
    BatchIterator,
    ByteTokenizer,
    DataConfig,
    ListSource,
    build_batches,
    chunk_group,
    default_corpus,
    reshard_states,
)

EOS = 3


class DocTokenizer:
    """Document ``"d<i>:<n>"`` -> ``n`` copies of id ``10 + i``, then end-of-text.

    Every id names the document it came from, so tests can tell which documents a batch holds.
    """

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        name, n = text.split(":")
        ids = [10 + int(name[1:])] * int(n)
        return ids + [EOS] if add_eos else ids


def make_docs(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [f"d{i}:{k}" for i, k in enumerate(lengths)]


def one_doc_per_sample(docs: list[str], **options) -> BatchIterator:
    """Samples of 12 positions, one document each (padded), one sample a batch: every batch
    holds exactly one document (``make_docs`` documents fit 12 positions)."""
    return BatchIterator(
        ListSource(docs),
        DocTokenizer(),
        batch_size=1,
        sample_length=12,
        padding_type="pad",
        batch_agg_count=1,
        **options,
    )


def doc_ids(batches: list[torch.Tensor]) -> list[int]:
    """Document indices in order of first appearance."""
    seen: dict[int, None] = {}
    for b in batches:
        for t in b.flatten().tolist():
            if t >= 10:
                seen.setdefault(t - 10)
    return list(seen)


# ------------------------------------------------------------------------------ chunk_group


def test_chunk_group_pack_pad_nopad_exact() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    rows, carry = chunk_group(docs, 4, "pack", carry=[0])
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert carry == [8, 9]
    rows, carry = chunk_group(docs, 4, "pad")
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert carry == []
    rows, carry = chunk_group(docs, 4, "nopad")
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert carry == []
    # Exactly divisible: pad adds no all-padding row, pack carries nothing.
    rows, carry = chunk_group([[1, 2], [3, 4]], 2, "pad")
    assert rows.tolist() == [[1, 2], [3, 4]] and carry == []
    rows, carry = chunk_group([[1]], 3, "pack")
    assert rows.shape == (0, 3) and carry == [1]
    assert rows.dtype == torch.long


def test_chunk_group_rejects_bad_input() -> None:
    with pytest.raises(PLDRError, match="padding_type"):
        chunk_group([[1]], 4, "zip")
    with pytest.raises(PLDRError, match="carries nothing"):
        chunk_group([[1]], 4, "pad", carry=[5])


# ------------------------------------------------------------------------- the batch stream


def reference_samples(
    token_lists: list[list[int]], sample_length: int, padding_type: str, group: int
) -> list[list[int]]:
    """The original's semantics written plainly: groups of ``group`` documents, each group
    concatenated (after pack's carry) and cut; the final carry is dropped."""
    out: list[list[int]] = []
    carry: list[int] = []
    for g in range(0, len(token_lists), group):
        ids = (carry if padding_type == "pack" else []) + [
            t for doc in token_lists[g : g + group] for t in doc
        ]
        full = len(ids) // sample_length
        out += [ids[i * sample_length : (i + 1) * sample_length] for i in range(full)]
        rest = ids[full * sample_length :]
        carry = rest if padding_type == "pack" else []
        if padding_type == "pad" and rest:
            out.append(rest + [0] * (sample_length - len(rest)))
    return out


@pytest.mark.parametrize("padding_type", ["pack", "pad", "nopad"])
def test_batches_match_the_original_grouping(padding_type: str) -> None:
    docs = make_docs(83)
    tok = DocTokenizer()
    it = BatchIterator(
        ListSource(docs),
        tok,
        batch_size=3,
        sample_length=7,
        padding_type=padding_type,
        batch_agg_count=4,  # groups of 12 documents
        repeat=False,
    )
    batches = list(it)
    samples = reference_samples([tok.encode(d) for d in docs], 7, padding_type, 12)
    usable = len(samples) // 3 * 3  # the last incomplete batch is dropped
    assert len(batches) == len(samples) // 3 > 5
    assert all(b.shape == (3, 7) and b.dtype == torch.long for b in batches)
    assert torch.cat(batches).tolist() == samples[:usable]
    assert list(it) == []  # one epoch only


def test_pack_never_pads_and_keeps_every_token_in_order() -> None:
    docs = make_docs(50)
    tok = DocTokenizer()
    it = BatchIterator(
        ListSource(docs), tok, batch_size=2, sample_length=5, batch_agg_count=2, repeat=False
    )
    flat = torch.cat(list(it)).flatten().tolist()
    stream = [t for d in docs for t in tok.encode(d)]
    assert 0 not in flat
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < 2 * 5 + 5  # at most a partial batch and a carry dropped


def test_empty_documents_are_skipped() -> None:
    it = BatchIterator(
        ListSource(["", "d1:3", "", "d2:2"]),
        DocTokenizer(),
        batch_size=1,
        sample_length=7,
        padding_type="pad",
        repeat=False,
    )
    assert [b.tolist() for b in it] == [[[11, 11, 11, 3, 12, 12, 3]]]


def test_repeat_cycles_epochs_and_reshuffles() -> None:
    docs = make_docs(40)
    it = one_doc_per_sample(docs, shuffle=True, seed=5, buffer_size=16)
    epoch0 = doc_ids([next(it) for _ in range(40)])
    assert it.epoch == 0
    epoch1 = doc_ids([next(it) for _ in range(40)])
    assert it.epoch == 1
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1 and epoch0 != list(range(40))


def test_shuffle_is_seeded() -> None:
    def order(seed: int) -> list[int]:
        it = one_doc_per_sample(make_docs(30), shuffle=True, seed=seed, buffer_size=8, repeat=False)
        return doc_ids(list(it))

    assert order(1) == order(1)
    assert order(1) != order(2)
    # A block shuffle keeps documents within their block of buffer_size.
    assert all(i // 8 == d // 8 for i, d in enumerate(order(3)))


def test_too_little_data_for_one_batch_fails_clearly() -> None:
    it = BatchIterator(ListSource(["d0:3"]), DocTokenizer(), batch_size=4, sample_length=8)
    with pytest.raises(PLDRError, match="no complete batch"):
        next(it)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding_type": "pack"},
        {"padding_type": "pad", "shuffle": True, "buffer_size": 7},
        {"padding_type": "nopad", "shuffle": True, "buffer_size": 32},
        {"padding_type": "pack", "shuffle": True, "buffer_size": 5, "rank": 1, "world_size": 3},
    ],
)
def test_resume_is_exact_at_every_batch(kwargs: dict) -> None:
    docs = make_docs(30, seed=1)

    def new() -> BatchIterator:
        return BatchIterator(
            ListSource(docs),
            DocTokenizer(),
            batch_size=2,
            sample_length=6,
            batch_agg_count=2,
            seed=11,
            **kwargs,
        )

    reference = new()
    expected = [next(reference) for _ in range(60)]  # crosses several epochs
    assert reference.epoch >= 2
    run = new()
    for n in range(len(expected) - 4):
        state = json.loads(json.dumps(run.state_dict()))  # states survive JSON
        resumed = new()
        resumed.load_state_dict(state)
        assert resumed.batches_yielded == n
        for k in range(4):
            assert torch.equal(next(resumed), expected[n + k]), (n, k)
        assert torch.equal(next(run), expected[n])


def test_state_of_a_finished_epoch_stays_finished() -> None:
    it = BatchIterator(
        ListSource(make_docs(10)), DocTokenizer(), batch_size=2, sample_length=4, repeat=False
    )
    n = len(list(it))
    state = it.state_dict()
    assert state["exhausted"] and state["batches"] == n
    again = BatchIterator(
        ListSource(make_docs(10)), DocTokenizer(), batch_size=2, sample_length=4, repeat=False
    )
    again.load_state_dict(state)
    assert list(again) == []
    again.reset()
    assert len(list(again)) == n


def test_load_state_checks_settings() -> None:
    src = ListSource(make_docs(20))
    a = BatchIterator(src, DocTokenizer(), batch_size=2, sample_length=4)
    next(a)
    b = BatchIterator(src, DocTokenizer(), batch_size=3, sample_length=4)
    with pytest.raises(PLDRError, match="batch_size=2"):
        b.load_state_dict(a.state_dict())
    c = BatchIterator(src, DocTokenizer(), batch_size=2, sample_length=4, rank=0, world_size=2)
    with pytest.raises(PLDRError, match="reshard_states"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(PLDRError, match="not a data iterator state"):
        c.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_shards_are_disjoint_and_cover(shuffle: bool) -> None:
    docs = make_docs(47)
    seen = []
    for rank in range(3):
        it = one_doc_per_sample(
            docs, shuffle=shuffle, buffer_size=10, rank=rank, world_size=3, repeat=False
        )
        seen.append(doc_ids(list(it)))
    assert all(len(s) in (15, 16) for s in seen)
    assert sorted(itertools.chain(*seen)) == list(range(47))
    if not shuffle:
        assert seen[1][:3] == [1, 4, 7]


def test_reshard_restarts_at_the_earliest_unfinished_document() -> None:
    docs = make_docs(60)

    def make(rank: int, world: int) -> BatchIterator:
        return one_doc_per_sample(docs, shuffle=True, buffer_size=9, rank=rank, world_size=world)

    old = [make(r, 2) for r in range(2)]
    used: list[int] = []
    for it, n in zip(old, (5, 8), strict=True):
        used += doc_ids([next(it) for _ in range(n)])
    [state] = reshard_states([it.state_dict() for it in old], 1)
    new = make(0, 1)
    new.load_state_dict(state)
    rest = doc_ids([next(new) for _ in range(60 - 10)])
    # No document is lost: the ones rank 0 had not reached are all still ahead.
    assert set(range(60)) == set(used) | set(rest)
    assert len(set(used) & set(rest)) == 3  # rank 1 was 3 documents ahead of rank 0

    two = reshard_states([new.state_dict()], 2)
    assert [s["settings"]["rank"] for s in two] == [0, 1]
    with pytest.raises(PLDRError, match="needs 2 states"):
        reshard_states([old[0].state_dict()], 1)


# ------------------------------------------------------------------------- build_batches


def test_build_batches_default_corpus_train_and_validation() -> None:
    n = len(default_corpus())
    cfg = DataConfig(
        train_interval=[0, n - 10], val_offset=10, shuffle=True, batch_agg_count=2, buffer_size=64
    )
    tok = ByteTokenizer()
    train = build_batches(cfg, tok, batch_size=4, context_length=32, rank=1, world_size=2)
    val = build_batches(cfg, tok, batch_size=4, context_length=32, split="validation")
    assert train is not None and val is not None
    assert build_batches(cfg, tok, batch_size=4, context_length=32, split="test") is None
    b = next(train)
    assert b.shape == (4, 33) and b.dtype == torch.long
    assert train.shuffle and not val.shuffle and not val.repeat
    val_text = tok.decode(torch.cat(list(val)).flatten().tolist())
    assert default_corpus()[n - 10][:100] in val_text  # validation comes right after train
    assert default_corpus()[n - 11][:100] not in val_text


def test_build_batches_reads_the_source_it_is_given(tmp_path) -> None:
    """An already opened source is read as it is: the config's (here a missing file) is not
    opened again, and the settings still come from the config."""
    cfg = DataConfig(source=str(tmp_path / "missing.txt"), shuffle=True, padding_type="pad")
    with pytest.raises(PLDRError):
        build_batches(cfg, ByteTokenizer(), batch_size=2, context_length=8)
    source = ListSource(["abc", "defgh"])
    batches = build_batches(cfg, ByteTokenizer(), batch_size=2, context_length=8, source=source)
    assert batches is not None and batches.source is source
    assert batches.shuffle and batches.padding_type == "pad"
    text = ByteTokenizer().decode(next(batches).flatten().tolist())
    assert "abc" in text and "defgh" in text


def test_build_batches_rejects_bad_arguments() -> None:
    cfg = DataConfig()
    with pytest.raises(PLDRError, match="context_length"):
        build_batches(cfg, ByteTokenizer(), batch_size=2, context_length=0)
    with pytest.raises(PLDRError, match="rank 2"):
        build_batches(cfg, ByteTokenizer(), batch_size=2, context_length=8, rank=2, world_size=2)


def test_encode_batch_is_used_when_present() -> None:
    calls: list[int] = []

    class Batched(DocTokenizer):
        def encode_batch(self, texts: list[str], add_eos: bool = True) -> list[list[int]]:
            calls.append(len(texts))
            return [self.encode(t, add_eos=add_eos) for t in texts]

    def run(tok: DocTokenizer) -> list[torch.Tensor]:
        it = BatchIterator(
            ListSource(make_docs(20)), tok, batch_size=2, sample_length=5, batch_agg_count=3
        )
        return [next(it) for _ in range(6)]

    assert all(torch.equal(a, b) for a, b in zip(run(DocTokenizer()), run(Batched()), strict=True))
    assert calls and calls[0] == 6  # one call per group of batch_size * batch_agg_count


def test_later_epochs_reuse_the_tokenized_documents_and_yield_the_same_batches():
    """A repeated corpus is tokenized once: the memo changes no batch, only the work."""
    from pldr_llm.data.batches import BatchIterator

    class Counting:
        def __init__(self) -> None:
            self.calls = 0

        def encode(self, text: str, add_eos: bool = True) -> list[int]:
            self.calls += 1
            return [4 + (ord(c) % 50) for c in text] + ([2] if add_eos else [])

    texts = [f"document number {i} " * (1 + i % 3) for i in range(12)]

    def batches(memo_limit: int | None, n: int) -> tuple[list, int]:
        import pldr_llm.data.batches as module

        saved = module.MEMO_IDS
        if memo_limit is not None:
            module.MEMO_IDS = memo_limit
        try:
            tok = Counting()
            it = BatchIterator(
                ListSource(texts), tok, batch_size=2, sample_length=16, shuffle=True, seed=3
            )
            return [next(it) for _ in range(n)], tok.calls
        finally:
            module.MEMO_IDS = saved

    with_memo, calls = batches(None, 40)  # several epochs
    without, calls_without = batches(0, 40)
    assert all(torch.equal(a, b) for a, b in zip(with_memo, without))
    assert calls == len(texts) and calls_without > 2 * len(texts)
