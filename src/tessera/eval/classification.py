"""Classification metrics and the closed-set VQA training helpers.

Metrics for the tasks scored by accuracy (closed-set VQA, NLVR2-style reasoning, SNLI-VE-style
entailment): accuracy, the majority-class baseline a model must beat, and accuracy per class.
Labels are any hashable values (ints, strings such as "entailment") or a tensor of ints.

Closed-set VQA treats answering as classification over a fixed answer vocabulary with soft
targets: an answer given by `count` annotators scores min(count / 3, 1) (the VQA accuracy
formula without the leave-one-out average; with 10 annotators the averaged values for counts
1, 2, 3 would be 0.3, 0.6, 0.9). Answers are normalised with the official VQA normalisation
(`normalize_answer`), so the vocabulary, the targets and the evaluation agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tessera.eval.vqa_metrics import ANNOTATORS_FOR_FULL_CREDIT, normalize_answer

Labels = Sequence[Hashable] | Tensor


def _as_list(labels: Labels) -> list[Hashable]:
    return labels.tolist() if isinstance(labels, Tensor) else list(labels)


def _paired(predictions: Labels, labels: Labels) -> tuple[list[Hashable], list[Hashable]]:
    predicted, truth = _as_list(predictions), _as_list(labels)
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} labels")
    if not truth:
        raise ValueError("accuracy over no examples")
    return predicted, truth


def accuracy(predictions: Labels, labels: Labels) -> float:
    """Fraction of predictions equal to their label."""
    predicted, truth = _paired(predictions, labels)
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def majority_baseline(labels: Labels, train_labels: Labels | None = None) -> tuple[Hashable, float]:
    """(majority class, accuracy on `labels` of always predicting it). The class is the most
    frequent one in `train_labels` (in `labels` themselves when not given, an upper bound for
    the honest baseline); ties go to the class seen first."""
    truth = _as_list(labels)
    if not truth:
        raise ValueError("majority baseline over no examples")
    source = truth if train_labels is None else _as_list(train_labels)
    if not source:
        raise ValueError("majority baseline needs at least one training label")
    majority = Counter(source).most_common(1)[0][0]
    return majority, sum(t == majority for t in truth) / len(truth)


def per_class_accuracy(predictions: Labels, labels: Labels) -> dict[Hashable, float]:
    """Accuracy (recall) within each TRUE class, for the classes present in `labels`, in order
    of first appearance."""
    predicted, truth = _paired(predictions, labels)
    correct: Counter[Hashable] = Counter()
    total: Counter[Hashable] = Counter()
    for p, t in zip(predicted, truth, strict=True):
        total[t] += 1
        correct[t] += p == t
    return {label: correct[label] / count for label, count in total.items()}


def answer_vocabulary(answers: Iterable[str], min_count: int) -> list[str]:
    """Normalised answers occurring at least `min_count` times, most frequent first (ties
    alphabetical); list index = class id. Pass one answer per question (e.g. VQA v2's
    multiple_choice_answer, as the bottom-up-attention recipe counts them) or every annotator's
    answer — the function counts whatever it is given. Answers that normalise to nothing are
    dropped."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts = Counter(normalized for normalized in map(normalize_answer, answers) if normalized)
    kept = [(answer, count) for answer, count in counts.items() if count >= min_count]
    return [answer for answer, _ in sorted(kept, key=lambda item: (-item[1], item[0]))]


def soft_scores(answers_per_question: Sequence[Sequence[str]], vocab: Sequence[str]) -> Tensor:
    """(Q, V) soft targets: min(annotators giving the answer / 3, 1) for each vocabulary answer.
    Annotator answers are normalised; those outside the vocabulary are ignored, so a question
    none of whose answers is in the vocabulary gets an all-zero row (`scores.sum(1) == 0`
    finds them)."""
    index = {answer: i for i, answer in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError("the answer vocabulary holds repeated answers")
    scores = torch.zeros(len(answers_per_question), len(vocab))
    for row, answers in enumerate(answers_per_question):
        if isinstance(answers, str):
            raise TypeError(f"question {row}: answers must be a sequence of strings, not one string")
        for answer, count in Counter(map(normalize_answer, answers)).items():
            if answer in index:
                scores[row, index[answer]] = min(count / ANNOTATORS_FOR_FULL_CREDIT, 1.0)
    return scores


def vqa_bce_loss(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits against soft targets, averaged over every element and
    multiplied by the number of answers — i.e. summed over answers and averaged over questions,
    the convention of the bottom-up-attention VQA code that keeps the gradient scale
    independent of the vocabulary size."""
    if logits.shape != soft_targets.shape or logits.ndim != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(soft_targets.shape)} must both be (Q, V)")
    return F.binary_cross_entropy_with_logits(logits, soft_targets.to(logits.dtype)) * logits.shape[1]
