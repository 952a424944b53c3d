"""ShapesWorld: Tessera's built-in synthetic vision-language dataset.

Images of simple coloured shapes on a light grey background, with captions, typed VQA
questions and LLaVA-style conversations, written in standard formats (COCO captions, COCO-like
instances, VQA v2, LLaVA JSON) so that the readers in ``tessera.data.readers`` serve it exactly
as they serve real data.

A few colour×shape combinations are held out: they never appear (in images or text) in
``train``, ``val`` or ``test`` and appear in every ``test_comp`` image, which measures
compositional generalisation.

Every image draws from its own random stream seeded by (seed, split, index), so the same
config always gives byte-identical files, and changing one split's count leaves the images of
the other splits (and the first images of the same split) unchanged.

Layout under ``out_dir`` (all paths inside the JSON files are relative to ``out_dir``)::

    meta.json                         config, vocabulary, held-out combos, counts per split
    images/<split>/<split>_<idx:06d>.png
    <split>/captions.json             COCO captions
    <split>/objects.json              COCO instances-like, plus "color" and "size" per object
    <split>/vqa_questions.json        VQA v2 questions, plus an "images" list [{"id", "file_name"}]
    <split>/vqa_annotations.json      VQA v2 annotations, 10 identical answers per question
    <split>/llava_pretrain.json       LLaVA records, one caption each
    <split>/llava_instruct.json       LLaVA records: single-turn VQA and multi-turn conversations
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

FORMAT_NAME = "tessera-shapesworld"
FORMAT_VERSION = 1
META_FILE = "meta.json"
IMAGES_DIR = "images"
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_comp")
SPLIT_FILES: dict[str, str] = {
    "captions": "captions.json",
    "objects": "objects.json",
    "vqa_questions": "vqa_questions.json",
    "vqa_annotations": "vqa_annotations.json",
    "llava_pretrain": "llava_pretrain.json",
    "llava_instruct": "llava_instruct.json",
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "spatial", "attribute")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}

# One combo per shape, each with a different colour, so every colour and every shape keeps at
# least four partners in train.
DEFAULT_HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "circle"),
    ("yellow", "diamond"),
    ("purple", "square"),
)

PRETRAIN_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for the image.",
    "What is in this picture?",
    "Give a brief description of the image.",
)
DESCRIBE_REQUESTS: tuple[str, ...] = (
    "describe the image.",
    "what do you see in the image?",
    "describe the shapes in the picture.",
)

MIN_SIDE = 32  # below this the small shapes are only a few pixels and become unreadable
MAX_OBJECTS = 9  # object/caption/question ids are image_id * 10 + k with k < 10
MAX_IMAGES_PER_SPLIT = 999_999  # image ids are (split number + 1) * 1_000_000 + index
_SPLIT_ID_BASE = 1_000_000
_IDS_PER_IMAGE = 10
_SIZE_FRACTION = {"small": 0.17, "large": 0.3}  # of the shorter image side
_BOX_GAP = 2  # pixels kept free between boxes so that neighbouring shapes read as separate
_PLACEMENT_TRIES = 50
_SPATIAL_MARGIN_FRACTION = 0.125  # centres closer than this (of width/height) are ambiguous
_ANNOTATORS = 10  # VQA v2 keeps ten answers per question
_MIN_QUESTIONS, _MAX_QUESTIONS = 3, 5
_EXTRA_QUESTION_TRIES = 20
_MAX_CHAT_QUESTIONS = 3  # plus the describe turn: 2 to 4 turns

_T = TypeVar("_T")


class ShapesConfig(BaseModel):
    """What ShapesWorld generates; every field is validated and errors name the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    image_size: int = Field(64, ge=MIN_SIDE, le=1024, description="image height in pixels")
    aspect_ratio: float = Field(
        1.0, gt=0, le=8, description="width / height; width = round(image_size * aspect_ratio)"
    )
    num_train: int = Field(8000, ge=0, le=MAX_IMAGES_PER_SPLIT)
    num_val: int = Field(500, ge=0, le=MAX_IMAGES_PER_SPLIT)
    num_test: int = Field(1000, ge=0, le=MAX_IMAGES_PER_SPLIT)
    num_test_comp: int = Field(1000, ge=0, le=MAX_IMAGES_PER_SPLIT)
    min_objects: int = Field(1, ge=1, le=MAX_OBJECTS)
    max_objects: int = Field(6, ge=1, le=MAX_OBJECTS)
    held_out_combos: tuple[tuple[str, str], ...] = Field(
        DEFAULT_HELD_OUT_COMBOS, description="(colour, shape) pairs seen only in test_comp"
    )

    @field_validator("held_out_combos")
    @classmethod
    def _check_held_out(cls, combos: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        for color, shape in combos:
            if color not in COLORS:
                raise ValueError(
                    f"held_out_combos: unknown colour {color!r}; known: {sorted(COLORS)}"
                )
            if shape not in SHAPES:
                raise ValueError(f"held_out_combos: unknown shape {shape!r}; known: {list(SHAPES)}")
        if len(set(combos)) != len(combos):
            raise ValueError("held_out_combos: contains duplicates")
        held = set(combos)
        for color in COLORS:
            if all((color, shape) in held for shape in SHAPES):
                raise ValueError(f"held_out_combos: colour {color!r} would never appear in train")
        for shape in SHAPES:
            if all((color, shape) in held for color in COLORS):
                raise ValueError(f"held_out_combos: shape {shape!r} would never appear in train")
        return combos

    @model_validator(mode="after")
    def _check_consistency(self) -> ShapesConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects ({self.min_objects}) must not exceed max_objects ({self.max_objects})"
            )
        if self.width < MIN_SIDE:
            raise ValueError(
                f"aspect_ratio {self.aspect_ratio} makes the image {self.width} px wide; "
                f"width must be at least {MIN_SIDE}"
            )
        if self.num_test_comp > 0 and not self.held_out_combos:
            raise ValueError("num_test_comp > 0 needs at least one entry in held_out_combos")
        return self

    @property
    def height(self) -> int:
        return self.image_size

    @property
    def width(self) -> int:
        return round(self.image_size * self.aspect_ratio)

    def split_counts(self) -> dict[str, int]:
        return {
            "train": self.num_train,
            "val": self.num_val,
            "test": self.num_test,
            "test_comp": self.num_test_comp,
        }


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; ``box`` is [x0, y0, x1, y1] in pixels with x1, y1 exclusive."""

    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def combo(self) -> tuple[str, str]:
        return self.color, self.shape

    def phrase(self, attributes: Sequence[str] = ("size", "color", "shape")) -> str:
        """Adjectives in natural English order (size, colour) followed by the shape noun."""
        return " ".join(getattr(self, a) for a in ("size", "color", "shape") if a in attributes)


@dataclass(frozen=True)
class _Geometry:
    width: int
    height: int
    size_px: dict[str, int]
    margin_x: float
    margin_y: float

    @classmethod
    def from_config(cls, config: ShapesConfig) -> _Geometry:
        shorter = min(config.width, config.height)
        return cls(
            width=config.width,
            height=config.height,
            size_px={name: max(5, round(f * shorter)) for name, f in _SIZE_FRACTION.items()},
            margin_x=_SPATIAL_MARGIN_FRACTION * config.width,
            margin_y=_SPATIAL_MARGIN_FRACTION * config.height,
        )


@dataclass(frozen=True)
class _Question:
    question_type: str
    question: str
    answer: str
    answer_type: str  # VQA v2 answer types: "yes/no", "number", "other"


@dataclass(frozen=True)
class _Scene:
    objects: tuple[ShapeObject, ...]
    focus: tuple[ShapeObject, ...]  # held-out objects in test_comp; questions prefer them
    absent_combos: tuple[tuple[str, str], ...]  # safe, preferred-first "no" answers for exists
    geometry: _Geometry


@dataclass(frozen=True)
class _Sample:
    image: Image.Image
    objects: tuple[ShapeObject, ...]
    captions: tuple[str, ...]
    caption_prompts: tuple[str, ...]  # the LLaVA pretrain instruction paired with each caption
    questions: tuple[_Question, ...]
    chat: tuple[tuple[str, str], ...]  # (user text, assistant text) per turn, no placeholder


# --- scene sampling and drawing -----------------------------------------------------------


def _all_combos() -> list[tuple[str, str]]:
    return [(color, shape) for color in COLORS for shape in SHAPES]


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return (
        a[2] + _BOX_GAP <= b[0]
        or b[2] + _BOX_GAP <= a[0]
        or a[3] + _BOX_GAP <= b[1]
        or b[3] + _BOX_GAP <= a[1]
    )


def _sample_objects(
    rng: random.Random, config: ShapesConfig, geometry: _Geometry, is_comp: bool
) -> tuple[ShapeObject, ...]:
    held_out = list(config.held_out_combos)
    allowed = [c for c in _all_combos() if c not in set(held_out)]
    count = rng.randint(config.min_objects, config.max_objects)
    specs: list[tuple[str, str, str]] = []
    for k in range(count):
        if is_comp and k == 0:
            color, shape = rng.choice(held_out)
        else:
            color, shape = rng.choice(_all_combos() if is_comp else allowed)
        specs.append((color, shape, rng.choice(SIZES)))
    # Large shapes go first (after the required held-out one) so that crowded images lose
    # small shapes rather than large ones when placement fails.
    required, optional = specs[:1], sorted(specs[1:], key=lambda s: s[2] != "large")
    placed: list[ShapeObject] = []
    for color, shape, size in required + optional:
        side = geometry.size_px[size]
        for _ in range(_PLACEMENT_TRIES):
            x0 = rng.randint(0, geometry.width - side)
            y0 = rng.randint(0, geometry.height - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_boxes_apart(box, other.box) for other in placed):
                placed.append(ShapeObject(color, shape, size, box))
                break
    # Reading order (left to right, then top to bottom) makes annotations easy to inspect.
    return tuple(sorted(placed, key=lambda o: (o.center[0], o.center[1])))


def _draw(objects: Sequence[ShapeObject], geometry: _Geometry) -> Image.Image:
    image = Image.new("RGB", (geometry.width, geometry.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLORS[obj.color]
        x0, y0, x1, y1 = obj.box
        right, bottom = x1 - 1, y1 - 1  # ImageDraw coordinates are inclusive
        cx, cy = (x0 + right) / 2, (y0 + bottom) / 2
        if obj.shape == "circle":
            draw.ellipse((x0, y0, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=fill)
        elif obj.shape == "cross":
            arm = (x1 - x0) / 3
            draw.rectangle((x0 + arm, y0, right - arm, bottom), fill=fill)
            draw.rectangle((x0, y0 + arm, right, bottom - arm), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


# --- language -------------------------------------------------------------------------------


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _is_unique(obj: ShapeObject, objects: Sequence[ShapeObject], attributes: Sequence[str]) -> bool:
    matches = sum(all(getattr(o, a) == getattr(obj, a) for a in attributes) for o in objects)
    return matches == 1


_REFERENCE_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
)


def _reference(obj: ShapeObject, objects: Sequence[ShapeObject]) -> str | None:
    """The shortest description that picks out exactly this object, or None if none does."""
    for attributes in _REFERENCE_ATTRIBUTES:
        if _is_unique(obj, objects, attributes):
            return obj.phrase(attributes)
    return None


def _separated_pairs(
    objects: Sequence[ShapeObject], geometry: _Geometry
) -> list[tuple[ShapeObject, ShapeObject, str]]:
    """Ordered pairs whose centres are clearly apart along an axis ("x" or "y")."""
    pairs = []
    for a in objects:
        for b in objects:
            if a is b:
                continue
            if abs(a.center[0] - b.center[0]) >= geometry.margin_x:
                pairs.append((a, b, "x"))
            if abs(a.center[1] - b.center[1]) >= geometry.margin_y:
                pairs.append((a, b, "y"))
    return pairs


def _true_relation(a: ShapeObject, b: ShapeObject, axis: str) -> str:
    if axis == "x":
        return "to the left of" if a.center[0] < b.center[0] else "to the right of"
    return "above" if a.center[1] < b.center[1] else "below"


_OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def _pick(rng: random.Random, candidates: Sequence[_T], preferred: Callable[[_T], bool]) -> _T:
    favoured = [c for c in candidates if preferred(c)]
    return rng.choice(favoured or list(candidates))


def count_clause(count: int) -> str:
    """How a caption says how many objects an image holds: "there is 1 shape", "there are 3 shapes"."""
    return "there is 1 shape" if count == 1 else f"there are {count} shapes"


def _captions(rng: random.Random, objects: Sequence[ShapeObject], geometry: _Geometry) -> list[str]:
    full = _join([_with_article(o.phrase()) for o in objects])
    plain = _join([_with_article(o.phrase(("color", "shape"))) for o in objects])
    opening = rng.choice(("{}.", "an image of {}.", "a picture with {}."))
    captions = [opening.format(full)]
    captions.append(f"{count_clause(len(objects))}: {plain}.")
    pairs = _separated_pairs(objects, geometry)
    if pairs:
        a, b, axis = rng.choice(pairs)
        captions.append(
            f"{_with_article(a.phrase(('color', 'shape')))} {_true_relation(a, b, axis)} "
            f"{_with_article(b.phrase(('color', 'shape')))}."
        )
    return captions


# --- questions --------------------------------------------------------------------------------


def _ask_color(rng: random.Random, scene: _Scene) -> _Question | None:
    candidates = [o for o in scene.objects if _is_unique(o, scene.objects, ("shape",))]
    if not candidates:
        return None
    obj = _pick(rng, candidates, lambda o: o in scene.focus)
    return _Question("color", f"what color is the {obj.shape}?", obj.color, "other")


def _ask_shape(rng: random.Random, scene: _Scene) -> _Question | None:
    candidates = [o for o in scene.objects if _is_unique(o, scene.objects, ("color",))]
    if not candidates:
        return None
    obj = _pick(rng, candidates, lambda o: o in scene.focus)
    return _Question("shape", f"what shape is the {obj.color} object?", obj.shape, "other")


def _ask_count(rng: random.Random, scene: _Scene) -> _Question:
    objects = scene.objects
    counts = Counter({"shapes": len(objects)})  # phrase -> how many objects it matches
    counts.update(f"{o.color} shapes" for o in objects)
    counts.update(PLURALS[o.shape] for o in objects)
    counts.update(f"{o.color} {PLURALS[o.shape]}" for o in objects)
    focus_phrases = sorted({f"{o.color} {PLURALS[o.shape]}" for o in scene.focus})
    # Only the colour+shape form can name a held-out combo; using it for every test_comp count
    # question would make "1" the answer almost always, so half the time any phrase is used.
    if focus_phrases and rng.random() < 0.5:
        phrase = rng.choice(focus_phrases)
    else:
        # Most phrases match a single object; drawing the answer first keeps "1" from dominating.
        answer = rng.choice(sorted(set(counts.values())))
        phrase = rng.choice(sorted(p for p, n in counts.items() if n == answer))
    return _Question("count", f"how many {phrase} are there?", str(counts[phrase]), "number")


def _ask_exists(rng: random.Random, scene: _Scene) -> _Question:
    want_yes = rng.random() < 0.5 or not scene.absent_combos
    if want_yes:
        color, shape = _pick(rng, scene.objects, lambda o: o in scene.focus).combo
    else:
        color, shape = scene.absent_combos[rng.randrange(len(scene.absent_combos))]
    question = f"is there {_with_article(f'{color} {shape}')}?"
    return _Question("exists", question, "yes" if want_yes else "no", "yes/no")


def _spatial_pair(rng: random.Random, scene: _Scene) -> tuple[str, str, str] | None:
    """Two objects clearly apart along one axis, both nameable: (reference a, reference b,
    the true relation of a to b), preferring held-out objects; None when no pair qualifies."""
    references = {id(o): _reference(o, scene.objects) for o in scene.objects}
    pairs = [
        (a, b, axis)
        for a, b, axis in _separated_pairs(scene.objects, scene.geometry)
        if references[id(a)] and references[id(b)]
    ]
    if not pairs:
        return None
    a, b, axis = _pick(rng, pairs, lambda p: p[0] in scene.focus or p[1] in scene.focus)
    return references[id(a)], references[id(b)], _true_relation(a, b, axis)


def _ask_spatial(rng: random.Random, scene: _Scene) -> _Question | None:
    pair = _spatial_pair(rng, scene)
    if pair is None:
        return None
    ref_a, ref_b, relation = pair
    want_yes = rng.random() < 0.5
    if not want_yes:
        relation = _OPPOSITE[relation]
    question = f"is the {ref_a} {relation} the {ref_b}?"
    return _Question("spatial", question, "yes" if want_yes else "no", "yes/no")


def _ask_attribute(rng: random.Random, scene: _Scene) -> _Question | None:
    objects = scene.objects
    forms: dict[str, list[tuple[ShapeObject, str, str]]] = {"size": [], "color": [], "shape": []}
    for o in objects:
        if _is_unique(o, objects, ("color", "shape")):
            forms["size"].append((o, f"what size is the {o.color} {o.shape}?", o.size))
        # The size adjective must be needed, otherwise this is just a "color"/"shape" question.
        if _is_unique(o, objects, ("size", "shape")) and not _is_unique(o, objects, ("shape",)):
            forms["color"].append((o, f"what color is the {o.size} {o.shape}?", o.color))
        if _is_unique(o, objects, ("size", "color")) and not _is_unique(o, objects, ("color",)):
            forms["shape"].append((o, f"what shape is the {o.size} {o.color} object?", o.shape))
    available = [name for name, entries in forms.items() if entries]
    if not available:
        return None
    _, question, answer = _pick(rng, forms[rng.choice(available)], lambda e: e[0] in scene.focus)
    return _Question("attribute", question, answer, "other")


_ASKERS: dict[str, Callable[[random.Random, _Scene], _Question | None]] = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "exists": _ask_exists,
    "spatial": _ask_spatial,
    "attribute": _ask_attribute,
}


def _questions(rng: random.Random, scene: _Scene) -> list[_Question]:
    wanted = rng.randint(_MIN_QUESTIONS, _MAX_QUESTIONS)
    order = list(QUESTION_TYPES)
    rng.shuffle(order)
    questions: list[_Question] = []
    for question_type in order:
        if len(questions) == wanted:
            break
        question = _ASKERS[question_type](rng, scene)
        if question is not None:
            questions.append(question)
    # Scenes of identical shapes leave only count and exists askable (they always are); ask
    # those again, with new wording, to reach the minimum.
    for _ in range(_EXTRA_QUESTION_TRIES):
        if len(questions) >= _MIN_QUESTIONS:
            break
        extra = _ASKERS[rng.choice(("count", "exists"))](rng, scene)
        if extra is not None and all(extra.question != q.question for q in questions):
            questions.append(extra)
    return questions


def _chat(
    rng: random.Random, questions: Sequence[_Question], captions: Sequence[str]
) -> list[tuple[str, str]]:
    asked = rng.sample(list(questions), min(len(questions), rng.randint(1, _MAX_CHAT_QUESTIONS)))
    turns = [(q.question, q.answer) for q in asked]
    turns.insert(rng.randint(0, len(turns)), (rng.choice(DESCRIBE_REQUESTS), rng.choice(captions)))
    return turns


def _scene(
    objects: tuple[ShapeObject, ...], config: ShapesConfig, geometry: _Geometry, is_comp: bool
) -> _Scene:
    """What text about these objects may mention: held-out objects to prefer in test_comp, and
    absent combos that are safe to name (never a held-out combo outside test_comp)."""
    held_out = set(config.held_out_combos)
    present = {o.combo for o in objects}
    if is_comp:
        focus = tuple(o for o in objects if o.combo in held_out)
        absent_held = [c for c in config.held_out_combos if c not in present]
        absent = absent_held or [c for c in _all_combos() if c not in present]
    else:
        focus = ()
        absent = [c for c in _all_combos() if c not in present and c not in held_out]
    return _Scene(objects, focus, tuple(absent), geometry)


def _make_sample(config: ShapesConfig, geometry: _Geometry, split: str, index: int) -> _Sample:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and
    # Python runs, unlike hash().
    rng = random.Random(f"shapesworld/{config.seed}/{split}/{index}")
    is_comp = split == "test_comp"
    objects = _sample_objects(rng, config, geometry, is_comp)
    scene = _scene(objects, config, geometry, is_comp)
    captions = _captions(rng, objects, geometry)
    questions = _questions(rng, scene)
    chat = _chat(rng, questions, captions)
    prompts = tuple(rng.choice(PRETRAIN_INSTRUCTIONS) for _ in captions)
    return _Sample(
        image=_draw(objects, geometry),
        objects=objects,
        captions=tuple(captions),
        caption_prompts=prompts,
        questions=tuple(questions),
        chat=tuple(chat),
    )


# --- writing ----------------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write to a temporary file next to ``path``, then rename, so readers never see half a file."""
    separators = (",", ": ") if indent else (",", ":")
    text = json.dumps(payload, ensure_ascii=False, indent=indent, separators=separators)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def image_file_name(split: str, index: int) -> str:
    """Path of an image relative to the dataset root, as written in every JSON file."""
    return f"{IMAGES_DIR}/{split}/{split}_{index:06d}.png"


