"""Fine-tuning heads on a fusion model's multimodal [CLS] state, and their trainer Task:
closed-set VQA, NLVR2-style visual reasoning over image pairs, SNLI-VE-style entailment.

Any model of the fusion-model contract (tessera.train.fusion_tasks) serves as the backbone:

    backbone.fused_features(images: list[Tensor (3, H, W)], input_ids (B, L), attention_mask (B, L))
        -> (B, D) multimodal [CLS] state of image i with text i
    backbone.fused_width -> D

`FusionClassifier` puts ViLT's classifier on top: Linear(k·D, 2D) → LayerNorm → GELU →
Linear(2D, C), where k is the number of images per example. For VQA k = 1 and C is the answer
vocabulary (soft-score BCE); for entailment k = 1, C = 3; for reasoning k = 2: the fused
states of (left image, sentence) and (right image, sentence) are concatenated (ViLT's "pair"
NLVR2 head), C = 2. The head is `head.*`, the backbone `backbone.*` (name them in a stage's
`trainable` / `lr_scale`).

Texts are encoded exactly as in pretraining: "<s> text </s>", right-padded.

Shapes: B examples, K images per example, L tokens, D fused width, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.data.datasets import ImageCache
from tessera.data.records import SkipStats, VQAItem
from tessera.data.task_readers import (
    ENTAILMENT_LABELS,
    REASONING_LABELS,
    AnswerVocabulary,
    EntailmentItem,
    ReasoningItem,
)
from tessera.eval.classification import vqa_bce_loss
from tessera.text.tokenizer import Tokenizer
from tessera.train.fusion_tasks import caption_token_rows, pad_token_rows

LossKind = Literal["ce", "bce"]


class FusionClassifier(nn.Module):
    """A fusion backbone and an MLP head over the concatenated fused states of K (image, text)
    pairs per example (see the module docstring)."""

    def __init__(self, backbone: nn.Module, num_classes: int, images_per_example: int = 1,
                 hidden_size: int | None = None) -> None:
        super().__init__()
        if num_classes < 1 or images_per_example < 1:
            raise ValueError(f"num_classes ({num_classes}) and images_per_example ({images_per_example}) must be ≥ 1")
        width = getattr(backbone, "fused_width", None)
        if not isinstance(width, int) or not callable(getattr(backbone, "fused_features", None)):
            raise TypeError(f"{type(backbone).__name__} lacks fused_features / an int fused_width")
        hidden = hidden_size or 2 * width
        self.backbone = backbone
        self.images_per_example = images_per_example
        self.head = nn.Sequential(
            nn.Linear(images_per_example * width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, images: Sequence[Sequence[Tensor]], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """images[k][b]: image k of example b → logits (B, C). The K passes run as one batch."""
        if len(images) != self.images_per_example:
            raise ValueError(f"expected {self.images_per_example} images per example, got {len(images)} slots")
        batch = input_ids.shape[0]
        if any(len(slot) != batch for slot in images):
            raise ValueError(f"each image slot needs {batch} images, got {[len(s) for s in images]}")
        k = self.images_per_example
        flat = [img for slot in images for img in slot]
        fused = self.backbone.fused_features(flat, input_ids.repeat(k, 1), attention_mask.repeat(k, 1))  # (K·B, D)
        features = torch.cat(fused.split(batch), dim=-1)  # (B, K·D)
        return self.head(features)


@dataclass(frozen=True)
class ClassificationExample:
    """K images, one text, and the target: a class index, or soft scores {class: score} (VQA)."""

    id: str
    images: tuple[Path, ...]
    text: str
    target: int | tuple[tuple[int, float], ...]


@dataclass
class ClassificationBatch:
    images: list[list[Tensor]]  # K slots of B normalised (3, H, W) images
    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L) bool
    targets: Tensor  # (B,) long class indices, or (B, C) float soft scores
    examples: list[int]  # the example index of each row


def vqa_examples(items: Sequence[VQAItem], vocabulary: AnswerVocabulary,
                 skips: SkipStats | None = None) -> list[ClassificationExample]:
    """Question → soft targets over the answer vocabulary (each in-vocabulary answer scores its
    VQA accuracy). Questions none of whose answers is in the vocabulary are skipped and counted
    (they cannot be learned; at evaluation every question is scored regardless)."""
    out: list[ClassificationExample] = []
    for item in items:
        targets = vocabulary.soft_targets(item.answers)
        if not targets:
            if skips is not None:
                skips.skip("no answer in the vocabulary", f"question_id={item.question_id}")
            continue
        out.append(ClassificationExample(str(item.question_id), (item.image,), item.question,
                                         tuple(sorted(targets.items()))))
    return out


def reasoning_examples(items: Sequence[ReasoningItem]) -> list[ClassificationExample]:
    """(left, right) images and the sentence; class index into REASONING_LABELS (True, False)."""
    return [ClassificationExample(i.id, (i.left, i.right), i.sentence, REASONING_LABELS.index(i.label)) for i in items]


def entailment_examples(items: Sequence[EntailmentItem]) -> list[ClassificationExample]:
    """Premise image and hypothesis; class index into ENTAILMENT_LABELS."""
    return [ClassificationExample(i.id, (i.image,), i.hypothesis, ENTAILMENT_LABELS.index(i.label)) for i in items]


class ClassificationTask:
    """Trainer Task (and batch maker for prediction) over ClassificationExamples.

    loss "ce": cross-entropy against class indices; "bce": VQA's soft-score BCE
    (eval.classification.vqa_bce_loss). Examples with an unreadable image or a text that
    tokenises to nothing are skipped and counted.
    """

    def __init__(self, examples: Sequence[ClassificationExample], tokenizer: Tokenizer, images: ImageCache,
                 max_length: int, num_classes: int, loss: LossKind = "ce") -> None:
        if not examples:
            raise ValueError("ClassificationTask got no examples")
        if loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {loss!r}")
        counts = {len(e.images) for e in examples}
        if len(counts) != 1:
            raise ValueError(f"examples mix different numbers of images: {sorted(counts)}")
        self.examples, self.tokenizer, self.images = examples, tokenizer, images
        self.max_length, self.num_classes, self.loss_kind = max_length, num_classes, loss
        self.images_per_example = counts.pop()
        self.skips: SkipStats = images.skips
        self._tokens: dict[int, list[int] | None] = {}

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _token_row(self, index: int) -> list[int] | None:
        if index not in self._tokens:
            text = self.examples[index].text
            row = caption_token_rows(self.tokenizer, [text], self.max_length)[0]
            if row is None:
                self.skips.skip("text is blank or tokenises to nothing", f"example {self.examples[index].id}: {text!r}")
            self._tokens[index] = row
        return self._tokens[index]

    def _target(self, example: ClassificationExample) -> Tensor:
        if self.loss_kind == "ce":
            if not isinstance(example.target, int) or not 0 <= example.target < self.num_classes:
                raise ValueError(f"example {example.id}: target {example.target!r} is not a class below {self.num_classes}")
            return torch.tensor(example.target)
        scores = torch.zeros(self.num_classes)
        if isinstance(example.target, int):
            scores[example.target] = 1.0
        else:
            for index, score in example.target:
                scores[index] = score
        return scores

    def make_batch(self, indices: list[int]) -> ClassificationBatch | None:
        slots: list[list[Tensor]] = [[] for _ in range(self.images_per_example)]
        rows, targets, kept = [], [], []
        for index in indices:
            example = self.examples[index]
            row = self._token_row(index)
            pixels = [self.images.get(p) for p in example.images]
            if row is None or any(px is None for px in pixels):
                continue
            for slot, px in zip(slots, pixels, strict=True):
                assert px is not None
                slot.append(self.images.normalize(px))
            rows.append(row)
            targets.append(self._target(example))
            kept.append(index)
        if not kept:
            return None
        ids, mask = pad_token_rows(rows, self.tokenizer.pad_id)
        return ClassificationBatch(slots, ids, mask, torch.stack(targets), kept)

    def logits(self, model: nn.Module, batch: ClassificationBatch) -> Tensor:
        device = next(model.parameters()).device
        images = [[img.to(device) for img in slot] for slot in batch.images]
        return model(images, batch.input_ids.to(device), batch.attention_mask.to(device))

    def loss(self, model: nn.Module, batch: ClassificationBatch) -> tuple[Tensor, dict[str, float]]:
        logits = self.logits(model, batch).float()
        targets = batch.targets.to(logits.device)
        if self.loss_kind == "bce":
            loss = vqa_bce_loss(logits, targets)
            score = targets.gather(1, logits.argmax(1, keepdim=True)).mean()  # soft score of the argmax
            return loss, {"train_score": float(score)}
        loss = F.cross_entropy(logits, targets)
        return loss, {"train_acc": float((logits.argmax(1) == targets).float().mean())}

    def after_step(self, model: nn.Module) -> None:
        pass

    @torch.no_grad()
    def predict(self, model: nn.Module, batch_size: int = 64) -> list[int | None]:
        """The argmax class of every example, in order; None for a skipped example."""
        model.eval()
        predictions: list[int | None] = [None] * len(self.examples)
        for start in range(0, len(self.examples), batch_size):
            batch = self.make_batch(list(range(start, min(start + batch_size, len(self.examples)))))
            if batch is None:
                continue
            for index, cls in zip(batch.examples, self.logits(model, batch).argmax(1).tolist(), strict=True):
                predictions[index] = cls
        return predictions
