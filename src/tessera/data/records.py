"""Plain records that every reader produces and every dataset consumes.

Readers (LLaVA JSON, COCO captions, VQA v2) turn files into these; nothing downstream
knows which file format a record came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str  # may contain the image placeholder "<image>"


@dataclass(frozen=True)
class Conversation:
    id: str
    images: tuple[Path, ...]  # one entry per "<image>" placeholder, in order
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Caption:
    image_id: int
    image: Path
    caption: str


@dataclass(frozen=True)
class RegionPhrase:
    """One object of an image: its box (x, y, width, height as FRACTIONS of the image's width
    and height, so that it holds at any resize) and a short phrase naming it ("a large red
    circle.")."""

    box: tuple[float, float, float, float]
    phrase: str
    category: str = ""  # the category name alone ("circle"), for category-level objectives


@dataclass(frozen=True)
class VQAItem:
    question_id: int
    image_id: int
    image: Path
    question: str
    question_type: str
    answers: tuple[str, ...]  # every annotator's answer (VQA v2 keeps 10)


@dataclass
class SkipStats:
    """Counts of what a reader or dataset skipped, by reason; printed at the end of a run."""

    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first offender per reason

    def skip(self, reason: str, where: str) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def merge(self, other: SkipStats) -> None:
        self.reasons.update(other.reasons)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 samples"
        parts = [f"{n} × {r} (first: {self.examples[r]})" for r, n in self.reasons.most_common()]
        return f"skipped {self.total} samples: " + "; ".join(parts)
