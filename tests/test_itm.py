"""Image-text matching: hard negatives never hit the positive or a same pair, follow the
softmax of the similarities, and form the 3B batch labelled 1/0/0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.objectives.itm import (
    ITMHead,
    itm_batch,
    itm_loss,
    itm_pair_indices,
    sample_hard_negatives,
)


def draw_counts(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, draws: int, same_pair: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """How often each (row, column) was drawn, per direction, over many calls."""
    gen = torch.Generator().manual_seed(0)
    b = sim_i2t.shape[0]
    text_counts = torch.zeros(b, b)
    image_counts = torch.zeros(b, b)
    rows = torch.arange(b)
    for _ in range(draws):
        neg = sample_hard_negatives(sim_i2t, sim_t2i, gen, same_pair=same_pair)
        text_counts[rows, neg.text_for_image] += 1
        image_counts[rows, neg.image_for_text] += 1
    return text_counts, image_counts


def test_the_positive_is_never_drawn_even_when_it_dominates() -> None:
    sim = torch.randn(6, 6)
    sim.fill_diagonal_(50.0)
    text_counts, image_counts = draw_counts(sim, sim.t().clone(), draws=2000)
    assert text_counts.diagonal().sum() == 0 and image_counts.diagonal().sum() == 0
    assert (text_counts.sum(1) == 2000).all()


def expected_frequencies(sim: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    weights = F.softmax(sim, dim=1).masked_fill(excluded, 0.0)  # ∝ softmax, positive zeroed
    return weights / weights.sum(1, keepdim=True)


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per row, over the allowed columns."""
    draws = counts.sum(1, keepdim=True)
    e = expected * draws
    allowed = expected > 0
    return torch.where(allowed, (counts - e) ** 2 / e.clamp(min=1e-9), torch.zeros_like(e)).sum(1)


def test_draws_follow_the_softmax_in_both_directions() -> None:
    gen = torch.Generator().manual_seed(1)
    sim_i2t = 2.0 * torch.randn(5, 5, generator=gen)
    sim_t2i = 2.0 * torch.randn(5, 5, generator=gen)  # not the transpose: each direction reads its own
    eye = torch.eye(5, dtype=torch.bool)
    text_counts, image_counts = draw_counts(sim_i2t, sim_t2i, draws=4000)
    for counts, sim in ((text_counts, sim_i2t), (image_counts, sim_t2i)):
        stat = chi_square(counts, expected_frequencies(sim, eye))
        # 3 degrees of freedom per row: P(chi2 > 25) ≈ 2e-5.
        assert (stat < 25).all(), stat
    # The wrong direction's softmax must not fit as well (the test can tell them apart).
    assert (chi_square(image_counts, expected_frequencies(sim_i2t, eye)) > 25).any()


def test_same_pairs_are_never_drawn_and_rows_without_negatives_are_dropped() -> None:
    b = 4
    # Texts 0 and 1 are the same caption: for image 0, text 1 is a positive too, and vice versa.
    same = torch.zeros(b, b, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    sim = torch.zeros(b, b)
    sim[:, 1] = 10.0  # text 1 would be everyone's favourite negative
    text_counts, image_counts = draw_counts(sim, sim.t().clone(), draws=500, same_pair=same)
    assert text_counts[0, 1] == 0 and text_counts[1, 0] == 0
    assert image_counts[1, 0] == 0 and image_counts[0, 1] == 0
    assert text_counts[2, 1] > 400  # elsewhere the softmax still prefers it
    # Two images and two identical captions: nothing is a negative.
    all_same = torch.ones(2, 2, dtype=torch.bool)
    neg = sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), same_pair=all_same)
    assert neg.text_for_image.tolist() == [-1, -1] and neg.image_for_text.tolist() == [-1, -1]
    image_index, text_index, labels = itm_pair_indices(neg)
    assert labels.tolist() == [1, 1] and image_index.tolist() == text_index.tolist() == [0, 1]


def test_itm_batch_is_positives_then_image_with_negative_text_then_negative_image_with_text() -> None:
    b, n, length = 3, 4, 5
    image_embeds = torch.arange(b, dtype=torch.float)[:, None, None].expand(b, n, 8).clone()
    image_mask = torch.ones(b, n, dtype=torch.bool)
    text = torch.arange(b)[:, None].expand(b, length).clone() + 100
    text_mask = torch.ones(b, length, dtype=torch.bool)
    text_mask[2, 3:] = False
    sim = torch.randn(b, b)
    neg = sample_hard_negatives(sim, sim.t().clone(), torch.Generator().manual_seed(2))
    batch = itm_batch(image_embeds, text, text_mask, neg, image_mask=image_mask)
    assert batch.labels.tolist() == [1] * b + [0] * (2 * b)
    rows = list(range(b))
    assert batch.image_index.tolist() == rows + rows + neg.image_for_text.tolist()
    assert batch.text_index.tolist() == rows + neg.text_for_image.tolist() + rows
    assert batch.image_embeds[:, 0, 0].long().tolist() == batch.image_index.tolist()
    assert (batch.text[:, 0] - 100).tolist() == batch.text_index.tolist()
    assert torch.equal(batch.text_mask, text_mask[batch.text_index])
    assert batch.image_mask is not None and batch.image_mask.shape == (3 * b, n)
    negatives = slice(b, 3 * b)
    assert (batch.image_index[negatives] != batch.text_index[negatives]).all()


def test_head_and_loss() -> None:
    head = ITMHead(16)
    assert {name for name, _ in head.named_parameters()} == {"weight", "bias"}
    logits = head(torch.randn(6, 16))
    labels = torch.tensor([1, 1, 0, 0, 0, 0])
    assert logits.shape == (6, 2)
    assert torch.allclose(itm_loss(logits, labels), F.cross_entropy(logits, labels))
    confident = torch.tensor([[-9.0, 9.0], [9.0, -9.0]])
    assert itm_loss(confident, torch.tensor([1, 0])) < 1e-6


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same_pair"):
        sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), same_pair=torch.zeros(3, 3, dtype=torch.bool))
