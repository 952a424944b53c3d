"""Classification metrics: the zero-shot classifier, its logits and top-k accuracy on hand-made
embeddings; accuracy, majority baseline, per-class accuracy and the closed-set VQA helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tessera.eval.classification import (
    accuracy,
    answer_vocabulary,
    majority_baseline,
    per_class_accuracy,
    soft_scores,
    vqa_bce_loss,
)
from tessera.eval.zeroshot import build_zeroshot_classifier, topk_accuracy, zeroshot_logits

# A fake text encoder: fixed, deliberately NON-unit vectors per prompt.
PROMPT_EMBEDDINGS = {
    "a photo of a cat.": [2.0, 0.0, 0.0],
    "a drawing of a cat.": [0.0, 0.5, 0.0],
    "a photo of a dog.": [0.0, 0.0, 3.0],
    "a drawing of a dog.": [0.0, 0.0, 1.0],
}
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def encode_text(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([PROMPT_EMBEDDINGS[p] for p in prompts])


def test_classifier_is_renormalised_mean_of_normalised_templates() -> None:
    # cat: [2,0,0] -> [1,0,0] and [0,0.5,0] -> [0,1,0]; mean [½,½,0]; renormalised [1/√2, 1/√2, 0].
    # (Averaging before normalising would give [1, 0.25, 0] / 1.03 instead.)
    # dog: [0,0,1] twice -> [0,0,1].
    classifier = build_zeroshot_classifier(encode_text, ["cat", "dog"], TEMPLATES)
    r = 1 / math.sqrt(2)
    assert torch.allclose(classifier, torch.tensor([[r, r, 0.0], [0.0, 0.0, 1.0]]))


def test_logits_are_100_times_cosine_and_topk_reads_them() -> None:
    classifier = build_zeroshot_classifier(encode_text, ["cat", "dog"], TEMPLATES)
    images = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.2]])  # unnormalised on purpose
    logits = zeroshot_logits(images, classifier)
    r = 1 / math.sqrt(2)
    assert torch.allclose(logits, torch.tensor([[100 * r, 0.0], [0.0, 100.0]]))
    assert topk_accuracy(logits, [0, 1], ks=(1, 2)) == {1: 1.0, 2: 1.0}
    assert topk_accuracy(logits, [1, 1], ks=(1, 2)) == {1: 0.5, 2: 1.0}
    assert torch.allclose(zeroshot_logits(images, classifier, scale=1.0), logits / 100)


def test_topk_accuracy_by_hand_with_ties_against_the_prediction() -> None:
    logits = torch.tensor([
        [0.1, 0.7, 0.2, 0.0],  # true 2: only class 1 is higher -> rank 1
        [0.5, 0.5, 0.1, 0.0],  # true 0: tied with class 1 -> rank 1 (pessimistic)
        [0.9, 0.1, 0.2, 0.3],  # true 0 -> rank 0
    ])
    assert topk_accuracy(logits, torch.tensor([2, 0, 0]), ks=(1, 2, 10)) == pytest.approx({1: 1 / 3, 2: 1.0, 10: 1.0})


def test_class_names_that_encode_to_nothing_are_named() -> None:
    with pytest.raises(ValueError, match=r"class 1 has an empty name ' '"):
        build_zeroshot_classifier(encode_text, ["cat", " "], TEMPLATES)
    with pytest.raises(ValueError, match=r"class 0 name 'cat' tokenises to nothing"):
        build_zeroshot_classifier(encode_text, ["cat", "dog"], TEMPLATES, tokenize=lambda s: [] if s == "cat" else [7])
    with pytest.raises(ValueError, match="more than once"):
        build_zeroshot_classifier(encode_text, ["cat", "cat"], TEMPLATES)
    with pytest.raises(ValueError, match="slot"):
        build_zeroshot_classifier(encode_text, ["cat"], ["a photo."])
    with pytest.raises(ValueError, match="labels must lie"):
        topk_accuracy(torch.zeros(1, 2), [2])


def test_accuracy_majority_baseline_and_per_class_accuracy() -> None:
    assert accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) == 1.0
    labels = ["entailment", "neutral", "contradiction", "entailment"]
    # The honest baseline takes its class from the training labels ...
    assert majority_baseline(labels, train_labels=["contradiction", "contradiction", "entailment"]) == (
        "contradiction", 0.25)
    # ... by default from the evaluated labels (the best constant predictor); ties: first seen.
    assert majority_baseline(labels) == ("entailment", 0.5)
    assert majority_baseline(["b", "a", "a", "b"]) == ("b", 0.5)
    predictions = ["entailment", "entailment", "neutral", "contradiction"]
    assert per_class_accuracy(predictions, ["entailment", "neutral", "neutral", "contradiction"]) == {
        "entailment": 1.0, "neutral": 0.5, "contradiction": 1.0}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy([0, 1], [0])


def test_answer_vocabulary_counts_normalised_answers() -> None:
    # "Two" -> "2", "the dog" -> "dog", "?" -> "" (dropped): dog 3, 2 twice, yes twice, no once.
    answers = ["Two", "2", "yes", "yes", "no", "the dog", "dog", "dog", "?"]
    assert answer_vocabulary(answers, min_count=2) == ["dog", "2", "yes"]  # count desc, then alphabetical
    assert answer_vocabulary(answers, min_count=4) == []
    with pytest.raises(ValueError, match="min_count"):
        answer_vocabulary(answers, min_count=0)


def test_soft_scores_are_min_count_over_3_and_1() -> None:
    answers = [
        ["yes"] * 3 + ["no"] * 2 + ["maybe"] * 5,  # yes 3/3 -> 1, no 2/3, maybe not in the vocabulary
        ["dog", "Dog", "a dog", "cat"],  # normalised: dog ×3 -> 1.0
        ["no", "cat"],  # no 1/3
        ["cat"],  # nothing in the vocabulary: an all-zero row
    ]
    expected = torch.tensor([[1.0, 2 / 3, 0.0], [0.0, 0.0, 1.0], [0.0, 1 / 3, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(soft_scores(answers, ["yes", "no", "dog"]), expected)


def test_vqa_bce_loss_sums_over_answers_and_averages_over_questions() -> None:
    # logits 0 everywhere: every element costs log 2; 3 answers -> 3·log 2 per question.
    assert float(vqa_bce_loss(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 1 / 3, 0]]))) == pytest.approx(
        3 * math.log(2))
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 2 / 3], [0.0, 1 / 3, 0.0]])
    per_element = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
    assert torch.allclose(vqa_bce_loss(logits, targets), per_element.sum(1).mean())
