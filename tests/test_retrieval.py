"""Retrieval Recall@K on matrices worked by hand, its edge cases, and ITM re-ranking."""

from __future__ import annotations

import pytest
import torch

from tessera.eval.retrieval import rerank_with_itm, retrieval_recall

# 3 images, 5 texts: texts 0-1 caption image 0, texts 2-3 image 1, text 4 image 2.
SIM = torch.tensor([
    [0.1, 0.9, 0.8, 0.2, 0.3],
    [0.9, 0.1, 0.2, 0.5, 0.3],
    [0.5, 0.6, 0.7, 0.8, 0.1],
])
TEXT_TO_IMAGE = [0, 0, 1, 1, 2]


def test_recall_by_hand() -> None:
    # Image→text, rank = wrong texts scoring >= the image's BEST caption:
    #   image 0: best caption is text 1 (0.9) although text 0 scores 0.1 -> rank 0
    #   image 1: best caption text 3 (0.5); text 0 (0.9) is ahead       -> rank 1
    #   image 2: its only caption scores 0.1; all 4 other texts ahead    -> rank 4
    # R@1 = 1/3, R@2 = 2/3, R@5 = 3/3 (5 = the whole gallery of texts).
    # Text→image, per column: text 0 -> image 0 (0.1) behind 0.9 and 0.5 -> rank 2;
    #   text 1 -> rank 0; text 2 -> image 1 (0.2) behind 0.8, 0.7 -> rank 2;
    #   text 3 -> image 1 (0.5) behind 0.8 -> rank 1; text 4 -> image 2 (0.1) behind 0.3, 0.3 -> rank 2.
    # R@1 = 1/5, R@2 = 2/5, R@5 = 5/5 (k clamped to the 3 images).
    scores = retrieval_recall(SIM, TEXT_TO_IMAGE, ks=(1, 2, 5))
    assert scores.image_to_text == pytest.approx({1: 1 / 3, 2: 2 / 3, 5: 1.0})
    assert scores.text_to_image == pytest.approx({1: 1 / 5, 2: 2 / 5, 5: 1.0})
    assert (scores.num_images, scores.num_texts, scores.images_without_captions) == (3, 5, 0)
    assert scores.duplicate_texts is None
    assert scores.to_dict()["t2i_R@2"] == pytest.approx(0.4)


def test_ties_count_against_the_model() -> None:
    flat = torch.zeros(3, 3)
    scores = retrieval_recall(flat, [0, 1, 2], ks=(1, 2, 3))
    assert scores.image_to_text == {1: 0.0, 2: 0.0, 3: 1.0}
    assert scores.text_to_image == {1: 0.0, 2: 0.0, 3: 1.0}


def test_images_without_captions_are_left_out_of_image_to_text_and_counted() -> None:
    # Image 1 has no caption; images 0 and 2 rank their own caption first.
    sim = torch.tensor([[0.9, 0.1], [0.95, 0.95], [0.2, 0.8]])
    scores = retrieval_recall(sim, [0, 2], ks=(1,))
    assert (scores.num_images, scores.images_without_captions) == (2, 1)
    assert scores.image_to_text == {1: 1.0}
    # Text→image still searches all 3 images: image 1 (0.95) beats both true images.
    assert scores.text_to_image == {1: 0.0}


def test_identical_captions_are_counted_and_optionally_matched() -> None:
    texts = ["a red circle", "a blue square", "a red circle"]
    text_to_image = [0, 0, 1]
    # Text 2 ("a red circle", captioning image 1) is closest to image 0, which has the same
    # caption; image 1 is closest to text 0, the same string under image 0.
    sim = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.2, 0.3]])
    by_index = retrieval_recall(sim, text_to_image, ks=(1,), texts=texts)
    assert by_index.duplicate_texts == 2
    assert by_index.text_to_image == pytest.approx({1: 2 / 3})
    assert by_index.image_to_text == {1: 0.5}  # image 1's only caption (0.3) is behind text 0 (0.6)
    matched = retrieval_recall(sim, text_to_image, ks=(1,), texts=texts, identical_texts_match=True)
    assert matched.text_to_image == {1: 1.0}
    assert matched.image_to_text == {1: 1.0}  # image 1 now also owns text 0, its top text
    with pytest.raises(ValueError, match="pass texts"):
        retrieval_recall(sim, text_to_image, identical_texts_match=True)


