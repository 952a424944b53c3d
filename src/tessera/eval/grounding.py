"""Grounding and reading evaluation: REC accuracy at IoU ≥ 0.5, REG accuracy, grounded-caption
F1, and the generation loop that produces the predictions with an LVLM.

REC: the prediction is read with the tolerant parser of ``tessera.data.boxes`` (first box in
the text, either format unless one is named); a prediction with no readable box is a miss and
is counted in ``unparsable``; a missing prediction is a miss too and counted in ``missing``.
The box is compared in pixels with the target after mapping the normalised coordinates back
to the image size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from tessera.data.boxes import BoxFormat, box_iou, denormalize_box, parse_box, parse_grounded
from tessera.data.datasets import ImageCache
from tessera.data.records import Turn
from tessera.data.shapes_reading import ReadingItem
from tessera.data.templates import ChatTemplate, encode_prompt, stop_token_ids
from tessera.eval.ocr_metrics import score_cer, score_charts
from tessera.infer.generate import GenerationConfig, generate
from tessera.models.lvlm import LVLM
from tessera.text.tokenizer import Tokenizer

IOU_THRESHOLD = 0.5
_BASELINE_CANDIDATES, _BASELINE_JUDGES = 200, 2000
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Room for the longest reference answer of each task with a small BPE vocabulary.
MAX_NEW_TOKENS: dict[str, int] = {
    "rec": 48,
    "reg": 12,
    "grounded_caption": 160,
    "ocr": 24,
    "chart": 48,
}


@dataclass(frozen=True)
class GroundingScores:
    acc50: float  # share of items whose predicted box has IoU ≥ threshold with the target
    mean_iou: float  # over all items, 0 for misses without a box
    hits: int
    count: int
    unparsable: int  # predictions in which no box could be read
    missing: int  # items without a prediction


def score_rec(
    predictions: Mapping[str, str],
    items: Sequence[ReadingItem],
    fmt: BoxFormat | None = None,
    threshold: float = IOU_THRESHOLD,
) -> GroundingScores:
    """Acc@IoU≥threshold of predicted texts (item id → text) against the items' pixel boxes."""
    if not items:
        raise ValueError("score_rec: no items")
    hits = unparsable = missing = 0
    iou_sum = 0.0
    for item in items:
        if item.box is None:
            raise ValueError(f"score_rec: item {item.id} has no target box")
        text = predictions.get(item.id)
        if text is None:
            missing += 1
            continue
        box = parse_box(text, fmt)
        if box is None:
            unparsable += 1
            continue
        iou = box_iou(denormalize_box(box, item.width, item.height), item.box)
        iou_sum += iou
        hits += iou >= threshold
    return GroundingScores(
        hits / len(items), iou_sum / len(items), hits, len(items), unparsable, missing
    )


