"""Reading metrics in pure Python: character error rate, ANLS, and chart-dict accuracy.

- Character error rate (CER): Levenshtein distance (insertions, deletions, substitutions, each
  cost 1) divided by the reference length. Over a set it is the corpus rate, total edits /
  total reference characters, so long texts weigh more (the usual OCR convention); it can
  exceed 1 when a prediction is much longer than its reference.
- ANLS (DocVQA): per question, the best over its reference answers of 1 − NL when NL < 0.5
  and 0 otherwise, NL = distance / max(len(prediction), len(reference)) on lowercased,
  whitespace-collapsed strings; averaged over questions.
- Charts (Vary's chart task): the ground truth is a Python-dict text ``{'red': 3, 'blue': 7}``.
  Relaxed accuracy counts a reference entry right when the prediction has the same key with a
  value within 5 % of it (exact for 0), as in ChartQA; exact match needs the same dict.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (unit costs), O(len(a)·len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _collapse(text: str) -> str:
    return " ".join(text.split())


def character_error_rate(
    prediction: str, reference: str, *, normalize_whitespace: bool = True
) -> float:
    """Edits / reference characters for one pair. With `normalize_whitespace` every run of
    whitespace (newlines included) counts as one space and the ends are stripped. An empty
    reference gives 0 for an empty prediction and 1 otherwise."""
    if normalize_whitespace:
        prediction, reference = _collapse(prediction), _collapse(reference)
    if not reference:
        return float(bool(prediction))
    return edit_distance(prediction, reference) / len(reference)


@dataclass(frozen=True)
class CERScores:
    cer: float  # corpus rate: total edits / total reference characters
    mean_cer: float  # mean of the per-sample rates
    exact: float  # share of predictions equal to their reference (after normalisation)
    edits: int
    reference_chars: int
    count: int
    missing: int  # references without a prediction (scored as empty predictions)


def score_cer(
    predictions: Mapping[str, str],
    references: Mapping[str, str],
    *,
    normalize_whitespace: bool = True,
) -> CERScores:
    """CER over every reference id; an id with no prediction counts as an empty prediction
    (every character deleted) and is counted in `missing`."""
    if not references:
        raise ValueError("score_cer: no references")
    edits = chars = exact = missing = 0
    rates: list[float] = []
    for key, reference in references.items():
        prediction = predictions.get(key)
        if prediction is None:
            missing += 1
            prediction = ""
        if normalize_whitespace:
            prediction, reference = _collapse(prediction), _collapse(reference)
        distance = edit_distance(prediction, reference)
        edits += distance
        chars += len(reference)
        exact += prediction == reference
        rates.append(distance / len(reference) if reference else float(bool(prediction)))
    return CERScores(
        cer=edits / chars if chars else float(edits > 0),
        mean_cer=sum(rates) / len(rates),
        exact=exact / len(references),
        edits=edits,
        reference_chars=chars,
        count=len(references),
        missing=missing,
    )


def anls_single(
    prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD
) -> float:
    """The ANLS score of one prediction against its reference answers."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = _collapse(prediction.lower())
    best = 0.0
    for answer in answers:
        ref = _collapse(answer.lower())
        longest = max(len(pred), len(ref))
        nl = edit_distance(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], threshold: float = ANLS_THRESHOLD
) -> float:
    """Mean ANLS over questions (`answers[i]` are the references of question i)."""
    if len(predictions) != len(answers):
        raise ValueError(f"anls: {len(predictions)} predictions for {len(answers)} questions")
    if not answers:
        raise ValueError("anls: no questions")
    return sum(
        anls_single(p, a, threshold) for p, a in zip(predictions, answers, strict=True)
    ) / len(answers)


# --- charts -------------------------------------------------------------------------------------

_PAIR = re.compile(r"""['"]([^'"]+)['"]\s*:\s*([-+]?\d+(?:\.\d*)?)""")
_MAX_CHART_TEXT = 10_000  # literal_eval on huge model output is pointless and slow


def chart_text(values: Mapping[str, float]) -> str:
    """The Python-dict text of a chart's values, keys in the given order: ``{'red': 3}``."""
    return repr(dict(values))


def parse_chart(text: str) -> dict[str, float] | None:
    """A chart dict from model output, or None when nothing dict-like is in it. A clean dict
    literal is read with ast.literal_eval; otherwise (a missing brace, trailing words) the
    ``'key': number`` pairs are collected; non-numeric values are dropped."""
    text = text.strip()[:_MAX_CHART_TEXT]
    start = text.find("{")
    candidate = text[start:] if start >= 0 else text
    for attempt in (candidate, candidate + "}"):
        try:
            value = ast.literal_eval(attempt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return {
                str(k): float(v)
                for k, v in value.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
    pairs = _PAIR.findall(candidate)
    return {k: float(v) for k, v in pairs} if pairs else None


def _close(predicted: float, reference: float, tolerance: float) -> bool:
    if reference == 0:
        return predicted == 0
    return abs(predicted - reference) <= tolerance * abs(reference)


@dataclass(frozen=True)
class ChartScores:
    relaxed_accuracy: float  # reference entries whose key is predicted with a value within 5 %
    exact_match: float  # charts predicted exactly (same keys, same values)
    unparsable: int  # predictions with no dict in them (all their entries count as wrong)
    count: int


def score_charts(
    predictions: Sequence[str], references: Sequence[str], tolerance: float = RELAXED_TOLERANCE
) -> ChartScores:
    """Relaxed accuracy and exact match of predicted chart dicts against reference dict texts."""
    if len(predictions) != len(references):
        raise ValueError(
            f"score_charts: {len(predictions)} predictions for {len(references)} charts"
        )
    if not references:
        raise ValueError("score_charts: no charts")
    right = total = exact = unparsable = 0
    for prediction, reference_text in zip(predictions, references, strict=True):
        reference = parse_chart(reference_text)
        if not reference:
            raise ValueError(f"score_charts: reference {reference_text[:80]!r} is not a chart dict")
        predicted = parse_chart(prediction)
        if predicted is None:
            unparsable += 1
            predicted = {}
        hits = sum(
            k in predicted and _close(predicted[k], v, tolerance) for k, v in reference.items()
        )
        right += hits
        total += len(reference)
        exact += predicted == reference
    return ChartScores(right / total, exact / len(references), unparsable, len(references))
