"""Fine-tuning heads on a fusion model's multimodal [CLS] state, and their trainer Task:
closed-set VQA, NLVR2-style visual reasoning over image pairs, SNLI-VE-style entailment; and
`AnswerGenerationTask`, VQA by a model that writes its answers (BLIP's answer decoder).

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

Contrast groups. A task can train on groups of examples instead of single ones
(`ClassificationTask(groups=...)`): the trainer then samples groups and every group's examples
land in the same batch. Reasoning trains on `contrast_groups`: each example paired with one of
the same sentence and the other label (ShapesWorld writes every sentence once true of an image
pair and once false of another pair, which mostly keeps one of the two images; NLVR2 likewise
writes each sentence for several pairs). A sentence alone then says nothing about the label,
while a fused [CLS] varies more with the text than with the image: on randomly drawn batches
the training loss stayed at ln 2 and the heads of all four fusion presets ended on a constant
answer (0.500 on both splits), ALBEF's too, although a probe on its frozen fused states reads
the pairs above chance. In a batch of contrast pairs every sentence comes with both labels, so
only what differs between the images of a pair can lower the loss.

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
from tessera.eval.vqa_metrics import normalize_answer, vqa_accuracy
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
        """images[k][b]: image k of example b → logits (B, C). The K passes run as one batch, in
        which a row (image, text) equal to an earlier one is fused once."""
        if len(images) != self.images_per_example:
            raise ValueError(f"expected {self.images_per_example} images per example, got {len(images)} slots")
        batch = input_ids.shape[0]
        if any(len(slot) != batch for slot in images):
            raise ValueError(f"each image slot needs {batch} images, got {[len(s) for s in images]}")
        k = self.images_per_example
        flat = [img for slot in images for img in slot]
        ids, mask = input_ids.repeat(k, 1), attention_mask.repeat(k, 1)
        unique, inverse = _unique_rows(flat, ids, mask)
        fused = self.backbone.fused_features([flat[i] for i in unique], ids[unique], mask[unique])
        features = torch.cat(fused[inverse].split(batch), dim=-1)  # (B, K·D)
        return self.head(features)


def _unique_rows(images: Sequence[Tensor], input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows (image i, text i) that repeat an earlier row exactly are fused once (a contrast pair
    of reasoning usually keeps one image and always the sentence): (first row of each distinct
    row (U,), index of each row's distinct row (N,)). Images of different sizes never match."""
    first: dict[tuple[tuple[int, ...], bytes, bytes, bytes], int] = {}
    unique: list[int] = []
    inverse: list[int] = []
    mask = attention_mask.bool()
    ids, mask = input_ids.masked_fill(~mask, 0).cpu(), mask.cpu()
    for row, img in enumerate(images):
        key = (tuple(img.shape), img.detach().float().cpu().numpy().tobytes(), ids[row].numpy().tobytes(),
               mask[row].numpy().tobytes())
        if key not in first:
            first[key] = len(unique)
            unique.append(row)
        inverse.append(first[key])
    device = input_ids.device
    return torch.tensor(unique, device=device), torch.tensor(inverse, device=device)


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


