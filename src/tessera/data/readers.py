"""Readers of the standard vision-language annotation formats: LLaVA JSON, COCO captions, VQA v2.

Each reader turns one file (or, for VQA, a questions/annotations pair) into the plain records of
``tessera.data.records`` plus a ``SkipStats``. A malformed record is skipped and counted with a
reason and its location (file and record index or id); it never stops the read. A file that is
missing or is not JSON at all raises, naming the file. Image paths in records are resolved
against ``image_root`` (absolute paths stay as they are) and must exist on disk.

ShapesWorld (``tessera.data.shapes``) writes these same formats; ``load_meta`` and
``shapes_split_paths`` locate its files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from tessera.data.records import Caption, Conversation, RegionPhrase, Role, SkipStats, Turn, VQAItem
from tessera.data.shapes import FORMAT_NAME, FORMAT_VERSION, META_FILE, SPLIT_FILES, SPLITS

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES: dict[str, Role] = {"human": "user", "gpt": "assistant", "system": "system"}


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _require_keys(data: Any, path: Path, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise ValueError(f"{path} is not a {what} file: expected an object with lists {list(keys)}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _ImageResolver:
    """Resolves relative image paths against a root, remembering which files exist."""

    def __init__(self, image_root: str | Path) -> None:
        self.root = Path(image_root)
        self._exists: dict[Path, bool] = {}

    def resolve(self, relative: str | Path) -> Path:
        return self.root / relative

    def exists(self, path: Path) -> bool:
        if path not in self._exists:
            self._exists[path] = path.is_file()
        return self._exists[path]


# --- LLaVA ------------------------------------------------------------------------------------


def _llava_images(record: dict[str, Any]) -> tuple[str, ...] | None:
    """The record's image paths; None when the image field is malformed."""
    fields = [key for key in ("image", "images") if key in record]
    if not fields:
        return ()
    if len(fields) > 1:
        return None
    value = record[fields[0]]
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        return None
    return tuple(entries)


