"""Grounding and reading tasks on ShapesWorld: referring expressions with boxes, grounded
captions, rendered text (OCR) and bar charts (Vary's chart-to-dict task).

``generate_reading_tasks(root)`` reads a folder written by ``tessera.data.shapes.generate_shapes``
and writes, next to the base files, LLaVA conversation JSON (so ``read_llava`` and the
ConversationDataset train on them unchanged; the extra keys are for evaluation)::

    reading_tasks.json                    manifest: options, prompts, counts per split
    images/reading/<split>/ocr_<idx:06d>.png     rendered words / short lines
    images/reading/<split>/chart_<idx:06d>.png   bar charts
    <split>/rec_qwen.json     referring expression comprehension, text → box, Qwen-VL format
    <split>/rec_cogvlm.json   the same questions, CogVLM format
    <split>/reg_qwen.json     referring expression generation, box → text (and reg_cogvlm.json)
    <split>/grounded_caption_qwen.json   every object named with its box (and _cogvlm.json)
    <split>/ocr.json          read the text in the image; answer = the lines, joined by "\\n"
    train/ocr_pretrain.json   more rendered text, for reading pretraining (Vary-tiny), same format
    <split>/chart.json        convert the chart to a Python dict, e.g. {'red': 3, 'blue': 7}

Box records carry ``width``, ``height`` and the target ``box`` in pixels ([x0, y0, x1, y1],
x1/y1 exclusive), REG records every unique description of the object in ``references``,
grounded captions the ``objects`` ([{"phrase", "box"}]). Boxes in text are written by
``tessera.data.boxes``.

Referring phrases are the base generator's (``shapes._reference``: the shortest description
naming exactly one object, ``shapes._is_unique`` for the longer ones), so an object that no
description singles out (two identical shapes) is never asked about. As in the base dataset,
held-out colour×shape combos appear only in ``test_comp``: there the REC/REG questions prefer
held-out objects, the first line of every rendered text is a held-out "colour shape" pair that
no other split ever shows, and charts have five bars where the other splits have two to four.
Every item draws from its own random stream seeded by (base seed, task, split, index), so the
same base dataset always gives byte-identical files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from tessera.data.boxes import BOX_FORMATS, BoxFormat, box_text, format_box, normalize_box
from tessera.data.readers import IMAGE_PLACEHOLDER, _ImageResolver, _load_json, load_meta
from tessera.data.records import SkipStats
from tessera.data.shapes import (
    _REFERENCE_ATTRIBUTES,
    COLORS,
    IMAGES_DIR,
    SHAPES,
    SIZES,
    SPLITS,
    ShapeObject,
    ShapesConfig,
    _Geometry,
    _is_unique,
    _join,
    _pick,
    _reference,
    _with_article,
    _write_json_atomic,
)
from tessera.data.shapes_tasks import _load_split_scenes
from tessera.eval.ocr_metrics import chart_text

READING_FORMAT_NAME = "tessera-shapesworld-reading-tasks"
READING_FORMAT_VERSION = 1
READING_META_FILE = "reading_tasks.json"
READING_IMAGES_DIR = f"{IMAGES_DIR}/reading"
GROUNDING_TASKS: tuple[str, ...] = ("rec", "reg", "grounded_caption")
READING_FILES: dict[str, str] = {
    **{f"{task}_{fmt}": f"{task}_{fmt}.json" for task in GROUNDING_TASKS for fmt in BOX_FORMATS},
    "ocr": "ocr.json",
    "chart": "chart.json",
}
# Train-only files: more of a task's data for pretraining, never evaluated on.
PRETRAIN_FILES: dict[str, str] = {"ocr_pretrain": "ocr_pretrain.json"}

# The instructions each system was trained with, shortened.
PROMPTS: dict[str, str] = {
    "rec_qwen": "Give the bounding box of <ref>{phrase}</ref>.",
    "rec_cogvlm": "Where is {phrase}? Answer in [[x0,y0,x1,y1]] format.",
    "reg_qwen": "What is in {box}?",
    "reg_cogvlm": "What is in the region {box}?",
    "grounded_caption_qwen": "Generate the caption in English with grounding:",
    "grounded_caption_cogvlm": "Describe the image and give the coordinates [[x0,y0,x1,y1]] of each object.",
    "ocr": "Read the text in the image.",
    "chart": "Convert the chart to a Python dict.",
}

# Words of rendered text, by kind; a word's kind is drawn first so numbers do not crowd out words.
TEXT_WORDS: tuple[tuple[str, ...], ...] = (
    tuple(COLORS),
    SHAPES,
    SIZES,
    tuple(str(n) for n in range(100)),
)
CHART_MAX_VALUE = 9
_CHART_BARS = {"default": (2, 4), "test_comp": (5, 5)}
_LINE_TRIES = 30
_TEXT_MARGIN = 2  # pixels kept free around rendered text
_PAPER = ((255, 255, 255), (245, 242, 232), (232, 238, 245))
_INK = ((0, 0, 0), (40, 40, 90), (90, 30, 30))


class ReadingTasksConfig(BaseModel):
    """How many items each task gets, relative to the base split's number of images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rec_per_image: int = Field(
        1, ge=0, le=9, description="referring expressions per base image (at most)"
    )
    text_images_per_image: float = Field(0.5, ge=0, le=10, description="rendered-text images")
    charts_per_image: float = Field(0.5, ge=0, le=10, description="bar-chart images")
    pretrain_texts_per_image: float = Field(
        4.0, ge=0, le=20, description="rendered-text images for reading pretraining, train split only"
    )
    max_text_lines: int = Field(2, ge=1, le=4)
    max_words_per_line: int = Field(2, ge=1, le=4)


