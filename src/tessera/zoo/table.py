"""The zoo's Markdown table (ZOO.md), made only from the results.json files under a zoo folder.

One row per preset. Each metric has an in-distribution and a compositional column, every cell
"value (baseline)"; then the visual tokens one image costs, the trainable parameters of each
training stage and the minutes the row took. The header states the machine(s) and the
command(s) that produced the rows, so every number can be traced to a run. Per-k recalls
(r5, r10) and per-task zero-shot accuracies stay in results.json; the table shows the
headline metric of each task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tessera.zoo.core import SPLITS

TABLE_FILE = "ZOO.md"
RESULTS_FILE = "results.json"

# Headline metrics in table order; any other non-detail metric a preset reports follows.
TABLE_METRICS: tuple[str, ...] = (
    "retrieval_i2t_r1", "retrieval_t2i_r1", "zeroshot_top1", "vqa_accuracy", "vqa_rank_accuracy",
    "vqa_generate_accuracy", "reasoning_accuracy",
    "entailment_accuracy", "caption_cider", "caption_bleu4", "grounding_acc50", "ocr_cer",
)
LOWER_IS_BETTER: frozenset[str] = frozenset({"ocr_cer"})
SPLIT_SHORT = {"in_distribution": "ID", "compositional": "comp"}


def _is_detail(metric: str) -> bool:
    """Per-k recalls and per-task zero-shot accuracies: in results.json, not in the table."""
    if metric.endswith(("_r5", "_r10")):
        return True
    return metric.startswith("zeroshot_") and metric != "zeroshot_top1"


def collect_results(out: str | Path, order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every out/NAME/results.json, in `order` first (e.g. the presets' discovery order), the
    rest by name. An unreadable file becomes a failed row naming it."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(out).glob(f"*/{RESULTS_FILE}")):
        try:
            row = json.loads(path.read_text())
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            row = {"status": "failed", "error": f"unreadable {path}: {err}"}
        row.setdefault("name", path.parent.name)
        rows.append(row)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda r: (rank.get(r["name"], len(rank)), r["name"]))


def _metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: set[str] = set()
    for row in rows:
        for split_metrics in (row.get("metrics") or {}).values():
            seen.update(m for m in split_metrics if not _is_detail(m))
    return [m for m in TABLE_METRICS if m in seen] + sorted(seen - set(TABLE_METRICS))


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "–"


def _cell(row: dict[str, Any], split: str, metric: str) -> str:
    value = (row.get("metrics") or {}).get(split, {}).get(metric)
    if value is None:
        return "–"
    baseline = (row.get("baselines") or {}).get(split, {}).get(metric)
    return f"{_number(value)} ({_number(baseline)})"


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.1f}K"
    return str(n)


def _params(row: dict[str, Any]) -> str:
    stages = row.get("trainable_params_by_stage") or {}
    return "; ".join(f"{stage} {_count(int(n))}" for stage, n in stages.items()) or "–"


def _machine(machine: dict[str, Any]) -> str:
    gpu = f"training on {machine['gpu']}, " if machine.get("gpu") else ""
    return (f"{gpu}{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, torch {machine.get('torch', '?')}, "
            f"{machine.get('threads', '?')} threads")


def _escape(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_zoo_table(rows: Sequence[dict[str, Any]]) -> str:
    """ZOO.md for result rows (results.json payloads)."""
    metrics = _metric_columns(rows)
    splits = list(SPLITS.values())
    machines = list(dict.fromkeys(_machine(r["machine"]) for r in rows if isinstance(r.get("machine"), dict)))
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    lines = ["# Tessera model zoo", ""]
    lines.append("Every number below comes from " + ("these commands" if len(commands) > 1 else "this command")
                 + " (each preset's full results, r5/r10 and per-task scores included, are in "
                 f"`NAME/{RESULTS_FILE}`):")
    lines.append("")
    lines += [f"    {c}" for c in commands] or ["    (no command recorded)"]
    lines.append("")
    lines.append("Machine: " + ("; ".join(machines) if machines else "not recorded") + ".")
    lines.append("")
    lines.append("Each cell is `value (baseline)`: the baseline is the trivial one (chance recall, the best "
                 "constant class, the majority answer). ID = in-distribution split `test`; comp = compositional "
                 "split `test_comp`, whose images hold colour×shape combinations never seen in training."
                 + (" Lower is better for " + ", ".join(sorted(LOWER_IS_BETTER & set(metrics))) + "."
                    if LOWER_IS_BETTER & set(metrics) else ""))
    lines.append("")
    header = ["preset"] + [f"{m} {SPLIT_SHORT.get(s, s)}" for m in metrics for s in splits]
    header += ["visual tokens / image", "trainable params by stage", "minutes"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    failures = []
    for row in rows:
        ok = row.get("status") == "ok"
        cells = [row["name"] if ok else f"{row['name']} (failed)"]
        cells += [_cell(row, s, m) if ok else "–" for m in metrics for s in splits]
        if not ok:
            failures.append(f"- {row['name']}: {_escape(row.get('error', 'unknown error'))}")
        tokens = row.get("visual_tokens_per_image")
        minutes = row.get("minutes")
        cells += [str(tokens) if tokens is not None else "–", _params(row),
                  f"{minutes:.1f}" if isinstance(minutes, int | float) else "–"]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    if failures:
        lines += ["", "Failed rows:", "", *failures]
    return "\n".join(lines) + "\n"
