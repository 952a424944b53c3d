"""Byte-level BPE tokenizer: special ids, round trips, save/load."""

from __future__ import annotations

import json
import random
import time

import pytest
import tokenizers
from tokenizers import processors

from tessera.text.tokenizer import (
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Tokenizer,
    train_bpe,
)

CORPUS = [
    "a red square is left of a blue circle",
    "the green triangle is above the red square",
    "what color is the circle? blue",
    "USER: how many shapes are there? ASSISTANT: three",
    "there are two circles and one square",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400)


def test_special_tokens_have_lowest_ids_in_order(tokenizer: Tokenizer) -> None:
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_id == 0
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id) == (
        1,
        2,
        3,
        4,
    )
    assert len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 400


@pytest.mark.parametrize(
    "text",
    [
        "a red square is left of a blue circle",
        "USER: hi ASSISTANT:",
        "  leading and trailing spaces  ",
        "line one\nline two\n\n\ttabbed",
        "héllo wörld — naïve café ✓ 你好 🙂",
        "unseen-words: zyxwvut 12345 !?",
        "",
    ],
)
def test_plain_text_round_trips(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_no_bos_or_eos_added(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a red square")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_special_tokens_in_text_are_single_ids(tokenizer: Tokenizer) -> None:
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.token_id(token)]
    ids = tokenizer.encode("<s>USER: <image>\nwhat?</s>")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids.count(tokenizer.image_id) == 1


def test_decode_skip_special(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.bos_id, *tokenizer.encode("a red square"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "a red square"
    assert tokenizer.decode(ids, skip_special=False) == "<s>a red square</s>"
    assert tokenizer.decode([tokenizer.image_id] * 3, skip_special=False) == IMAGE_TOKEN * 3


def test_encoding_is_context_free(tokenizer: Tokenizer) -> None:
    # No space is invented in front of a piece: concatenated pieces decode to the joined text.
    pieces = ["USER: ", "what color?", " ", "ASSISTANT: ", "blue", "</s>"]
    ids = [i for piece in pieces for i in tokenizer.encode(piece)]
    assert tokenizer.decode(ids, skip_special=False) == "".join(pieces)


def test_encode_with_offsets_gives_character_spans(tokenizer: Tokenizer) -> None:
    text = "USER: <image>\ncafé à côté? ASSISTANT: blue</s>"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text) and len(offsets) == len(ids)
    # Spans index characters (not bytes) of `text`; a character split over several byte-level
    # tokens gives each of them its span.
    pieces = [text[start:end] for start, end in offsets]
    assert pieces[ids.index(tokenizer.image_id)] == IMAGE_TOKEN
    assert pieces[-1] == "</s>" and offsets[-1][1] == len(text)
    assert " blue" in pieces  # the space belongs to the word after it
    assert any(a == b for a, b in zip(offsets, offsets[1:], strict=False))  # "é" is two byte-level tokens
    distinct = [span for k, span in enumerate(offsets) if k == 0 or span != offsets[k - 1]]
    assert all(a[1] == b[0] for a, b in zip(distinct, distinct[1:], strict=False))
    assert "".join(text[start:end] for start, end in distinct) == text


def test_encode_with_offsets_adds_no_special_tokens(tokenizer: Tokenizer) -> None:
    """Like `encode`: a post-processor that would add BOS/EOS (as many HF tokenizers have) is
    not applied."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_id), ("</s>", tokenizer.eos_id)]
    )
    wrapped = Tokenizer(backend)
    assert wrapped.encode_with_offsets("a red square")[0] == tokenizer.encode("a red square")
    assert wrapped.encode("a red square") == tokenizer.encode("a red square")


def test_unknown_token_error_names_it(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="<nope>"):
        tokenizer.token_id("<nope>")


def test_save_and_load(tokenizer: Tokenizer, tmp_path) -> None:
    path = tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / TOKENIZER_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [TOKENIZER_FILE]
    json.loads(path.read_text())
    text = "the <image> is a red square</s>"
    for source in (path.parent, path, str(path)):
        loaded = Tokenizer.load(source)
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.image_id == tokenizer.image_id


def test_load_missing_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        Tokenizer.load(tmp_path / "nothing.json")


def test_vocab_size_too_small() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(CORPUS, vocab_size=100)


def test_trains_quickly_on_many_sentences() -> None:
    rng = random.Random(0)
    words = "a the red green blue square circle triangle left right above below of is what".split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(50_000)]
    start = time.perf_counter()
    tokenizer = train_bpe(texts, vocab_size=1024)
    assert time.perf_counter() - start < 10
    assert tokenizer.decode(tokenizer.encode(texts[0])) == texts[0]
    # Frequent words become single tokens.
    assert len(tokenizer.encode("triangle")) == 1


def test_matches_transformers_fast_tokenizer(tokenizer: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    path = tokenizer.save(tmp_path)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "USER: <image>\nwhat color is the circle? ASSISTANT: blue</s>"
    assert reference.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert reference.decode(tokenizer.encode(text)) == text
