"""BLEU and CIDEr-D against values derived by hand and against coco-caption's published output."""

from __future__ import annotations

import math

import pytest

from tessera.eval.caption_metrics import (
    BleuStatistics,
    bleu_statistics,
    cider_d,
    cider_d_per_item,
    corpus_bleu,
    score_captions,
    tokenize_caption,
)

LN2 = math.log(2)


def test_tokenizer_lowercases_and_strips_punctuation() -> None:
    assert tokenize_caption("A Red-Circle, next to 2 squares!") == ["a", "red", "circle", "next", "to", "2", "squares"]
    assert tokenize_caption("don't   stop_here.") == ["don", "t", "stop", "here"]
    assert tokenize_caption(" ...! ") == []


def test_bleu_of_a_candidate_identical_to_its_reference_is_one() -> None:
    assert corpus_bleu(["A man rides a horse."], [["a man rides a horse"]]) == 1.0
    assert corpus_bleu(["a man rides a horse"], [["a man rides a horse"]], n=1) == 1.0


def test_bleu_worked_example() -> None:
    # candidate "the cat sat on the mat", reference "the cat sat on a mat":
    #   1-grams: the×2 (clipped to 1), cat, sat, on, mat -> 5 of 6
    #   2-grams: the cat, cat sat, sat on match; on the, the mat do not -> 3 of 5
    #   3-grams: the cat sat, cat sat on -> 2 of 4;  4-grams: the cat sat on -> 1 of 3
    #   lengths 6 and 6: no brevity penalty. BLEU-4 = (5/6 · 3/5 · 2/4 · 1/3)^(1/4) = 12^(-1/4)
    stats = bleu_statistics(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert stats == BleuStatistics((5, 3, 2, 1), (6, 5, 4, 3), 6, 6)
    assert math.isclose(stats.score(4), 12 ** -0.25, rel_tol=1e-12)
    assert math.isclose(stats.score(1), 5 / 6, rel_tol=1e-12)


def test_bleu_is_summed_over_the_corpus_with_closest_reference_length() -> None:
    # Add candidate "a dog" with references "a dog runs" (3 words) and "a big dog runs fast" (5):
    #   1-grams 2/2, 2-grams ("a dog") 1/1, no 3- or 4-grams; closest reference length 3.
    # Corpus: p1 = 7/8, p2 = 4/6, p3 = 2/4, p4 = 1/3; c = 6 + 2 = 8 < r = 6 + 3 = 9,
    # so BP = exp(1 - 9/8) -> 0.49278170... (pycocoevalcap 1.2's Bleu(4), run once outside the
    # test suite, returns 0.4927817046117781). A sentence-level average would differ: the
    # second item alone has no 4-gram.
    candidates = ["the cat sat on the mat", "a dog"]
    references = [["the cat sat on a mat"], ["a dog runs", "a big dog runs fast"]]
    expected = (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25 * math.exp(1 - 9 / 8)
    assert bleu_statistics(candidates, references) == BleuStatistics((7, 4, 2, 1), (8, 6, 4, 3), 8, 9)
    assert math.isclose(corpus_bleu(candidates, references), expected, rel_tol=1e-12)


def test_bleu_closest_length_tie_takes_the_shorter_reference() -> None:
    # 4 candidate words, references of 3 and 5 words: both 1 away, the shorter (3) is used, so
    # c = 4 > r = 3 and there is no penalty; every n-gram is in the 5-word reference.
    stats = bleu_statistics(["one two three four"], [["one two three", "one two three four five"]])
    assert stats.reference_length == 3
    assert stats.score(4) == 1.0


def test_bleu_from_coco_caption_published_statistics() -> None:
    # coco-caption's demo (captions_val2014 fakecap results), as printed by its BLEU scorer:
    # {'reflen': 9855, 'guess': [9893, 8893, 7893, 6893], 'testlen': 9893,
    #  'correct': [5732, 2510, 1043, 423]} -> Bleu_1 0.579, Bleu_2 0.404, Bleu_3 0.279, Bleu_4 0.191
    # (github.com/tylin/coco-caption issue #3).
    stats = BleuStatistics((5732, 2510, 1043, 423), (9893, 8893, 7893, 6893), 9893, 9855)
    assert [round(stats.score(n), 3) for n in (1, 2, 3, 4)] == [0.579, 0.404, 0.279, 0.191]


def test_bleu_is_zero_without_any_4gram_match() -> None:
    assert corpus_bleu(["a red circle"], [["a red circle"]]) == 0.0  # no 4-grams at all
    assert corpus_bleu(["a red circle is here"], [["a blue square is there"]]) == 0.0


# Two images: A = "a red circle", B = "a blue square"; one reference each.
# Document frequencies (images whose references contain the n-gram): "a" -> 2, every other
# n-gram of the references -> 1, n-grams only in candidates -> 0. With 2 images the idf is
# log 2 - log(max(1, df)): "a" weighs 0, every other n-gram log 2.
REFS = [["a red circle"], ["a blue square"]]


def test_cider_d_two_image_worked_example() -> None:
    # Image A, candidate "a red circle" = its reference:
    #   n=1 vectors (a:0, red:ln2, circle:ln2) on both sides -> cosine 1; n=2, n=3 likewise 1;
    #   n=4: no 4-grams, the norm is 0 and the term stays 0. Mean over n = 3/4, no length
    #   difference, one reference: 10 · 0.75 = 7.5 (a perfect 3-word caption is not 10).
    # Image B, candidate "a blue circle" vs "a blue square":
    #   n=1: candidate (a:0, blue:ln2, circle:ln2), reference (a:0, blue:ln2, square:ln2);
    #        clipped overlap min(ln2, ln2)·ln2 = ln2² for "blue"; norms √2·ln2 each -> ½
    #   n=2: "a blue" shared (ln2 each), "blue circle" vs "blue square" -> ln2² / (2 ln2²) = ½
    #   n=3: no shared trigram -> 0;  n=4 -> 0.   Mean (½ + ½ + 0 + 0) / 4 = ¼ -> 2.5
    # Corpus CIDEr-D = (7.5 + 2.5) / 2 = 5.0
    # (pycocoevalcap 1.2's Cider().compute_score on the same input, run once outside the test
    # suite, returns 5.000000000000001 and per image [7.5, 2.5].)
    candidates = ["a red circle", "a blue circle"]
    assert cider_d_per_item(candidates, REFS) == pytest.approx([7.5, 2.5], abs=1e-12)
    assert cider_d(candidates, REFS) == pytest.approx(5.0, abs=1e-12)


def test_cider_d_length_penalty_worked_example() -> None:
    # Image B, candidate "a blue" (2 words) vs "a blue square" (3 words):
    #   n=1: candidate (a:0, blue:ln2), norm ln2; reference norm √2·ln2; overlap ln2² -> 1/√2
    #   n=2: candidate ("a blue": ln2), norm ln2; reference norm √2·ln2; overlap ln2² -> 1/√2
    #   n=3, n=4: the candidate has none -> 0
    #   mean over n = (2/√2)/4 = √2/4; Gaussian penalty exp(-(2-3)²/(2·6²)) = exp(-1/72)
    expected_b = 10 * math.sqrt(2) / 4 * math.exp(-1 / 72)
    assert cider_d_per_item(["a red circle", "a blue"], REFS) == pytest.approx([7.5, expected_b], abs=1e-12)


def test_cider_d_averages_over_references() -> None:
    # Image A gains a second reference "green" (a new n-gram, df 1, no effect on A's other weights):
    #   against "a red circle" the per-n values are still (1, 1, 1, 0) -> mean 0.75;
    #   against "green" nothing is shared -> 0. Averaged over the 2 references: 10 · 0.75 / 2 = 3.75.
    refs = [["a red circle", "green"], ["a blue square"]]
    assert cider_d_per_item(["a red circle", "a blue circle"], refs) == pytest.approx([3.75, 2.5], abs=1e-12)
    # A repeated reference changes neither the document frequencies nor the average.
    assert cider_d_per_item(["a red circle"] * 2, [["a red circle"] * 2, ["a blue square"]])[0] == pytest.approx(7.5)


def test_cider_d_of_exact_captions_of_four_or_more_words_is_ten() -> None:
    # No n-gram is shared between the two images, so every weight is log 2 and every order
    # n = 1..4 has a cosine of 1: 10 · mean(1, 1, 1, 1) = 10 for each image.
    refs = [["red circle left of square"], ["blue triangle above green star"]]
    assert cider_d(["Red circle, left of square.", "blue triangle above green star"], refs) == pytest.approx(10.0)


def test_cider_d_of_a_single_image_is_zero() -> None:
    # The idf comes from the evaluated references: with one image, log 1 - log 1 = 0 for all.
    assert cider_d(["red circle left of square"], [["red circle left of square"]]) == 0.0


def test_score_captions_counts_missing_and_extra_predictions() -> None:
    references = {1: ["a red circle"], 2: ["a blue square"]}
    scores = score_captions({1: "a red circle", 7: "stray"}, references)
    assert (scores.count, scores.missing, scores.extra_predictions) == (2, 1, 1)
    assert scores.cider_d_by_item == pytest.approx({1: 7.5, 2: 0.0})
    assert scores.cider_d == pytest.approx(3.75)
    # BLEU-1: 3 of 3 words match, but c = 3 < r = 3 + 3 -> BP = exp(1 - 6/3).
    assert scores.bleu[1] == pytest.approx(math.exp(-1.0))
    assert scores.to_dict()["cider_d"] == pytest.approx(3.75)


def test_bad_corpora_raise() -> None:
    with pytest.raises(ValueError, match="2 candidates for 1"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d(["a"], ["a"])
    with pytest.raises(TypeError):
        corpus_bleu("a cat", [["a cat"]])
