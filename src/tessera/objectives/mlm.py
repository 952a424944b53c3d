"""Masked language modelling (MLM) of the fusion encoders: BERT's token masking (with the
whole-word variant ViLT uses), the prediction head tied to the word embeddings, and the loss,
with soft targets for ALBEF's momentum distillation.

Masking: each maskable token (or, with word ids, each word: all of its sub-tokens together) is
selected with probability `prob`; a selected token becomes [MASK] 80% of the time, a random
token 10%, and stays unchanged 10% (decided per token, as BERT's own whole-word masking does).
Labels hold the original id at selected tokens and -100 elsewhere.

The head's parameter names match Hugging Face's BertOnlyMLMHead (`cls.` in BertForMaskedLM):
predictions.transform.{dense, LayerNorm}, predictions.decoder (weight tied to the word
embeddings), predictions.bias (the same Parameter as predictions.decoder.bias).

Shapes: B rows, L tokens, E hidden size, V vocabulary, M masked (supervised) positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.data.templates import IGNORE_INDEX
from tessera.nn.layers import activation_fn
from tessera.objectives.lm import next_token_loss
from tessera.text.bert import BertConfig

MASK_FRACTION = 0.8  # of the selected tokens, replaced by [MASK]
RANDOM_FRACTION = 0.1  # replaced by a random token; the remaining 10% stay unchanged


def mask_tokens(
    input_ids: Tensor,
    special_mask: Tensor,
    vocab_size: int,
    mask_id: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    whole_word_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """input_ids (B, L) → (masked ids (B, L), labels (B, L) with -100 where not selected).

    special_mask (B, L) bool: True at special tokens and padding, which are never selected.
    whole_word_ids (B, L): the index of the word each token belongs to (unique within a row,
    e.g. a tokenizer's word_ids()), negative for tokens outside any word; each word is selected
    with probability `prob` and then all its tokens are. Random replacements are drawn from the
    whole vocabulary, as BERT does.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"masking prob must be in (0, 1), got {prob}")
    if special_mask.shape != input_ids.shape:
        raise ValueError(f"special_mask {tuple(special_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    device = input_ids.device
    maskable = ~special_mask.to(torch.bool)
    if whole_word_ids is None:
        selected = (torch.rand(input_ids.shape, generator=generator, device=device) < prob) & maskable
    else:
        if whole_word_ids.shape != input_ids.shape or input_ids.dim() != 2:
            raise ValueError(
                f"whole_word_ids {tuple(whole_word_ids.shape)} must match input_ids (B, L) {tuple(input_ids.shape)}"
            )
        in_word = whole_word_ids >= 0
        num_words = int(whole_word_ids.max()) + 1 if bool(in_word.any()) else 1
        word_chosen = torch.rand((input_ids.shape[0], num_words), generator=generator, device=device) < prob
        selected = word_chosen.gather(1, whole_word_ids.clamp(min=0).long()) & in_word & maskable
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    to_mask = selected & (action < MASK_FRACTION)
    to_random = selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


class MLMPredictionTransform(nn.Module):
    """LayerNorm(act(dense(x)))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation_fn(cfg.act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MLMPredictions(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding | None) -> None:
        super().__init__()
        self.transform = MLMPredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        nn.init.zeros_(self.decoder.bias)
        if word_embeddings is not None:
            if word_embeddings.weight.shape != self.decoder.weight.shape:
                raise ValueError(
                    f"word embeddings {tuple(word_embeddings.weight.shape)} do not fit the head "
                    f"({cfg.vocab_size}, {cfg.hidden_size})"
                )
            self.decoder.weight = word_embeddings.weight
        # Hugging Face keeps the output bias under both names; one Parameter serves both keys.
        self.bias = self.decoder.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class MLMHead(nn.Module):
    """hidden (..., E) → vocabulary logits (..., V); decoder weight tied to `word_embeddings`."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        self.predictions = MLMPredictions(cfg, word_embeddings)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.predictions(hidden)


def mlm_logits(hidden: Tensor, head: nn.Module, labels: Tensor) -> Tensor:
    """Logits (M, V) at the masked positions only, in the order of `(labels != -100).nonzero()`.

    The momentum model's logits for distillation targets are taken here too, at the positions
    of the main model's labels.
    """
    return head(hidden[labels != IGNORE_INDEX])


def mlm_loss(hidden: Tensor, head: nn.Module, labels: Tensor, soft_targets: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the M masked positions of hidden (B, L, E).

    soft_targets (M, V), rows summing to 1, replace the one-hot labels: ALBEF's momentum
    distillation passes momentum.distillation_targets(mlm_logits(hidden_m, head_m, labels),
    one_hot(labels[labels != -100]), alpha), which gives (1 - α)·CE + α·KD-cross-entropy.
    """
    if soft_targets is None:
        return next_token_loss(hidden, head, labels)
    logits = mlm_logits(hidden, head, labels)
    if soft_targets.shape != logits.shape:
        raise ValueError(f"soft_targets {tuple(soft_targets.shape)} do not match the masked logits {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("batch has no masked token (every label is -100)")
    return F.cross_entropy(logits.float(), soft_targets.float())