def _rng(seed: int, task: str, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes, unlike hash().
    return random.Random(f"shapesworld-reading/{seed}/{task}/{split}/{index}")


def reading_task_paths(root: str | Path, split: str) -> dict[str, Path]:
    """Paths of the reading-task files of a split, keyed like ``READING_FILES`` (and, for the
    train split, ``PRETRAIN_FILES``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; expected one of {list(SPLITS)}")
    files = {**READING_FILES, **PRETRAIN_FILES} if split == "train" else READING_FILES
    return {name: Path(root) / split / file_name for name, file_name in files.items()}


def _record(record_id: str, image: str, prompt: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
        **extra,
    }


# --- referring expressions and grounded captions ------------------------------------------------


def unique_descriptions(obj: ShapeObject, objects: Sequence[ShapeObject]) -> list[str]:
    """Every description (shortest first) that names exactly this object among `objects`."""
    return [obj.phrase(attrs) for attrs in _REFERENCE_ATTRIBUTES if _is_unique(obj, objects, attrs)]


def _grounding_records(
    split: str,
    index: int,
    file_name: str,
    objects: tuple[ShapeObject, ...],
    geometry: _Geometry,
    held_out: set[tuple[str, str]],
    options: ReadingTasksConfig,
    seed: int,
) -> dict[str, list[dict[str, Any]]]:
    rng = _rng(seed, "grounding", split, index)
    w, h = geometry.width, geometry.height
    stem = f"{split}_{index:06d}"
    out: dict[str, list[dict[str, Any]]] = {
        name: [] for name in READING_FILES if name not in ("ocr", "chart")
    }
    referable = [o for o in objects if _reference(o, objects) is not None]
    chosen: list[ShapeObject] = []
    while referable and len(chosen) < options.rec_per_image:
        obj = _pick(rng, referable, lambda o: split == "test_comp" and o.combo in held_out)
        referable.remove(obj)
        chosen.append(obj)
    for k, obj in enumerate(chosen):
        descriptions = unique_descriptions(obj, objects)
        asked = "the " + rng.choice(descriptions)  # REC: any unique description, for variety
        target = "the " + descriptions[0]  # REG: the shortest, so the target is well defined
        extra = {"width": w, "height": h, "box": list(obj.box)}
        for fmt in BOX_FORMATS:
            coords = box_text(normalize_box(obj.box, w, h), fmt)
            rec_answer = format_box(obj.box, w, h, fmt, ref=asked) if fmt == "qwen" else coords
            out[f"rec_{fmt}"].append(
                _record(
                    f"{stem}_rec{k}",
                    file_name,
                    PROMPTS[f"rec_{fmt}"].format(phrase=asked),
                    rec_answer,
                    task="rec",
                    box_format=fmt,
                    phrase=asked,
                    **extra,
                )
            )
            out[f"reg_{fmt}"].append(
                _record(
                    f"{stem}_reg{k}",
                    file_name,
                    PROMPTS[f"reg_{fmt}"].format(box=coords),
                    target,
                    task="reg",
                    box_format=fmt,
                    references=["the " + d for d in descriptions],
                    **extra,
                )
            )
    if objects:
        described = [(_with_article(o.phrase()), o) for o in objects]  # reading order
        for fmt in BOX_FORMATS:
            caption = _join([format_box(o.box, w, h, fmt, ref=p) for p, o in described]) + "."
            out[f"grounded_caption_{fmt}"].append(
                _record(
                    f"{stem}_gcap",
                    file_name,
                    PROMPTS[f"grounded_caption_{fmt}"],
                    caption,
                    task="grounded_caption",
                    box_format=fmt,
                    width=w,
                    height=h,
                    objects=[{"phrase": p, "box": list(o.box)} for p, o in described],
                )
            )
    return out


# --- rendered text ---------------------------------------------------------------------------------


def _font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled default font, scaled with the image: 8 px at the default 64 px, where the
    # longest held-out pair ("yellow diamond") still fits on one line.
    return ImageFont.load_default(size=max(8, height // 8))


def _text_lines(
    rng: random.Random,
    split: str,
    held_out: Sequence[tuple[str, str]],
    fits: Any,
    options: ReadingTasksConfig,
) -> list[str]:
    forbidden = {f"{c} {s}" for c, s in held_out}
    lines: list[str] = []
    if split == "test_comp":
        color, shape = rng.choice(list(held_out))
        lines.append(f"{color} {shape}")
    wanted = rng.randint(1, options.max_text_lines)
    for _ in range(_LINE_TRIES):
        if len(lines) >= wanted:
            break
        words = rng.randint(1, options.max_words_per_line)
        line = " ".join(rng.choice(rng.choice(TEXT_WORDS)) for _ in range(words))
        if line not in forbidden and fits(lines + [line]):
            lines.append(line)
    return lines


def _draw_text(rng: random.Random, lines: Sequence[str], geometry: _Geometry) -> Image.Image:
    font = _font(geometry.height)
    image = Image.new("RGB", (geometry.width, geometry.height), rng.choice(_PAPER))
    draw = ImageDraw.Draw(image)
    text = "\n".join(lines)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    x = rng.randint(_TEXT_MARGIN, max(_TEXT_MARGIN, geometry.width - _TEXT_MARGIN - right)) - left
    y = rng.randint(_TEXT_MARGIN, max(_TEXT_MARGIN, geometry.height - _TEXT_MARGIN - bottom)) - top
    draw.multiline_text((x, y), text, fill=rng.choice(_INK), font=font)
    return image


def _ocr_sample(
    seed: int,
    split: str,
    index: int,
    geometry: _Geometry,
    held_out: Sequence[tuple[str, str]],
    options: ReadingTasksConfig,
    task: str = "ocr",
) -> tuple[Image.Image, list[str]]:
    rng = _rng(seed, task, split, index)  # "ocr_pretrain" draws texts of its own
    font = _font(geometry.height)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(lines: list[str]) -> bool:
        left, top, right, bottom = probe.multiline_textbbox((0, 0), "\n".join(lines), font=font)
        return (
            right - left <= geometry.width - 2 * _TEXT_MARGIN
            and bottom - top <= geometry.height - 2 * _TEXT_MARGIN
        )

    lines = _text_lines(rng, split, held_out, fits, options)
    if not lines or not fits(lines):
        raise _too_small(geometry)
    return _draw_text(rng, lines, geometry), lines


def _too_small(geometry: _Geometry) -> ValueError:
    return ValueError(
        f"images of {geometry.width}x{geometry.height} px are too small for rendered text; "
        "use a larger image_size (48 px or more) or text_images_per_image=0 and "
        "pretrain_texts_per_image=0"
    )


def _check_text_fits(geometry: _Geometry, held_out: Sequence[tuple[str, str]]) -> None:
    """Every held-out pair must fit on one line, since test_comp texts start with one."""
    font = _font(geometry.height)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for color, shape in held_out:
        left, top, right, bottom = probe.textbbox((0, 0), f"{color} {shape}", font=font)
        if (
            right - left > geometry.width - 2 * _TEXT_MARGIN
            or bottom - top > geometry.height - 2 * _TEXT_MARGIN
        ):
            raise _too_small(geometry)


# --- bar charts ------------------------------------------------------------------------------------


def _chart_sample(
    seed: int, split: str, index: int, geometry: _Geometry
) -> tuple[Image.Image, dict[str, int]]:
    rng = _rng(seed, "chart", split, index)
    low, high = _CHART_BARS.get(split, _CHART_BARS["default"])
    names = rng.sample(list(COLORS), rng.randint(low, high))
    values = {name: rng.randint(1, CHART_MAX_VALUE) for name in names}
    w, h = geometry.width, geometry.height
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = (
        round(0.1 * w),
        w - round(0.05 * w),
        round(0.08 * h),
        h - round(0.1 * h),
    )
    unit = (bottom - top) / (CHART_MAX_VALUE + 1)
    for v in range(1, CHART_MAX_VALUE + 1):  # one light grid line per unit makes values readable
        y = round(bottom - v * unit)
        draw.line((left, y, right, y), fill=(215, 215, 215))
    slot = (right - left) / len(names)
    for k, name in enumerate(names):
        x0 = round(left + k * slot + 0.2 * slot)
        x1 = max(x0 + 1, round(left + (k + 1) * slot - 0.2 * slot))
        draw.rectangle((x0, round(bottom - values[name] * unit), x1 - 1, bottom), fill=COLORS[name])
    draw.line((left, top, left, bottom), fill=(60, 60, 60))
    draw.line((left, bottom, right, bottom), fill=(60, 60, 60))
    return image, values


# --- entry point ----------------------------------------------------------------------------------


def _image_name(split: str, kind: str, index: int) -> str:
    return f"{READING_IMAGES_DIR}/{split}/{kind}_{index:06d}.png"


def generate_reading_tasks(
    root: str | Path, progress: bool = True, config: ReadingTasksConfig | None = None
) -> dict[str, Any]:
    """Write every grounding and reading task file for every split of the ShapesWorld folder
    ``root`` (its ``meta.json`` and each split's ``objects.json`` must exist). Returns the
    manifest, also written to ``root/reading_tasks.json``, which is removed first and written
    last, so a folder with it has complete task files."""
    out = Path(root)
    meta = load_meta(out)
    base = ShapesConfig.model_validate(meta["config"])
    options = config or ReadingTasksConfig()
    geometry = _Geometry.from_config(base)
    held_out = set(base.held_out_combos)
    if options.text_images_per_image > 0 or options.pretrain_texts_per_image > 0:
        _check_text_fits(geometry, base.held_out_combos)
    (out / READING_META_FILE).unlink(missing_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        scenes = _load_split_scenes(out, split)
        paths = reading_task_paths(out, split)
        files: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for index, (file_name, objects) in enumerate(
            tqdm(
                list(zip(scenes.file_names, scenes.objects, strict=True)),
                desc=f"grounding {split}",
                disable=not progress,
            )
        ):
            for name, records in _grounding_records(
                split, index, file_name, objects, geometry, held_out, options, base.seed
            ).items():
                files[name].extend(records)
        images = len(scenes.objects)
        (out / READING_IMAGES_DIR / split).mkdir(parents=True, exist_ok=True)
        text_counts = {"ocr": options.text_images_per_image * images}
        if "ocr_pretrain" in paths:  # train-only, as reading_task_paths says
            text_counts["ocr_pretrain"] = options.pretrain_texts_per_image * images
        for task, count in text_counts.items():
            for index in tqdm(range(round(count)), desc=f"{task} {split}", disable=not progress):
                image, lines = _ocr_sample(
                    base.seed, split, index, geometry, base.held_out_combos, options, task
                )
                file_name = _image_name(split, task, index)
                image.save(out / file_name, format="PNG")
                files[task].append(
                    _record(
                        f"{split}_{task}_{index:06d}",
                        file_name,
                        PROMPTS["ocr"],
                        "\n".join(lines),
                        task="ocr",
                        lines=lines,
                    )
                )
        for index in tqdm(
            range(round(options.charts_per_image * images)),
            desc=f"charts {split}",
            disable=not progress,
        ):
            image, values = _chart_sample(base.seed, split, index, geometry)
            file_name = _image_name(split, "chart", index)
            image.save(out / file_name, format="PNG")
            files["chart"].append(
                _record(
                    f"{split}_chart_{index:06d}",
                    file_name,
                    PROMPTS["chart"],
                    chart_text(values),
                    task="chart",
                    values=values,
                )
            )
        for name, records in files.items():
            _write_json_atomic(paths[name], records)
        counts[split] = {name: len(records) for name, records in files.items()}
    manifest: dict[str, Any] = {
        "format": READING_FORMAT_NAME,
        "format_version": READING_FORMAT_VERSION,
        "base_seed": base.seed,
        "config": options.model_dump(mode="json"),
        "box_formats": {
            "qwen": "<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>, coordinates in [0,1000)",
            "cogvlm": "[[x0,y0,x1,y1]], coordinates in [0,1000), three digits",
            "pixel_boxes": "record 'box' is [x0, y0, x1, y1] in pixels, x1/y1 exclusive",
        },
        "prompts": dict(PROMPTS),
        "splits": counts,
        "files": {**READING_FILES, "images": READING_IMAGES_DIR},
        "train_only_files": dict(PRETRAIN_FILES),
    }
    _write_json_atomic(out / READING_META_FILE, manifest, indent=2)
    return manifest


# --- reading the files back for evaluation ---------------------------------------------------------


@dataclass(frozen=True)
class ReadingItem:
    """One evaluation item of any reading task; fields a task does not use are empty."""

    id: str
    image: Path
    task: str  # "rec", "reg", "grounded_caption", "ocr" or "chart"
    prompt: str  # the user turn, "<image>\n..." included
    answer: str  # the reference assistant turn
    box_format: BoxFormat | None = None
    width: int = 0
    height: int = 0
    box: tuple[float, float, float, float] | None = None  # REC / REG target, pixels
    references: tuple[str, ...] = ()  # REG: every acceptable description
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()  # grounded captions


def _box(value: Any) -> tuple[float, float, float, float] | None:
    if (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) for v in value)
        and value[2] > value[0]
        and value[3] > value[1]
    ):
        return (float(value[0]), float(value[1]), float(value[2]), float(value[3]))
    return None


def _parse_item(record: Any, images: _ImageResolver) -> ReadingItem | str:
    if not isinstance(record, dict):
        return "record is not a JSON object"
    turns = record.get("conversations")
    if (
        not isinstance(turns, list)
        or len(turns) != 2
        or not all(isinstance(t, dict) for t in turns)
        or not all(isinstance(t.get("value"), str) for t in turns)
    ):
        return "conversations must be one human and one gpt turn"
    task, image = record.get("task"), record.get("image")
    if task not in (*GROUNDING_TASKS, "ocr", "chart"):
        return f"unknown task {task!r}"
    if not isinstance(image, str) or not images.exists(images.resolve(image)):
        return "image file not found"
    fields: dict[str, Any] = {}
    if task in GROUNDING_TASKS:
        fmt, w, h = record.get("box_format"), record.get("width"), record.get("height")
        if fmt not in BOX_FORMATS:
            return f"unknown box_format {fmt!r}"
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            return "missing or invalid width/height"
        fields.update(box_format=fmt, width=w, height=h)
        if task in ("rec", "reg"):
            box = _box(record.get("box"))
            if box is None:
                return "missing or invalid box"
            fields["box"] = box
        if task == "reg":
            refs = record.get("references")
            if (
                not isinstance(refs, list)
                or not refs
                or not all(isinstance(r, str) and r for r in refs)
            ):
                return "missing or invalid references"
            fields["references"] = tuple(refs)
        if task == "grounded_caption":
            objects = record.get("objects")
            parsed = (
                [(o.get("phrase"), _box(o.get("box"))) for o in objects if isinstance(o, dict)]
                if isinstance(objects, list)
                else []
            )
            if (
                not parsed
                or len(parsed) != len(objects)
                or any(not isinstance(p, str) or b is None for p, b in parsed)
            ):
                return "missing or invalid objects"
            fields["objects"] = tuple(parsed)
    return ReadingItem(
        id=str(record.get("id")),
        image=images.resolve(image),
        task=task,
        prompt=turns[0]["value"],
        answer=turns[1]["value"],
        **fields,
    )


def read_reading_items(
    path: str | Path, image_root: str | Path
) -> tuple[list[ReadingItem], SkipStats]:
    """Read a reading-task file for evaluation; malformed records are skipped and counted
    with their location (file and index)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a reading-task file: expected a JSON list of records")
    images = _ImageResolver(image_root)
    stats, items = SkipStats(), []
    for index, record in enumerate(data):
        parsed = _parse_item(record, images)
        if isinstance(parsed, str):
            stats.skip(parsed, f"{path}[{index}]")
        else:
            items.append(parsed)
    return items, stats
