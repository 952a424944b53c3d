"""Turning evaluation results into files and tables people read.

Markdown tables (which also line up in a terminal) for READMEs and logs, and an atomic JSON
writer so an interrupted run never leaves a truncated results file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tessera.eval.vqa_metrics import VQAScores

MISSING_CELL = "—"
OVERALL_ROW = "overall"
MISSING_PREDICTIONS_ROW = "missing predictions"
QUESTION_TYPE_COLUMN = "question type"


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True/False are labels, not quantities to right-align.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _format_cell(value: object, floatfmt: str) -> str:
    if value is None:
        return MISSING_CELL
    text = format(value, floatfmt) if isinstance(value, float) else str(value)
    # A raw "|" would split the cell and a newline would end the row.
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def format_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".3f",
) -> str:
    """Render rows as a GitHub-Markdown table padded so it also lines up in a terminal.

    Columns default to every key seen, in first-seen order. Floats use `floatfmt`; None and
    absent keys show as "—". Columns holding only numbers are right-aligned.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("format_table needs at least one column")

    header = [_format_cell(column, "") for column in columns]
    body = [[_format_cell(row.get(column), floatfmt) for column in columns] for row in rows]
    right_aligned = [
        any(row.get(column) is not None for row in rows)
        and all(_is_number(row.get(column)) for row in rows if row.get(column) is not None)
        for column in columns
    ]
    # Three dashes is the shortest separator every Markdown renderer accepts.
    widths = [
        max(3, len(header[i]), *(len(cells[i]) for cells in body)) for i in range(len(columns))
    ]

    def render(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, right_aligned, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    separator = [
        "-" * (width - 1) + ":" if right else "-" * width
        for width, right in zip(widths, right_aligned, strict=True)
    ]
    return "\n".join([render(header), render(separator), *(render(cells) for cells in body)])


def _default_file_mode() -> int:
    # mkstemp creates files readable by the owner only; results files should get the same
    # permissions as any other file this process creates.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_DEFAULT_FILE_MODE = _default_file_mode()


def write_json_atomic(path: str | os.PathLike[str], obj: object) -> None:
    """Write `obj` as JSON (indent 2, trailing newline) so readers never see a partial file.

    The JSON goes to a temporary file in the destination folder, is flushed to disk and then
    os.replace()d over `path`; missing parent folders are created. An existing file keeps its
    permissions.
    """
    destination = Path(path)
    # Serialise first: an object json cannot encode must fail before any file is touched.
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    destination.parent.mkdir(parents=True, exist_ok=True)
    mode = destination.stat().st_mode & 0o7777 if destination.exists() else _DEFAULT_FILE_MODE
    fd, temp_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _accuracy_cell(accuracy: float, count: int) -> str:
    return f"{100 * accuracy:.2f} (n={count})"


def vqa_results_table(results: Mapping[str, VQAScores]) -> str:
    """One Markdown table comparing VQA splits: a row per question type, then "overall".

    Columns are the splits in the given order; each cell reads "accuracy% (n=count)", and "—"
    where a split has no question of that type. A final row gives each split's number of
    missing predictions (already scored as wrong in the accuracies above it).
    """
    if not results:
        raise ValueError("vqa_results_table needs at least one split")
    if QUESTION_TYPE_COLUMN in results:
        raise ValueError(f"a split cannot be named {QUESTION_TYPE_COLUMN!r}: it labels the rows")
    splits = list(results)
    question_types = sorted({t for scores in results.values() for t in scores.count_by_type})

    rows: list[dict[str, object]] = []
    for question_type in question_types:
        row: dict[str, object] = {QUESTION_TYPE_COLUMN: question_type}
        for split, scores in results.items():
            if question_type in scores.count_by_type:
                row[split] = _accuracy_cell(
                    scores.accuracy_by_type[question_type], scores.count_by_type[question_type]
                )
            else:
                row[split] = None
        rows.append(row)
    rows.append(
        {
            QUESTION_TYPE_COLUMN: OVERALL_ROW,
            **{split: _accuracy_cell(s.accuracy, s.count) for split, s in results.items()},
        }
    )
    rows.append(
        {
            QUESTION_TYPE_COLUMN: MISSING_PREDICTIONS_ROW,
            **{split: str(s.missing) for split, s in results.items()},
        }
    )
    return format_table(rows, columns=[QUESTION_TYPE_COLUMN, *splits])
