"""Image-text matching (ITM) with hard negatives, as ALBEF and BLIP train it.

For each image a negative text is drawn with probability ∝ softmax of the image's ITC
similarities, the positive excluded, and for each text a negative image likewise. Pairs the
caller marks as the same (a duplicate caption, the same image twice) are excluded too, since
they would be positives labelled 0. The fusion encoder then reads a 3B batch: B positive
pairs (label 1), B images with their negative text and B negative images with their text
(label 0), and a linear head on the [CLS] output classifies match / no match.

A row whose every candidate is excluded (a batch of identical captions) has no negative; its
index is -1 and `itm_batch` leaves that pair out, so no row is ever a false negative.

Shapes: B pairs in the batch (image i matches text i), N image tokens, E_v image width,
L text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NO_NEGATIVE = -1


class ITMHead(nn.Linear):
    """hidden (..., E) → (..., 2) logits [no match, match]; a bare Linear so the weights are
    `itm_head.weight` / `itm_head.bias` as in ALBEF's and Hugging Face's BLIP checkpoints."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, 2)


@dataclass(frozen=True)
class HardNegatives:
    text_for_image: Tensor  # (B,) long: the negative text of each image, -1 where none exists
    image_for_text: Tensor  # (B,) long: the negative image of each text, -1 where none exists


def _draw_excluding(sim: Tensor, excluded: Tensor, generator: torch.Generator | None) -> Tensor:
    """One column per row, P(j) ∝ exp(sim[i, j]) over the columns not excluded; -1 if none."""
    logits = sim.float().masked_fill(excluded, float("-inf"))
    has_candidate = ~excluded.all(dim=1)
    probs = F.softmax(logits[has_candidate], dim=1)
    drawn = torch.full((sim.shape[0],), NO_NEGATIVE, dtype=torch.long, device=sim.device)
    if bool(has_candidate.any()):
        drawn[has_candidate] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return drawn


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    generator: torch.Generator | None = None,
    same_pair: Tensor | None = None,
) -> HardNegatives:
    """sim_i2t (B, B) image → text and sim_t2i (B, B) text → image similarities (already
    divided by the temperature), positives on the diagonal.

    same_pair (B, B) bool, optional: same_pair[i, j] means text j also describes image i (and
    image i is as good as image j for text j), so that pair is never drawn as a negative in
    either direction; the diagonal is always excluded.
    """
    b = sim_i2t.shape[0]
    if sim_i2t.shape != (b, b) or sim_t2i.shape != (b, b):
        raise ValueError(f"similarities must be square (B, B), got {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}")
    excluded = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
    if same_pair is not None:
        if same_pair.shape != (b, b):
            raise ValueError(f"same_pair must be ({b}, {b}), got {tuple(same_pair.shape)}")
        excluded = excluded | same_pair.to(torch.bool)
    return HardNegatives(
        text_for_image=_draw_excluding(sim_i2t, excluded, generator),
        image_for_text=_draw_excluding(sim_t2i, excluded.t(), generator),
    )


@dataclass(frozen=True)
class ITMBatch:
    """The pairs the fusion encoder scores, positives first, then the two kinds of negatives."""

    image_index: Tensor  # (P,) long: which batch image each pair uses
    text_index: Tensor  # (P,) long: which batch text each pair uses
    labels: Tensor  # (P,) long: 1 match, 0 no match
    image_embeds: Tensor  # (P, N, E_v)
    image_mask: Tensor | None  # (P, N) or None
    text: Tensor  # (P, L) ids or (P, L, E) hidden states, whatever the caller gave
    text_mask: Tensor  # (P, L)


def itm_pair_indices(negatives: HardNegatives) -> tuple[Tensor, Tensor, Tensor]:
    """(image_index, text_index, labels) of the P ≤ 3B pairs: B positives (1), each image with
    its negative text (0), each text with its negative image (0); rows without a negative are
    left out."""
    text_neg, image_neg = negatives.text_for_image, negatives.image_for_text
    rows = torch.arange(text_neg.shape[0], device=text_neg.device)
    has_text_neg, has_image_neg = text_neg != NO_NEGATIVE, image_neg != NO_NEGATIVE
    image_index = torch.cat([rows, rows[has_text_neg], image_neg[has_image_neg]])
    text_index = torch.cat([rows, text_neg[has_text_neg], rows[has_image_neg]])
    labels = torch.zeros_like(image_index)
    labels[: rows.shape[0]] = 1
    return image_index, text_index, labels


def itm_batch(
    image_embeds: Tensor,
    text: Tensor,
    text_mask: Tensor,
    negatives: HardNegatives,
    image_mask: Tensor | None = None,
) -> ITMBatch:
    """Gather the 3B pairs: image_embeds (B, N, E_v), text (B, L) ids or (B, L, E) hidden states,
    text_mask (B, L), image_mask (B, N) or None."""
    image_index, text_index, labels = itm_pair_indices(negatives)
    return ITMBatch(
        image_index=image_index,
        text_index=text_index,
        labels=labels,
        image_embeds=image_embeds[image_index],
        image_mask=None if image_mask is None else image_mask[image_index],
        text=text[text_index],
        text_mask=text_mask[text_index],
    )


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """logits (P, 2) from ITMHead on the [CLS] outputs, labels (P,) → mean cross-entropy."""
    return F.cross_entropy(logits.float(), labels)
