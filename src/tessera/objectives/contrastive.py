"""Image-text contrastive losses of the dual encoders, on one process or across many.

- clip_loss (CLIP's ITC): symmetric cross-entropy over the similarity matrix, positives on the
  diagonal.
- siglip_loss (SigLIP): pairwise sigmoid loss, label +1 on the diagonal and -1 elsewhere,
  summed over all pairs and divided by the number of images.
- region_phrase_loss: boxes of objects against short phrases naming them ("a large red
  circle."), the local signal that makes a ViT's patch tokens encode what sits where (and
  images against the count phrases, "there are 3 shapes.").
- bank_itc_loss (ALBEF's and BLIP's ITC): images and texts scored against banks of candidates
  (momentum features of the batch plus a queue) with soft targets (`positive_targets` spread
  over every candidate of the same image, mixed with momentum distillation); one process.

clip_loss and siglip_loss take the LOG of the scale (t' with t = exp t'), as the models store it. With
`distributed=True` under an initialised torch.distributed process group, each rank passes its
LOCAL embeddings and the loss covers the GLOBAL batch: the other ranks' embeddings arrive
through `gather_with_grad`, this rank's positives sit at columns offset by the sizes of the
ranks before it (batch · rank when all local batches are equal), and each rank returns its
share such that the MEAN over ranks equals the single-process loss over the global batch.
Averaging gradients over ranks (DDP) then gives the single-process gradients exactly.
Local batches may differ in size across ranks.

Shapes: n local pairs, N global pairs (n = N on one process), P embedding width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from tessera.objectives.distributed import gather_sizes, gather_with_grad, world_size_and_rank


def _check_pairs(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"expected image and text embeddings of the same shape (n, P), got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )


def _global_layout(local_size: int, device: torch.device, distributed: bool,
                   group: dist.ProcessGroup | None) -> tuple[list[int], int, int]:
    """(every rank's batch size, first global index of this rank's block, world size)."""
    world, rank = world_size_and_rank(group) if distributed else (1, 0)
    sizes = gather_sizes(local_size, device, group) if world > 1 else [local_size]
    if sum(sizes) == 0:
        raise ValueError("contrastive loss over an empty batch")
    return sizes, sum(sizes[:rank]), world


def _with_hard_negatives(all_texts: Tensor, hard_negative_texts: Tensor | None, world: int,
                         group: dist.ProcessGroup | None) -> Tensor:
    """The global texts (N, P) followed by every rank's hard negatives (M, P), gathered with gradient."""
    if hard_negative_texts is None:
        return all_texts
    if hard_negative_texts.ndim != 2 or hard_negative_texts.shape[1] != all_texts.shape[1]:
        raise ValueError(f"hard_negative_texts must be (m, {all_texts.shape[1]}), got {tuple(hard_negative_texts.shape)}")
    if world > 1:
        negative_sizes = gather_sizes(hard_negative_texts.shape[0], all_texts.device, group)
        hard_negative_texts = gather_with_grad(hard_negative_texts, group, negative_sizes)
    return torch.cat([all_texts, hard_negative_texts])


def clip_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, *, hard_negative_texts: Tensor | None = None,
    distributed: bool = False, group: dist.ProcessGroup | None = None,
) -> Tensor:
    """CLIP's symmetric ITC loss. image_emb, text_emb (n, P) unit-norm, pair i matching pair i;
    logit_scale is the LOG of the scale.

    On one process: 0.5 · (CE(rows of s·I·Tᵀ, diagonal) + CE(columns, diagonal)), each a mean
    over the batch. With `distributed=True` this rank's images are scored against ALL texts and
    its texts against ALL images; the returned share is (world / N) · 0.5 · (sum of this rank's
    row losses + its column losses), whose mean over ranks is the global loss.

    `hard_negative_texts` (m, P), NegCLIP's hard negatives (captions with a word swapped, see
    text/word_swaps.py): extra columns of the image→text softmax only, never a positive and
    never a row of text→image. Distributed, every rank's hard negatives are gathered as the
    texts are, so the loss stays the single-process loss over the global batch.
    """
    _check_pairs(image_emb, text_emb)
    sizes, start, world = _global_layout(image_emb.shape[0], image_emb.device, distributed, group)
    all_images = gather_with_grad(image_emb, group, sizes) if world > 1 else image_emb
    all_texts = _with_hard_negatives(gather_with_grad(text_emb, group, sizes) if world > 1 else text_emb,
                                     hard_negative_texts, world, group)
    scale = logit_scale.exp()
    image_to_text = scale * image_emb @ all_texts.t()  # (n, N [+ M hard negatives])
    text_to_image = scale * text_emb @ all_images.t()  # (n, N)
    labels = torch.arange(start, start + image_emb.shape[0], device=image_emb.device)
    summed = F.cross_entropy(image_to_text, labels, reduction="sum") + F.cross_entropy(
        text_to_image, labels, reduction="sum"
    )
    return 0.5 * summed * (world / sum(sizes))