def normalize_phrase(text: str) -> str:
    """Lowercase, articles and punctuation removed, spaces collapsed ("The red circle." → "red circle")."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_reg(predictions: Mapping[str, str], items: Sequence[ReadingItem]) -> float:
    """Share of REG items whose prediction is one of the object's unique descriptions (after
    normalize_phrase): a description that also fits another object does not count."""
    if not items:
        raise ValueError("score_reg: no items")
    right = sum(
        normalize_phrase(predictions.get(item.id, ""))
        in {normalize_phrase(r) for r in item.references}
        for item in items
    )
    return right / len(items)


@dataclass(frozen=True)
class GroundedCaptionScores:
    precision: float  # predicted (phrase, box) pairs that match an unmatched reference object
    recall: float  # reference objects matched
    f1: float
    count: int


def score_grounded_captions(
    predictions: Mapping[str, str],
    items: Sequence[ReadingItem],
    fmt: BoxFormat | None = None,
    threshold: float = IOU_THRESHOLD,
) -> GroundedCaptionScores:
    """A predicted pair matches a reference object when the phrases agree (normalize_phrase)
    and the boxes overlap with IoU ≥ threshold; each reference object matches at most once."""
    if not items:
        raise ValueError("score_grounded_captions: no items")
    matched = predicted = reference = 0
    for item in items:
        pairs = parse_grounded(predictions.get(item.id, ""), fmt)
        predicted += len(pairs)
        reference += len(item.objects)
        free = list(item.objects)
        for phrase, box in pairs:
            pixels = denormalize_box(box, item.width, item.height)
            for k, (ref_phrase, ref_box) in enumerate(free):
                if (
                    normalize_phrase(phrase) == normalize_phrase(ref_phrase)
                    and box_iou(pixels, ref_box) >= threshold
                ):
                    matched += 1
                    del free[k]
                    break
    precision = matched / predicted if predicted else 0.0
    recall = matched / reference if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return GroundedCaptionScores(precision, recall, f1, len(items))


def predict_reading(
    model: LVLM,
    tokenizer: Tokenizer,
    template: ChatTemplate | str,
    items: Sequence[ReadingItem],
    images: ImageCache,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "reading",
) -> dict[str, str]:
    """Item id → generated answer (greedy) for any reading task; items whose image cannot be
    read get no prediction (the scores count them as missing)."""
    model.eval()
    stops = stop_token_ids(tokenizer, template)
    predictions: dict[str, str] = {}
    usable = [it for it in items if images.get(it.image) is not None]
    for start in tqdm(
        range(0, len(usable), batch_size), desc=desc, disable=not progress, dynamic_ncols=True
    ):
        chunk = usable[start : start + batch_size]
        pixels = [images.get(it.image) for it in chunk]
        prompts = [
            encode_prompt(
                tokenizer,
                template,
                [Turn("user", it.prompt)],
                [model.num_image_tokens(px.shape[1], px.shape[2])],
            )
            for it, px in zip(chunk, pixels, strict=True)
        ]
        budget = max_new_tokens or max(MAX_NEW_TOKENS.get(it.task, 32) for it in chunk)
        outs = generate(
            model,
            prompts,
            [images.normalize(px) for px in pixels],
            stop_ids=stops,
            pad_id=tokenizer.pad_id,
            config=GenerationConfig(max_new_tokens=budget),
        )
        for it, out in zip(chunk, outs, strict=True):
            predictions[it.id] = tokenizer.decode(out).strip()
    return predictions


def score_reading_task(
    task: str, predictions: Mapping[str, str], items: Sequence[ReadingItem]
) -> dict[str, float]:
    """The metrics of one task under the zoo's names: rec → grounding_acc50 (+ mean IoU and the
    unparsable share), reg → reg_accuracy, grounded_caption → grounded_caption_f1,
    ocr → ocr_cer (+ exact), chart → chart_relaxed_accuracy (+ exact)."""
    if task == "rec":
        s = score_rec(predictions, items)
        return {
            "grounding_acc50": s.acc50,
            "grounding_mean_iou": s.mean_iou,
            "grounding_unparsable": s.unparsable / s.count,
        }
    if task == "reg":
        return {"reg_accuracy": score_reg(predictions, items)}
    if task == "grounded_caption":
        g = score_grounded_captions(predictions, items)
        return {"grounded_caption_f1": g.f1}
    if task == "ocr":
        c = score_cer(predictions, {it.id: it.answer for it in items})
        return {"ocr_cer": c.cer, "ocr_exact": c.exact}
    if task == "chart":
        ch = score_charts([predictions.get(it.id, "") for it in items], [it.answer for it in items])
        return {"chart_relaxed_accuracy": ch.relaxed_accuracy, "chart_exact": ch.exact_match}
    raise ValueError(f"unknown reading task {task!r}")


def evaluate_reading(
    model: LVLM,
    tokenizer: Tokenizer,
    template: ChatTemplate | str,
    items: Sequence[ReadingItem],
    train_items: Sequence[ReadingItem],
    images: ImageCache,
    *,
    progress: bool = True,
    desc: str = "reading",
) -> tuple[dict[str, float], dict[str, float]]:
    """Greedy answers to the items' prompts scored with their task's metrics
    (`score_reading_task`), and the same metrics of the trivial baseline taken from
    `train_items` (`reading_baseline`): (scores, baseline)."""
    if not items:
        raise ValueError("evaluate_reading: no items")
    task = items[0].task
    mixed = sorted({it.task for it in items} - {task})
    if mixed:
        raise ValueError(f"evaluate_reading: items of several tasks ({task!r} and {mixed})")
    predictions = predict_reading(model, tokenizer, template, items, images, progress=progress, desc=desc)
    return score_reading_task(task, predictions, items), reading_baseline(task, train_items, items)


def reading_baseline(
    task: str, train: Sequence[ReadingItem], items: Sequence[ReadingItem]
) -> dict[str, float]:
    """The trivial baseline of each metric: answer every item with the most common training
    answer (REC: the box that is most often right on the training items, i.e. a fixed guess)."""
    if not train:
        raise ValueError("reading_baseline: no training items")
    if task == "rec":
        # Candidates and judges are capped so that the search stays O(200 · 2000) IoUs.
        judges = [t.box for t in train[:_BASELINE_JUDGES] if t.box is not None]
        best = max(
            train[:_BASELINE_CANDIDATES],
            key=lambda c: sum(box_iou(c.box, b) >= IOU_THRESHOLD for b in judges) if c.box else -1,
        )
        return score_reading_task(task, {it.id: best.answer for it in items}, items)
    answers: dict[str, int] = {}
    for t in train:
        answers[t.answer] = answers.get(t.answer, 0) + 1
    majority = max(answers, key=answers.__getitem__)
    return score_reading_task(task, {it.id: majority for it in items}, items)
