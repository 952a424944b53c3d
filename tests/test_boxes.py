"""Box text formats (Qwen-VL and CogVLM): writing from pixel boxes, the round trip, and the
tolerant reading of what models emit."""

from __future__ import annotations

import random

import pytest

from tessera.data.boxes import (
    BoxParseError,
    box_iou,
    denormalize_box,
    format_box,
    format_boxes,
    normalize_box,
    parse_box,
    parse_boxes,
    parse_grounded,
    require_box,
    strip_boxes,
)


def test_formats_match_the_papers() -> None:
    # 64 px: 10 → floor(156.25) = 156, 30 → 468, 20 → 312, 40 → 625
    assert (
        format_box((10, 20, 30, 40), 64, 64, "qwen", ref="the red circle")
        == "<ref>the red circle</ref><box>(156,312),(468,625)</box>"
    )
    assert (
        format_box((10, 20, 30, 40), 64, 64, "cogvlm", ref="a red circle")
        == "a red circle[[156,312,468,625]]"
    )
    assert (
        format_box((0, 1, 2, 64), 64, 64, "cogvlm") == "[[000,015,031,999]]"
    )  # padded, right edge 999
    assert (
        format_boxes([(0, 0, 32, 32), (32, 32, 64, 64)], 64, 64, "cogvlm")
        == "[[000,000,500,500;500,500,999,999]]"
    )
    assert (
        format_boxes([(0, 0, 32, 32), (32, 32, 64, 64)], 64, 64, "qwen", ref="x")
        == "<ref>x</ref><box>(0,0),(500,500)</box><box>(500,500),(999,999)</box>"
    )


def test_normalisation_is_in_range_and_non_square_aware() -> None:
    assert normalize_box((0, 0, 200, 100), 200, 100) == (0, 0, 999, 999)
    assert normalize_box((50, 50, 100, 100), 200, 100) == (250, 500, 500, 999)
    assert normalize_box((30, 40, 10, 20), 64, 64) == normalize_box(
        (10, 20, 30, 40), 64, 64
    )  # corners sorted
    with pytest.raises(ValueError, match="image size"):
        normalize_box((0, 0, 1, 1), 0, 64)
    with pytest.raises(ValueError, match="four finite"):
        normalize_box((0, 0, 1), 64, 64)


@pytest.mark.parametrize("fmt", ["qwen", "cogvlm"])
@pytest.mark.parametrize("size", [(64, 64), (96, 40), (1000, 700), (1333, 800)])
def test_round_trip(fmt: str, size: tuple[int, int]) -> None:
    w, h = size
    rng = random.Random(0)
    for _ in range(200):
        x0, x1 = sorted(rng.sample(range(w + 1), 2))
        y0, y1 = sorted(rng.sample(range(h + 1), 2))
        text = format_box((x0, y0, x1, y1), w, h, fmt, ref="the thing")
        norm = parse_box(text, fmt)
        assert norm == normalize_box((x0, y0, x1, y1), w, h)  # exact in normalised space
        back = denormalize_box(norm, w, h)
        # one quantisation step at most per corner
        assert all(
            abs(a - b) <= max(w, h) / 1000 + 1e-9
            for a, b in zip(back, (x0, y0, x1, y1), strict=True)
        )
        assert parse_box(text) == norm  # auto-detected format


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<ref>the red circle</ref><box>(12,34),(56,78)</box>", (12, 34, 56, 78)),
        ("<box> ( 12 , 34 ) , ( 56 ,78 ) </box>", (12, 34, 56, 78)),  # extra spaces
        ("<box>(12,34),(56,78)", (12, 34, 56, 78)),  # missing closing tag
        ("<box>(12,34),(56,78</box>", (12, 34, 56, 78)),  # missing closing parenthesis
        ("(12,34),(56,78)", (12, 34, 56, 78)),  # no tags at all
        ("<box>(56,78),(12,34)</box>", (12, 34, 56, 78)),  # swapped corners
        ("<box>(56,34),(12,78)</box>", (12, 34, 56, 78)),  # mixed-up corners
        ("<box>(12.4,33.6),(56.0,78.)</box>", (12, 34, 56, 78)),  # floats, rounded
        ("<box>(-5,34),(1200,78)</box>", (0, 34, 999, 78)),  # out of range, clipped
        ("[[012,034,056,078]]", (12, 34, 56, 78)),
        ("[[ 12 , 34 , 56 , 78 ]]", (12, 34, 56, 78)),
        ("it is here: [[12,34,56,78", (12, 34, 56, 78)),  # missing closing brackets
        ("[12,34,56,78]", (12, 34, 56, 78)),  # single brackets
        ("[[56,78,12,34]]", (12, 34, 56, 78)),
        ("[[12,34,56,78;100,100,200,200]]", (12, 34, 56, 78)),  # several: the first
        ("<box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>", (1, 2, 3, 4)),
    ],
)
def test_tolerant_parsing(text: str, expected: tuple[int, int, int, int]) -> None:
    assert parse_box(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I don't know",
        "the red circle",
        "<box></box>",
        "<box>(12,34)</box>",
        "[[1,2,3]]",
        "[[1,2,3,4,5]]",
        "[[a,b,c,d]]",
        "(12,34),(56,",
        "<ref>circle</ref><box>(x,y),(z,w)</box>",
    ],
)
def test_garbage_gives_none_and_require_box_raises(text: str) -> None:
    assert parse_box(text) is None
    assert parse_boxes(text) == []
    with pytest.raises(BoxParseError, match="no .*box in"):
        require_box(text)


def test_format_restriction_and_all_boxes() -> None:
    mixed = "a[[1,2,3,4]] b<box>(5,6),(7,8)</box> c[[9,10,11,12;13,14,15,16]]"
    assert parse_boxes(mixed) == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]
    assert parse_boxes(mixed, "qwen") == [(5, 6, 7, 8)]
    assert parse_boxes(mixed, "cogvlm") == [(1, 2, 3, 4), (9, 10, 11, 12), (13, 14, 15, 16)]
    with pytest.raises(ValueError, match="unknown box format"):
        parse_boxes(mixed, "yolo")  # type: ignore[arg-type]


def test_grounded_caption_parsing_and_stripping() -> None:
    qwen = "<ref>a small red circle</ref><box>(1,2),(3,4)</box>, <ref>a blue square</ref><box>(5,6),(7,8)</box>."
    assert parse_grounded(qwen) == [
        ("a small red circle", (1, 2, 3, 4)),
        ("a blue square", (5, 6, 7, 8)),
    ]
    cog = "a small red circle[[001,002,003,004]], a green cross[[5,6,7,8]] and two squares[[1,1,2,2;3,3,4,4]]."
    assert parse_grounded(cog) == [
        ("a small red circle", (1, 2, 3, 4)),
        ("a green cross", (5, 6, 7, 8)),
        ("two squares", (1, 1, 2, 2)),
        ("two squares", (3, 3, 4, 4)),
    ]
    assert strip_boxes(cog) == "a small red circle, a green cross and two squares."
    assert strip_boxes(qwen) == "a small red circle, a blue square."


def test_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # empty boxes
