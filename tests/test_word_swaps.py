"""Word swaps for hard-negative captions and noisy captions: what changes, what never does."""

from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F

from tessera.data.shapes import COLORS, SHAPES, SIZES, count_clause
from tessera.objectives.contrastive import clip_loss, siglip_loss
from tessera.text.word_swaps import CountPhrases, WordGroup, WordSwapper


def _changed_words(before: str, after: str) -> list[tuple[str, str]]:
    a, b = re.split(r"\W+", before), re.split(r"\W+", after)
    assert len(a) == len(b), (before, after)
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def test_one_swap_changes_exactly_one_attribute_word_within_its_group() -> None:
    swapper = WordSwapper.for_shapesworld()
    caption = "an image of a large purple diamond and a small green circle."
    groups = {"color": set(COLORS), "shape": set(SHAPES), "size": set(SIZES)}
    seen = set()
    for seed in range(200):
        out = swapper.swap(caption, random.Random(seed))
        assert out is not None and out != caption
        changed = [(x, y) for x, y in _changed_words(caption, out) if x not in ("a", "an")]
        assert len(changed) == 1, out
        old, new = changed[0]
        group = next(name for name, words in groups.items() if old in words)
        assert new in groups[group] and new != old
        seen.add(group)
    assert seen == {"color", "shape", "size"}


def test_articles_follow_the_new_word_and_plurals_stay_plural() -> None:
    swapper = WordSwapper([WordGroup("color", ("orange", "red"))])
    assert swapper.swap("an orange circle.", random.Random(0)) == "a red circle."
    assert swapper.swap("A red circle.", random.Random(0)) == "An orange circle."
    shapes = WordSwapper([WordGroup("shape", ("circle", "cross"), {"circle": "circles", "cross": "crosses"})])
    assert shapes.swap("there are 2 circles.", random.Random(0)) == "there are 2 crosses."


def test_every_swaps_all_words_of_the_chosen_groups_and_none_when_nothing_matches() -> None:
    swapper = WordSwapper.for_shapesworld()
    caption = "a red circle to the left of a blue square."
    out = swapper.swap(caption, random.Random(3), ["color"], every=True)
    assert out is not None
    changed = _changed_words(caption, out)
    assert [x for x, _ in changed if x in COLORS] == ["red", "blue"]
    assert all(x not in SHAPES for x, _ in changed)
    assert swapper.swap("nothing to see here.", random.Random(0)) is None
    with pytest.raises(ValueError, match="unknown word groups"):
        swapper.swap(caption, random.Random(0), ["texture"])


def test_held_out_pairs_are_never_written() -> None:
    swapper = WordSwapper.for_shapesworld({"held_out_combos": [["red", "triangle"]]})
    for seed in range(300):
        out = swapper.swap("a blue triangle and a red circle.", random.Random(seed))
        assert out is None or "red triangle" not in out


def test_groups_are_validated() -> None:
    with pytest.raises(ValueError, match="at least two words"):
        WordGroup("color", ("red",))
    with pytest.raises(ValueError, match="plurals of words not in the group"):
        WordGroup("shape", ("circle", "square"), {"cross": "crosses"})
    with pytest.raises(ValueError, match="unique"):
        WordSwapper([WordGroup("a", ("x", "y")), WordGroup("a", ("u", "v"))])


def test_clip_loss_hard_negatives_are_extra_image_to_text_columns() -> None:
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    negatives = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    scale = torch.tensor(2.0)
    labels = torch.arange(4)
    i2t = scale.exp() * images @ torch.cat([texts, negatives]).t()
    t2i = scale.exp() * texts @ images.t()
    expected = 0.5 * (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels))
    got = clip_loss(images, texts, scale, hard_negative_texts=negatives)
    assert torch.allclose(got, expected, atol=1e-6)
    # A negative equal to an image's own caption is as likely as the positive: the loss rises.
    assert clip_loss(images, texts, scale, hard_negative_texts=texts[:1]) > clip_loss(images, texts, scale)
    assert torch.allclose(clip_loss(images, texts, scale, hard_negative_texts=texts[:0]), clip_loss(images, texts, scale))
    with pytest.raises(ValueError, match="hard_negative_texts"):
        clip_loss(images, texts, scale, hard_negative_texts=negatives[:, :4])


def test_siglip_loss_hard_negatives_are_extra_negative_pairs_of_every_image() -> None:
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    negatives = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    scale, bias = torch.tensor([2.0]), torch.tensor([-3.0])
    logits = scale.exp() * images @ torch.cat([texts, negatives]).t() + bias  # (4, 7)
    signs = -torch.ones(4, 7)
    signs[torch.arange(4), torch.arange(4)] = 1.0
    expected = -F.logsigmoid(signs * logits).sum() / 4
    got = siglip_loss(images, texts, scale, bias, hard_negative_texts=negatives)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(siglip_loss(images, texts, scale, bias, hard_negative_texts=texts[:0]),
                          siglip_loss(images, texts, scale, bias))
    with pytest.raises(ValueError, match="hard_negative_texts"):
        siglip_loss(images, texts, scale, bias, hard_negative_texts=negatives[:, :4])


def test_count_phrases_read_the_count_a_caption_states() -> None:
    counts = CountPhrases(max_count=6)
    assert counts.count("there are 3 shapes: a red circle, a blue cross and a green square.") == 3
    assert counts.count("an image of there is 1 shape: a red circle.") == 1
    assert counts.count("a red circle above a blue cross.") is None
    assert counts.count("there are 9 shapes: ...") is None  # beyond max_count: no target, not a wrong one
    assert counts.phrases() == [f"{count_clause(n)}." for n in range(1, 7)]
    assert counts.phrase(1) == "there is 1 shape." and counts.phrase(2) == "there are 2 shapes."
    assert [counts.count(p) for p in counts.phrases()] == list(range(1, 7))
    with pytest.raises(ValueError, match="max_count"):
        CountPhrases(max_count=1)
    assert CountPhrases.for_shapesworld({"config": {"max_objects": 4}}) == CountPhrases(4)


def test_drop_removes_every_word_of_a_group_and_fixes_articles() -> None:
    swapper = WordSwapper.for_shapesworld()
    assert swapper.drop("an image of a large purple diamond and a small green circle.", ["color"]) == (
        "an image of a large diamond and a small circle.")
    assert swapper.drop("there are 2 shapes: an orange diamond, a yellow triangle and a blue square.", ["color"]) == (
        "there are 2 shapes: a diamond, a triangle and a square.")
    assert swapper.drop("a green circle to the right of an orange diamond.", ["color", "size"]) == (
        "a circle to the right of a diamond.")
    assert swapper.drop("the shape is red.", ["color"]) == "the shape is."  # a last word takes its space along
    assert swapper.drop("a large circle.", ["color"]) == "a large circle."
    with pytest.raises(ValueError, match="unknown word groups"):
        swapper.drop("a red circle.", ["texture"])