def _generate_split(
    config: ShapesConfig, geometry: _Geometry, split: str, out_dir: Path, progress: bool
) -> dict[str, Any]:
    split_number = SPLITS.index(split)
    (out_dir / IMAGES_DIR / split).mkdir(parents=True, exist_ok=True)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    info = {
        "description": f"ShapesWorld synthetic shapes, split {split}",
        "version": str(FORMAT_VERSION),
        "seed": config.seed,
    }
    images: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    pretrain: list[dict[str, Any]] = []
    instruct: list[dict[str, Any]] = []
    question_types: Counter[str] = Counter()
    category_ids = {shape: k + 1 for k, shape in enumerate(SHAPES)}  # COCO ids start at 1

    count = config.split_counts()[split]
    for index in tqdm(range(count), desc=f"ShapesWorld {split}", disable=not progress):
        sample = _make_sample(config, geometry, split, index)
        image_id = (split_number + 1) * _SPLIT_ID_BASE + index
        file_name = image_file_name(split, index)
        sample.image.save(out_dir / file_name, format="PNG")
        stem = f"{split}_{index:06d}"
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": geometry.width,
                "height": geometry.height,
            }
        )
        for k, (caption, prompt) in enumerate(
            zip(sample.captions, sample.caption_prompts, strict=True)
        ):
            captions.append(
                {"id": image_id * _IDS_PER_IMAGE + k, "image_id": image_id, "caption": caption}
            )
            pretrain.append(
                {
                    "id": f"{stem}_cap{k}",
                    "image": file_name,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + prompt},
                        {"from": "gpt", "value": caption},
                    ],
                }
            )
        for k, obj in enumerate(sample.objects):
            x0, y0, x1, y1 = obj.box
            objects.append(
                {
                    "id": image_id * _IDS_PER_IMAGE + k,
                    "image_id": image_id,
                    "category_id": category_ids[obj.shape],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "color": obj.color,
                    "size": obj.size,
                }
            )
        for k, question in enumerate(sample.questions):
            question_id = image_id * _IDS_PER_IMAGE + k
            question_types[question.question_type] += 1
            questions.append(
                {"question_id": question_id, "image_id": image_id, "question": question.question}
            )
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": question.question_type,
                    "answer_type": question.answer_type,
                    "multiple_choice_answer": question.answer,
                    "answers": [
                        {"answer": question.answer, "answer_confidence": "yes", "answer_id": n + 1}
                        for n in range(_ANNOTATORS)
                    ],
                }
            )
            instruct.append(
                {
                    "id": f"{stem}_q{question_id}",
                    "image": file_name,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + question.question},
                        {"from": "gpt", "value": question.answer},
                    ],
                }
            )
        conversation = []
        for turn, (user_text, assistant_text) in enumerate(sample.chat):
            conversation.append(
                {"from": "human", "value": ("<image>\n" if turn == 0 else "") + user_text}
            )
            conversation.append({"from": "gpt", "value": assistant_text})
        instruct.append({"id": f"{stem}_chat", "image": file_name, "conversations": conversation})

    split_dir = out_dir / split
    categories = [{"id": category_ids[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    _write_json_atomic(
        split_dir / SPLIT_FILES["captions"],
        {"info": info, "images": images, "annotations": captions},
    )
    _write_json_atomic(
        split_dir / SPLIT_FILES["objects"],
        {"info": info, "images": images, "categories": categories, "annotations": objects},
    )
    _write_json_atomic(
        split_dir / SPLIT_FILES["vqa_questions"],
        {
            "info": info,
            "task_type": "Open-Ended",
            "data_type": "shapesworld",
            "data_subtype": split,
            "images": [{"id": im["id"], "file_name": im["file_name"]} for im in images],
            "questions": questions,
        },
    )
    _write_json_atomic(
        split_dir / SPLIT_FILES["vqa_annotations"],
        {
            "info": info,
            "data_type": "shapesworld",
            "data_subtype": split,
            "annotations": annotations,
        },
    )
    _write_json_atomic(split_dir / SPLIT_FILES["llava_pretrain"], pretrain)
    _write_json_atomic(split_dir / SPLIT_FILES["llava_instruct"], instruct)
    return {
        "images": len(images),
        "objects": len(objects),
        "captions": len(captions),
        "questions": len(questions),
        "question_types": {t: question_types[t] for t in QUESTION_TYPES},
        "llava_pretrain": len(pretrain),
        "llava_instruct": len(instruct),
    }


def generate_shapes(
    config: ShapesConfig, out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Generate every split of ShapesWorld under ``out_dir`` and return the metadata.

    The metadata (also written to ``out_dir/meta.json``) holds the config, the vocabulary
    (colours with RGB values, shapes, sizes with pixel sides), the held-out combos, the question
    types and per-split counts. ``meta.json`` is removed first and written last, so a folder
    with a ``meta.json`` is always complete. Files of an earlier, larger generation in the same
    folder are overwritten but not deleted.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    geometry = _Geometry.from_config(config)
    splits = {split: _generate_split(config, geometry, split, out, progress) for split in SPLITS}
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "image_width": geometry.width,
        "image_height": geometry.height,
        "background": list(BACKGROUND),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": {name: geometry.size_px[name] for name in SIZES},
        "held_out_combos": [list(combo) for combo in config.held_out_combos],
        "question_types": list(QUESTION_TYPES),
        "spatial_margin_px": [geometry.margin_x, geometry.margin_y],
        "box_format": "objects.json bbox is COCO [x, y, width, height] in pixels",
        "splits": splits,
        "files": dict(SPLIT_FILES),
    }
    _write_json_atomic(out / META_FILE, meta, indent=2)
    return meta
