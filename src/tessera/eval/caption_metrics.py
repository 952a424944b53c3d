"""Captioning metrics as the COCO caption evaluation (coco-caption / pycocoevalcap) defines
them: corpus BLEU-1..4 and CIDEr-D, in pure Python.

Tokenisation. coco-caption runs the Stanford PTB tokenizer and drops punctuation tokens;
Tessera uses a documented stand-in instead (`tokenize_caption`): lowercase, every character
that is not a letter, digit or whitespace becomes a space, split on whitespace. It differs
from PTB on contractions and inner punctuation ("don't" -> "don t", PTB: "do n't";
"3.5" -> "3 5"), so scores on such text can differ slightly from published ones; on
lowercase captions without punctuation inside words the two agree.

BLEU (Papineni et al., 2002, computed as coco-caption does): candidate n-gram counts are
clipped by the maximum count in any one reference; clipped matches and candidate n-grams are
summed over the CORPUS, BLEU-n is the geometric mean of the n precisions 1..n, times one
brevity penalty exp(1 - r/c) when c < r, where c is the total candidate length and r the sum,
over candidates, of the reference length CLOSEST to the candidate's (ties -> the shorter).
coco-caption adds 1e-15 / 1e-9 to every precision's numerator / denominator; here a zero
precision gives exactly 0, where coco-caption gives a tiny positive number.

CIDEr-D (Vedantam et al., 2015, the coco-caption "CIDEr"): n = 1..4; each sentence is a TF-IDF
vector per n (raw n-gram counts times log(#images) - log(max(1, df)), df = the number of
images whose reference set contains the n-gram); per reference and n, the candidate's counts
are clipped by the reference's, the cosine-style product is multiplied by a Gaussian length
penalty exp(-(len_c - len_r)² / (2·6²)); the per-n values are averaged over n = 1..4 and over
the references, times 10; the corpus score is the mean over images. The idf comes from the
evaluated references themselves, so CIDEr-D is a corpus measure: with a single image every
weight is log 1 - log 1 = 0 and the score is 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_NGRAM = 4
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0

_NOT_WORD = re.compile(r"[^\w\s]|_")

NGram = tuple[str, ...]


def tokenize_caption(text: str) -> list[str]:
    """Lowercase, punctuation (anything not a letter, digit or whitespace) to spaces, split."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter[NGram]:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of captions, not one string")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if len(candidates) == 0:
        raise ValueError("caption metrics need at least one candidate")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"item {index}: references must be a non-empty list of captions, got {refs!r}")


@dataclass(frozen=True)
class BleuStatistics:
    """Corpus totals BLEU is computed from, index n-1 for n-grams of size n (the same numbers
    coco-caption prints as correct / guess / testlen / reflen)."""

    correct: tuple[int, ...]  # clipped n-gram matches
    guess: tuple[int, ...]  # candidate n-grams
    candidate_length: int
    reference_length: int  # sum of the closest reference lengths

    def score(self, n: int = MAX_NGRAM) -> float:
        """BLEU-n: geometric mean of precisions 1..n times the corpus brevity penalty."""
        if not 1 <= n <= len(self.correct):
            raise ValueError(f"BLEU-{n} needs n-gram statistics up to {n}; have {len(self.correct)}")
        if self.candidate_length == 0 or any(c == 0 for c in self.correct[:n]):
            return 0.0
        log_precision = sum(math.log(c / g) for c, g in zip(self.correct[:n], self.guess[:n], strict=True)) / n
        brevity = min(0.0, 1.0 - self.reference_length / self.candidate_length)
        return math.exp(log_precision + brevity)


def bleu_statistics(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = MAX_NGRAM
) -> BleuStatistics:
    """Clipped matches, candidate n-grams and the two lengths, summed over the corpus."""
    _check_corpus(candidates, references)
    correct, guess = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references, strict=True):
        words = tokenize_caption(candidate)
        ref_words = [tokenize_caption(r) for r in refs]
        max_ref_counts: Counter[NGram] = Counter()
        for counts in (_ngram_counts(r, max_n) for r in ref_words):
            max_ref_counts |= counts  # element-wise maximum
        for ngram, count in _ngram_counts(words, max_n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_n + 1):
            guess[n - 1] += max(len(words) - n + 1, 0)
        candidate_length += len(words)
        reference_length += min((len(r) for r in ref_words), key=lambda length: (abs(length - len(words)), length))
    return BleuStatistics(tuple(correct), tuple(guess), candidate_length, reference_length)


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = MAX_NGRAM) -> float:
    """Corpus BLEU-n (BLEU-4 by default) of one candidate per item against its references."""
    return bleu_statistics(candidates, references, max_n=n).score(n)


