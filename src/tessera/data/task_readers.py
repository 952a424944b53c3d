"""Readers of the classic vision-language task files, the closed-set VQA answer vocabulary, and
trivial baselines per task.

The files are the ones ``tessera.data.shapes_tasks`` writes next to a ShapesWorld dataset:
image-text retrieval galleries (COCO captions format plus a caption kind), zero-shot
classification labels (class names, prompt templates, labelled images), a VQA answer
vocabulary, NLVR2-style statements about image pairs and SNLI-VE-style hypotheses. Nothing
here is specific to ShapesWorld: any data written in these formats reads the same way.

Like ``tessera.data.readers``, every reader returns what it read plus a ``SkipStats``: a
malformed record is skipped and counted with its location and never stops the read; a file
that is missing, is not JSON or has the wrong overall shape raises, naming the file. Image
paths are resolved against ``image_root`` and must exist on disk.

The baselines are what a model must beat by a wide margin to show it learned something:
the majority label (from the training split when there is one) and uniform chance.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.data.readers import (
    _coco_image_files,
    _ImageResolver,
    _is_int,
    _load_json,
    _require_keys,
)
from tessera.data.records import SkipStats, VQAItem
from tessera.eval.vqa_metrics import VQAScores, normalize_answer, score_vqa, vqa_accuracy

CAPTION_KINDS: tuple[str, ...] = ("coco", "unique")
ENTAILMENT_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
REASONING_LABELS: tuple[bool, ...] = (True, False)
TEMPLATE_SLOT = "{}"


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalGallery:
    """Images and captions of one gallery; ``text_to_image[t]`` is the index of caption t's image.

    Captions repeat across images ("a red circle." describes many), so the ground truth of a
    caption is ambiguous: ``text_positives`` lists, per caption, every image that has a caption
    with exactly the same text, for retrieval metrics that count such images as hits.
    """

    images: tuple[Path, ...]
    captions: tuple[str, ...]
    text_to_image: tuple[int, ...]
    caption_kind: str

    @property
    def image_to_texts(self) -> tuple[tuple[int, ...], ...]:
        texts: list[list[int]] = [[] for _ in self.images]
        for text_index, image_index in enumerate(self.text_to_image):
            texts[image_index].append(text_index)
        return tuple(tuple(t) for t in texts)

    @property
    def text_positives(self) -> tuple[tuple[int, ...], ...]:
        return images_sharing_text(self.captions, self.text_to_image)


@dataclass(frozen=True)
class ZeroShotItem:
    id: str
    image: Path
    label: int  # index into the task's class_names


@dataclass(frozen=True)
class ZeroShotTask:
    """One classification task: prompts are ``template.format(class_name)`` for every pair."""

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    items: tuple[ZeroShotItem, ...]

    def prompts(self, class_index: int) -> tuple[str, ...]:
        return tuple(t.format(self.class_names[class_index]) for t in self.templates)


@dataclass(frozen=True)
class ReasoningItem:
    id: str
    left: Path
    right: Path
    sentence: str
    label: bool  # whether the sentence is true of the two images together
    kind: str = ""  # which statement template made it, for per-kind accuracy


@dataclass(frozen=True)
class EntailmentItem:
    id: str
    image: Path
    hypothesis: str
    label: str  # one of ENTAILMENT_LABELS
    kind: str = ""  # which hypothesis form made it, for per-kind accuracy


@dataclass(frozen=True)
class AnswerVocabulary:
    """Closed-set VQA answers, normalised like the VQA metric, most frequent first."""

    answers: tuple[str, ...]
    counts: tuple[int, ...]  # training questions having the answer among their annotators'
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.counts):
            raise ValueError("answers and counts must have the same length")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError("answers must be distinct")
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(self.answers)})

    def __len__(self) -> int:
        return len(self.answers)

    def index_of(self, answer: str) -> int | None:
        """The class index of an answer (normalised first), or None when it is out of vocabulary."""
        return self._index.get(normalize_answer(answer))

    def soft_targets(self, annotator_answers: Sequence[str]) -> dict[int, float]:
        """Soft BCE targets: each in-vocabulary answer scores its VQA accuracy against all the
        annotators' answers, so the target is exactly what the metric would award."""
        targets: dict[int, float] = {}
        for answer in {normalize_answer(a) for a in annotator_answers}:
            index = self._index.get(answer)
            if index is not None:
                targets[index] = vqa_accuracy(answer, annotator_answers)
        return targets

    def to_json(self) -> list[dict[str, Any]]:
        return [{"answer": a, "count": n} for a, n in zip(self.answers, self.counts, strict=True)]


