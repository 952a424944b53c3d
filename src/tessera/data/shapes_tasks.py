"""Classic vision-language tasks on ShapesWorld: image-text retrieval, zero-shot classification,
closed-set VQA, visual reasoning over image pairs (NLVR2-style) and visual entailment
(SNLI-VE-style), for training and evaluating dual encoders and fusion models.

``generate_classic_tasks(root)`` reads a folder written by ``tessera.data.shapes.generate_shapes``
(its ``meta.json`` and every split's ``objects.json``) and writes, next to the base files (all
paths inside the JSON files are relative to ``root``, like the base dataset's)::

    classic_tasks.json                      manifest: options, counts, label balance, duplicates
    vqa_answers.json                        closed-set VQA answers over train, with counts
    images/zeroshot/<split>/<split>_<idx:06d>.png   single-object images for zero-shot
    <split>/retrieval.json                  gallery: COCO captions format plus "caption_kind"
    <split>/zeroshot.json                   shape / color / count tasks: class names, templates, items
    <split>/reasoning.json                  statements about image pairs, true or false
    <split>/entailment.json                 hypotheses: entailment / neutral / contradiction

Every label is computed from the objects, so it is never ambiguous. Statements name a held-out
colour×shape combo only in ``test_comp``, where they prefer held-out objects, as the base
questions do. Every item draws from its own random stream seeded by (base seed, task, split,
index), so the same base dataset always gives byte-identical task files.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from tessera.data.readers import _load_json, load_meta, read_vqa, shapes_split_paths
from tessera.data.shapes import (
    _IDS_PER_IMAGE,
    _OPPOSITE,
    COLORS,
    IMAGES_DIR,
    PLURALS,
    SHAPES,
    SIZES,
    SPLIT_FILES,
    SPLITS,
    ShapeObject,
    ShapesConfig,
    _draw,
    _Geometry,
    _is_unique,
    _join,
    _pick,
    _reference,
    _sample_objects,
    _Scene,
    _scene,
    _spatial_pair,
    _with_article,
    _write_json_atomic,
)
from tessera.data.task_readers import (
    ENTAILMENT_LABELS,
    build_answer_vocabulary,
    caption_duplicate_stats,
)

TASKS_FORMAT_NAME = "tessera-shapesworld-classic-tasks"
TASKS_FORMAT_VERSION = 1
TASKS_META_FILE = "classic_tasks.json"
VQA_ANSWERS_FILE = "vqa_answers.json"
ZEROSHOT_IMAGES_DIR = f"{IMAGES_DIR}/zeroshot"
TASK_FILES: dict[str, str] = {
    "retrieval": "retrieval.json",
    "zeroshot": "zeroshot.json",
    "reasoning": "reasoning.json",
    "entailment": "entailment.json",
}
ZEROSHOT_TASKS: tuple[str, ...] = ("shape", "color", "count")

# Templates for shape and colour names keep an article-free slot for colours ("orange" would
# need "an"); counts are written with digits, as in the base captions ("there are 3 shapes").
ZEROSHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": (
        "a photo of a {}.",
        "a picture of a {} shape.",
        "an image of a {}.",
        "a drawing of a {}.",
        "there is a {}.",
    ),
    "color": (
        "a photo of one {} shape.",
        "a picture of one {} shape.",
        "an image with one {} shape.",
        "a drawing of a shape colored {}.",
        "the shape is {}.",
    ),
    "count": (
        "a photo of {}.",
        "a picture with {}.",
        "an image of {}.",
        "a drawing of {}.",
        "{} on a grey background.",
    ),
}

# Facts a flat drawing of shapes can neither show nor rule out: the neutral hypotheses.
MATERIALS: tuple[str, ...] = ("wood", "metal", "glass", "paper", "plastic", "stone")
SCENE_FACTS: tuple[str, ...] = (
    "the picture was drawn by a child.",
    "the picture was made on a rainy day.",
    "the picture was drawn in the morning.",
    "the person who drew the picture is left-handed.",
)

_GRID = 3  # unique captions place each object in a 3×3 grid of the image
_GRID_PLACES: dict[tuple[int, int], str] = {  # (column, row) -> where
    (0, 0): "in the top left",
    (1, 0): "at the top",
    (2, 0): "in the top right",
    (0, 1): "on the left",
    (1, 1): "in the center",
    (2, 1): "on the right",
    (0, 2): "in the bottom left",
    (1, 2): "at the bottom",
    (2, 2): "in the bottom right",
}
_STATEMENT_TRIES = 20  # statements tried per reasoning group before giving the group up
_CONTRAST_TRIES = 60  # image pairs tried to find one where the statement has the other truth
_EXISTS_WITH_MATERIAL_SHARE = 0.25  # of contradictions; matches its share of neutral forms


class ClassicTasksConfig(BaseModel):
    """How many items each task gets, relative to the base split's number of images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    single_object_images_per_image: float = Field(
        0.5, ge=0, le=10, description="single-object images for the shape and color tasks"
    )
    reasoning_groups_per_image: float = Field(
        0.5,
        ge=0,
        le=10,
        description="reasoning sentences; each gives one true and one false record",
    )


