"""Datasets between records and samples: `group_by_image`, `ConversationDataset`, `ImageCache`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import tessera.data.datasets as datasets_module
from tessera.data.datasets import ConversationDataset, ImageCache, group_by_image
from tessera.data.images import ImageTransform
from tessera.data.records import Conversation, SkipStats, Turn
from tessera.data.templates import IGNORE_INDEX
from tessera.text.tokenizer import Tokenizer, train_bpe

IMAGE_TOKENS_PER_IMAGE = 4
SENTENCES = [
    "what color is the circle?", "red", "how many shapes are there?", "2",
    "is there a blue square?", "yes", "a small green triangle above a red circle.",
]


def single_turn(conv_id: str, image: Path, question: str, answer: str) -> Conversation:
    return Conversation(id=conv_id, images=(image,),
                        turns=(Turn("user", f"<image>\n{question}"), Turn("assistant", answer)))


def qa_pairs(conversation: Conversation) -> list[tuple[str, str]]:
    """(question, answer) pairs with the image placeholder removed from the questions."""
    turns = [t for t in conversation.turns if t.role != "system"]
    return [(u.text.replace("<image>", "").strip(), a.text) for u, a in zip(turns[::2], turns[1::2], strict=True)]


def assert_one_leading_image(conversation: Conversation) -> None:
    texts = [t.text for t in conversation.turns]
    assert sum(text.count("<image>") for text in texts) == 1, texts
    assert conversation.turns[0].role == "user" and texts[0].startswith("<image>\n"), texts
    assert [t.role for t in conversation.turns] == ["user", "assistant"] * (len(texts) // 2), texts


# --- group_by_image ---------------------------------------------------------------------------


@pytest.fixture()
def mixed_conversations() -> list[Conversation]:
    """Three images with 3, 2 and 1 single-turn conversations, plus one conversation with two
    images and one without any (both must pass through untouched)."""
    a, b, c = Path("a.png"), Path("b.png"), Path("c.png")
    convs = [single_turn(f"a{i}", a, f"question a{i}?", f"answer a{i}") for i in range(3)]
    convs += [single_turn(f"b{i}", b, f"question b{i}?", f"answer b{i}") for i in range(2)]
    convs.append(single_turn("c0", c, "question c0?", "answer c0"))
    convs.append(Conversation(id="two-images", images=(a, b), turns=(
        Turn("user", "<image>\n<image>\nwhich is bigger?"), Turn("assistant", "the first"))))
    convs.append(Conversation(id="text-only", images=(), turns=(
        Turn("user", "what is a square?"), Turn("assistant", "a shape"))))
    return convs


def test_group_by_image_merges_each_image_into_one_conversation(mixed_conversations: list[Conversation]) -> None:
    merged = group_by_image(mixed_conversations, seed=0)
    single_image = [c for c in merged if len(c.images) == 1]
    assert sorted(c.images[0].name for c in single_image) == ["a.png", "b.png", "c.png"]
    turns_by_image = {c.images[0].name: len(c.turns) for c in single_image}
    assert turns_by_image == {"a.png": 6, "b.png": 4, "c.png": 2}
    for conv in single_image:
        assert_one_leading_image(conv)


def test_group_by_image_keeps_every_question_answer_pair_exactly_once(
    mixed_conversations: list[Conversation],
) -> None:
    originals = Counter(p for c in mixed_conversations if len(c.images) == 1 for p in qa_pairs(c))
    merged = group_by_image(mixed_conversations, seed=3)
    grouped = Counter(p for c in merged if len(c.images) == 1 for p in qa_pairs(c))
    assert grouped == originals
    assert max(grouped.values()) == 1


def test_group_by_image_drops_single_questions_repeated_for_the_same_image() -> None:
    """A repeated pair in one merged conversation could be answered by copying the first copy."""
    image, other = Path("a.png"), Path("b.png")
    chat = Conversation(id="chat", images=(image,), turns=(
        Turn("user", "<image>\nhow many?"), Turn("assistant", "2"),
        Turn("user", "what color is the circle?"), Turn("assistant", "red")))
    convs = [single_turn("q0", image, "how many?", "2"), chat, single_turn("q1", image, "is it big?", "yes"),
             single_turn("q2", image, "is it big?", "yes"), single_turn("q3", other, "how many?", "2")]
    merged = group_by_image(convs, seed=1)
    pairs = Counter(p for c in merged for p in qa_pairs(c))
    assert pairs == Counter({("how many?", "2"): 2, ("what color is the circle?", "red"): 1, ("is it big?", "yes"): 1})
    (for_image,) = [c for c in merged if c.images == (image,)]
    # the chat stays whole and in order
    texts = [t.text.removeprefix("<image>\n") for t in for_image.turns]
    i = texts.index("how many?")
    assert texts[i : i + 4] == ["how many?", "2", "what color is the circle?", "red"]


def test_group_by_image_passes_multi_image_and_text_only_conversations_through(
    mixed_conversations: list[Conversation],
) -> None:
    merged = group_by_image(mixed_conversations)
    untouched = [c for c in mixed_conversations if len(c.images) != 1]
    assert [c for c in merged if len(c.images) != 1] == untouched


def test_group_by_image_is_a_function_of_the_seed(mixed_conversations: list[Conversation]) -> None:
    assert group_by_image(mixed_conversations, seed=5) == group_by_image(mixed_conversations, seed=5)


@pytest.mark.parametrize("max_turns", [2, 3, 4, 5])
def test_group_by_image_splits_at_max_turns(max_turns: int) -> None:
    image = Path("only.png")
    convs = [single_turn(f"q{i}", image, f"question {i}?", f"answer {i}") for i in range(5)]
    merged = group_by_image(convs, max_turns=max_turns)
    assert all(len(c.turns) <= max_turns for c in merged)
    # Chunks hold whole question/answer pairs, as many as fit, so only the last is shorter.
    pairs_per_chunk = max_turns // 2
    assert [len(c.turns) // 2 for c in merged[:-1]] == [pairs_per_chunk] * (len(merged) - 1)
    assert len(merged) == -(-5 // pairs_per_chunk)
    for conv in merged:
        assert_one_leading_image(conv)
    assert sorted(p for c in merged for p in qa_pairs(c)) == sorted(p for c in convs for p in qa_pairs(c))


def test_group_by_image_rejects_max_turns_below_one_exchange() -> None:
    with pytest.raises(ValueError, match="max_turns"):
        group_by_image([single_turn("q", Path("x.png"), "question?", "answer")], max_turns=1)


def test_group_by_image_drops_system_turns_and_placeholders_anywhere_in_the_question() -> None:
    image = Path("x.png")
    with_system = Conversation(id="s", images=(image,), turns=(
        Turn("system", "be brief"), Turn("user", "what is it?\n<image>"), Turn("assistant", "a star")))
    merged = group_by_image([with_system, single_turn("t", image, "how many?", "1")])
    assert len(merged) == 1
    assert_one_leading_image(merged[0])
    assert sorted(qa_pairs(merged[0])) == [("how many?", "1"), ("what is it?", "a star")]


# --- ImageCache and ConversationDataset ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(SENTENCES * 4, vocab_size=300)


@pytest.fixture()
def image_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.png"
    Image.new("RGB", (24, 20), (200, 30, 30)).save(good)
    other = tmp_path / "other.png"
    Image.new("RGB", (16, 16), (30, 30, 200)).save(other)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()))
    return {"good": good, "other": other, "corrupt": corrupt}


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> Counter[str]:
    """Wrap `tessera.data.datasets.<name>` so that its calls are counted."""
    calls: Counter[str] = Counter()
    original: Callable = getattr(datasets_module, name)

    def wrapper(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(datasets_module, name, wrapper)
    return calls


def test_image_cache_decodes_each_file_once(monkeypatch: pytest.MonkeyPatch, image_files: dict[str, Path]) -> None:
    calls = counting(monkeypatch, "load_image")
    cache = ImageCache(ImageTransform(size=(16, 12)), SkipStats())
    first = cache.get(image_files["good"])
    again = cache.get(image_files["good"])
    assert calls["load_image"] == 1
    assert again is first
    assert first.dtype == torch.uint8 and first.shape == (3, 16, 12)
    assert int(first[0].float().mean()) > 150 > int(first[2].float().mean())  # red stays red
    cache.get(image_files["other"])
    assert calls["load_image"] == 2


def test_image_cache_counts_an_unreadable_file_once(
    monkeypatch: pytest.MonkeyPatch, image_files: dict[str, Path],
) -> None:
    calls = counting(monkeypatch, "load_image")
    skips = SkipStats()
    cache = ImageCache(ImageTransform(size=(16, 16)), skips)
    assert cache.get(image_files["corrupt"]) is None
    assert cache.get(image_files["corrupt"]) is None
    assert calls["load_image"] == 1
    assert skips.reasons == Counter({"unreadable image": 1})
    assert "corrupt.png" in skips.examples["unreadable image"]


def make_dataset(
    tokenizer: Tokenizer, records: list[Conversation], max_length: int = 128,
) -> ConversationDataset:
    images = ImageCache(ImageTransform(size=(16, 16)), SkipStats())
    return ConversationDataset(records, tokenizer, "vicuna", images,
                               lambda height, width: IMAGE_TOKENS_PER_IMAGE, max_length)


def test_conversation_dataset_encodes_once_and_returns_the_same_sample(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer, image_files: dict[str, Path],
) -> None:
    calls = counting(monkeypatch, "encode_conversation")
    dataset = make_dataset(tokenizer, [single_turn("ok", image_files["good"], "what color is the circle?", "red")])
    first, again = dataset[0], dataset[0]
    assert calls["encode_conversation"] == 1
    assert first is not None and again is not None
    assert first.input_ids == again.input_ids and first.labels == again.labels
    assert first.input_ids.count(tokenizer.image_id) == IMAGE_TOKENS_PER_IMAGE
    assert len(first.images) == 1 and first.images[0].shape == (3, 16, 16)
    answer = [t for t, label in zip(first.input_ids, first.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special=False) == " red</s>"  # vicuna's separator, answer, stop
    assert dataset.skips.total == 0


def test_conversation_dataset_returns_none_for_skipped_items_and_counts_each_once(
    monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer, image_files: dict[str, Path],
) -> None:
    calls = counting(monkeypatch, "encode_conversation")
    records = [
        single_turn("fits", image_files["good"], "is there a blue square?", "yes"),
        single_turn("unreadable", image_files["corrupt"], "how many shapes are there?", "2"),
        Conversation(id="too-long", images=(image_files["other"],), turns=(
            Turn("user", "what color is the circle? " * 4 + "<image>"), Turn("assistant", "red"))),
    ]
    # "fits" is 38 tokens with this tokenizer; "too-long" has its image at tokens 55-58, so a
    # cut at 48 would go through the image.
    dataset = make_dataset(tokenizer, records, max_length=48)
    for _ in range(3):  # three epochs
        samples = [dataset[i] for i in range(len(dataset))]
        assert samples[0] is not None and samples[1] is None and samples[2] is None
    assert calls["encode_conversation"] == 2  # the unreadable one is never encoded
    assert dataset.skips.reasons == Counter({"unreadable image": 1, "conversation does not fit the template": 1})
    assert "too-long" in dataset.skips.examples["conversation does not fit the template"]