# --- captions shared between images -------------------------------------------------------------


def images_sharing_text(
    captions: Sequence[str], text_to_image: Sequence[int]
) -> tuple[tuple[int, ...], ...]:
    """Per caption, the sorted indices of every image with a caption of exactly that text."""
    images_of_text: dict[str, set[int]] = defaultdict(set)
    for caption, image_index in zip(captions, text_to_image, strict=True):
        images_of_text[caption].add(image_index)
    return tuple(tuple(sorted(images_of_text[caption])) for caption in captions)


def caption_duplicate_stats(
    captions: Sequence[str], text_to_image: Sequence[int]
) -> dict[str, int]:
    """How much exact caption text is shared between different images of a gallery.

    ``duplicate_captions`` counts captions whose text is also a caption of another image;
    ``images_with_shared_caption`` counts images having at least one such caption.
    """
    positives = images_sharing_text(captions, text_to_image)
    shared = [len(p) > 1 for p in positives]
    return {
        "images": len(set(text_to_image)),
        "captions": len(captions),
        "distinct_texts": len(set(captions)),
        "duplicate_captions": sum(shared),
        "images_with_shared_caption": len(
            {image for image, is_shared in zip(text_to_image, shared, strict=True) if is_shared}
        ),
    }


# --- readers --------------------------------------------------------------------------------------


def _nonempty_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _record_id(record: dict[str, Any]) -> str | None:
    value = record.get("id")
    if isinstance(value, str) and value:
        return value
    return str(value) if _is_int(value) else None


def _existing_image(value: Any, images: _ImageResolver) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    path = images.resolve(value)
    return path if images.exists(path) else None


def _records_file(path: Path, what: str) -> list[Any]:
    return _require_keys(_load_json(path), path, ("records",), what)["records"]


def read_retrieval_gallery(
    path: str | Path, image_root: str | Path
) -> tuple[RetrievalGallery, SkipStats]:
    """Read a gallery: COCO captions (``"images"``, ``"annotations"``) plus ``"caption_kind"``.

    Images keep their file order; an image whose file is missing is skipped together with its
    captions. Images left without any caption stay in the gallery (distractors for text→image).
    """
    path = Path(path)
    data = _require_keys(_load_json(path), path, ("images", "annotations"), "retrieval gallery")
    caption_kind = data.get("caption_kind")
    if caption_kind not in CAPTION_KINDS:
        raise ValueError(f"{path}: 'caption_kind' must be one of {list(CAPTION_KINDS)}")
    resolver = _ImageResolver(image_root)
    stats = SkipStats()
    files = _coco_image_files(data["images"], path, stats)
    image_index: dict[int, int] = {}
    images: list[Path] = []
    for image_id, file_name in files.items():
        image = resolver.resolve(file_name)
        if resolver.exists(image):
            image_index[image_id] = len(images)
            images.append(image)
        else:
            stats.skip("image file not found", f"{path}[images id={image_id}]")
    captions: list[str] = []
    text_to_image: list[int] = []
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}[annotations {index}]"
        if not isinstance(annotation, dict):
            stats.skip("record is not a JSON object", where)
            continue
        caption = _nonempty_text(annotation.get("caption"))
        image_id = annotation.get("image_id")
        if caption is None:
            stats.skip("missing or empty 'caption'", where)
        elif not _is_int(image_id) or image_id not in files:
            stats.skip("unknown image_id", where)
        elif image_id not in image_index:
            stats.skip("image file not found", where)
        else:
            captions.append(caption)
            text_to_image.append(image_index[image_id])
    gallery = RetrievalGallery(tuple(images), tuple(captions), tuple(text_to_image), caption_kind)
    return gallery, stats


