"""Markdown tables, the atomic JSON writer and the VQA results table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tessera.eval import report
from tessera.eval.report import format_table, vqa_results_table, write_json_atomic
from tessera.eval.vqa_metrics import VQAScores


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def test_format_table_renders_markdown_with_aligned_columns() -> None:
    rows = [
        {"model": "clip", "recall@1": 0.51234, "steps": 100},
        {"model": "siglip-tiny", "recall@1": None, "steps": 2000},
    ]
    lines = format_table(rows).splitlines()

    assert len(lines) == 4
    assert _cells(lines[0]) == ["model", "recall@1", "steps"]
    assert _cells(lines[2]) == ["clip", "0.512", "100"]
    assert _cells(lines[3]) == ["siglip-tiny", "—", "2000"]
    # numeric columns are right-aligned, text columns left-aligned
    separator = _cells(lines[1])
    assert not separator[0].endswith(":")
    assert separator[1].endswith(":") and separator[2].endswith(":")
    # padding makes every line the same length, so it lines up in a terminal
    assert len({len(line) for line in lines}) == 1


def test_format_table_columns_floatfmt_and_missing_keys() -> None:
    rows = [{"a": 1.0, "b": "x"}, {"a": 2.5}]
    table = format_table(rows, columns=["b", "a"], floatfmt=".1%")
    lines = table.splitlines()
    assert _cells(lines[0]) == ["b", "a"]
    assert _cells(lines[2]) == ["x", "100.0%"]
    assert _cells(lines[3]) == ["—", "250.0%"]


def test_format_table_escapes_pipes_and_newlines() -> None:
    table = format_table([{"text": "a|b\nc", "flag": True}])
    body = table.splitlines()[2]
    assert "a\\|b c" in body
    assert "True" in body
    # booleans are labels, not numbers
    assert not table.splitlines()[1].rstrip(" |").endswith(":")


def test_format_table_header_only_and_no_columns() -> None:
    assert format_table([], columns=["x"]).splitlines() == ["| x   |", "| --- |"]
    with pytest.raises(ValueError):
        format_table([])


def test_write_json_atomic_writes_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "eval" / "results.json"
    write_json_atomic(target, {"b": 1, "a": [1.5, "é"]})
    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text == json.dumps({"b": 1, "a": [1.5, "é"]}, indent=2, ensure_ascii=False) + "\n"
    # key order is kept as given, not sorted
    assert text.index('"b"') < text.index('"a"')
    assert list(target.parent.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == report._DEFAULT_FILE_MODE


def test_write_json_atomic_replaces_and_keeps_permissions(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_json_atomic(str(target), [1, 2])
    assert json.loads(target.read_text()) == [1, 2]
    assert target.stat().st_mode & 0o777 == 0o640


def test_write_json_atomic_leaves_old_file_when_serialising_fails(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text('{"ok": true}\n')
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert target.read_text() == '{"ok": true}\n'
    assert list(tmp_path.iterdir()) == [target]


def test_write_json_atomic_removes_temp_file_when_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "results.json"
    target.write_text('{"ok": true}\n')

    def crash(src: str, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        write_json_atomic(target, {"new": 1})
    assert target.read_text() == '{"ok": true}\n'
    assert list(tmp_path.iterdir()) == [target]


def _scores(by_type: dict[str, tuple[float, int]], missing: int = 0) -> VQAScores:
    count = sum(n for _, n in by_type.values())
    return VQAScores(
        accuracy=sum(acc * n for acc, n in by_type.values()) / count,
        count=count,
        missing=missing,
        extra_predictions=0,
        accuracy_by_type={t: acc for t, (acc, _) in by_type.items()},
        count_by_type={t: n for t, (_, n) in by_type.items()},
    )


def test_vqa_results_table_rows_are_types_then_overall() -> None:
    results = {
        "in-distribution": _scores({"how many": (0.5, 2), "what color": (1.0, 2)}),
        "compositional": _scores({"how many": (0.25, 4)}, missing=3),
    }
    lines = vqa_results_table(results).splitlines()

    assert _cells(lines[0]) == ["question type", "in-distribution", "compositional"]
    assert [_cells(line)[0] for line in lines[2:]] == [
        "how many",
        "what color",
        "overall",
        "missing predictions",
    ]
    assert _cells(lines[2]) == ["how many", "50.00 (n=2)", "25.00 (n=4)"]
    assert _cells(lines[3]) == ["what color", "100.00 (n=2)", "—"]
    assert _cells(lines[4]) == ["overall", "75.00 (n=4)", "25.00 (n=4)"]
    assert _cells(lines[5]) == ["missing predictions", "0", "3"]


def test_vqa_results_table_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        vqa_results_table({})
    with pytest.raises(ValueError):
        vqa_results_table({"question type": _scores({"what": (1.0, 1)})})