def siglip_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor, *,
    hard_negative_texts: Tensor | None = None, distributed: bool = False, group: dist.ProcessGroup | None = None,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss. image_emb, text_emb (n, P) unit-norm; logit_scale is t'
    (the LOG of t) and logit_bias is b, scalars or shape (1,) as SigLIPDualEncoder stores them.

    On one process: -(1/N) · sum_ij log σ(z_ij · (t · x_i·y_j + b)) with z_ij = +1 for i = j and
    -1 otherwise — summed over all pairs, normalised per image as in the SigLIP paper.

    With `distributed=True` the text blocks of all ranks are all-gathered (with gradient) and
    this rank's images are scored against every text; another rank's texts can only be
    negatives for these images, so +1 appears only in this rank's own block. The returned share
    is (world / N) · (this rank's sum), whose mean over ranks is the global loss; every
    image-text pair is counted once, on the rank that holds the image. The all-gather is used
    rather than the paper's ring of neighbour exchanges because it reuses the one
    gradient-correct collective; it holds an (n, N) logit block per rank where the ring holds
    (n, n) at a time, which only matters at batch sizes far beyond Tessera's CPU scale.

    `hard_negative_texts` (m, P) are further texts paired with every image as negatives (−1),
    gathered from all ranks as the texts are, as in clip_loss.
    """
    _check_pairs(image_emb, text_emb)
    sizes, start, world = _global_layout(image_emb.shape[0], image_emb.device, distributed, group)
    all_texts = gather_with_grad(text_emb, group, sizes) if world > 1 else text_emb
    all_texts = _with_hard_negatives(all_texts, hard_negative_texts, world, group)
    logits = logit_scale.exp() * image_emb @ all_texts.t() + logit_bias  # (n, N [+ M hard negatives])
    local = torch.arange(image_emb.shape[0], device=logits.device)
    signs = torch.full_like(logits, -1.0)
    signs[local, start + local] = 1.0
    return -F.logsigmoid(signs * logits).sum() * (world / sum(sizes))


def region_phrase_loss(region_emb: Tensor, phrase_emb: Tensor, targets: Tensor, logit_scale: Tensor) -> Tensor:
    """Region-level ITC (as RegionCLIP / GLIP align boxes with phrases): each region (M, P) is
    classified among the batch's distinct phrases (U, P) by scaled cosine, targets (M,) the
    index of its own phrase; mean cross-entropy. logit_scale is the LOG of the scale, shared
    with the image-level loss. Local to each process. Also the count objective's loss (whole
    images against the count phrases, train.tasks.ContrastiveTask)."""
    if region_emb.ndim != 2 or phrase_emb.ndim != 2 or region_emb.shape[1] != phrase_emb.shape[1]:
        raise ValueError(f"expected regions (M, P) and phrases (U, P), got {tuple(region_emb.shape)} and "
                         f"{tuple(phrase_emb.shape)}")
    return F.cross_entropy(logit_scale.exp() * region_emb @ phrase_emb.t(), targets)


def positive_targets(positives: Tensor) -> Tensor:
    """positives (n, C) bool → (n, C) float targets: each row spread evenly over its positives
    (ALBEF's and BLIP's retrieval ITC, where several candidates show the same image)."""
    counts = positives.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("every row needs at least one positive candidate")
    return positives.float() / counts


def bank_itc_loss(
    image_emb: Tensor, text_emb: Tensor, image_bank: Tensor, text_bank: Tensor, temperature: Tensor,
    targets_i2t: Tensor, targets_t2i: Tensor,
) -> Tensor:
    """ITC of ALBEF and BLIP: each image is scored against a bank of texts and each text against
    a bank of images (the momentum model's features of the batch, then the queue), with soft
    targets.

    image_emb, text_emb (n, P) unit-norm; image_bank, text_bank (C, P); temperature τ, the
    divisor itself (ALBEF stores τ, not its log); targets_i2t, targets_t2i (n, C), rows summing
    to 1 (`positive_targets`, possibly mixed with the momentum model's softmax by
    momentum.distillation_targets). Returns 0.5 · (CE(I·T_bankᵀ/τ, targets_i2t) +
    CE(T·I_bankᵀ/τ, targets_t2i)), CE(s, q) = mean over rows of −Σ_c q_c log softmax(s)_c.
    """
    _check_pairs(image_emb, text_emb)
    if image_bank.shape != text_bank.shape or image_bank.shape[1:] != image_emb.shape[1:]:
        raise ValueError(
            f"banks must be (C, {image_emb.shape[1]}) both, got {tuple(image_bank.shape)} and {tuple(text_bank.shape)}"
        )
    expected = (image_emb.shape[0], image_bank.shape[0])
    if targets_i2t.shape != expected or targets_t2i.shape != expected:
        raise ValueError(f"targets must be {expected}, got {tuple(targets_i2t.shape)} and {tuple(targets_t2i.shape)}")
    sim_i2t = image_emb.float() @ text_bank.float().t() / temperature
    sim_t2i = text_emb.float() @ image_bank.float().t() / temperature
    return 0.5 * (F.cross_entropy(sim_i2t, targets_i2t.float()) + F.cross_entropy(sim_t2i, targets_t2i.float()))