def _string_list(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, str) and v for v in value):
        return None
    return tuple(value)


def _zeroshot_task(
    name: str, raw: Any, path: Path, images: _ImageResolver, stats: SkipStats
) -> ZeroShotTask | None:
    where = f"{path}[tasks {name}]"
    if not isinstance(raw, dict):
        stats.skip("malformed task", where)
        return None
    class_names = _string_list(raw.get("class_names"))
    templates = _string_list(raw.get("templates"))
    items = raw.get("items")
    if class_names is None or len(set(class_names)) != len(class_names):
        stats.skip("malformed task: invalid 'class_names'", where)
        return None
    if templates is None or any(t.count(TEMPLATE_SLOT) != 1 for t in templates):
        stats.skip("malformed task: each template needs exactly one '{}'", where)
        return None
    if not isinstance(items, list):
        stats.skip("malformed task: missing 'items'", where)
        return None
    parsed: list[ZeroShotItem] = []
    for index, item in enumerate(items):
        item_where = f"{where} items {index}"
        if not isinstance(item, dict):
            stats.skip("record is not a JSON object", item_where)
            continue
        item_id, label = _record_id(item), item.get("label")
        if item_id is None:
            stats.skip("invalid id", item_where)
        elif not _is_int(label) or not 0 <= label < len(class_names):
            stats.skip("invalid label", item_where)
        elif (image := _existing_image(item.get("image"), images)) is None:
            stats.skip("missing image or image file not found", item_where)
        else:
            parsed.append(ZeroShotItem(item_id, image, label))
    return ZeroShotTask(name, class_names, templates, tuple(parsed))


