"""Image-text retrieval metrics: Recall@K in both directions over a similarity matrix, and the
ITM re-ranking of fusion models (ALBEF / BLIP style).

Conventions, shared by every function here:
- `sim` is (num_images, num_texts); higher means more similar. Each text has exactly one
  source image, `text_to_image[j]`; an image may have any number of captions, zero included.
- Ground truth is by INDEX: text j matches image text_to_image[j] and nothing else, as in the
  COCO / Flickr30K protocol. Identical caption strings under different images are therefore
  counted as misses when retrieved for the "wrong" image; pass `texts` to have them counted
  (`duplicate_texts`), and `identical_texts_match=True` to treat an identical string as a
  caption of every image it describes.
- Image→text: an image's rank is the rank of its BEST ground-truth caption. Images without
  captions cannot be scored; they are left out and counted (`images_without_captions`).
- Ranks are pessimistic on ties: a wrong item scoring EQUAL to the best correct one ranks
  ahead of it, so a degenerate model (all similarities equal) scores no hits instead of
  perfect ones.
- R@k with k at least the gallery size is 1.0: k is clamped to the gallery.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Rows of the similarity matrix handled at once, bounding the boolean temporaries.
_RANK_CHUNK_ROWS = 1024

ItmScoreFn = Callable[[int, list[int]], Tensor | Sequence[float]]


@dataclass
class RetrievalScores:
    """Recall@k (fractions in [0, 1]) keyed by k, per direction.

    `num_images` counts the images scored for image→text (those with at least one caption);
    `duplicate_texts` is the number of texts whose exact string is also a caption of another
    image (None when the strings were not given).
    """

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    num_images: int
    num_texts: int
    images_without_captions: int
    duplicate_texts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f"i2t_R@{k}": v for k, v in self.image_to_text.items()},
            **{f"t2i_R@{k}": v for k, v in self.text_to_image.items()},
            "num_images": self.num_images,
            "num_texts": self.num_texts,
            "images_without_captions": self.images_without_captions,
            "duplicate_texts": self.duplicate_texts,
        }


def _check_similarity(sim: Tensor, name: str) -> None:
    if sim.ndim != 2:
        raise ValueError(f"{name} must be (num_images, num_texts), got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"empty gallery: {name} has shape {tuple(sim.shape)}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def _positives(
    num_images: int, text_to_image: Sequence[int], texts: Sequence[str] | None, identical_texts_match: bool
) -> tuple[Tensor, int | None]:
    """(num_images, num_texts) mask of ground-truth pairs, and the duplicate-text count."""
    num_texts = len(text_to_image)
    bad = [(j, i) for j, i in enumerate(text_to_image) if not 0 <= i < num_images]
    if bad:
        raise ValueError(f"text_to_image points outside the {num_images} images: (text, image) {bad[:5]}")
    positives = torch.zeros(num_images, num_texts, dtype=torch.bool)
    positives[torch.as_tensor(list(text_to_image), dtype=torch.long), torch.arange(num_texts)] = True
    if texts is None:
        if identical_texts_match:
            raise ValueError("identical_texts_match needs the caption strings: pass texts")
        return positives, None
    if len(texts) != num_texts:
        raise ValueError(f"{len(texts)} texts for {num_texts} entries of text_to_image")
    images_of: dict[str, set[int]] = defaultdict(set)
    for text, image in zip(texts, text_to_image, strict=True):
        images_of[text].add(image)
    duplicates = sum(len(images_of[text]) > 1 for text in texts)
    if identical_texts_match:
        for j, text in enumerate(texts):
            positives[sorted(images_of[text]), j] = True
    return positives, duplicates


def _best_positive_ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """Per row: how many non-positive columns score at least as high as the row's best
    positive (0 means retrieved first). Rows without positives get the column count."""
    ranks = []
    for start in range(0, scores.shape[0], _RANK_CHUNK_ROWS):
        block, mask = scores[start : start + _RANK_CHUNK_ROWS], positives[start : start + _RANK_CHUNK_ROWS]
        best = block.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((block >= best) & ~mask).sum(dim=1))
    return torch.cat(ranks)


def _recall(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    return {k: float((ranks < k).float().mean()) for k in ks}


def retrieval_recall(
    sim: Tensor,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    *,
    t2i_sim: Tensor | None = None,
    texts: Sequence[str] | None = None,
    identical_texts_match: bool = False,
) -> RetrievalScores:
    """Recall@k for image→text and text→image retrieval (see the module docstring).

    `sim` ranks texts for each image, and texts' images too unless `t2i_sim` (same shape) is
    given — as after `rerank_with_itm`, whose two directions re-rank different pairs. `texts`
    (the caption strings, aligned with text_to_image) enables the duplicate count and
    `identical_texts_match`. Raises ValueError on an empty gallery, a shape mismatch, an image
    index out of range, non-finite similarities or a k below 1.
    """
    _check_similarity(sim, "sim")
    t2i_sim = sim if t2i_sim is None else t2i_sim
    _check_similarity(t2i_sim, "t2i_sim")
    if t2i_sim.shape != sim.shape:
        raise ValueError(f"t2i_sim shape {tuple(t2i_sim.shape)} differs from sim shape {tuple(sim.shape)}")
    num_images, num_texts = sim.shape
    if len(text_to_image) != num_texts:
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {num_texts} texts")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {list(ks)}")
    positives, duplicates = _positives(num_images, text_to_image, texts, identical_texts_match)
    positives = positives.to(sim.device)

    captioned = positives.any(dim=1)
    image_ranks = _best_positive_ranks(sim[captioned], positives[captioned])
    text_ranks = _best_positive_ranks(t2i_sim.t(), positives.t())
    return RetrievalScores(
        image_to_text=_recall(image_ranks, ks),
        text_to_image=_recall(text_ranks, ks),
        num_images=int(captioned.sum()),
        num_texts=num_texts,
        images_without_captions=num_images - int(captioned.sum()),
        duplicate_texts=duplicates,
    )


def _fuse_top(sim: Tensor, fused: Tensor, rescored: Tensor, dim: int) -> Tensor:
    """Re-scored entries keep `fused`; the rest keep their ITC order, shifted along `dim`
    to sit strictly below the lowest re-scored entry."""
    lowest_rescored = fused.masked_fill(~rescored, float("inf")).amin(dim=dim, keepdim=True)
    highest_rest = sim.masked_fill(rescored, float("-inf")).amax(dim=dim, keepdim=True)
    return torch.where(rescored, fused, sim - highest_rest + lowest_rescored - 1.0)


def rerank_with_itm(sim: Tensor, itm_score_fn: ItmScoreFn, k: int) -> tuple[Tensor, Tensor]:
    """Re-rank the ITC top-k with score = ITM + ITC, as fusion models do for retrieval.

    For each image, its k best texts by `sim` (ITC) are re-scored with
    itm_score_fn(image, texts) + sim; for each text, its k best images likewise. Everything
    else keeps its ITC order below the re-scored entries of its row (image→text) or column
    (text→image), so recalls at depths beyond k fall back to ITC. k is clamped to the gallery.

    `itm_score_fn(image_index, text_indices)` returns one ITM score per text (e.g. the ITM
    head's "match" logit; BLIP adds it to the raw ITC similarity, which is what `sim` should
    then hold). It is called once per image that needs any score, with all the texts that image
    needs in ascending order, so every pair is scored once.

    Returns (i2t_scores, t2i_scores), both (num_images, num_texts):
    `retrieval_recall(i2t_scores, text_to_image, t2i_sim=t2i_scores)`.
    """
    _check_similarity(sim, "sim")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    num_images, num_texts = sim.shape
    top_texts = sim.topk(min(k, num_texts), dim=1).indices  # (num_images, k)
    top_images = sim.topk(min(k, num_images), dim=0).indices  # (k, num_texts)

    needed: dict[int, set[int]] = defaultdict(set)
    for image, texts in enumerate(top_texts.tolist()):
        needed[image].update(texts)
    for text, images in enumerate(top_images.t().tolist()):
        for image in images:
            needed[image].add(text)

    itm = torch.zeros_like(sim)
    for image in sorted(needed):
        texts = sorted(needed[image])
        scores = torch.as_tensor(itm_score_fn(image, texts), dtype=sim.dtype, device=sim.device).flatten()
        if scores.shape[0] != len(texts):
            raise ValueError(f"itm_score_fn gave {scores.shape[0]} scores for image {image} and {len(texts)} texts")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"itm_score_fn gave non-finite scores for image {image}")
        itm[image, texts] = scores

    fused = sim + itm
    image_rescored = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top_texts, True)
    text_rescored = torch.zeros_like(sim, dtype=torch.bool).scatter_(0, top_images, True)
    return _fuse_top(sim, fused, image_rescored, dim=1), _fuse_top(sim, fused, text_rescored, dim=0)
