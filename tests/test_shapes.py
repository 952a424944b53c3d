"""Tests of the ShapesWorld generator: determinism, geometry, held-out combos and answer truth."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from tessera.data.shapes import (
    COLORS,
    PLURALS,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SPLIT_FILES,
    SPLITS,
    ShapesConfig,
    generate_shapes,
)

SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _tiny(seed: int = 0, **overrides: Any) -> ShapesConfig:
    counts = {"num_train": 12, "num_val": 6, "num_test": 6, "num_test_comp": 6}
    return ShapesConfig(seed=seed, **{**counts, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("shapes")
    config = ShapesConfig(seed=3, num_train=300, num_val=30, num_test=30, num_test_comp=60)
    meta = generate_shapes(config, root, progress=False)
    return root, meta


def _load(root: Path, split: str, name: str) -> Any:
    return json.loads((root / split / SPLIT_FILES[name]).read_text())


def _objects_by_image(root: Path, split: str) -> dict[int, list[dict[str, Any]]]:
    data = _load(root, split, "objects")
    shape_of = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append(
            {
                "color": a["color"],
                "shape": shape_of[a["category_id"]],
                "size": a["size"],
                "box": (x, y, x + w, y + h),
                "cx": x + w / 2,
                "cy": y + h / 2,
            }
        )
    return by_image


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    generate_shapes(_tiny(seed=5), tmp_path / "a", progress=False)
    generate_shapes(_tiny(seed=5), tmp_path / "b", progress=False)
    generate_shapes(_tiny(seed=6), tmp_path / "c", progress=False)
    a, b, c = (_all_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/captions.json"] != c["train/captions.json"]
    assert a["images/train/train_000000.png"] != c["images/train/train_000000.png"]
    assert not any(name.endswith(".tmp") or ".tmp-" in name for name in a)


def test_layout_and_meta(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, meta = dataset
    assert json.loads((root / "meta.json").read_text()) == meta
    assert set(meta["splits"]) == set(SPLITS)
    for split in SPLITS:
        for file_name in SPLIT_FILES.values():
            assert (root / split / file_name).is_file()
        images = _load(root, split, "captions")["images"]
        assert len(images) == meta["splits"][split]["images"]
        for image in images:
            assert not Path(image["file_name"]).is_absolute()
            assert (root / image["file_name"]).is_file()


def test_objects_counts_boxes_and_no_overlap(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, meta = dataset
    width, height = meta["image_width"], meta["image_height"]
    for split in SPLITS:
        for objects in _objects_by_image(root, split).values():
            assert len(objects) in range(1, 7), f"{split}: a scene with {len(objects)} objects"
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            for i, a in enumerate(objects):
                for b in objects[i + 1 :]:
                    ax0, ay0, ax1, ay1 = a["box"]
                    bx0, by0, bx1, by1 = b["box"]
                    assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0


def test_pixels_match_the_recorded_colours(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, meta = dataset
    captions = _load(root, "train", "captions")
    file_of = {im["id"]: im["file_name"] for im in captions["images"]}
    for image_id, objects in list(_objects_by_image(root, "train").items())[:20]:
        with Image.open(root / file_of[image_id]) as image:
            pixels = image.convert("RGB")
        for o in objects:
            assert pixels.getpixel((int(o["cx"]), int(o["cy"]))) == tuple(
                meta["colors"][o["color"]]
            )


def test_vocabulary_is_covered_in_train(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, _ = dataset
    objects = [o for objs in _objects_by_image(root, "train").values() for o in objs]
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["size"] for o in objects} == set(SIZES)
    assert len(COLORS) >= 6 and len(SHAPES) >= 5


def test_held_out_combos_only_in_test_comp(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, meta = dataset
    held_out = {tuple(c) for c in meta["held_out_combos"]}
    assert len(held_out) >= 4
    held_out_phrases = [f"{c} {s}" for c, s in held_out] + [
        f"{c} {PLURALS[s]}" for c, s in held_out
    ]
    for split in ("train", "val", "test"):
        for objects in _objects_by_image(root, split).values():
            assert not any((o["color"], o["shape"]) in held_out for o in objects)
        # The text must not leak the held-out combos either, not even in "no" questions.
        texts = [a["caption"] for a in _load(root, split, "captions")["annotations"]]
        texts += [q["question"] for q in _load(root, split, "vqa_questions")["questions"]]
        for text in texts:
            assert not any(re.search(rf"\b{p}\b", text) for p in held_out_phrases), text
    comp = _objects_by_image(root, "test_comp")
    assert comp
    for objects in comp.values():
        assert any((o["color"], o["shape"]) in held_out for o in objects)


def _refer(objects: list[dict[str, Any]], phrase: str) -> list[dict[str, Any]]:
    """Objects matching a phrase like "small red circle", "red object", "red shapes", "circles"."""
    matches = objects
    for word in phrase.split():
        if word in ("object", "shapes"):
            continue
        word = SINGULAR.get(word, word)
        key = (
            "color"
            if word in COLORS
            else "shape"
            if word in SHAPES
            else "size"
            if word in SIZES
            else None
        )
        assert key is not None, f"unknown word {word!r} in {phrase!r}"
        matches = [o for o in matches if o[key] == word]
    return matches


def _the(objects: list[dict[str, Any]], phrase: str) -> dict[str, Any]:
    matches = _refer(objects, phrase)
    assert len(matches) == 1, f"'the {phrase}' is not unique"
    return matches[0]


def _expected_answer(
    question_type: str, question: str, objects: list[dict[str, Any]], margin: tuple[float, float]
) -> str:
    if question_type in ("color", "attribute") and (
        m := re.fullmatch(r"what color is the (.+)\?", question)
    ):
        if question_type == "color":
            assert m.group(1) in SHAPES
        return _the(objects, m.group(1))["color"]
    if question_type in ("shape", "attribute") and (
        m := re.fullmatch(r"what shape is the (.+) object\?", question)
    ):
        return _the(objects, m.group(1))["shape"]
    if question_type == "attribute" and (m := re.fullmatch(r"what size is the (.+)\?", question)):
        return _the(objects, m.group(1))["size"]
    if question_type == "count" and (m := re.fullmatch(r"how many (.+) are there\?", question)):
        return str(len(_refer(objects, m.group(1))))
    if question_type == "exists" and (m := re.fullmatch(r"is there an? (.+)\?", question)):
        return "yes" if _refer(objects, m.group(1)) else "no"
    pattern = r"is the (.+?) (to the left of|to the right of|above|below) the (.+)\?"
    if question_type == "spatial" and (m := re.fullmatch(pattern, question)):
        a, b = _the(objects, m.group(1)), _the(objects, m.group(3))
        axis, sign = {
            "to the left of": ("cx", -1),
            "to the right of": ("cx", 1),
            "above": ("cy", -1),
            "below": ("cy", 1),
        }[m.group(2)]
        delta = a[axis] - b[axis]
        assert abs(delta) >= margin[0 if axis == "cx" else 1], "ambiguous spatial pair"
        return "yes" if delta * sign > 0 else "no"
    raise AssertionError(f"{question_type} question does not follow a template: {question!r}")


def test_vqa_answers_are_true(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, meta = dataset
    margin = tuple(meta["spatial_margin_px"])
    question_ids: set[int] = set()
    type_counts: Counter[str] = Counter()
    yes_no: Counter[str] = Counter()
    for split in SPLITS:
        objects = _objects_by_image(root, split)
        questions = _load(root, split, "vqa_questions")["questions"]
        annotations = {
            a["question_id"]: a for a in _load(root, split, "vqa_annotations")["annotations"]
        }
        per_image = Counter(q["image_id"] for q in questions)
        assert all(3 <= n <= 5 for n in per_image.values())
        for q in questions:
            assert q["question_id"] not in question_ids
            question_ids.add(q["question_id"])
            annotation = annotations[q["question_id"]]
            answer = annotation["multiple_choice_answer"]
            assert len(answer.split()) <= 2
            assert [a["answer"] for a in annotation["answers"]] == [answer] * 10
            qtype = annotation["question_type"]
            expected = _expected_answer(qtype, q["question"], objects[q["image_id"]], margin)
            assert answer == expected, (split, q["question"], objects[q["image_id"]])
            type_counts[qtype] += 1
            if qtype in ("exists", "spatial"):
                yes_no[answer] += 1
    assert set(type_counts) == set(QUESTION_TYPES)
    total = sum(type_counts.values())
    assert all(count / total > 0.08 for count in type_counts.values()), type_counts
    assert 0.4 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.6, yes_no


def test_test_comp_questions_prefer_held_out_objects(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, meta = dataset
    held_out = [f"{c} {s}" for c, s in meta["held_out_combos"]]
    questions = _load(root, "test_comp", "vqa_questions")["questions"]
    annotations = {
        a["question_id"]: a for a in _load(root, "test_comp", "vqa_annotations")["annotations"]
    }
    exists = [
        q["question"]
        for q in questions
        if annotations[q["question_id"]]["question_type"] == "exists"
    ]
    assert exists and all(any(p in text for p in held_out) for text in exists)


def test_captions_and_llava_files(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, _ = dataset
    for split in SPLITS:
        captions = _load(root, split, "captions")
        per_image = Counter(a["caption"] and a["image_id"] for a in captions["annotations"])
        assert set(per_image) == {im["id"] for im in captions["images"]}
        assert all(2 <= n <= 3 for n in per_image.values())
        pretrain = _load(root, split, "llava_pretrain")
        assert len(pretrain) == len(captions["annotations"])
        assert len({r["id"] for r in pretrain}) == len(pretrain)
        instruct = _load(root, split, "llava_instruct")
        chats = [r for r in instruct if r["id"].endswith("_chat")]
        assert len(chats) == len(captions["images"])
        for record in pretrain + instruct:
            turns = record["conversations"]
            assert turns[0]["value"].startswith("<image>\n")
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert sum(t["value"].count("<image>") for t in turns) == 1
        for chat in chats:
            assert 2 <= len(chat["conversations"]) // 2 <= 4
    sample = [a["caption"] for a in _load(root, "train", "captions")["annotations"]]
    assert any(c.startswith("there are ") for c in sample)
    assert any(" to the left of " in c or " above " in c for c in sample)


def test_aspect_ratio_sets_width_and_height(tmp_path: Path) -> None:
    config = _tiny(image_size=48, aspect_ratio=1.5, num_val=0, num_test=0, num_test_comp=0)
    meta = generate_shapes(config, tmp_path, progress=False)
    assert (meta["image_width"], meta["image_height"]) == (72, 48)
    captions = json.loads((tmp_path / "train" / "captions.json").read_text())
    for image in captions["images"]:
        assert (image["width"], image["height"]) == (72, 48)
        with Image.open(tmp_path / image["file_name"]) as img:
            assert img.size == (72, 48)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"min_objects": 4, "max_objects": 2}, "min_objects"),
        ({"image_size": 8}, "image_size"),
        ({"aspect_ratio": 0.1}, "aspect_ratio"),
        ({"held_out_combos": [("pink", "circle")]}, "held_out_combos"),
        ({"held_out_combos": [(c, "circle") for c in COLORS]}, "held_out_combos"),
        ({"held_out_combos": [], "num_test_comp": 5}, "held_out_combos"),
        ({"num_train": -1}, "num_train"),
        ({"unknown_option": 1}, "unknown_option"),
    ],
)
def test_config_validation_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ShapesConfig(**overrides)


def test_config_is_frozen_and_round_trips_through_meta(
    dataset: tuple[Path, dict[str, Any]],
) -> None:
    _, meta = dataset
    config = ShapesConfig.model_validate(meta["config"])
    assert config.seed == 3
    with pytest.raises(ValidationError):
        config.seed = 4  # type: ignore[misc]


def test_images_per_split_differ(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, _ = dataset
    per_split: dict[str, bytes] = defaultdict(bytes)
    for split in SPLITS:
        per_split[split] = (root / "images" / split / f"{split}_000000.png").read_bytes()
    assert len(set(per_split.values())) == len(SPLITS)