def read_zeroshot(
    path: str | Path, image_root: str | Path
) -> tuple[dict[str, ZeroShotTask], SkipStats]:
    """Read ``{"tasks": {name: {"class_names", "templates", "items": [{"id", "image", "label"}]}}}``.

    A task whose class names or templates are malformed is skipped as a whole (counted once);
    within a task, malformed items are skipped one by one.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path} is not a zero-shot file: expected an object with 'tasks'")
    images = _ImageResolver(image_root)
    stats = SkipStats()
    tasks: dict[str, ZeroShotTask] = {}
    for name, raw in data["tasks"].items():
        task = _zeroshot_task(name, raw, path, images, stats)
        if task is not None:
            tasks[name] = task
    return tasks, stats


def read_reasoning(
    path: str | Path, image_root: str | Path
) -> tuple[list[ReasoningItem], SkipStats]:
    """Read NLVR2-style records ``{"id", "left", "right", "sentence", "label": true|false}``."""
    path = Path(path)
    images = _ImageResolver(image_root)
    stats = SkipStats()
    items: list[ReasoningItem] = []
    for index, record in enumerate(_records_file(path, "reasoning")):
        where = f"{path}[records {index}]"
        if not isinstance(record, dict):
            stats.skip("record is not a JSON object", where)
            continue
        record_id, sentence, label = (
            _record_id(record),
            _nonempty_text(record.get("sentence")),
            record.get("label"),
        )
        if record_id is None:
            stats.skip("invalid id", where)
            continue
        where += f" id={record_id}"
        left = _existing_image(record.get("left"), images)
        right = _existing_image(record.get("right"), images)
        if sentence is None:
            stats.skip("missing or empty 'sentence'", where)
        elif not isinstance(label, bool):
            stats.skip("invalid label", where)
        elif left is None or right is None:
            stats.skip("missing image or image file not found", where)
        else:
            kind = record.get("kind") if isinstance(record.get("kind"), str) else ""
            items.append(ReasoningItem(record_id, left, right, sentence, label, kind))
    return items, stats


def read_entailment(
    path: str | Path, image_root: str | Path
) -> tuple[list[EntailmentItem], SkipStats]:
    """Read SNLI-VE-style records ``{"id", "image", "hypothesis", "label"}`` with label one of
    ``ENTAILMENT_LABELS``."""
    path = Path(path)
    images = _ImageResolver(image_root)
    stats = SkipStats()
    items: list[EntailmentItem] = []
    for index, record in enumerate(_records_file(path, "entailment")):
        where = f"{path}[records {index}]"
        if not isinstance(record, dict):
            stats.skip("record is not a JSON object", where)
            continue
        record_id, hypothesis, label = (
            _record_id(record),
            _nonempty_text(record.get("hypothesis")),
            record.get("label"),
        )
        if record_id is None:
            stats.skip("invalid id", where)
            continue
        where += f" id={record_id}"
        if hypothesis is None:
            stats.skip("missing or empty 'hypothesis'", where)
        elif label not in ENTAILMENT_LABELS:
            stats.skip("invalid label", where)
        elif (image := _existing_image(record.get("image"), images)) is None:
            stats.skip("missing image or image file not found", where)
        else:
            kind = record.get("kind") if isinstance(record.get("kind"), str) else ""
            items.append(EntailmentItem(record_id, image, hypothesis, label, kind))
    return items, stats


# --- VQA answer vocabulary ------------------------------------------------------------------------


def build_answer_vocabulary(items: Iterable[VQAItem], min_count: int = 1) -> AnswerVocabulary:
    """The closed answer set of a (training) VQA split.

    Answers are normalised with the VQA metric's own normalisation; an answer's count is the
    number of questions that have it among their annotators' answers (a question counts once
    per distinct answer, however many annotators gave it). Answers below ``min_count`` are
    dropped. Order: most frequent first, ties alphabetical, so indices are deterministic.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    counts: Counter[str] = Counter()
    for item in items:
        counts.update({normalize_answer(a) for a in item.answers})
    kept = sorted((-n, a) for a, n in counts.items() if n >= min_count and a)
    return AnswerVocabulary(tuple(a for _, a in kept), tuple(-n for n, _ in kept))


def read_answer_vocabulary(path: str | Path) -> tuple[AnswerVocabulary, SkipStats]:
    """Read ``{"answers": [{"answer", "count"}]}``; entries keep their file order (their index)."""
    path = Path(path)
    data = _require_keys(_load_json(path), path, ("answers",), "VQA answer vocabulary")
    stats = SkipStats()
    answers: list[str] = []
    counts: list[int] = []
    for index, entry in enumerate(data["answers"]):
        where = f"{path}[answers {index}]"
        answer = entry.get("answer") if isinstance(entry, dict) else None
        count = entry.get("count") if isinstance(entry, dict) else None
        if not isinstance(answer, str) or not answer or normalize_answer(answer) != answer:
            stats.skip("missing or unnormalised 'answer'", where)
        elif not _is_int(count) or count < 0:
            stats.skip("invalid count", where)
        elif answer in answers:
            stats.skip("duplicate answer", where)
        else:
            answers.append(answer)
            counts.append(count)
    return AnswerVocabulary(tuple(answers), tuple(counts)), stats


# --- trivial baselines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """A constant prediction's accuracy next to uniform chance on one evaluation set."""

    prediction: str  # the constant (majority) label, as text
    accuracy: float  # of always predicting it
    chance: float  # expected accuracy of guessing uniformly among the classes
    count: int  # evaluated items


def majority_baseline(
    train_labels: Sequence[Hashable], eval_labels: Sequence[Hashable], classes: Sequence[Hashable]
) -> Baseline:
    """Always predict the most common training label (ties: earliest in ``classes``)."""
    if not classes:
        raise ValueError("majority_baseline needs at least one class")
    counts = Counter(train_labels)
    majority = max(classes, key=lambda c: (counts[c], -list(classes).index(c)))
    hits = sum(label == majority for label in eval_labels)
    accuracy = hits / len(eval_labels) if eval_labels else 0.0
    prediction = str(majority).lower() if isinstance(majority, bool) else str(majority)
    return Baseline(prediction, accuracy, 1 / len(classes), len(eval_labels))