def _llava_turns(conversations: list[Any]) -> tuple[Turn, ...] | str:
    """Validated turns, or the reason the conversation is unusable."""
    turns: list[Turn] = []
    for raw in conversations:
        if not isinstance(raw, dict) or not isinstance(raw.get("value"), str):
            return "malformed turn"
        speaker = raw.get("from")
        if speaker not in LLAVA_ROLES:
            return "unknown speaker"
        turns.append(Turn(role=LLAVA_ROLES[speaker], text=raw["value"]))
    dialogue = turns
    while dialogue and dialogue[0].role == "system":
        dialogue = dialogue[1:]
    # Training needs user → assistant pairs; a trailing user turn would have no target.
    expected = ["user", "assistant"] * (len(dialogue) // 2)
    if not dialogue or len(dialogue) % 2 or [t.role for t in dialogue] != expected:
        return "turn order violation"
    return tuple(turns)


def _parse_llava(record: Any, index: int, path: Path, images: _ImageResolver) -> Conversation | str:
    if not isinstance(record, dict):
        return "record is not a JSON object"
    record_id = record.get("id", f"{path.stem}-{index}")
    if not (isinstance(record_id, str) or _is_int(record_id)):
        return "invalid id"
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        return "missing or invalid 'conversations'"
    if not conversations:
        return "empty conversation"
    turns = _llava_turns(conversations)
    if isinstance(turns, str):
        return turns
    relative_paths = _llava_images(record)
    if relative_paths is None:
        return "invalid image field"
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(relative_paths):
        return "image placeholder count differs from image count"
    resolved = tuple(images.resolve(p) for p in relative_paths)
    if not all(images.exists(p) for p in resolved):
        return "image file not found"
    return Conversation(id=str(record_id), images=resolved, turns=turns)


def read_llava(path: str | Path, image_root: str | Path) -> tuple[list[Conversation], SkipStats]:
    """Read a LLaVA JSON list of ``{"id", "image"?, "conversations": [{"from", "value"}]}``.

    ``"from"`` human/gpt/system becomes role user/assistant/system. ``"image"`` may be a string,
    a list, or absent (text-only record); a list under ``"images"`` is accepted too. Turn text is
    kept exactly as written, placeholders included. After optional leading system turns the
    turns must alternate user, assistant, ..., ending with the assistant.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a LLaVA file: expected a JSON list of records")
    images = _ImageResolver(image_root)
    stats = SkipStats()
    records: list[Conversation] = []
    for index, record in enumerate(data):
        parsed = _parse_llava(record, index, path, images)
        if isinstance(parsed, str):
            record_id = record.get("id") if isinstance(record, dict) else None
            stats.skip(
                parsed, f"{path}[{index}]" + (f" id={record_id}" if record_id is not None else "")
            )
        else:
            records.append(parsed)
    return records, stats


# --- COCO captions ----------------------------------------------------------------------------


def _coco_image_files(entries: list[Any], path: Path, stats: SkipStats) -> dict[int, str]:
    files: dict[int, str] = {}
    for index, entry in enumerate(entries):
        if (
            isinstance(entry, dict)
            and _is_int(entry.get("id"))
            and isinstance(entry.get("file_name"), str)
        ):
            files[entry["id"]] = entry["file_name"]
        else:
            stats.skip("malformed image entry", f"{path}[images {index}]")
    return files


def read_coco_captions(path: str | Path, image_root: str | Path) -> tuple[list[Caption], SkipStats]:
    """Read a COCO captions file: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

    Captions are stripped of surrounding whitespace (COCO's own captions carry stray spaces and
    newlines); one record per annotation, so an image with five captions gives five records.
    """
    path = Path(path)
    data = _require_keys(_load_json(path), path, ("images", "annotations"), "COCO captions")
    images = _ImageResolver(image_root)
    stats = SkipStats()
    files = _coco_image_files(data["images"], path, stats)
    records: list[Caption] = []
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}[annotations {index}]"
        if not isinstance(annotation, dict):
            stats.skip("record is not a JSON object", where)
            continue
        where += f" id={annotation.get('id')}"
        image_id, caption = annotation.get("image_id"), annotation.get("caption")
        if not _is_int(image_id):
            stats.skip("missing or invalid 'image_id'", where)
        elif not isinstance(caption, str) or not caption.strip():
            stats.skip("missing or empty 'caption'", where)
        elif image_id not in files:
            stats.skip("unknown image_id", where)
        elif not images.exists(image := images.resolve(files[image_id])):
            stats.skip("image file not found", where)
        else:
            records.append(Caption(image_id=image_id, image=image, caption=caption.strip()))
    return records, stats


# --- COCO instances as region phrases -------------------------------------------------------


def region_phrase(category: str, attributes: Sequence[str] = ()) -> str:
    """"a large red circle." from the category name and its attribute words, in order."""
    words = " ".join([*attributes, category])
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}."


_GRID_ROWS: tuple[str, ...] = ("top", "middle", "bottom")
_GRID_COLUMNS: tuple[str, ...] = ("left", "centre", "right")


def position_phrase(box: Sequence[float]) -> str:
    """Where a box's centre lies in a 3x3 grid over the image, as a phrase ("at the top left.",
    "in the middle."); `box` is (x, y, width, height) in fractions of the image."""
    x, y, width, height = box
    row = _GRID_ROWS[min(2, max(0, int((y + height / 2) * 3)))]
    column = _GRID_COLUMNS[min(2, max(0, int((x + width / 2) * 3)))]
    if row == "middle":
        return "in the middle." if column == "centre" else f"on the {column}."
    return f"at the {row}." if column == "centre" else f"at the {row} {column}."


def read_coco_regions(path: str | Path, image_root: str | Path,
                      attributes: Sequence[str] = ("size", "color")) -> tuple[dict[Path, list[RegionPhrase]], SkipStats]:
    """A COCO instances file (``images``, ``categories``, ``annotations`` with ``bbox``) as region
    phrases per image file: each object's box (relative to the image's "width" and "height",
    read from the file when the entry lacks them) and "a <attributes...> <category>." where
    `attributes` name optional string fields of the annotation (ShapesWorld's "size" and
    "color"). Malformed annotations and missing images are skipped and counted."""
    path = Path(path)
    data = _require_keys(_load_json(path), path, ("images", "categories", "annotations"), "COCO instances")
    stats = SkipStats()
    images = _ImageResolver(image_root)
    files = _coco_image_files(data["images"], path, stats)
    names = {c["id"]: c["name"] for c in data["categories"]
             if isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)}
    declared = {e["id"]: (e["width"], e["height"]) for e in data["images"]
                if isinstance(e, dict) and _is_int(e.get("width")) and _is_int(e.get("height"))
                and e["width"] > 0 and e["height"] > 0}
    sizes: dict[int, tuple[int, int]] = {}

    def image_size(image_id: int, image: Path) -> tuple[int, int]:
        if image_id not in sizes:
            if image_id in declared:
                sizes[image_id] = declared[image_id]
            else:
                with Image.open(image) as img:
                    sizes[image_id] = img.size
        return sizes[image_id]

    regions: dict[Path, list[RegionPhrase]] = {}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}[annotations {index}]"
        if not isinstance(annotation, dict):
            stats.skip("record is not a JSON object", where)
            continue
        box = annotation.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
                and box[2] > 0 and box[3] > 0):
            stats.skip("missing or invalid 'bbox'", where)
        elif annotation.get("category_id") not in names:
            stats.skip("unknown category_id", where)
        elif annotation.get("image_id") not in files:
            stats.skip("unknown image_id", where)
        elif not images.exists(image := images.resolve(files[annotation["image_id"]])):
            stats.skip("image file not found", where)
        else:
            width, height = image_size(annotation["image_id"], image)
            x, y, w, h = (float(v) for v in box)
            words = [annotation[a] for a in attributes if isinstance(annotation.get(a), str)]
            regions.setdefault(image, []).append(RegionPhrase(
                (x / width, y / height, w / width, h / height), region_phrase(names[annotation["category_id"]], words),
                names[annotation["category_id"]]))
    return regions, stats


# --- VQA v2 -----------------------------------------------------------------------------------


def _vqa_answers(annotation: dict[str, Any]) -> tuple[str, ...]:
    answers = annotation.get("answers")
    if isinstance(answers, list):
        texts = tuple(
            a["answer"] for a in answers if isinstance(a, dict) and isinstance(a.get("answer"), str)
        )
        if texts:
            return texts
    fallback = annotation.get("multiple_choice_answer")
    return (fallback,) if isinstance(fallback, str) else ()


def _vqa_image_lookup(
    questions_file: dict[str, Any], image_paths: Mapping[int, str | Path] | None
) -> tuple[dict[int, str | Path], str | None]:
    files: dict[int, str | Path] = {}
    for entry in questions_file.get("images") or []:
        if (
            isinstance(entry, dict)
            and _is_int(entry.get("id"))
            and isinstance(entry.get("file_name"), str)
        ):
            files[entry["id"]] = entry["file_name"]
    if image_paths:
        files.update(image_paths)
    subtype = questions_file.get("data_subtype")
    return files, subtype if isinstance(subtype, str) and subtype else None


def read_vqa(
    questions_path: str | Path,
    annotations_path: str | Path | None,
    image_root: str | Path,
    image_paths: Mapping[int, str | Path] | None = None,
) -> tuple[list[VQAItem], SkipStats]:
    """Read a VQA v2 questions file and its annotations file into one record per question.

    An image is found, in order, by: ``image_paths[image_id]`` (an explicit mapping wins); the
    questions file's optional ``"images": [{"id", "file_name"}]`` list (ShapesWorld writes one);
    the official VQA v2 naming ``<data_subtype>/COCO_<data_subtype>_<image_id:012d>.jpg`` when
    the questions file has a ``"data_subtype"`` (e.g. "val2014"). ``annotations_path=None``
    reads questions without answers (test-dev style): answers are empty, question_type is "".
    Answers keep every annotator's answer, in file order.
    """
    questions_path = Path(questions_path)
    questions_file = _require_keys(
        _load_json(questions_path), questions_path, ("questions",), "VQA questions"
    )
    stats = SkipStats()
    annotations: dict[int, dict[str, Any]] | None = None
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        annotations_file = _require_keys(
            _load_json(annotations_path), annotations_path, ("annotations",), "VQA annotations"
        )
        annotations = {}
        for index, annotation in enumerate(annotations_file["annotations"]):
            if isinstance(annotation, dict) and _is_int(annotation.get("question_id")):
                annotations[annotation["question_id"]] = annotation
            else:
                stats.skip("malformed annotation", f"{annotations_path}[annotations {index}]")
    files, subtype = _vqa_image_lookup(questions_file, image_paths)
    images = _ImageResolver(image_root)
    records: list[VQAItem] = []
    for index, question in enumerate(questions_file["questions"]):
        where = f"{questions_path}[questions {index}]"
        if not isinstance(question, dict):
            stats.skip("record is not a JSON object", where)
            continue
        question_id, image_id, text = (
            question.get(k) for k in ("question_id", "image_id", "question")
        )
        where += f" question_id={question_id}"
        if not _is_int(question_id) or not _is_int(image_id):
            stats.skip("missing or invalid 'question_id'/'image_id'", where)
            continue
        if not isinstance(text, str) or not text.strip():
            stats.skip("missing or empty 'question'", where)
            continue
        answers: tuple[str, ...] = ()
        question_type = ""
        if annotations is not None:
            annotation = annotations.get(question_id)
            if annotation is None:
                stats.skip("no annotation for question", where)
                continue
            if annotation.get("image_id", image_id) != image_id:
                stats.skip("annotation image_id differs from question", where)
                continue
            answers = _vqa_answers(annotation)
            if not answers:
                stats.skip("no answers", where)
                continue
            question_type = (
                annotation.get("question_type")
                if isinstance(annotation.get("question_type"), str)
                else ""
            )
        if image_id in files:
            relative: str | Path = files[image_id]
        elif subtype is not None:
            relative = f"{subtype}/COCO_{subtype}_{image_id:012d}.jpg"
        else:
            stats.skip("unknown image_id", where)
            continue
        image = images.resolve(relative)
        if not images.exists(image):
            stats.skip("image file not found", where)
            continue
        records.append(
            VQAItem(
                question_id=question_id,
                image_id=image_id,
                image=image,
                question=text.strip(),
                question_type=question_type,
                answers=answers,
            )
        )
    return records, stats


# --- ShapesWorld folders ----------------------------------------------------------------------


def load_meta(root: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a ShapesWorld folder; raises if ``root`` is not one."""
    meta_path = Path(root) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{root} is not a ShapesWorld folder: {META_FILE} not found "
            "(generate one with tessera.data.shapes.generate_shapes)"
        )
    meta = _load_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{meta_path} is not ShapesWorld metadata (expected format {FORMAT_NAME!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has ShapesWorld format version {meta.get('format_version')}, "
            f"this Tessera reads version {FORMAT_VERSION}; regenerate the dataset"
        )
    return meta


def shapes_split_paths(root: str | Path, split: str) -> dict[str, Path]:
    """Paths of a split's JSON files, keyed like ``SPLIT_FILES`` (captions, objects, vqa_questions,
    vqa_annotations, llava_pretrain, llava_instruct). Image paths inside them are relative to
    ``root``, so ``root`` is the ``image_root`` to pass to the readers."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; expected one of {list(SPLITS)}")
    return {name: Path(root) / split / file_name for name, file_name in SPLIT_FILES.items()}
