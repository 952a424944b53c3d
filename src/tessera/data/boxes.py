"""Bounding boxes as text: the Qwen-VL and CogVLM formats, written from pixel boxes and read
back from whatever a model emits.

Pixel boxes are ``(x0, y0, x1, y1)`` with x1, y1 exclusive (ShapesWorld's convention). In text
both formats carry integer coordinates normalised to the image size and quantised to
[0, 1000): ``v = min(999, floor(1000 · x / size))``; reading back maps v to the pixel
``(v / 1000) · size``, so a round trip moves a corner by at most size / 1000 pixels.

    Qwen-VL   <ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>      corners as points
    CogVLM    the red circle[[x0,y0,x1,y1]]                            three digits, zero-padded;
                                                                       several boxes: [[a,b,c,d;e,f,g,h]]

Reading (``parse_boxes`` / ``parse_box``) never raises on model output. It tolerates what models
actually emit: extra spaces, missing closing tags or brackets (``<box>(1,2),(3,4)``,
``[[1,2,3,4``), no tags at all (``(1,2),(3,4)``, ``[1,2,3,4]``), swapped corners (sorted back),
floats (rounded), values out of range (clipped to [0, 999]), several boxes (``parse_boxes``
returns all in order of appearance, ``parse_box`` the first). Anything that is not a box of
that shape — a bracket list of three or five numbers, a lone point, words where numbers
belong, no box at all — is skipped (Qwen-VL points are read in pairs, so a stray third point
is ignored): ``parse_box`` returns None and the grounding metric counts it as
unparsable. ``require_box`` is the strict form for training data: it raises BoxParseError
with the offending text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

BoxFormat = Literal["qwen", "cogvlm"]
BOX_FORMATS: tuple[BoxFormat, ...] = ("qwen", "cogvlm")
NORM_BINS = 1000  # coordinates live in [0, NORM_BINS)
MAX_COORD = NORM_BINS - 1

PixelBox = tuple[float, float, float, float]
NormBox = tuple[int, int, int, int]

_NUM = r"[-+]?\d+(?:\.\d*)?"
# Qwen-VL: two points, the closing parenthesis of the second and the tags optional.
_QWEN = re.compile(
    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*(?:\)|(?=\s*(?:</box>|$)))"
)
# CogVLM: one or two opening brackets, groups of numbers separated by ';', closing brackets
# optional. Arity is checked after matching.
_COG = re.compile(r"\[\[?([-+\d.,;\s]*)(?:\]\]?)?")
_REF = re.compile(r"<ref>(.*?)</ref>", re.S)
_BOX_TAGS = re.compile(r"</?box>|</?ref>")


class BoxParseError(ValueError):
    """Text that should hold a box (training data) but does not; the message quotes it."""


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got width={width} height={height}")


def _quantise(value: float, size: float) -> int:
    return min(MAX_COORD, max(0, math.floor(NORM_BINS * value / size)))


def normalize_box(box: Sequence[float], width: float, height: float) -> NormBox:
    """Pixel box (x0, y0, x1, y1) → integer coordinates in [0, 1000), corners sorted."""
    _check_size(width, height)
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise ValueError(f"a box is four finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (
        _quantise(x0, width),
        _quantise(y0, height),
        _quantise(x1, width),
        _quantise(y1, height),
    )


def denormalize_box(box: Sequence[float], width: float, height: float) -> PixelBox:
    """Normalised coordinates → pixel box in the image of that size."""
    _check_size(width, height)
    x0, y0, x1, y1 = box
    return (
        x0 / NORM_BINS * width,
        y0 / NORM_BINS * height,
        x1 / NORM_BINS * width,
        y1 / NORM_BINS * height,
    )


def box_text(box: NormBox, fmt: BoxFormat) -> str:
    """The coordinates alone: ``<box>(x1,y1),(x2,y2)</box>`` or ``[[x0,y0,x1,y1]]``."""
    x0, y0, x1, y1 = box
    if fmt == "qwen":
        return f"<box>({x0},{y0}),({x1},{y1})</box>"
    if fmt == "cogvlm":
        return f"[[{x0:03d},{y0:03d},{x1:03d},{y1:03d}]]"
    raise ValueError(f"unknown box format {fmt!r}; known: {list(BOX_FORMATS)}")


def format_box(
    box: Sequence[float], width: float, height: float, fmt: BoxFormat, ref: str | None = None
) -> str:
    """A pixel box as text in `fmt`, after the referring phrase `ref` when given
    (``<ref>ref</ref><box>…</box>`` or ``ref[[…]]``)."""
    coords = box_text(normalize_box(box, width, height), fmt)
    if ref is None:
        return coords
    return f"<ref>{ref}</ref>{coords}" if fmt == "qwen" else f"{ref}{coords}"


def format_boxes(
    boxes: Sequence[Sequence[float]],
    width: float,
    height: float,
    fmt: BoxFormat,
    ref: str | None = None,
) -> str:
    """Several boxes of one phrase: Qwen-VL repeats <box>, CogVLM separates them with ';'."""
    if not boxes:
        raise ValueError("format_boxes needs at least one box")
    norm = [normalize_box(b, width, height) for b in boxes]
    if fmt == "qwen":
        coords = "".join(box_text(b, fmt) for b in norm)
        return coords if ref is None else f"<ref>{ref}</ref>{coords}"
    if fmt != "cogvlm":
        raise ValueError(f"unknown box format {fmt!r}; known: {list(BOX_FORMATS)}")
    coords = "[[" + ";".join(",".join(f"{v:03d}" for v in b) for b in norm) + "]]"
    return coords if ref is None else f"{ref}{coords}"


def _clean(values: Sequence[str]) -> NormBox:
    x0, y0, x1, y1 = (min(MAX_COORD, max(0, round(float(v)))) for v in values)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _qwen_spans(text: str) -> list[tuple[int, int, NormBox]]:
    return [(m.start(), m.end(), _clean(m.groups())) for m in _QWEN.finditer(text)]


def _cog_spans(text: str) -> list[tuple[int, int, NormBox]]:
    spans = []
    for m in _COG.finditer(text):
        for group in m.group(1).split(";"):
            values = [v.strip() for v in group.split(",")]
            if len(values) == 4 and all(re.fullmatch(_NUM, v) for v in values):
                spans.append((m.start(), m.end(), _clean(values)))
    return spans


def _spans(text: str, fmt: BoxFormat | None) -> list[tuple[int, int, NormBox]]:
    if fmt is not None and fmt not in BOX_FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; known: {list(BOX_FORMATS)}")
    spans = []
    if fmt in (None, "qwen"):
        spans += _qwen_spans(text)
    if fmt in (None, "cogvlm"):
        spans += _cog_spans(text)
    return sorted(spans, key=lambda s: s[0])


def parse_boxes(text: str, fmt: BoxFormat | None = None) -> list[NormBox]:
    """Every box in `text`, in order of appearance, as normalised coordinates ([] if none).
    `fmt` None accepts both formats."""
    return [box for _, _, box in _spans(text, fmt)]


def parse_box(text: str, fmt: BoxFormat | None = None) -> NormBox | None:
    """The first box in `text`, or None when it holds none (see the module docstring)."""
    boxes = parse_boxes(text, fmt)
    return boxes[0] if boxes else None


def require_box(text: str, fmt: BoxFormat | None = None) -> NormBox:
    """Like parse_box, but text without a box raises BoxParseError quoting it."""
    box = parse_box(text, fmt)
    if box is None:
        raise BoxParseError(f"no {fmt or 'Qwen-VL or CogVLM'} box in {text[:120]!r}")
    return box


def parse_grounded(text: str, fmt: BoxFormat | None = None) -> list[tuple[str, NormBox]]:
    """(phrase, box) pairs of a grounded caption. Qwen-VL: the ``<ref>`` text right before the
    box; CogVLM: the words between the previous box (or a comma / "and") and this one. A box
    with no phrase gets ""; several boxes after one phrase each get that phrase."""
    pairs: list[tuple[str, NormBox]] = []
    previous_end = 0
    for start, end, box in _spans(text, fmt):
        before = text[previous_end:start]
        refs = _REF.findall(before)
        if refs:
            phrase = refs[-1]
        else:
            before = _BOX_TAGS.sub("", before)
            phrase = re.split(r",|;|\band\b|\.", before)[-1]
            if not phrase.strip() and pairs and not before.strip():
                phrase = pairs[-1][0]  # a second box straight after the first: same phrase
        pairs.append((" ".join(phrase.split()).strip(" .,").lower(), box))
        previous_end = end
    return pairs


def strip_boxes(text: str) -> str:
    """The text with every box and <ref>/<box> tag removed and spaces tidied (for caption
    metrics on grounded captions)."""
    pieces, previous_end = [], 0
    for start, end, _ in _spans(text, None):
        pieces.append(text[previous_end:start])
        previous_end = end
    pieces.append(text[previous_end:])
    out = _BOX_TAGS.sub("", "".join(pieces))
    out = re.sub(r"\s+([,.;])", r"\1", out)
    return " ".join(out.split())


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (any units; 0 for empty boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
