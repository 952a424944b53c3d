"""VQA accuracy with the official VQA v2 answer normalisation.

Scores produced here are meant to be comparable with published VQA v2 numbers, so the
normalisation follows the official evaluation script rule for rule, including its quirks
(which are noted where they matter). Accuracies are fractions in [0, 1]; the report layer
turns them into percentages.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tessera.data.records import VQAItem

# An answer given by this many annotators (among the ones left after leave-one-out) is
# fully correct; fewer earn a proportional share.
ANNOTATORS_FOR_FULL_CREDIT = 3

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Only these characters count as punctuation; the apostrophe, colon, period (handled on its
# own), '#', '$', '%', '&', '*' and others are left in place, exactly as the official script does.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# The official table, one "written form -> canonical form" pair per line. It is kept verbatim,
# oddities included, because changing any entry would shift scores away from published ones:
# keys with capitals ("Im", "Ive", ...) can never match since words are lowercased first, and
# "somebody'd" maps to "somebodyd" (reversed relative to its neighbours).
_CONTRACTION_PAIRS = """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn't've
couldnt've couldn't've
didnt didn't
doesnt doesn't
dont don't
hadnt hadn't
hadnt've hadn't've
hadn'tve hadn't've
hasnt hasn't
havent haven't
hed he'd
hed've he'd've
he'dve he'd've
hes he's
howd how'd
howll how'll
hows how's
Id've I'd've
I'dve I'd've
Im I'm
Ive I've
isnt isn't
itd it'd
itd've it'd've
it'dve it'd've
itll it'll
let's let's
maam ma'am
mightnt mightn't
mightnt've mightn't've
mightn'tve mightn't've
mightve might've
mustnt mustn't
mustve must've
neednt needn't
notve not've
oclock o'clock
oughtnt oughtn't
ow's'at 'ow's'at
'ows'at 'ow's'at
'ow'sat 'ow's'at
shant shan't
shed've she'd've
she'dve she'd've
she's she's
shouldve should've
shouldnt shouldn't
shouldnt've shouldn't've
shouldn'tve shouldn't've
somebody'd somebodyd
somebodyd've somebody'd've
somebody'dve somebody'd've
somebodyll somebody'll
somebodys somebody's
someoned someone'd
someoned've someone'd've
someone'dve someone'd've
someonell someone'll
someones someone's
somethingd something'd
somethingd've something'd've
something'dve something'd've
somethingll something'll
thats that's
thered there'd
thered've there'd've
there'dve there'd've
therere there're
theres there's
theyd they'd
theyd've they'd've
they'dve they'd've
theyll they'll
theyre they're
theyve they've
twas 'twas
wasnt wasn't
wed've we'd've
we'dve we'd've
weve we've
werent weren't
whatll what'll
whatre what're
whats what's
whatve what've
whens when's
whered where'd
wheres where's
whereve where've
whod who'd
whod've who'd've
who'dve who'd've
wholl who'll
whos who's
whove who've
whyll why'll
whyre why're
whys why's
wont won't
wouldve would've
wouldnt wouldn't
wouldnt've wouldn't've
wouldn'tve wouldn't've
yall y'all
yall'll y'all'll
y'allll y'all'll
yall'd've y'all'd've
y'alld've y'all'd've
y'all'dve y'all'd've
youd you'd
youd've you'd've
you'dve you'd've
youll you'll
youre you're
youve you've
"""

CONTRACTIONS: dict[str, str] = dict(
    (written, canonical)
    for written, canonical in (line.split() for line in _CONTRACTION_PAIRS.strip().splitlines())
)

# A comma between two digits anywhere in the answer ("1,000") switches every punctuation
# mark to deletion instead of replacement by a space, so thousands separators vanish.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")

# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a negative LOOKAHEAD for
# the literal text "<=digit" (a mistyped lookbehind), which never fires in front of a period.
# What remains is "a period not followed by a digit", so "3.5" and ".5" keep their period
# while "dog." and "5." lose it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    # Both tests look at the text as it was on entry, not as it is being rewritten.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result)


def _process_words(text: str) -> str:
    words: list[str] = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


@lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """Normalise an answer the way the official VQA v2 evaluation does.

    Newlines and tabs become spaces; punctuation is removed or replaced by a space (removed
    when it touches a space or when the answer contains a digit-comma-digit such as "1,000");
    periods are dropped unless a digit follows ("3.5" stays); then the text is lowercased,
    number words up to "ten" become digits ("none" -> "0"), the articles a/an/the are dropped,
    contractions written without an apostrophe get one ("dont" -> "don't") and whitespace is
    collapsed.
    """
    # Cached because annotator answers repeat heavily across a VQA split.
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against every annotator's answer.

    For each annotator, that annotator is left out and the prediction scores
    min(1, matches among the remaining answers / 3); the result is the mean over all
    leave-one-out subsets. Both sides are normalised with `normalize_answer`. With fewer than
    10 answers the same formula runs over len(answers); note that a single reference answer
    therefore always scores 0, since leaving it out leaves nothing to match.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == predicted for answer in answers)
    # Leaving out a matching annotator leaves matches - 1 agreeing answers; leaving out any
    # other annotator leaves all of them. Averaging those cases equals the explicit loop.
    others = len(answers) - matches
    score_without_match = min(1.0, (matches - 1) / ANNOTATORS_FOR_FULL_CREDIT)
    score_without_other = min(1.0, matches / ANNOTATORS_FOR_FULL_CREDIT)
    total = matches * score_without_match + others * score_without_other
    return total / len(answers)


@dataclass
class VQAScores:
    """VQA accuracy over one split, overall and per question type (fractions in [0, 1]).

    `missing` items had no prediction and are scored 0 (they are included in every count);
    `extra_predictions` counts predictions whose question id is not among the scored items,
    which usually means predictions and annotations come from different splits.
    """

    accuracy: float
    count: int
    missing: int
    extra_predictions: int
    accuracy_by_type: dict[str, float] = field(default_factory=dict)
    count_by_type: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "count": self.count,
            "missing": self.missing,
            "extra_predictions": self.extra_predictions,
            "accuracy_by_type": dict(self.accuracy_by_type),
            "count_by_type": dict(self.count_by_type),
        }


def score_vqa(predictions: Mapping[int, str], items: Sequence[VQAItem]) -> VQAScores:
    """Score predictions (question_id -> answer) against VQA items.

    Every item counts: an item without a prediction scores 0 and is reported in `missing`.
    Question types appear in `accuracy_by_type` / `count_by_type` in sorted order.
    """
    if len(items) == 0:
        raise ValueError("score_vqa needs at least one item")
    id_counts = Counter(item.question_id for item in items)
    duplicated = sorted(qid for qid, n in id_counts.items() if n > 1)
    if duplicated:
        raise ValueError(f"duplicate question ids among items: {duplicated[:10]}")

    total_by_type: dict[str, float] = defaultdict(float)
    count_by_type: Counter[str] = Counter()
    missing = 0
    for item in items:
        count_by_type[item.question_type] += 1
        prediction = predictions.get(item.question_id)
        if prediction is None:
            missing += 1
            continue
        total_by_type[item.question_type] += vqa_accuracy(prediction, item.answers)

    question_types = sorted(count_by_type)
    return VQAScores(
        accuracy=sum(total_by_type.values()) / len(items),
        count=len(items),
        missing=missing,
        extra_predictions=len(set(predictions) - set(id_counts)),
        accuracy_by_type={t: total_by_type[t] / count_by_type[t] for t in question_types},
        count_by_type={t: count_by_type[t] for t in question_types},
    )
