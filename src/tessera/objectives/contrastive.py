"""Image-text contrastive loss (ITC) of CLIP: symmetric cross-entropy over the similarity
matrix, positives on the diagonal.

Shapes: N pairs, P embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """image_emb, text_emb (N, P) unit-norm; logit_scale is the LOG of the scale."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