@dataclass
class _TfIdf:
    weights: list[dict[NGram, float]]  # per n-gram size
    norms: list[float]
    length: int  # words


def _tf_idf(counts: Counter[NGram], length: int, df: Counter[NGram], log_num_images: float, max_n: int) -> _TfIdf:
    weights: list[dict[NGram, float]] = [{} for _ in range(max_n)]
    for ngram, count in counts.items():
        weights[len(ngram) - 1][ngram] = count * (log_num_images - math.log(max(1, df[ngram])))
    norms = [math.sqrt(sum(w * w for w in by_n.values())) for by_n in weights]
    return _TfIdf(weights, norms, length)


def _cider_similarity(candidate: _TfIdf, reference: _TfIdf, sigma: float) -> float:
    """Mean over n of the clipped, length-penalised cosine of one candidate and one reference.

    coco-caption measures length in bigrams; the difference equals the difference in words
    whenever both sentences have a word, and otherwise the similarity is already 0."""
    penalty = math.exp(-((candidate.length - reference.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for cand_n, ref_n, cand_norm, ref_norm in zip(
        candidate.weights, reference.weights, candidate.norms, reference.norms, strict=True
    ):
        if cand_norm == 0.0 or ref_norm == 0.0:
            continue
        overlap = sum(min(w, ref_n[g]) * ref_n[g] for g, w in cand_n.items() if g in ref_n)
        total += overlap / (cand_norm * ref_norm) * penalty
    return total / len(candidate.weights)


def cider_d_per_item(
    candidates: Sequence[str], references: Sequence[Sequence[str]],
    sigma: float = CIDER_SIGMA, max_n: int = MAX_NGRAM,
) -> list[float]:
    """CIDEr-D of each candidate (×10 scale), with document frequencies from all references."""
    _check_corpus(candidates, references)
    ref_counts = [[_ngram_counts(tokenize_caption(r), max_n) for r in refs] for refs in references]
    ref_lengths = [[len(tokenize_caption(r)) for r in refs] for refs in references]
    df: Counter[NGram] = Counter()
    for counts_of_item in ref_counts:
        df.update(set().union(*counts_of_item))
    log_num_images = math.log(len(references))
    scores = []
    for candidate, counts_of_item, lengths in zip(candidates, ref_counts, ref_lengths, strict=True):
        words = tokenize_caption(candidate)
        cand = _tf_idf(_ngram_counts(words, max_n), len(words), df, log_num_images, max_n)
        total = sum(
            _cider_similarity(cand, _tf_idf(counts, length, df, log_num_images, max_n), sigma)
            for counts, length in zip(counts_of_item, lengths, strict=True)
        )
        scores.append(CIDER_SCALE * total / len(counts_of_item))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_per_item` (10 = every candidate matches every
    reference perfectly, in sentences of at least 4 words)."""
    per_item = cider_d_per_item(candidates, references, sigma)
    return sum(per_item) / len(per_item)


@dataclass
class CaptionScores:
    """Corpus BLEU-1..4 and CIDEr-D of a split, plus CIDEr-D per item.

    `missing` items had no prediction and were scored as an empty caption (0 for the item,
    and its closest reference length still counts in BLEU's brevity penalty);
    `extra_predictions` counts predictions for ids that are not among the references.
    """

    bleu: dict[int, float]
    cider_d: float
    count: int
    missing: int
    extra_predictions: int
    cider_d_by_item: dict[Hashable, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f"bleu_{n}": v for n, v in self.bleu.items()},
            "cider_d": self.cider_d,
            "count": self.count,
            "missing": self.missing,
            "extra_predictions": self.extra_predictions,
        }


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> CaptionScores:
    """Score predicted captions (item id -> caption) against references (item id -> captions)."""
    ids = list(references)
    candidates = [predictions.get(item, "") for item in ids]
    refs = [references[item] for item in ids]
    stats = bleu_statistics(candidates, refs)
    per_item = cider_d_per_item(candidates, refs)
    return CaptionScores(
        bleu={n: stats.score(n) for n in range(1, MAX_NGRAM + 1)},
        cider_d=sum(per_item) / len(per_item),
        count=len(ids),
        missing=sum(item not in predictions for item in ids),
        extra_predictions=len(set(predictions) - set(references)),
        cider_d_by_item=dict(zip(ids, per_item, strict=True)),
    )
