"""Next-token cross-entropy for decoders, computed only where a target exists.

The collator has already shifted targets per sample (targets[t] = token t+1 of the same
sample, -100 elsewhere), so a packed row needs no special care here. Projecting only the
supervised positions onto the vocabulary skips the work for prompts, images and padding.

Shapes: B rows, L tokens, E width, V vocabulary, M supervised positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.data.templates import IGNORE_INDEX as IGNORE


def next_token_loss(hidden: Tensor, lm_head: nn.Module, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """hidden (B, L, E), targets (B, L) → mean loss over the M supervised positions.

    hidden may also be (M, E), the supervised rows alone: what a decoder called with
    `keep=targets != -100` returns (its last layer then skips the other positions too).
    """
    keep = targets != IGNORE
    if not bool(keep.any()):
        raise ValueError("batch has no supervised token (every target is -100)")
    rows = hidden if hidden.dim() == 2 else hidden[keep]
    if rows.shape[0] != keep.sum():
        raise ValueError(f"hidden has {rows.shape[0]} rows but targets supervise {int(keep.sum())} positions")
    logits = lm_head(rows)  # (M, V)
    return F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)


@torch.no_grad()
def token_accuracy(hidden: Tensor, lm_head: nn.Module, targets: Tensor) -> float:
    keep = targets != IGNORE
    return float((lm_head(hidden[keep]).argmax(-1) == targets[keep]).float().mean())