def contrast_groups(examples: Sequence[ClassificationExample]) -> list[tuple[int, ...]]:
    """Contrast pairs of class-index examples: in example order, each example is paired with the
    earliest still unpaired example of the same text and another target; examples left without a
    partner form groups of one. Every example is in exactly one group; groups are ordered by
    their first example. On ShapesWorld's reasoning files (each sentence's true and false record
    written one after the other) this gives back the generator's pairs."""
    groups: list[tuple[int, ...]] = []
    waiting: dict[str, list[int]] = {}  # text -> its unpaired examples, in order
    for index, example in enumerate(examples):
        if not isinstance(example.target, int):
            raise ValueError(f"example {example.id}: contrast groups need class-index targets, got {example.target!r}")
        unpaired = waiting.setdefault(example.text, [])
        partner = next((j for j in unpaired if examples[j].target != example.target), None)
        if partner is None:
            unpaired.append(index)
        else:
            unpaired.remove(partner)
            groups.append((partner, index))
    groups.extend((index,) for unpaired in waiting.values() for index in unpaired)
    return sorted(groups)


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

    groups: a partition of the example indices (e.g. `contrast_groups`). With it the trainer's
    units are the groups: `num_examples` counts groups, `make_batch` takes group indices and
    batches all their examples (a stage's batch_size then counts groups). `predict` and
    `batch_of` always take example indices.
    """

    def __init__(self, examples: Sequence[ClassificationExample], tokenizer: Tokenizer, images: ImageCache,
                 max_length: int, num_classes: int, loss: LossKind = "ce",
                 groups: Sequence[Sequence[int]] | None = None) -> None:
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
        self.groups: list[tuple[int, ...]] | None = None
        if groups is not None:
            self.groups = [tuple(g) for g in groups]
            flat = sorted(i for g in self.groups for i in g)
            if any(not g for g in self.groups) or flat != list(range(len(examples))):
                raise ValueError("groups must split the example indices 0..N-1, each into exactly one non-empty group")

    @property
    def num_examples(self) -> int:
        """Training units: groups when the task has them, else examples."""
        return len(self.examples) if self.groups is None else len(self.groups)

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
        """The trainer's batch: `indices` are training units (groups when the task has them)."""
        if self.groups is not None:
            indices = [i for g in indices for i in self.groups[g]]
        return self.batch_of(indices)

    def batch_of(self, indices: list[int]) -> ClassificationBatch | None:
        """A batch of the examples at `indices`; None when every one of them was skipped."""
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
            batch = self.batch_of(list(range(start, min(start + batch_size, len(self.examples)))))
            if batch is None:
                continue
            for index, cls in zip(batch.examples, self.logits(model, batch).argmax(1).tolist(), strict=True):
                predictions[index] = cls
        return predictions


# --- VQA by answer generation (BLIP) ---------------------------------------------------------------


@dataclass
class AnswerBatch:
    images: list[Tensor]  # B normalised images
    input_ids: Tensor  # (B, Lq) "<s> question </s>"
    attention_mask: Tensor  # (B, Lq)
    answer_ids: Tensor  # (R, La) "<s> answer </s>" of each question's distinct answers
    answer_mask: Tensor  # (R, La)
    answer_question: Tensor  # (R,) the question (batch row) each answer row belongs to
    answer_weights: Tensor  # (R,) the answer's VQA accuracy among its question's annotators
    items: list[int]  # the item index of each question row


class AnswerGenerationTask:
    """Trainer Task (and batch maker for prediction) for a model that writes VQA answers
    (`models.blip.BLIPVQA`): each question with each of its distinct (normalised) answers,
    weighted by the VQA accuracy that answer scores. Questions with an unreadable image or a
    question that tokenises to nothing are skipped and counted; answers that tokenise to nothing
    are dropped, and a question left with none is skipped and counted."""

    def __init__(self, items: Sequence[VQAItem], tokenizer: Tokenizer, images: ImageCache, max_length: int) -> None:
        if not items:
            raise ValueError("AnswerGenerationTask got no questions")
        self.items, self.tokenizer, self.images, self.max_length = list(items), tokenizer, images, max_length
        self.skips: SkipStats = images.skips
        self._rows: dict[int, tuple[list[int], list[tuple[list[int], float]]] | None] = {}

    @property
    def num_examples(self) -> int:
        return len(self.items)

    def answer_rows(self, answers: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Candidate answers as "<s> answer </s>" rows (C, La) and their mask; an answer that
        tokenises to nothing raises, naming it."""
        rows = caption_token_rows(self.tokenizer, answers, self.max_length)
        empty = [a for a, r in zip(answers, rows, strict=True) if r is None]
        if empty:
            raise ValueError(f"candidate answers tokenise to nothing: {empty[:5]}")
        return pad_token_rows([r for r in rows if r is not None], self.tokenizer.pad_id)

    def _tokens(self, index: int) -> tuple[list[int], list[tuple[list[int], float]]] | None:
        if index not in self._rows:
            item = self.items[index]
            question = caption_token_rows(self.tokenizer, [item.question], self.max_length)[0]
            distinct = sorted({normalize_answer(a) for a in item.answers})
            # each distinct answer is one of the annotators', so its VQA accuracy (the weight) is > 0
            answers = [(row, vqa_accuracy(a, item.answers))
                       for a, row in zip(distinct, caption_token_rows(self.tokenizer, distinct, self.max_length),
                                         strict=True) if row is not None]
            if question is None or not answers:
                reason = "question tokenises to nothing" if question is None else "no answer that tokenises"
                self.skips.skip(reason, f"question_id={item.question_id}")
                self._rows[index] = None
            else:
                self._rows[index] = (question, answers)
        return self._rows[index]

    def make_batch(self, indices: list[int]) -> AnswerBatch | None:
        """A training batch of the questions at `indices`; None when every one of them was skipped."""
        images, questions, answers, owner, weights, kept = [], [], [], [], [], []
        for index in indices:
            tokens = self._tokens(index)
            pixels = self.images.get(self.items[index].image)
            if tokens is None or pixels is None:
                continue
            question, answer_rows = tokens
            for row, weight in answer_rows:
                answers.append(row)
                owner.append(len(questions))
                weights.append(weight)
            images.append(self.images.normalize(pixels))
            questions.append(question)
            kept.append(index)
        if not kept:
            return None
        ids, mask = pad_token_rows(questions, self.tokenizer.pad_id)
        answer_ids, answer_mask = pad_token_rows(answers, self.tokenizer.pad_id)
        return AnswerBatch(images, ids, mask, answer_ids, answer_mask, torch.tensor(owner),
                           torch.tensor(weights), kept)

    def _question_batch(self, indices: list[int]) -> tuple[list[Tensor], Tensor, Tensor, list[int]] | None:
        """Images, question ids and mask, and item indices of the questions at `indices` that can
        be read, for prediction (their annotated answers are not needed)."""
        images, questions, kept = [], [], []
        rows = caption_token_rows(self.tokenizer, [self.items[i].question for i in indices], self.max_length)
        for index, question in zip(indices, rows, strict=True):
            pixels = self.images.get(self.items[index].image)
            if question is None or pixels is None:
                continue
            images.append(self.images.normalize(pixels))
            questions.append(question)
            kept.append(index)
        if not kept:
            return None
        return (images, *pad_token_rows(questions, self.tokenizer.pad_id), kept)

    def loss(self, model: nn.Module, batch: AnswerBatch) -> tuple[Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        loss = model.loss([img.to(device) for img in batch.images], batch.input_ids.to(device),
                          batch.attention_mask.to(device), batch.answer_ids.to(device),
                          batch.answer_mask.to(device), batch.answer_question.to(device),
                          batch.answer_weights.to(device))
        return loss, {}

    def after_step(self, model: nn.Module) -> None:
        pass

    @torch.no_grad()
    def predict(self, model: nn.Module, candidates: Sequence[str] | None = None, batch_size: int = 64,
                max_new_tokens: int = 8) -> list[str | None]:
        """Every question's answer, in order (None for a question whose image is unreadable or
        whose text tokenises to nothing; its answers are not read): the best-ranked of
        `candidates` by the model's log-likelihood, or, without candidates, a greedy answer."""
        model.eval()
        device = next(model.parameters()).device
        cand = None if candidates is None else [t.to(device) for t in self.answer_rows(candidates)]
        out: list[str | None] = [None] * len(self.items)
        for start in range(0, len(self.items), batch_size):
            batch = self._question_batch(list(range(start, min(start + batch_size, len(self.items)))))
            if batch is None:
                continue
            images, ids, mask, kept = batch
            args = ([img.to(device) for img in images], ids.to(device), mask.to(device))
            if cand is None:
                answers = [self.tokenizer.decode(row).strip() for row in model.generate(*args, max_new_tokens)]
            else:
                assert candidates is not None
                answers = [candidates[c] for c in model.rank(*args, *cand).argmax(1).tolist()]
            for index, answer in zip(kept, answers, strict=True):
                out[index] = answer
        return out