@pytest.mark.parametrize(
    ("sim", "text_to_image", "match"),
    [
        (torch.zeros(0, 3), [0, 0, 0], "empty gallery"),
        (torch.zeros(3, 0), [], "empty gallery"),
        (torch.zeros(2, 2), [0], "2 texts"),
        (torch.zeros(2, 2), [0, 2], "outside the 2 images"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), [0, 1], "NaN"),
    ],
)
def test_bad_input_raises(sim: torch.Tensor, text_to_image: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_recall(sim, text_to_image)


def test_itm_reranking_by_hand() -> None:
    sim = torch.tensor([[0.5, 0.6, 0.1], [0.2, 0.4, 0.3], [0.3, 0.1, 0.2]])
    itm_table = torch.tensor([[2.0, 0.0, 9.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    calls: list[tuple[int, list[int]]] = []

    def itm(image: int, texts: list[int]) -> torch.Tensor:
        calls.append((image, texts))
        return itm_table[image, texts]

    # ITC alone: image 0 ranks text 1 first, image 2 ranks text 0 first; text 1 and text 2
    # rank image 0 and image 1 first. Both R@1 = 1/3.
    before = retrieval_recall(sim, [0, 1, 2], ks=(1,))
    assert before.image_to_text == pytest.approx({1: 1 / 3})
    assert before.text_to_image == pytest.approx({1: 1 / 3})

    # k = 2. Image→text re-scores {0,1}, {1,2}, {0,2}; ITM + ITC gives
    #   image 0: text 0 2.5, text 1 0.6 (text 2, ITM 9, was not in the top 2 and stays last) -> hit
    #   image 1: text 2 1.3 > text 1 0.4 -> miss;  image 2: text 2 3.2 > text 0 0.3 -> hit
    # Text→image re-scores images {0,2}, {0,1}, {1,2}:
    #   text 0: image 0 2.5 -> hit;  text 1: image 0 0.6 > image 1 0.4 -> miss;
    #   text 2: image 2 3.2 > image 1 1.3 -> hit (image 0, ITM 9, not in its top 2).
    i2t, t2i = rerank_with_itm(sim, itm, k=2)
    assert calls == [(0, [0, 1]), (1, [1, 2]), (2, [0, 2])]  # each needed pair scored once
    assert torch.allclose(i2t[0, :2], torch.tensor([2.5, 0.6]))
    assert float(i2t[0, 2]) < 0.6
    after = retrieval_recall(i2t, [0, 1, 2], ks=(1, 3), t2i_sim=t2i)
    assert after.image_to_text == pytest.approx({1: 2 / 3, 3: 1.0})
    assert after.text_to_image == pytest.approx({1: 2 / 3, 3: 1.0})


def test_rerank_keeps_itc_order_below_the_top_k_and_clamps_k() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    i2t, _ = rerank_with_itm(sim, lambda image, texts: torch.full((len(texts),), -5.0), k=1)
    # Text 0 is re-scored to 0.9 - 5 = -4.1; the others keep their ITC order beneath it.
    assert i2t[0].argsort(descending=True).tolist() == [0, 2, 3, 1]
    everything, both = rerank_with_itm(sim, lambda image, texts: torch.ones(len(texts)), k=10)
    assert torch.allclose(everything, sim + 1) and torch.allclose(both, sim + 1)
    with pytest.raises(ValueError, match="2 scores"):
        rerank_with_itm(sim, lambda image, texts: [0.0, 0.0], k=1)
