"""The one incremental detokenizer (``pldr_llm.generation.Detokenizer``) on the paper's
SentencePiece tokenizer (32000 pieces, byte fallback, leading spaces dropped).

The reference is always a full decode: ``final_text`` of the ids the detokenizer took, and the id
at which a full decode of the row first holds a stop string (what ``StopStrings`` stops at).
Exact string equality throughout: there is no tolerance in text.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pldr_llm.generation import Detokenizer, StopStrings, final_text, find_stop
from pldr_llm.tokenizer import PLDRTokenizer, load_tokenizer
from support import PAPER_TOKENIZER_MODEL

# Texts whose ids are spliced into the random rows: byte-fallback characters (CJK, an emoji),
# runs of spaces (lone "▁" pieces), accents, and U+FFFD itself.
TEXTS = [" 日本語🙂 ok", " héllo wörld", "  spaced   out ", "a\ufffdb", " The power law"]


@pytest.fixture(scope="module")
def tok(paper_tokenizer_dir: Path) -> PLDRTokenizer:
    return load_tokenizer(paper_tokenizer_dir / PAPER_TOKENIZER_MODEL)


def _random_ids(tok: PLDRTokenizer, r: random.Random, n: int) -> list[int]:
    """Ids that hit the decoder's special cases often: control and unknown ids, ids past the
    vocabulary, lone "▁" pieces, single bytes (half characters), and whole encoded texts."""
    special = [0, 1, 2, 3, 4, tok.processor.piece_to_id("▁")] + list(range(6, 262))
    encoded = [tok.encode(t, add_eos=False) for t in TEXTS]
    out: list[int] = []
    while len(out) < n:
        c = r.random()
        if c < 0.3:
            out.append(r.choice(special))
        elif c < 0.5:
            out.extend(r.choice(encoded))
        elif c < 0.55:
            out.append(r.randrange(tok.vocab_size, tok.vocab_size + 10))
        else:
            out.append(r.randrange(tok.vocab_size))
    return out[:n]


def _stop_id(tok: PLDRTokenizer, prompt: list[int], ids: list[int], stops) -> int | None:
    """How many ids a row takes before a full decode of it holds a stop string (None: never)."""
    start = len(tok.decode(prompt))
    for j in range(1, len(ids) + 1):
        if find_stop(tok.decode(prompt + ids[:j])[start:], stops) is not None:
            return j
    return None


def _stream(detok: Detokenizer, ids: list[int], r: random.Random) -> list[str]:
    """Push ``ids`` in random slices of 1..3 (the server pushes one, a block may push more)."""
    deltas = [detok.push([])]
    i = 0
    while i < len(ids):
        k = r.randrange(1, 4)
        deltas.append(detok.push(ids[i : i + k]))
        i += k
    deltas.append(detok.finish())
    return deltas


@pytest.mark.slow
@pytest.mark.parametrize("block", range(4))
def test_deltas_add_up_to_final_text(tok: PLDRTokenizer, block: int) -> None:
    """Many random rows, with and without stop strings (cut out of the row's own new text at
    random places, so they are often split across tokens and hold multi-byte characters), with
    and without the prompt's text: the deltas add up to ``final_text`` exactly, and the row
    stops at the id where a full decode first holds a stop string."""
    stopped = split = 0
    for seed in range(block * 100, block * 100 + 100):
        r = random.Random(seed)
        prompt = _random_ids(tok, r, r.randrange(0, 8)) or [tok.eos_id]
        ids = _random_ids(tok, r, r.randrange(0, 60))
        prompt_text = tok.decode(prompt)
        new = tok.decode(prompt + ids)[len(prompt_text) :]
        cases: list[tuple[str, ...]] = [(), ("\ufffd",)]
        if len(new) > 2:
            a = r.randrange(len(new))
            b = min(len(new), a + r.randrange(1, 6))
            cases += [(new[a:b],), ("@@never@@", new[a:b], new[max(0, a - 1) : b + 1])]
        for stops in cases:
            want_at = _stop_id(tok, prompt, ids, stops) if stops else None
            for echo in (False, True):
                detok = Detokenizer(tok, prompt, stops, echo=echo)
                got = "".join(_stream(detok, ids, r))
                taken = ids if want_at is None else ids[:want_at]
                assert detok.new_ids == taken, (seed, stops)
                assert detok.stopped == (want_at is not None)
                want = final_text(tok, prompt, taken, stops)
                assert got == (want if echo else want[len(prompt_text) :]), (seed, stops, echo)
            if want_at is not None:
                stopped += 1
                # Split across ids: the match starts in text that came before the last id.
                before = tok.decode(prompt + ids[: want_at - 1])[len(prompt_text) :]
                at = find_stop(tok.decode(prompt + ids[:want_at])[len(prompt_text) :], stops)
                split += at is not None and at < len(before.rstrip("\ufffd"))
    assert stopped > 200 and split > 50  # the stop strings were met, many split across ids


def test_a_push_of_several_ids_gives_what_pushing_them_one_by_one_gives(tok: PLDRTokenizer) -> None:
    """The server pushes a sequence's tokens of a block of steps at once (one decode where that
    gives the same text): each push's delta is the deltas of its ids pushed one by one, put
    together, and the row stops at the same id, with and without stop strings."""
    whole = 0
    for seed in range(150):
        r = random.Random(seed)
        prompt = _random_ids(tok, r, r.randrange(0, 8)) or [tok.eos_id]
        ids = _random_ids(tok, r, r.randrange(20, 80))
        if seed % 3 == 0:  # rows of whole words too: most blocks then take one decode
            ids = tok.encode(" the power law graph attention" * 8, add_eos=False)
        new = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
        a = r.randrange(max(1, len(new)))
        cases: list[tuple[str, ...]] = [(), ("@@never@@",), (new[a : a + r.randrange(1, 5)],)]
        for stops in cases:
            one, block = Detokenizer(tok, prompt, stops), Detokenizer(tok, prompt, stops)
            i = 0
            while i < len(ids):
                k = r.choice((2, 3, 8, 16))
                want = "".join(one.push([t]) for t in ids[i : i + k])
                read = block._read
                assert block.push(ids[i : i + k]) == want, (seed, stops, i)
                whole += block._read - read >= k
                i += k
            assert block.finish() == one.finish()
            assert block.new_ids == one.new_ids and block.stopped == one.stopped
    assert whole > 200  # many pushes took the one-decode way


def test_stop_string_split_across_tokens_is_never_shown(tok: PLDRTokenizer) -> None:
    prompt = tok.prompt_ids("Say")
    ids = tok.encode(" alpha beta gamma delta", add_eos=False)  # ▁alpha ▁beta ▁gamma ▁delta
    detok = Detokenizer(tok, prompt, ["a be"])  # the end of "▁alpha", the start of "▁beta"
    assert detok.push(ids[:1]) == " alph"  # "a" may start the stop string: held back
    assert detok.push(ids[1:]) == "" and detok.stopped
    assert detok.new_ids == ids[:2]  # stopped at the id that completed it; the rest ignored
    assert detok.finish() == ""
    assert final_text(tok, prompt, ids[:2], ["a be"]) == "Say alph"


def test_only_a_possible_stop_start_is_held_back(tok: PLDRTokenizer) -> None:
    """Text that no stop string starts with is shown at once: the old rule held back the last
    len(stop) - 1 characters whatever they were (nothing of " alpha" for "beta gam")."""
    prompt = tok.prompt_ids("Say")
    detok = Detokenizer(tok, prompt, ["beta gam"])
    assert detok.push(tok.encode(" alpha", add_eos=False)) == " alpha"
    # "bet" may be the start of the stop string: held; "bet" + "ter" is not: shown.
    assert detok.push(tok.encode(" bet", add_eos=False)) == " "
    assert detok.push([tok.processor.piece_to_id("ter")]) == "better"
    assert detok.finish() == "" and not detok.stopped


def test_multibyte_characters_are_never_cut(tok: PLDRTokenizer) -> None:
    prompt = tok.prompt_ids("Say")
    ids = tok.encode(" 日本語🙂 ok", add_eos=False)
    assert sum(tok.id_to_piece(i).startswith("<0x") for i in ids) > 4  # byte-fallback pieces
    detok = Detokenizer(tok, prompt, ["本"])
    deltas = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.finish() == " 日"
    assert detok.stopped


def test_a_lone_space_piece_keeps_its_space(tok: PLDRTokenizer) -> None:
    """SentencePiece drops every leading "▁" of a decode: the old server detokenizer decoded
    a window starting at a lone "▁" piece and lost that space ("Say Hello" for "Say  Hello")."""
    space, hello = tok.processor.piece_to_id("▁"), tok.processor.piece_to_id("▁Hello")
    prompt = tok.prompt_ids("Say")
    detok = Detokenizer(tok, prompt)
    got = "".join(detok.push([i]) for i in (space, hello, space, space, hello)) + detok.finish()
    assert got == "  Hello   Hello" == tok.decode(prompt + [space, hello, space, space, hello])[3:]
    # From an empty prompt (the end-of-text id) the leading spaces are dropped, as in a decode.
    detok = Detokenizer(tok, [tok.eos_id], echo=True)
    assert "".join(detok.push([i]) for i in (space, space)) == ""
    assert "".join(detok.push([i]) for i in (hello, space)) == "Hello "
    assert detok.finish() == ""


def test_a_prompt_ending_in_half_a_character(tok: PLDRTokenizer) -> None:
    """Ids, not text, as a prompt may end inside a character: with the prompt's text shown
    (the CLI's streamer), the old one printed the prompt's U+FFFD and then nothing more."""
    ids = tok.encode(" 日本", add_eos=False)
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    prompt, new = ids[:cut], ids[cut:]
    detok = Detokenizer(tok, prompt, echo=True)
    assert detok.push([]) == ""  # the prompt's last character is not whole yet
    assert "".join(detok.push([i]) for i in new) + detok.finish() == "日本"
    assert final_text(tok, prompt, new) == "日本"


def test_each_id_decodes_only_the_ids_since_the_last_commit(tok: PLDRTokenizer) -> None:
    """A long row costs no more per id than a short one: no decode grows with the row."""
    sizes: list[int] = []

    class Counting:
        unk_id = tok.unk_id

        def decode(self, ids: list[int]) -> str:
            sizes.append(len(ids))
            return tok.decode(ids)

    prompt = tok.prompt_ids("The power law graph attention " * 20)
    ids = tok.encode(" 日本語🙂 and words " * 60, add_eos=False)
    assert len(ids) > 600
    detok = Detokenizer(Counting(), prompt, ["@@never@@", "\n\n"])
    sizes.clear()  # the prompt is decoded once, whole
    got = "".join(detok.push([i]) for i in ids) + detok.finish()
    assert got == final_text(tok, prompt, ids)[len(detok.prompt_text) :]
    assert max(sizes) <= 6  # the anchor and the ids of at most one (four-byte) character


def test_stop_strings_criteria_stops_where_a_full_decode_does(tok: PLDRTokenizer) -> None:
    r = random.Random(7)
    prompts = [tok.prompt_ids("Say"), [tok.eos_id]]
    rows = [_random_ids(tok, r, 80) for _ in prompts]
    for stops in (["e"], ["\ufffd", "ok"], ["the"]):
        criteria = StopStrings(tok, prompts, stops)
        for row, (prompt, ids) in enumerate(zip(prompts, rows)):
            want = _stop_id(tok, prompt, ids, stops)
            got = next((j for j in range(1, len(ids) + 1) if criteria(row, ids[:j])), None)
            assert got == want