def reasoning_baseline(
    train: Sequence[ReasoningItem], evaluated: Sequence[ReasoningItem]
) -> Baseline:
    return majority_baseline(
        [i.label for i in train], [i.label for i in evaluated], REASONING_LABELS
    )


def entailment_baseline(
    train: Sequence[EntailmentItem], evaluated: Sequence[EntailmentItem]
) -> Baseline:
    return majority_baseline(
        [i.label for i in train], [i.label for i in evaluated], ENTAILMENT_LABELS
    )


def zeroshot_baseline(task: ZeroShotTask) -> Baseline:
    """Zero-shot has no training labels, so the majority is taken on the evaluated items
    themselves: the best any constant prediction could do."""
    labels = [item.label for item in task.items]
    baseline = majority_baseline(labels, labels, range(len(task.class_names)))
    return Baseline(
        task.class_names[int(baseline.prediction)],
        baseline.accuracy,
        baseline.chance,
        baseline.count,
    )


def vqa_prior_baseline(train: Sequence[VQAItem], evaluated: Sequence[VQAItem]) -> VQAScores:
    """The classic "prior per question type" baseline: answer every question with the most
    common training answer of its type (the overall most common one for an unseen type)."""
    if not train:
        raise ValueError("vqa_prior_baseline needs training items")
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for item in train:
        answers = Counter(normalize_answer(a) for a in item.answers)
        top = min(answers, key=lambda a: (-answers[a], a))
        by_type[item.question_type][top] += 1
        overall[top] += 1

    def most_common(counter: Counter[str]) -> str:
        return min(counter, key=lambda a: (-counter[a], a))

    default = most_common(overall)
    prior = {qtype: most_common(counter) for qtype, counter in by_type.items()}
    predictions = {item.question_id: prior.get(item.question_type, default) for item in evaluated}
    return score_vqa(predictions, evaluated)


def _random_rank_recall(candidates: int, positives: int, k: int) -> float:
    """Probability that a uniformly random ranking puts at least one positive in the top k."""
    if positives <= 0:
        return 0.0
    if k >= candidates:
        return 1.0
    return 1.0 - math.comb(candidates - positives, k) / math.comb(candidates, k)


def retrieval_chance_recall(
    gallery: RetrievalGallery, ks: Sequence[int] = (1, 5, 10), duplicate_aware: bool = True
) -> dict[str, float]:
    """Expected Recall@k of a random ranking, keys ``text_to_image@k`` and ``image_to_text@k``.

    With ``duplicate_aware`` a hit is any image (caption) with exactly the same caption text
    as the ground truth; without it only the source image (the image's own captions) count.
    Images without captions are left out of image→text.
    """
    if not gallery.captions:
        raise ValueError("retrieval_chance_recall needs a gallery with captions")
    positives = gallery.text_positives
    own_texts = gallery.image_to_texts
    captions_with_text: Mapping[str, int] = Counter(gallery.captions)
    results: dict[str, float] = {}
    for k in ks:
        text_recalls = [
            _random_rank_recall(len(gallery.images), len(p) if duplicate_aware else 1, k)
            for p in positives
        ]
        image_recalls = []
        for texts in own_texts:
            if not texts:
                continue
            if duplicate_aware:
                count = sum(captions_with_text[t] for t in {gallery.captions[i] for i in texts})
            else:
                count = len(texts)
            image_recalls.append(_random_rank_recall(len(gallery.captions), count, k))
        results[f"text_to_image@{k}"] = sum(text_recalls) / len(text_recalls)
        results[f"image_to_text@{k}"] = sum(image_recalls) / len(image_recalls)
    return results
