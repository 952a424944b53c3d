"""VQA answer normalisation and accuracy, checked against the official script's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera.data.records import VQAItem
from tessera.eval.vqa_metrics import (
    CONTRACTIONS,
    VQAScores,
    normalize_answer,
    score_vqa,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # case, surrounding whitespace, newline / tab
        ("  Yes ", "yes"),
        ("red\nand\tblue", "red and blue"),
        ("  two   dogs  ", "2 dogs"),
        # number words up to ten, "none" and "zero" are 0, larger ones untouched
        ("Two", "2"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("twenty two", "twenty 2"),
        # articles dropped as whole words only
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("another", "another"),
        ("the", ""),
        # periods: kept only before a digit
        ("3.5", "3.5"),
        ("dog.", "dog"),
        ("5.", "5"),
        (".5", ".5"),
        ("a.m.", "am"),
        # commas: a digit-comma-digit anywhere deletes all punctuation instead of spacing it
        ("1,000", "1000"),
        ("1,000,000", "1000000"),
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),
        ("1,2 red-blue", "12 redblue"),
        # other marks: removed when touching a space, else replaced by a space
        ("black-and-white", "black and white"),
        ("black - white", "black white"),
        ("yes!", "yes"),
        ("what?", "what"),
        ("(left)", "left"),
        ("on/off", "on off"),
        ("t_shirt", "t shirt"),
        # not in the official list: left as they are
        ("10:30", "10:30"),
        ("50%", "50%"),
        ("don't", "don't"),
        # contractions gain their apostrophe; capitalised table keys never match
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Whats", "what's"),
        ("oclock", "o'clock"),
        ("cant see", "can't see"),
        ("Im", "im"),
        # number mapping, article removal and contractions together
        ("The two dogs dont", "2 dogs don't"),
        ("", ""),
    ],
)
def test_normalize_answer_matches_official_rules(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_contraction_table_is_the_full_official_one() -> None:
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["wouldnt've"] == "wouldn't've"
    assert CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert CONTRACTIONS["twas"] == "'twas"
    assert all(" " not in key and " " not in value for key, value in CONTRACTIONS.items())


def _leave_one_out_by_loop(prediction: str, answers: list[str]) -> float:
    scores = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],
)
def test_accuracy_with_ten_annotators(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    # the closed form given in the design notes
    k = matches
    by_formula = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
    assert vqa_accuracy("cat", answers) == pytest.approx(by_formula)


@pytest.mark.parametrize("n_answers", [1, 2, 3, 4, 5, 7])
def test_accuracy_with_fewer_annotators_uses_the_same_formula(n_answers: int) -> None:
    for matches in range(n_answers + 1):
        answers = ["yes"] * matches + ["no"] * (n_answers - matches)
        expected = _leave_one_out_by_loop("yes", answers)
        assert vqa_accuracy("yes", answers) == pytest.approx(expected)
    # a lone reference answer is always left out, so nothing remains to match
    assert vqa_accuracy("yes", ["yes"]) == 0.0


def test_accuracy_normalises_both_sides() -> None:
    answers = ["Two", "2", "two.", "2 ", "dogs", "two", "3", "2", "a 2", "2!"]
    assert vqa_accuracy("TWO", answers) == 1.0
    # two of three agree: (2 * min(1, 1/3) + 1 * min(1, 2/3)) / 3
    assert vqa_accuracy("1,000", ["1000", "1000", "1 000"]) == pytest.approx(4 / 9)


def test_accuracy_rejects_empty_or_string_answers() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


def _item(question_id: int, question_type: str, answers: tuple[str, ...]) -> VQAItem:
    return VQAItem(
        question_id=question_id,
        image_id=question_id,
        image=Path(f"{question_id}.jpg"),
        question="?",
        question_type=question_type,
        answers=answers,
    )


def test_score_vqa_aggregates_per_question_type_and_counts_missing() -> None:
    items = [
        _item(1, "how many", ("2",) * 10),  # correct -> 1.0
        _item(2, "how many", ("3",) * 2 + ("4",) * 8),  # 2 of 10 agree -> 0.6
        _item(3, "what color", ("red",) * 10),  # wrong -> 0.0
        _item(4, "what color", ("blue",) * 10),  # no prediction -> 0.0
        _item(5, "is this", ("yes",) * 10),  # no prediction -> 0.0
    ]
    predictions = {1: "two", 2: "3", 3: "green", 99: "orphan"}
    scores = score_vqa(predictions, items)

    assert scores.count == 5
    assert scores.missing == 2
    assert scores.extra_predictions == 1
    assert scores.accuracy == pytest.approx((1.0 + 0.6) / 5)
    assert list(scores.accuracy_by_type) == ["how many", "is this", "what color"]
    assert scores.accuracy_by_type["how many"] == pytest.approx(0.8)
    assert scores.accuracy_by_type["what color"] == 0.0
    assert scores.accuracy_by_type["is this"] == 0.0
    assert scores.count_by_type == {"how many": 2, "is this": 1, "what color": 2}


def test_score_vqa_with_every_prediction_missing_scores_zero() -> None:
    scores = score_vqa({}, [_item(1, "what", ("a",) * 10)])
    assert (scores.accuracy, scores.count, scores.missing) == (0.0, 1, 1)


def test_score_vqa_rejects_empty_and_duplicate_items() -> None:
    with pytest.raises(ValueError):
        score_vqa({1: "yes"}, [])
    with pytest.raises(ValueError, match="duplicate"):
        score_vqa({1: "yes"}, [_item(1, "is", ("yes",)), _item(1, "is", ("yes",))])


def test_scores_to_dict_is_plain_data() -> None:
    scores = VQAScores(
        accuracy=0.5,
        count=2,
        missing=1,
        extra_predictions=0,
        accuracy_by_type={"what": 0.5},
        count_by_type={"what": 2},
    )
    assert scores.to_dict() == {
        "accuracy": 0.5,
        "count": 2,
        "missing": 1,
        "extra_predictions": 0,
        "accuracy_by_type": {"what": 0.5},
        "count_by_type": {"what": 2},
    }
