"""Captions with attribute words swapped for others of their kind.

Two uses, one implementation:
- hard-negative captions for contrastive pretraining (NegCLIP, Yuksekgonul et al. 2023): the
  caption of an image with ONE colour, shape or size word swapped is a text that differs from
  the true one only in what the image must show, so the image tower has to encode it;
- CapFilt's noisy "web" captions (capfilt.corrupt_captions): every colour word, every shape word
  or both swapped.

A third helper, `CountPhrases`, reads the number a caption states ("there are 3 shapes: a red
circle, ...") and writes that count clause alone ("there are 3 shapes."), for the dual encoders'
count objective (train.tasks.ContrastiveTask, after CountCLIP).

A `WordSwapper` holds groups of interchangeable words (a group may give plural forms, which are
swapped for plurals) and colour-shape pairs that a swap must never write (the held-out pairs of
a compositional test split). Articles are fixed ("an orange" → "a red") so that grammar gives no
swap away.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_ARTICLES = ("a", "an")
_TRIES = 20


@dataclass(frozen=True)
class WordGroup:
    """Words that can replace one another. `plurals` maps a word to its plural form."""

    name: str
    words: tuple[str, ...]
    plurals: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.words) < 2:
            raise ValueError(f"word group {self.name!r} needs at least two words, got {list(self.words)}")
        unknown = set(self.plurals) - set(self.words)
        if unknown:
            raise ValueError(f"word group {self.name!r}: plurals of words not in the group: {sorted(unknown)}")


@dataclass(frozen=True)
class _Spot:
    index: int  # position in the token list (words at even indices)
    group: WordGroup
    singular: str
    plural: bool


class WordSwapper:
    """Swaps words of `groups` in captions; never writes a pair of adjacent words (singular
    forms) listed in `held_out_pairs`."""

    def __init__(self, groups: Sequence[WordGroup], held_out_pairs: Sequence[Sequence[str]] = ()) -> None:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"word group names must be unique, got {names}")
        self.groups = {g.name: g for g in groups}
        self.held_out = {(a, b) for a, b in held_out_pairs}
        self._lookup: dict[str, tuple[WordGroup, str, bool]] = {}
        for g in groups:
            for w in g.words:
                self._lookup[w] = (g, w, False)
            for w, p in g.plurals.items():
                self._lookup[p] = (g, w, True)

    @classmethod
    def for_shapesworld(cls, meta: Mapping | None = None) -> WordSwapper:
        """Colours, shapes (with plurals) and sizes of ShapesWorld; `meta` (a dataset's
        meta.json) supplies its word lists and held-out combos, else the defaults."""
        from tessera.data.shapes import COLORS, PLURALS, SHAPES, SIZES

        meta = meta or {}
        colors = tuple(meta.get("colors", COLORS))
        shapes = tuple(meta.get("shapes", SHAPES))
        sizes = tuple(meta.get("sizes", SIZES))
        plurals = {s: PLURALS.get(s, s + "s") for s in shapes}
        return cls([WordGroup("color", colors), WordGroup("shape", shapes, plurals), WordGroup("size", sizes)],
                   held_out_pairs=meta.get("held_out_combos", ()))

    def swap(self, caption: str, rng: random.Random, groups: Sequence[str] | None = None, *,
             every: bool = False) -> str | None:
        """`caption` with words of `groups` (default: all) swapped: one occurrence chosen at
        random, or with `every` all of them (each replaced independently). None when the caption
        has no such word or every try writes a held-out pair."""
        wanted = set(self.groups) if groups is None else set(groups)
        unknown = wanted - set(self.groups)
        if unknown:
            raise ValueError(f"unknown word groups {sorted(unknown)}; known: {sorted(self.groups)}")
        tokens = re.split(r"(\W+)", caption)  # words at even indices, separators at odd ones
        spots = [_Spot(i, *self._lookup[t]) for i, t in enumerate(tokens)
                 if i % 2 == 0 and t in self._lookup and self._lookup[t][0].name in wanted]
        if not spots:
            return None
        for _ in range(_TRIES):
            out = list(tokens)
            for spot in spots if every else [rng.choice(spots)]:
                new = rng.choice([w for w in spot.group.words if w != spot.singular])
                out[spot.index] = spot.group.plurals.get(new, new) if spot.plural else new
                _fix_article(out, spot.index)
            if not self._writes_held_out(out):
                return "".join(out)
        return None

    def drop(self, caption: str, groups: Sequence[str]) -> str:
        """`caption` without the words of `groups` ("an orange circle" → "a circle" for
        "color"): each word goes with the separator after it (before it when last), and articles
        are fixed."""
        unknown = set(groups) - set(self.groups)
        if unknown:
            raise ValueError(f"unknown word groups {sorted(unknown)}; known: {sorted(self.groups)}")
        tokens = re.split(r"(\W+)", caption)
        for i in range(len(tokens) - 1, -1, -2):  # words sit at even indices; go backwards to delete
            if tokens[i] in self._lookup and self._lookup[tokens[i]][0].name in groups:
                if i + 1 < len(tokens) and tokens[i + 1].isspace():
                    del tokens[i: i + 2]
                elif i > 0 and tokens[i - 1].isspace():
                    del tokens[i - 1: i + 1]
                else:  # a word between punctuation: keep the separators, join them
                    tokens[i] = ""
        for i in range(0, len(tokens), 2):
            _fix_article(tokens, i)
        return "".join(tokens)

    def _writes_held_out(self, tokens: list[str]) -> bool:
        if not self.held_out:
            return False
        words = [self._lookup[t][1] if t in self._lookup else t for t in tokens[::2] if t]
        return bool(set(zip(words, words[1:], strict=False)) & self.held_out)


def _fix_article(tokens: list[str], index: int) -> None:
    """Make the article two tokens before `index` (if any) agree with the word now there."""
    if index < 2 or tokens[index - 2].lower() not in _ARTICLES:
        return
    article = "an" if tokens[index][:1].lower() in "aeiou" else "a"
    tokens[index - 2] = article.capitalize() if tokens[index - 2][:1].isupper() else article


_COUNT_CLAUSE = re.compile(r"\bthere (?:is|are) (\d+) shapes?\b")


@dataclass(frozen=True)
class CountPhrases:
    """The count clauses of ShapesWorld's captions, as `tessera.data.shapes.count_clause` writes
    them, for counts 1..`max_count`."""

    max_count: int

    def __post_init__(self) -> None:
        if self.max_count < 2:
            raise ValueError(f"counting needs max_count >= 2 (one count is no choice), got {self.max_count}")

    @classmethod
    def for_shapesworld(cls, meta: Mapping | None = None) -> CountPhrases:
        """`meta` (a dataset's meta.json) supplies the largest object count, else the default."""
        from tessera.data.shapes import ShapesConfig

        config = (meta or {}).get("config")
        return cls(int(config["max_objects"]) if isinstance(config, Mapping) else ShapesConfig().max_objects)

    def count(self, caption: str) -> int | None:
        """The count a caption states, or None when it states none (or one outside 1..max_count)."""
        match = _COUNT_CLAUSE.search(caption)
        if match is None or not 1 <= int(match.group(1)) <= self.max_count:
            return None
        return int(match.group(1))

    def phrase(self, count: int) -> str:
        """The clause alone: "there is 1 shape.", "there are 3 shapes."."""
        from tessera.data.shapes import count_clause

        return f"{count_clause(count)}."

    def phrases(self) -> list[str]:
        """The phrase of every count 1..max_count, in order (index = count − 1)."""
        return [self.phrase(n) for n in range(1, self.max_count + 1)]