@dataclass(frozen=True)
class _SplitScenes:
    """The base dataset's images of one split, with their objects in reading order."""

    split: str
    image_ids: tuple[int, ...]
    file_names: tuple[str, ...]
    objects: tuple[tuple[ShapeObject, ...], ...]


@dataclass(frozen=True)
class _SplitContext:
    config: ShapesConfig
    geometry: _Geometry
    split: str

    @property
    def is_comp(self) -> bool:
        return self.split == "test_comp"

    def is_nameable(self, combo: tuple[str, str]) -> bool:
        """Held-out combos may be named only in test_comp, so that no other split leaks them."""
        return self.is_comp or combo not in set(self.config.held_out_combos)

    def is_focus(self, obj: ShapeObject) -> bool:
        return self.is_comp and obj.combo in set(self.config.held_out_combos)

    def scene(self, objects: tuple[ShapeObject, ...]) -> _Scene:
        return _scene(objects, self.config, self.geometry, self.is_comp)


def _rng(seed: int, task: str, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes, unlike hash().
    return random.Random(f"shapesworld-tasks/{seed}/{task}/{split}/{index}")


def classic_task_paths(root: str | Path, split: str) -> dict[str, Path]:
    """Paths of the task files for a split, keyed like ``TASK_FILES`` plus ``"vqa_answers"``
    (one file for the whole dataset). Image paths inside them are relative to ``root``."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; expected one of {list(SPLITS)}")
    paths = {name: Path(root) / split / file_name for name, file_name in TASK_FILES.items()}
    paths["vqa_answers"] = Path(root) / VQA_ANSWERS_FILE
    return paths


def _load_split_scenes(root: Path, split: str) -> _SplitScenes:
    path = shapes_split_paths(root, split)["objects"]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the base ShapesWorld dataset at {root} is incomplete "
            "(generate it with tessera.data.shapes.generate_shapes first)"
        )
    data = _load_json(path)
    try:
        shape_of = {c["id"]: c["name"] for c in data["categories"]}
        ids = [image["id"] for image in data["images"]]
        file_names = [image["file_name"] for image in data["images"]]
        by_image: dict[int, list[ShapeObject]] = {image_id: [] for image_id in ids}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            obj = ShapeObject(
                a["color"], shape_of[a["category_id"]], a["size"], (x, y, x + w, y + h)
            )
            by_image[a["image_id"]].append(obj)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a ShapesWorld objects file: {error!r}") from error
    objects = tuple(tuple(by_image[image_id]) for image_id in ids)
    return _SplitScenes(split, tuple(ids), tuple(file_names), objects)


# --- noun phrases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NounPhrase:
    """Objects picked out by colour and/or shape; with neither it means every shape."""

    color: str | None = None
    shape: str | None = None

    def count(self, objects: Sequence[ShapeObject]) -> int:
        return sum(
            (self.color is None or o.color == self.color)
            and (self.shape is None or o.shape == self.shape)
            for o in objects
        )

    @property
    def noun(self) -> str:
        return " ".join(w for w in (self.color, self.shape or "shape") if w)

    @property
    def plural(self) -> str:
        return " ".join(
            w for w in (self.color, PLURALS[self.shape] if self.shape else "shapes") if w
        )

    @property
    def with_article(self) -> str:
        return _with_article(self.noun)

    def counted(self, number: int) -> str:
        return f"{number} {self.noun if number == 1 else self.plural}"


def _phrase_for(rng: random.Random, obj: ShapeObject, allow_every_shape: bool) -> _NounPhrase:
    # Colour+shape phrases come up half the time: only they can name a held-out combo.
    kinds = ["combo", "combo", "color", "shape"] + (["every"] if allow_every_shape else [])
    kind = rng.choice(kinds)
    if kind == "combo":
        return _NounPhrase(obj.color, obj.shape)
    if kind == "color":
        return _NounPhrase(color=obj.color)
    if kind == "shape":
        return _NounPhrase(shape=obj.shape)
    return _NounPhrase()


def _wrong_count(rng: random.Random, actual: int) -> int:
    """A nearby but wrong count, at least 1: far-off numbers would be too easy to reject."""
    return 2 if actual <= 1 else actual + rng.choice((-1, 1))


# --- retrieval ------------------------------------------------------------------------------------


def _grid_place(obj: ShapeObject, geometry: _Geometry) -> tuple[int, int]:
    cx, cy = obj.center
    column = min(_GRID - 1, int(_GRID * cx / geometry.width))
    row = min(_GRID - 1, int(_GRID * cy / geometry.height))
    return column, row


def grid_caption(objects: Sequence[ShapeObject], geometry: _Geometry) -> str:
    """Every object with size, colour, shape and its place in a 3×3 grid. Objects are listed in
    a canonical order (by place, then attributes), so two captions are equal exactly when the
    images hold the same objects in the same places."""
    places = {id(o): _grid_place(o, geometry) for o in objects}
    ordered = sorted(
        objects, key=lambda o: (places[id(o)][1], places[id(o)][0], o.size, o.color, o.shape)
    )
    return (
        _join([f"{_with_article(o.phrase())} {_GRID_PLACES[places[id(o)]]}" for o in ordered]) + "."
    )


def coordinate_caption(objects: Sequence[ShapeObject]) -> str:
    """Every object with its centre in pixels (rounded down): equal only for images holding
    identical objects, since same-size objects at different spots have different centres."""
    centres = {id(o): (int(o.center[0]), int(o.center[1])) for o in objects}
    ordered = sorted(
        objects, key=lambda o: (centres[id(o)][1], centres[id(o)][0], o.size, o.color, o.shape)
    )
    return _join([f"{_with_article(o.phrase())} at {centres[id(o)]}" for o in ordered]) + "."


def _unique_captions(scenes: _SplitScenes, geometry: _Geometry) -> list[tuple[str, str]]:
    """One (caption, detail) per image; grid captions shared by several images fall back to
    pixel coordinates, so only images with identical objects can still share a caption."""
    captions = [grid_caption(objects, geometry) for objects in scenes.objects]
    shared = Counter(captions)
    return [
        (coordinate_caption(objects), "coordinates") if shared[caption] > 1 else (caption, "grid")
        for caption, objects in zip(captions, scenes.objects, strict=True)
    ]


def _retrieval_file(
    root: Path, scenes: _SplitScenes, context: _SplitContext, unique: bool, info: dict[str, Any]
) -> dict[str, Any]:
    base = _load_json(shapes_split_paths(root, scenes.split)["captions"])
    index_of = {image_id: k for k, image_id in enumerate(scenes.image_ids)}
    if unique:
        annotations = [
            {
                "id": image_id * _IDS_PER_IMAGE,
                "image_id": image_id,
                "caption": caption,
                "detail": detail,
            }
            for image_id, (caption, detail) in zip(
                scenes.image_ids, _unique_captions(scenes, context.geometry), strict=True
            )
        ]
    else:
        annotations = base["annotations"]
    duplicates = caption_duplicate_stats(
        [a["caption"] for a in annotations], [index_of[a["image_id"]] for a in annotations]
    )
    return {
        "info": info,
        "caption_kind": "unique" if unique else "coco",
        "duplicates": duplicates,
        "images": base["images"],
        "annotations": annotations,
    }


# --- zero-shot classification -------------------------------------------------------------------


def zeroshot_class_names(config: ShapesConfig) -> dict[str, list[str]]:
    """Class names per zero-shot task; a label is an index into its task's list."""
    count_phrase = _NounPhrase()
    return {
        "shape": list(SHAPES),
        "color": list(COLORS),
        "count": [count_phrase.counted(n) for n in range(1, config.max_objects + 1)],
    }


def _zeroshot_image_name(split: str, index: int) -> str:
    return f"{ZEROSHOT_IMAGES_DIR}/{split}/{split}_{index:06d}.png"


def _zeroshot_file(
    root: Path,
    scenes: _SplitScenes,
    context: _SplitContext,
    count: int,
    progress: bool,
    info: dict[str, Any],
) -> dict[str, Any]:
    split, config = scenes.split, context.config
    # One object per image, drawn by the base generator's own sampler: in test_comp it is always
    # a held-out combo, elsewhere never.
    single = config.model_copy(update={"min_objects": 1, "max_objects": 1})
    (root / ZEROSHOT_IMAGES_DIR / split).mkdir(parents=True, exist_ok=True)
    singles: list[dict[str, Any]] = []
    shape_items: list[dict[str, Any]] = []
    color_items: list[dict[str, Any]] = []
    color_names = list(COLORS)
    for index in tqdm(range(count), desc=f"zero-shot {split}", disable=not progress):
        rng = _rng(config.seed, "zeroshot", split, index)
        (obj,) = _sample_objects(rng, single, context.geometry, context.is_comp)
        file_name = _zeroshot_image_name(split, index)
        _draw((obj,), context.geometry).save(root / file_name, format="PNG")
        x0, y0, x1, y1 = obj.box
        singles.append(
            {
                "image": file_name,
                "color": obj.color,
                "shape": obj.shape,
                "size": obj.size,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            }
        )
        item_id = f"{split}_single_{index:06d}"
        shape_items.append({"id": item_id, "image": file_name, "label": SHAPES.index(obj.shape)})
        color_items.append(
            {"id": item_id, "image": file_name, "label": color_names.index(obj.color)}
        )
    count_items = [
        {"id": Path(file_name).stem, "image": file_name, "label": len(objects) - 1}
        for file_name, objects in zip(scenes.file_names, scenes.objects, strict=True)
    ]
    class_names = zeroshot_class_names(config)
    items = {"shape": shape_items, "color": color_items, "count": count_items}
    images_of = {
        "shape": "single-object images",
        "color": "single-object images",
        "count": "base images",
    }
    return {
        "info": info,
        "tasks": {
            name: {
                "images": images_of[name],
                "class_names": class_names[name],
                "templates": list(ZEROSHOT_TEMPLATES[name]),
                "items": items[name],
            }
            for name in ZEROSHOT_TASKS
        },
        "single_object_images": singles,
    }


# --- visual reasoning over image pairs ------------------------------------------------------------

_Objects = Sequence[ShapeObject]


@dataclass(frozen=True)
class _PairStatement:
    kind: str
    sentence: str
    holds: Callable[[_Objects, _Objects], bool]


def _pair_phrase(
    rng: random.Random,
    left: _Objects,
    right: _Objects,
    context: _SplitContext,
    allow_every_shape: bool,
) -> _NounPhrase:
    obj = _pick(rng, [*left, *right], context.is_focus)
    return _phrase_for(rng, obj, allow_every_shape)


def _both_contain(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    phrase = _pair_phrase(rng, left, right, context, allow_every_shape=False)
    return _PairStatement(
        "both_contain",
        f"both images contain {phrase.with_article}.",
        lambda a, b: phrase.count(a) > 0 and phrase.count(b) > 0,
    )


def _exactly_one_contains(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    phrase = _pair_phrase(rng, left, right, context, allow_every_shape=False)
    return _PairStatement(
        "exactly_one_contains",
        f"exactly one image contains {phrase.with_article}.",
        lambda a, b: (phrase.count(a) > 0) != (phrase.count(b) > 0),
    )


def _neither_contains(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    phrase = _pair_phrase(rng, left, right, context, allow_every_shape=False)
    return _PairStatement(
        "neither_contains",
        f"neither image contains {phrase.with_article}.",
        lambda a, b: phrase.count(a) == 0 and phrase.count(b) == 0,
    )


def _count_in_total(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    phrase = _pair_phrase(rng, left, right, context, allow_every_shape=True)
    actual = phrase.count(left) + phrase.count(right)
    stated = actual if rng.random() < 0.5 else _wrong_count(rng, actual)
    verb = "is" if stated == 1 else "are"
    return _PairStatement(
        "count_in_total",
        f"there {verb} exactly {phrase.counted(stated)} in total.",
        lambda a, b: phrase.count(a) + phrase.count(b) == stated,
    )


def _more_on_one_side(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    phrase = _pair_phrase(rng, left, right, context, allow_every_shape=True)
    side, other = rng.choice((("left", "right"), ("right", "left")))

    def holds(a: _Objects, b: _Objects) -> bool:
        counts = {"left": phrase.count(a), "right": phrase.count(b)}
        return counts[side] > counts[other]

    return _PairStatement(
        "more_on_one_side",
        f"the {side} image has more {phrase.plural} than the {other} image.",
        holds,
    )


def _same_number(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    phrase = _pair_phrase(rng, left, right, context, allow_every_shape=True)
    return _PairStatement(
        "same_number",
        f"both images have the same number of {phrase.plural}.",
        lambda a, b: phrase.count(a) == phrase.count(b),
    )


def _all_one_color(
    rng: random.Random, left: _Objects, right: _Objects, context: _SplitContext
) -> _PairStatement:
    side = rng.choice(("left", "right"))
    color = _pick(rng, left if side == "left" else right, context.is_focus).color

    def holds(a: _Objects, b: _Objects) -> bool:
        return all(o.color == color for o in (a if side == "left" else b))

    return _PairStatement("all_one_color", f"every shape in the {side} image is {color}.", holds)


_PAIR_STATEMENTS: tuple[
    Callable[[random.Random, _Objects, _Objects, _SplitContext], _PairStatement], ...
] = (
    _both_contain,
    _exactly_one_contains,
    _neither_contains,
    _count_in_total,
    _more_on_one_side,
    _same_number,
    _all_one_color,
)


def _two_images(rng: random.Random, count: int) -> tuple[int, int]:
    first = rng.randrange(count)
    second = rng.randrange(count - 1)
    return first, second + (second >= first)


def _contrast_pair(
    rng: random.Random, statement: _PairStatement, pair: tuple[int, int], scenes: _SplitScenes
) -> tuple[int, int] | None:
    """Another pair of images for which the statement has the opposite truth value. It keeps
    one image of the first pair when it can, so the two records differ as little as possible."""
    objects = scenes.objects
    truth = statement.holds(objects[pair[0]], objects[pair[1]])
    for attempt in range(_CONTRAST_TRIES):
        left, right = _two_images(rng, len(objects))
        if attempt % 3 == 0 and pair[0] != right:
            left = pair[0]
        elif attempt % 3 == 1 and pair[1] != left:
            right = pair[1]
        if statement.holds(objects[left], objects[right]) != truth:
            return left, right
    return None


def _reasoning_group(
    scenes: _SplitScenes, context: _SplitContext, group: int
) -> list[dict[str, Any]]:
    """Two records with one sentence: true of one image pair, false of another, so the sentence
    alone never tells the label (as in NLVR2). Empty when no contrasting pair turns up."""
    if len(scenes.objects) < 2:
        return []
    rng = _rng(context.config.seed, "reasoning", scenes.split, group)
    for _ in range(_STATEMENT_TRIES):
        pair = _two_images(rng, len(scenes.objects))
        make = rng.choice(_PAIR_STATEMENTS)
        statement = make(rng, scenes.objects[pair[0]], scenes.objects[pair[1]], context)
        contrast = _contrast_pair(rng, statement, pair, scenes)
        if contrast is None:
            continue
        pairs = [pair, contrast]
        rng.shuffle(pairs)
        return [
            {
                "id": f"{scenes.split}_pair_{group:06d}_{k}",
                "left": scenes.file_names[left],
                "right": scenes.file_names[right],
                "left_image_id": scenes.image_ids[left],
                "right_image_id": scenes.image_ids[right],
                "sentence": statement.sentence,
                "label": statement.holds(scenes.objects[left], scenes.objects[right]),
                "kind": statement.kind,
            }
            for k, (left, right) in enumerate(pairs)
        ]
    return []


def _reasoning_file(
    scenes: _SplitScenes, context: _SplitContext, groups: int, progress: bool, info: dict[str, Any]
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    for group in tqdm(range(groups), desc=f"reasoning {scenes.split}", disable=not progress):
        records.extend(_reasoning_group(scenes, context, group))
    labels = Counter(r["label"] for r in records)
    return {
        "info": info,
        "task": "visual reasoning over image pairs (NLVR2-style)",
        "label_counts": {"true": labels[True], "false": labels[False]},
        "records": records,
    }


# --- visual entailment ----------------------------------------------------------------------------

_Hypothesis = Callable[[random.Random, _Scene, _SplitContext, bool], str | None]


def _present_combo(rng: random.Random, scene: _Scene) -> tuple[str, str]:
    return _pick(rng, scene.objects, lambda o: o in scene.focus).combo


def _absent_combo(rng: random.Random, scene: _Scene) -> tuple[str, str] | None:
    if not scene.absent_combos:
        return None
    return scene.absent_combos[rng.randrange(len(scene.absent_combos))]


def _claim_exists(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    combo = _present_combo(rng, scene) if truth else _absent_combo(rng, scene)
    return None if combo is None else f"there is {_with_article(' '.join(combo))}."


def _claim_absent(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    combo = _absent_combo(rng, scene) if truth else _present_combo(rng, scene)
    return None if combo is None else f"there is no {' '.join(combo)}."


def _claim_count(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    if rng.random() < 0.5:
        phrase = _NounPhrase()
    else:
        phrase = _phrase_for(rng, _pick(rng, scene.objects, lambda o: o in scene.focus), False)
    actual = phrase.count(scene.objects)
    stated = actual if truth else _wrong_count(rng, actual)
    return f"there {'is' if stated == 1 else 'are'} exactly {phrase.counted(stated)}."


def _claim_color(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    candidates = [o for o in scene.objects if _is_unique(o, scene.objects, ("shape",))]
    if not candidates:
        return None
    obj = _pick(rng, candidates, lambda o: o in scene.focus)
    if truth:
        return f"the {obj.shape} is {obj.color}."
    others = [c for c in COLORS if c != obj.color and context.is_nameable((c, obj.shape))]
    return f"the {obj.shape} is {rng.choice(others)}."


def _claim_size(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    candidates = [o for o in scene.objects if _is_unique(o, scene.objects, ("color", "shape"))]
    if not candidates:
        return None
    obj = _pick(rng, candidates, lambda o: o in scene.focus)
    size = obj.size if truth else next(s for s in SIZES if s != obj.size)
    return f"the {obj.color} {obj.shape} is {size}."


def _claim_spatial(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    pair = _spatial_pair(rng, scene)
    if pair is None:
        return None
    ref_a, ref_b, relation = pair
    if not truth:
        relation = _OPPOSITE[relation]
    return f"the {ref_a} is {relation} the {ref_b}."


def _undecidable_material(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    referable = [o for o in scene.objects if _reference(o, scene.objects)]
    if not referable:
        return None
    obj = _pick(rng, referable, lambda o: o in scene.focus)
    return f"the {_reference(obj, scene.objects)} is made of {rng.choice(MATERIALS)}."


def _undecidable_weight(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    # Only equal sizes: "the large square is heavier than the small circle" invites a guess.
    pairs = [
        (a, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b
        and a.size == b.size
        and _reference(a, scene.objects)
        and _reference(b, scene.objects)
    ]
    if not pairs:
        return None
    a, b = _pick(rng, pairs, lambda p: p[0] in scene.focus or p[1] in scene.focus)
    return f"the {_reference(a, scene.objects)} is heavier than the {_reference(b, scene.objects)}."


def _undecidable_scene(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    return rng.choice(SCENE_FACTS)


def _exists_with_material(
    rng: random.Random, scene: _Scene, context: _SplitContext, truth: bool
) -> str | None:
    """Neutral when such a shape is present (its material is invisible), contradiction when no
    shape of that colour and kind is there at all: the same words, either label."""
    combo = _present_combo(rng, scene) if truth else _absent_combo(rng, scene)
    if combo is None:
        return None
    return f"there is {_with_article(' '.join(combo))} made of {rng.choice(MATERIALS)}."


_DECIDABLE: dict[str, _Hypothesis] = {
    "exists": _claim_exists,
    "absent": _claim_absent,
    "count": _claim_count,
    "color": _claim_color,
    "size": _claim_size,
    "spatial": _claim_spatial,
}
_NEUTRAL: dict[str, _Hypothesis] = {
    "material": _undecidable_material,
    "weight": _undecidable_weight,
    "scene": _undecidable_scene,
    "exists_with_material": _exists_with_material,
}


def _first_hypothesis(
    rng: random.Random,
    forms: dict[str, _Hypothesis],
    scene: _Scene,
    context: _SplitContext,
    truth: bool,
) -> tuple[str, str]:
    names = sorted(forms)
    rng.shuffle(names)
    for name in names:
        text = forms[name](rng, scene, context, truth)
        if text is not None:
            return name, text
    raise ValueError(f"no hypothesis form applies to the scene {scene.objects}")


def _entailment_records(
    scenes: _SplitScenes, context: _SplitContext, index: int
) -> list[dict[str, Any]]:
    """Three hypotheses about one image, one per label."""
    rng = _rng(context.config.seed, "entailment", scenes.split, index)
    scene = context.scene(scenes.objects[index])
    hypotheses = [
        ("entailment", *_first_hypothesis(rng, _DECIDABLE, scene, context, True)),
        ("neutral", *_first_hypothesis(rng, _NEUTRAL, scene, context, True)),
    ]
    contradiction_forms = _DECIDABLE
    if rng.random() < _EXISTS_WITH_MATERIAL_SHARE:
        contradiction_forms = {"exists_with_material": _exists_with_material}
    hypotheses.append(
        ("contradiction", *_first_hypothesis(rng, contradiction_forms, scene, context, False))
    )
    rng.shuffle(hypotheses)
    stem = Path(scenes.file_names[index]).stem
    return [
        {
            "id": f"{stem}_ve{k}",
            "image": scenes.file_names[index],
            "image_id": scenes.image_ids[index],
            "hypothesis": text,
            "label": label,
            "kind": kind,
        }
        for k, (label, kind, text) in enumerate(hypotheses)
    ]


def _entailment_file(
    scenes: _SplitScenes, context: _SplitContext, progress: bool, info: dict[str, Any]
) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    for index in tqdm(
        range(len(scenes.objects)), desc=f"entailment {scenes.split}", disable=not progress
    ):
        records.extend(_entailment_records(scenes, context, index))
    labels = Counter(r["label"] for r in records)
    return {
        "info": info,
        "task": "visual entailment (SNLI-VE-style)",
        "labels": list(ENTAILMENT_LABELS),
        "label_counts": {label: labels[label] for label in ENTAILMENT_LABELS},
        "records": records,
    }


# --- VQA answers ----------------------------------------------------------------------------------


def _vqa_answers_file(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    def items(split: str) -> list[Any]:
        paths = shapes_split_paths(root, split)
        records, _ = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], root)
        return records

    vocabulary = build_answer_vocabulary(items("train"))
    coverage: dict[str, float | None] = {}
    for split in SPLITS:
        split_items = items(split)
        covered = sum(
            any(vocabulary.index_of(a) is not None for a in item.answers) for item in split_items
        )
        coverage[split] = covered / len(split_items) if split_items else None
    return {
        "info": info,
        "source": f"train/{SPLIT_FILES['vqa_annotations']}",
        "normalization": "official VQA v2 answer normalisation (tessera.eval.vqa_metrics)",
        "count": "training questions having the answer among their annotators' answers",
        "coverage": coverage,
        "answers": vocabulary.to_json(),
    }


# --- entry point ----------------------------------------------------------------------------------


def _class_counts(task: dict[str, Any]) -> dict[str, int]:
    labels = Counter(item["label"] for item in task["items"])
    return {name: labels[k] for k, name in enumerate(task["class_names"])}


def generate_classic_tasks(
    root: str | Path,
    progress: bool = True,
    unique_captions: bool = False,
    config: ClassicTasksConfig | None = None,
) -> dict[str, Any]:
    """Write every classic task file for every split of the ShapesWorld folder ``root``.

    The base dataset (``meta.json`` and each split's files) must exist. With
    ``unique_captions`` the retrieval galleries hold one full-description caption per image
    (every object with size, colour, shape and place), unique within the split unless two
    images hold identical objects; otherwise they hold the base COCO captions, which repeat
    across images. Returns the manifest, also written to ``root/classic_tasks.json``, which is
    removed first and written last, so a folder with it has complete task files.
    """
    out = Path(root)
    meta = load_meta(out)
    base_config = ShapesConfig.model_validate(meta["config"])
    options = config or ClassicTasksConfig()
    geometry = _Geometry.from_config(base_config)
    all_scenes = {split: _load_split_scenes(out, split) for split in SPLITS}
    (out / TASKS_META_FILE).unlink(missing_ok=True)
    info = {
        "description": "ShapesWorld classic vision-language tasks",
        "version": str(TASKS_FORMAT_VERSION),
        "seed": base_config.seed,
    }
    splits: dict[str, Any] = {}
    for split, scenes in all_scenes.items():
        context = _SplitContext(base_config, geometry, split)
        images = len(scenes.objects)
        retrieval = _retrieval_file(out, scenes, context, unique_captions, info)
        zeroshot = _zeroshot_file(
            out,
            scenes,
            context,
            round(options.single_object_images_per_image * images),
            progress,
            info,
        )
        reasoning = _reasoning_file(
            scenes, context, round(options.reasoning_groups_per_image * images), progress, info
        )
        entailment = _entailment_file(scenes, context, progress, info)
        paths = classic_task_paths(out, split)
        for name, payload in (
            ("retrieval", retrieval),
            ("zeroshot", zeroshot),
            ("reasoning", reasoning),
            ("entailment", entailment),
        ):
            _write_json_atomic(paths[name], payload)
        splits[split] = {
            "retrieval": retrieval["duplicates"],
            "zeroshot": {
                name: {
                    "items": len(task["items"]),
                    "label_counts": _class_counts(task),
                }
                for name, task in zeroshot["tasks"].items()
            },
            "reasoning": {
                "records": len(reasoning["records"]),
                "label_counts": reasoning["label_counts"],
            },
            "entailment": {
                "records": len(entailment["records"]),
                "label_counts": entailment["label_counts"],
            },
        }
    answers = _vqa_answers_file(out, info)
    _write_json_atomic(out / VQA_ANSWERS_FILE, answers)
    manifest: dict[str, Any] = {
        "format": TASKS_FORMAT_NAME,
        "format_version": TASKS_FORMAT_VERSION,
        "base_seed": base_config.seed,
        "caption_kind": "unique" if unique_captions else "coco",
        "config": options.model_dump(mode="json"),
        "zeroshot_templates": {name: list(t) for name, t in ZEROSHOT_TEMPLATES.items()},
        "vqa_answers": {"answers": len(answers["answers"]), "coverage": answers["coverage"]},
        "splits": splits,
        "files": {
            **TASK_FILES,
            "vqa_answers": VQA_ANSWERS_FILE,
            "zeroshot_images": ZEROSHOT_IMAGES_DIR,
        },
    }
    _write_json_atomic(out / TASKS_META_FILE, manifest, indent=2)
    return manifest
