"""Tests of the classic ShapesWorld tasks (retrieval, zero-shot, VQA answers, reasoning over
image pairs, entailment): determinism, label truth recomputed from objects.json, label balance,
held-out combos, reader round trips, skip-and-count of malformed records and baselines."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tessera.data.records import VQAItem
from tessera.data.shapes import (
    COLORS,
    PLURALS,
    SHAPES,
    SIZES,
    SPLITS,
    ShapesConfig,
    generate_shapes,
)
from tessera.data.shapes_tasks import (
    TASK_FILES,
    TASKS_META_FILE,
    ClassicTasksConfig,
    classic_task_paths,
    generate_classic_tasks,
)
from tessera.data.task_readers import (
    AnswerVocabulary,
    RetrievalGallery,
    build_answer_vocabulary,
    caption_duplicate_stats,
    entailment_baseline,
    majority_baseline,
    read_answer_vocabulary,
    read_entailment,
    read_reasoning,
    read_retrieval_gallery,
    read_zeroshot,
    reasoning_baseline,
    retrieval_chance_recall,
    vqa_prior_baseline,
    zeroshot_baseline,
)

SINGULAR = {plural: shape for shape, plural in PLURALS.items()}
# Written out here rather than imported, so the test checks the generator against the intent.
UNDECIDABLE_MATERIALS = {"wood", "metal", "glass", "paper", "plastic", "stone"}
UNDECIDABLE_SCENE_FACTS = {
    "the picture was drawn by a child.",
    "the picture was made on a rainy day.",
    "the picture was drawn in the morning.",
    "the person who drew the picture is left-handed.",
}
GRID_PLACES = {
    "in the top left": (0, 0),
    "at the top": (1, 0),
    "in the top right": (2, 0),
    "on the left": (0, 1),
    "in the center": (1, 1),
    "on the right": (2, 1),
    "in the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right": (2, 2),
}

Obj = dict[str, Any]


def _base(seed: int = 3, **overrides: int) -> ShapesConfig:
    counts = {"num_train": 80, "num_val": 20, "num_test": 60, "num_test_comp": 60}
    return ShapesConfig(seed=seed, **{**counts, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("tasks")
    generate_shapes(_base(), root, progress=False)
    return root, generate_classic_tasks(root, progress=False)


@pytest.fixture(scope="module")
def unique_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("tasks_unique")
    # Single-object scenes share grid captions often, so the fallback to coordinates is exercised.
    generate_shapes(_base(max_objects=1, num_train=120), root, progress=False)
    return root, generate_classic_tasks(root, progress=False, unique_captions=True)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _objects(root: Path, split: str) -> tuple[dict[str, list[Obj]], dict[str, int]]:
    """Objects per image file name, read straight from objects.json, and the image ids."""
    data = _json(root / split / "objects.json")
    shape_of = {c["id"]: c["name"] for c in data["categories"]}
    file_of = {im["id"]: im["file_name"] for im in data["images"]}
    by_file: dict[str, list[Obj]] = {name: [] for name in file_of.values()}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_file[file_of[a["image_id"]]].append(
            {
                "color": a["color"],
                "shape": shape_of[a["category_id"]],
                "size": a["size"],
                "cx": x + w / 2,
                "cy": y + h / 2,
            }
        )
    return by_file, {name: image_id for image_id, name in file_of.items()}


def _matching(objects: list[Obj], phrase: str) -> list[Obj]:
    """Objects a phrase like "a small red circle", "red shapes", "crosses" or "shape" picks out."""
    words = phrase.split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    matches = objects
    for word in words:
        if word in ("shape", "shapes"):
            continue
        word = SINGULAR.get(word, word)
        key = {
            **dict.fromkeys(COLORS, "color"),
            **dict.fromkeys(SHAPES, "shape"),
            **dict.fromkeys(SIZES, "size"),
        }.get(word)
        assert key is not None, f"unknown word {word!r} in {phrase!r}"
        matches = [o for o in matches if o[key] == word]
    return matches


def _the(objects: list[Obj], phrase: str) -> Obj:
    matches = _matching(objects, phrase)
    assert len(matches) == 1, f"'the {phrase}' does not pick out exactly one object"
    return matches[0]


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- generation -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_task_files_and_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_shapes(
            _base(seed, num_train=16, num_val=6, num_test=8, num_test_comp=8),
            tmp_path / name,
            progress=False,
        )
        generate_classic_tasks(tmp_path / name, progress=False)
    a, b, c = (_all_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    for split in SPLITS:
        for file_name in TASK_FILES.values():
            assert f"{split}/{file_name}" in a
    assert a["test/reasoning.json"] != c["test/reasoning.json"]
    assert (
        a["images/zeroshot/train/train_000000.png"] != c["images/zeroshot/train/train_000000.png"]
    )
    assert not any(".tmp-" in name for name in a)


def test_needs_the_base_dataset(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a ShapesWorld folder"):
        generate_classic_tasks(tmp_path, progress=False)
    generate_shapes(
        _base(num_train=4, num_val=2, num_test=2, num_test_comp=2), tmp_path, progress=False
    )
    (tmp_path / "val" / "objects.json").unlink()
    with pytest.raises(FileNotFoundError, match="generate_shapes"):
        generate_classic_tasks(tmp_path, progress=False)
    assert not (tmp_path / TASKS_META_FILE).exists()


def test_manifest_paths_and_relative_images(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = dataset
    assert _json(root / TASKS_META_FILE) == manifest
    assert manifest["caption_kind"] == "coco" and manifest["base_seed"] == 3
    assert manifest["config"] == ClassicTasksConfig().model_dump()
    for split in SPLITS:
        paths = classic_task_paths(root, split)
        assert set(paths) == {*TASK_FILES, "vqa_answers"}
        assert all(p.is_file() for p in paths.values())
        for record in _json(paths["reasoning"])["records"]:
            for key in ("left", "right"):
                assert not Path(record[key]).is_absolute() and (root / record[key]).is_file()
    with pytest.raises(ValueError, match="unknown ShapesWorld split"):
        classic_task_paths(root, "dev")


# --- retrieval ------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_retrieval_gallery_round_trip_and_duplicate_count(
    dataset: tuple[Path, dict[str, Any]], split: str
) -> None:
    root, manifest = dataset
    base = _json(root / split / "captions.json")
    gallery, stats = read_retrieval_gallery(classic_task_paths(root, split)["retrieval"], root)
    assert stats.total == 0 and gallery.caption_kind == "coco"
    assert [p.relative_to(root).as_posix() for p in gallery.images] == [
        im["file_name"] for im in base["images"]
    ]
    assert list(gallery.captions) == [a["caption"] for a in base["annotations"]]
    file_of = {im["id"]: im["file_name"] for im in base["images"]}
    for annotation, image_index in zip(base["annotations"], gallery.text_to_image, strict=True):
        assert gallery.images[image_index] == root / file_of[annotation["image_id"]]

    images_of_text: dict[str, set[int]] = defaultdict(set)
    for annotation in base["annotations"]:
        images_of_text[annotation["caption"]].add(annotation["image_id"])
    duplicated = [a for a in base["annotations"] if len(images_of_text[a["caption"]]) > 1]
    expected = {
        "images": len(base["images"]),
        "captions": len(base["annotations"]),
        "distinct_texts": len(images_of_text),
        "duplicate_captions": len(duplicated),
        "images_with_shared_caption": len({a["image_id"] for a in duplicated}),
    }
    assert _json(root / split / "retrieval.json")["duplicates"] == expected
    assert manifest["splits"][split]["retrieval"] == expected
    if split == "train":
        assert expected["duplicate_captions"] > 0  # ShapesWorld captions do repeat
    for text_index, positives in enumerate(gallery.text_positives):
        caption = gallery.captions[text_index]
        assert {file_of[i] for i in images_of_text[caption]} == {
            gallery.images[i].relative_to(root).as_posix() for i in positives
        }


def _grid_place(obj: Obj, width: int, height: int) -> tuple[int, int]:
    return min(2, int(3 * obj["cx"] / width)), min(2, int(3 * obj["cy"] / height))


_PLACED_OBJECT = re.compile(
    r"an? (small|large) (\w+) (\w+) (" + "|".join(GRID_PLACES) + r"|at \((\d+), (\d+)\))"
)


@pytest.mark.parametrize("split", SPLITS)
def test_unique_captions_describe_every_object_and_do_not_repeat(
    unique_dataset: tuple[Path, dict[str, Any]], split: str
) -> None:
    root, manifest = unique_dataset
    meta = _json(root / "meta.json")
    width, height = meta["image_width"], meta["image_height"]
    assert manifest["caption_kind"] == "unique"
    gallery, stats = read_retrieval_gallery(classic_task_paths(root, split)["retrieval"], root)
    assert stats.total == 0 and gallery.caption_kind == "unique"
    assert len(gallery.captions) == len(gallery.images)
    objects, _ = _objects(root, split)
    signature: dict[str, Counter[tuple[Any, ...]]] = {}
    for caption, image_index in zip(gallery.captions, gallery.text_to_image, strict=True):
        file_name = gallery.images[image_index].relative_to(root).as_posix()
        found = _PLACED_OBJECT.findall(caption)
        assert len(found) == len(objects[file_name]), caption
        described = Counter()
        for size, color, shape, place, x, y in found:
            described[(size, color, shape, place if not x else (int(x), int(y)))] += 1
        by_grid = Counter(
            (o["size"], o["color"], o["shape"], _grid_place(o, width, height))
            for o in objects[file_name]
        )
        by_pixel = Counter(
            (o["size"], o["color"], o["shape"], (int(o["cx"]), int(o["cy"])))
            for o in objects[file_name]
        )
        grid_described = Counter(
            {(s, c, sh, GRID_PLACES.get(p, p)): n for (s, c, sh, p), n in described.items()}
        )
        assert grid_described in (by_grid, by_pixel), caption
        signature[file_name] = by_pixel
    stats_in_file = _json(root / split / "retrieval.json")["duplicates"]
    assert stats_in_file == caption_duplicate_stats(gallery.captions, gallery.text_to_image)
    # A caption may repeat only between images holding identical objects in identical places.
    for positives in gallery.text_positives:
        names = [gallery.images[i].relative_to(root).as_posix() for i in positives]
        assert all(signature[n] == signature[names[0]] for n in names)
    assert stats_in_file["duplicate_captions"] == 0
    details = Counter(a["detail"] for a in _json(root / split / "retrieval.json")["annotations"])
    if split == "train":
        assert details["coordinates"] > 0 and details["grid"] > details["coordinates"]


# --- zero-shot classification ---------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_zeroshot_labels(dataset: tuple[Path, dict[str, Any]], split: str) -> None:
    root, manifest = dataset
    meta = _json(root / "meta.json")
    held_out = {tuple(c) for c in meta["held_out_combos"]}
    path = classic_task_paths(root, split)["zeroshot"]
    tasks, stats = read_zeroshot(path, root)
    assert stats.total == 0 and set(tasks) == {"shape", "color", "count"}
    assert tasks["shape"].class_names == tuple(SHAPES) and tasks["color"].class_names == tuple(
        COLORS
    )
    assert tasks["count"].class_names[:3] == ("1 shape", "2 shapes", "3 shapes")
    for task in tasks.values():
        assert len(task.templates) >= 3 and all(t.count("{}") == 1 for t in task.templates)
        assert all(
            " a orange" not in p for k in range(len(task.class_names)) for p in task.prompts(k)
        )

    objects, _ = _objects(root, split)
    assert len(tasks["count"].items) == len(objects)
    for item in tasks["count"].items:
        assert tasks["count"].class_names[item.label] == (
            f"{len(objects[item.image.relative_to(root).as_posix()])} shape"
            + ("s" if item.label else "")
        )

    singles = {s["image"]: s for s in _json(path)["single_object_images"]}
    assert (
        len(tasks["shape"].items)
        == len(tasks["color"].items)
        == len(singles)
        == round(0.5 * len(objects))
    )
    for shape_item, color_item in zip(tasks["shape"].items, tasks["color"].items, strict=True):
        single = singles[shape_item.image.relative_to(root).as_posix()]
        assert color_item.image == shape_item.image
        assert (
            SHAPES[shape_item.label] == single["shape"]
            and list(COLORS)[color_item.label] == single["color"]
        )
        assert ((single["color"], single["shape"]) in held_out) == (split == "test_comp")
        x, y, w, h = single["bbox"]
        with Image.open(shape_item.image) as image:
            assert (
                image.convert("RGB").getpixel((x + w // 2, y + h // 2)) == COLORS[single["color"]]
            )
    counts = manifest["splits"][split]["zeroshot"]["shape"]["label_counts"]
    assert counts == {
        name: sum(SHAPES[i.label] == name for i in tasks["shape"].items) for name in SHAPES
    }


# --- closed-set VQA ------------------------------------------------------------------------------


def test_vqa_answer_vocabulary(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = dataset
    annotations = _json(root / "train" / "vqa_annotations.json")["annotations"]
    expected = Counter(a["multiple_choice_answer"] for a in annotations)
    vocabulary, stats = read_answer_vocabulary(classic_task_paths(root, "train")["vqa_answers"])
    assert stats.total == 0
    assert dict(zip(vocabulary.answers, vocabulary.counts, strict=True)) == expected
    assert list(vocabulary.counts) == sorted(vocabulary.counts, reverse=True)
    assert {"yes", "no", "1", "red", "circle", "small"} <= set(vocabulary.answers)
    assert manifest["vqa_answers"]["coverage"]["test_comp"] == 1.0
    assert vocabulary.index_of("Yes.") == vocabulary.answers.index("yes")
    assert vocabulary.index_of("banana") is None


def _vqa_item(question_id: int, answers: list[str], question_type: str = "") -> VQAItem:
    return VQAItem(question_id, 1, Path("x.png"), "q?", question_type, tuple(answers))


def test_build_answer_vocabulary_normalises_and_counts_questions() -> None:
    items = [
        _vqa_item(1, ["Two"] * 6 + ["2"] * 4),
        _vqa_item(2, ["a dog"] * 9 + ["cat"]),
        _vqa_item(3, ["2"] * 10),
        _vqa_item(4, ["dog"] * 10),
    ]
    vocabulary = build_answer_vocabulary(items)
    assert vocabulary == AnswerVocabulary(("2", "dog", "cat"), (2, 2, 1))
    assert build_answer_vocabulary(items, min_count=2).answers == ("2", "dog")
    targets = vocabulary.soft_targets(["dog"] * 2 + ["cat"] * 8)
    assert targets[vocabulary.answers.index("cat")] == pytest.approx(1.0)
    assert targets[vocabulary.answers.index("dog")] == pytest.approx(0.6)
    assert vocabulary.answers.index("2") not in targets
    with pytest.raises(ValueError, match="min_count"):
        build_answer_vocabulary(items, min_count=0)


# --- visual reasoning over image pairs ------------------------------------------------------------


def _statement_truth(sentence: str, left: list[Obj], right: list[Obj]) -> bool:
    def has(objects: list[Obj], phrase: str) -> bool:
        return bool(_matching(objects, phrase))

    if m := re.fullmatch(r"both images contain (an? .+)\.", sentence):
        return has(left, m[1]) and has(right, m[1])
    if m := re.fullmatch(r"exactly one image contains (an? .+)\.", sentence):
        return has(left, m[1]) != has(right, m[1])
    if m := re.fullmatch(r"neither image contains (an? .+)\.", sentence):
        return not has(left, m[1]) and not has(right, m[1])
    if m := re.fullmatch(r"there (is|are) exactly (\d+) (.+) in total\.", sentence):
        assert (m[1] == "is") == (m[2] == "1")
        return len(_matching(left, m[3])) + len(_matching(right, m[3])) == int(m[2])
    if m := re.fullmatch(
        r"the (left|right) image has more (.+) than the (left|right) image\.", sentence
    ):
        assert m[1] != m[3]
        counts = {"left": len(_matching(left, m[2])), "right": len(_matching(right, m[2]))}
        return counts[m[1]] > counts[m[3]]
    if m := re.fullmatch(r"both images have the same number of (.+)\.", sentence):
        return len(_matching(left, m[1])) == len(_matching(right, m[1]))
    if m := re.fullmatch(r"every shape in the (left|right) image is (\w+)\.", sentence):
        assert m[2] in COLORS
        return all(o["color"] == m[2] for o in (left if m[1] == "left" else right))
    raise AssertionError(f"statement does not follow a template: {sentence!r}")


def _names_combo(text: str, combos: set[tuple[str, str]]) -> bool:
    return any(re.search(rf"\b{c} ({s}|{PLURALS[s]})\b", text) for c, s in combos)


@pytest.mark.parametrize("split", SPLITS)
def test_reasoning_labels_are_true_and_balanced(
    dataset: tuple[Path, dict[str, Any]], split: str
) -> None:
    root, manifest = dataset
    meta = _json(root / "meta.json")
    held_out = {tuple(c) for c in meta["held_out_combos"]}
    all_combos = {(c, s) for c in COLORS for s in SHAPES}
    objects, image_ids = _objects(root, split)
    path = classic_task_paths(root, split)["reasoning"]
    records = _json(path)["records"]
    items, stats = read_reasoning(path, root)
    assert stats.total == 0 and len(items) == len(records) == 2 * round(0.5 * len(objects))
    by_sentence: dict[str, list[bool]] = defaultdict(list)
    for record, item in zip(records, items, strict=True):
        assert record["left"] != record["right"]
        assert image_ids[record["left"]] == record["left_image_id"]
        left, right = objects[record["left"]], objects[record["right"]]
        assert item.label is record["label"] is _statement_truth(record["sentence"], left, right)
        by_sentence[record["id"].rsplit("_", 1)[0] + record["sentence"]].append(record["label"])
        if split != "test_comp":
            assert not _names_combo(record["sentence"], held_out), record["sentence"]
    # Every sentence comes once true and once false, so the text alone never gives the label.
    assert all(sorted(labels) == [False, True] for labels in by_sentence.values())
    labels = Counter(item.label for item in items)
    assert (
        labels[True]
        == labels[False]
        == manifest["splits"][split]["reasoning"]["label_counts"]["true"]
    )
    if split == "test_comp":
        naming = [r["sentence"] for r in records if _names_combo(r["sentence"], all_combos)]
        assert naming and all(_names_combo(s, held_out) for s in naming)
        for record in records:
            for key in ("left", "right"):
                assert any((o["color"], o["shape"]) in held_out for o in objects[record[key]])


# --- visual entailment ----------------------------------------------------------------------------


def _entailment_label(hypothesis: str, objects: list[Obj], margin: tuple[float, float]) -> str:
    def decided(truth: bool) -> str:
        return "entailment" if truth else "contradiction"

    if hypothesis in UNDECIDABLE_SCENE_FACTS:
        return "neutral"
    if m := re.fullmatch(r"there is (an? \w+ \w+) made of (\w+)\.", hypothesis):
        assert m[2] in UNDECIDABLE_MATERIALS
        # The material is invisible, but no such shape at all makes the claim false.
        return "neutral" if _matching(objects, m[1]) else "contradiction"
    if m := re.fullmatch(r"there is no (\w+ \w+)\.", hypothesis):
        return decided(not _matching(objects, m[1]))
    if m := re.fullmatch(r"there is (an? \w+ \w+)\.", hypothesis):
        return decided(bool(_matching(objects, m[1])))
    if m := re.fullmatch(r"there (is|are) exactly (\d+) (.+)\.", hypothesis):
        assert (m[1] == "is") == (m[2] == "1")
        return decided(len(_matching(objects, m[3])) == int(m[2]))
    if m := re.fullmatch(r"the (.+) is made of (\w+)\.", hypothesis):
        _the(objects, m[1])
        assert m[2] in UNDECIDABLE_MATERIALS
        return "neutral"
    if m := re.fullmatch(r"the (.+) is heavier than the (.+)\.", hypothesis):
        a, b = _the(objects, m[1]), _the(objects, m[2])
        assert a is not b and a["size"] == b["size"], "a size difference would hint at weight"
        return "neutral"
    pattern = r"the (.+?) is (to the left of|to the right of|above|below) the (.+)\."
    if m := re.fullmatch(pattern, hypothesis):
        a, b = _the(objects, m[1]), _the(objects, m[3])
        axis, sign = {
            "to the left of": ("cx", -1),
            "to the right of": ("cx", 1),
            "above": ("cy", -1),
            "below": ("cy", 1),
        }[m[2]]
        delta = a[axis] - b[axis]
        assert abs(delta) >= margin[0 if axis == "cx" else 1], "ambiguous spatial pair"
        return decided(delta * sign > 0)
    if m := re.fullmatch(r"the (\w+ \w+) is (small|large)\.", hypothesis):
        return decided(_the(objects, m[1])["size"] == m[2])
    if m := re.fullmatch(r"the (\w+) is (\w+)\.", hypothesis):
        assert m[1] in SHAPES and m[2] in COLORS
        return decided(_the(objects, m[1])["color"] == m[2])
    raise AssertionError(f"hypothesis does not follow a template: {hypothesis!r}")


@pytest.mark.parametrize("split", SPLITS)
def test_entailment_labels_are_right_and_balanced(
    dataset: tuple[Path, dict[str, Any]], split: str
) -> None:
    root, manifest = dataset
    meta = _json(root / "meta.json")
    margin = tuple(meta["spatial_margin_px"])
    held_out = {tuple(c) for c in meta["held_out_combos"]}
    all_combos = {(c, s) for c in COLORS for s in SHAPES}
    objects, image_ids = _objects(root, split)
    path = classic_task_paths(root, split)["entailment"]
    records = _json(path)["records"]
    items, stats = read_entailment(path, root)
    assert stats.total == 0 and len(items) == len(records) == 3 * len(objects)
    per_image: dict[str, list[str]] = defaultdict(list)
    for record, item in zip(records, items, strict=True):
        assert image_ids[record["image"]] == record["image_id"]
        expected = _entailment_label(record["hypothesis"], objects[record["image"]], margin)
        assert item.label == record["label"] == expected, (record, objects[record["image"]])
        per_image[record["image"]].append(record["label"])
        if split != "test_comp":
            assert not _names_combo(record["hypothesis"], held_out), record["hypothesis"]
            shape_is_color = re.fullmatch(r"the (\w+) is (\w+)\.", record["hypothesis"])
            assert not (shape_is_color and (shape_is_color[2], shape_is_color[1]) in held_out)
    assert all(
        sorted(labels) == sorted(["entailment", "neutral", "contradiction"])
        for labels in per_image.values()
    )
    counts = Counter(item.label for item in items)
    assert counts["entailment"] == counts["neutral"] == counts["contradiction"] == len(objects)
    assert manifest["splits"][split]["entailment"]["label_counts"] == dict(counts)
    kinds = Counter(r["kind"] for r in records)
    if split == "train":
        assert set(kinds) == {
            "exists",
            "absent",
            "count",
            "color",
            "size",
            "spatial",
            "material",
            "weight",
            "scene",
            "exists_with_material",
        }
    if split == "test_comp":
        naming = [r["hypothesis"] for r in records if _names_combo(r["hypothesis"], all_combos)]
        assert sum(_names_combo(h, held_out) for h in naming) > 0.5 * len(naming)


# --- readers: malformed records -------------------------------------------------------------------


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (30, 20, 10)).save(tmp_path / "b.png")
    return tmp_path


def _write(path: Path, payload: Any) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_read_reasoning_skips_and_counts_malformed_records(image_dir: Path) -> None:
    good = {
        "id": "ok",
        "left": "a.png",
        "right": "b.png",
        "sentence": "both images contain a circle.",
        "label": True,
    }
    records = [
        good,
        "not an object",
        {**good, "id": None},
        {**good, "id": "empty", "sentence": "  "},
        {**good, "id": "string-label", "label": "true"},
        {**good, "id": "missing-file", "right": "nope.png"},
        {k: v for k, v in good.items() if k != "left"} | {"id": "no-left"},
    ]
    items, stats = read_reasoning(_write(image_dir / "r.json", {"records": records}), image_dir)
    assert (
        [i.id for i in items] == ["ok"]
        and items[0].label is True
        and items[0].right == image_dir / "b.png"
    )
    assert stats.total == 6
    assert stats.reasons == Counter(
        {
            "record is not a JSON object": 1,
            "invalid id": 1,
            "missing or empty 'sentence'": 1,
            "invalid label": 1,
            "missing image or image file not found": 2,
        }
    )
    assert "id=missing-file" in stats.examples["missing image or image file not found"]


def test_read_entailment_skips_and_counts_malformed_records(image_dir: Path) -> None:
    good = {
        "id": "ok",
        "image": "a.png",
        "hypothesis": "there is a red circle.",
        "label": "neutral",
    }
    records = [
        good,
        {**good, "id": "bad-label", "label": "maybe"},
        {**good, "id": "no-text", "hypothesis": 3},
        {**good, "id": "gone", "image": "c.png"},
        7,
    ]
    items, stats = read_entailment(_write(image_dir / "e.json", {"records": records}), image_dir)
    assert [(i.id, i.label) for i in items] == [("ok", "neutral")]
    assert stats.reasons == Counter(
        {
            "invalid label": 1,
            "missing or empty 'hypothesis'": 1,
            "missing image or image file not found": 1,
            "record is not a JSON object": 1,
        }
    )


def test_read_zeroshot_skips_malformed_tasks_and_items(image_dir: Path) -> None:
    items = [
        {"id": "ok", "image": "a.png", "label": 1},
        {"id": "out-of-range", "image": "a.png", "label": 2},
        {"id": "bool-label", "image": "a.png", "label": True},
        {"id": "gone", "image": "c.png", "label": 0},
    ]
    payload = {
        "tasks": {
            "shape": {"class_names": ["circle", "square"], "templates": ["a {}."], "items": items},
            "no-slot": {"class_names": ["x"], "templates": ["a photo."], "items": []},
            "no-classes": {"class_names": "x", "templates": ["a {}."], "items": []},
        }
    }
    tasks, stats = read_zeroshot(_write(image_dir / "z.json", payload), image_dir)
    assert list(tasks) == ["shape"] and [i.id for i in tasks["shape"].items] == ["ok"]
    assert tasks["shape"].prompts(1) == ("a square.",)
    assert stats.total == 5
    assert stats.reasons["invalid label"] == 2
    assert stats.reasons["missing image or image file not found"] == 1


def test_read_retrieval_gallery_skips_and_reindexes(image_dir: Path) -> None:
    payload = {
        "caption_kind": "coco",
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "gone.png"},
            {"id": "x"},
            {"id": 3, "file_name": "b.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "a red circle."},
            {"image_id": 2, "caption": "a blue square."},
            {"image_id": 3, "caption": " a red circle. "},
            {"image_id": 3, "caption": ""},
            {"image_id": 9, "caption": "a cross."},
        ],
    }
    gallery, stats = read_retrieval_gallery(_write(image_dir / "g.json", payload), image_dir)
    assert gallery == RetrievalGallery(
        (image_dir / "a.png", image_dir / "b.png"),
        ("a red circle.", "a red circle."),
        (0, 1),
        "coco",
    )
    assert gallery.text_positives == ((0, 1), (0, 1))
    assert stats.reasons == Counter(
        {
            "image file not found": 2,  # the image entry and its caption
            "malformed image entry": 1,
            "missing or empty 'caption'": 1,
            "unknown image_id": 1,
        }
    )
    with pytest.raises(ValueError, match="caption_kind"):
        read_retrieval_gallery(
            _write(image_dir / "g2.json", {**payload, "caption_kind": "mixed"}), image_dir
        )


def test_read_answer_vocabulary_skips_and_file_errors(tmp_path: Path) -> None:
    entries = [
        {"answer": "yes", "count": 5},
        {"answer": "Yes", "count": 4},
        {"answer": "no", "count": -1},
        {"answer": "yes", "count": 1},
        ["no"],
        {"answer": "2", "count": 3},
    ]
    vocabulary, stats = read_answer_vocabulary(_write(tmp_path / "v.json", {"answers": entries}))
    assert vocabulary.answers == ("yes", "2") and vocabulary.counts == (5, 3)
    assert stats.reasons == Counter(
        {"missing or unnormalised 'answer'": 2, "invalid count": 1, "duplicate answer": 1}
    )
    with pytest.raises(FileNotFoundError, match="not found"):
        read_reasoning(tmp_path / "missing.json", tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_entailment(tmp_path / "broken.json", tmp_path)
    with pytest.raises(ValueError, match="not a reasoning file"):
        read_reasoning(_write(tmp_path / "list.json", []), tmp_path)


# --- baselines ------------------------------------------------------------------------------------


def test_majority_and_task_baselines(dataset: tuple[Path, dict[str, Any]]) -> None:
    root, _ = dataset
    baseline = majority_baseline(["a", "b", "b", "c"], ["b", "a", "b", "b"], ["a", "b", "c"])
    assert (baseline.prediction, baseline.accuracy, baseline.chance, baseline.count) == (
        "b",
        0.75,
        1 / 3,
        4,
    )
    assert majority_baseline([], ["x", "y"], ["y", "x"]).prediction == "y"  # ties: class order

    train_reasoning, _ = read_reasoning(classic_task_paths(root, "train")["reasoning"], root)
    test_reasoning, _ = read_reasoning(classic_task_paths(root, "test")["reasoning"], root)
    assert reasoning_baseline(train_reasoning, test_reasoning).accuracy == 0.5
    train_ve, _ = read_entailment(classic_task_paths(root, "train")["entailment"], root)
    test_ve, _ = read_entailment(classic_task_paths(root, "test")["entailment"], root)
    assert entailment_baseline(train_ve, test_ve).accuracy == pytest.approx(1 / 3)
    tasks, _ = read_zeroshot(classic_task_paths(root, "test")["zeroshot"], root)
    shape = zeroshot_baseline(tasks["shape"])
    assert shape.chance == 1 / 5 and shape.prediction in SHAPES
    assert shape.accuracy == max(Counter(i.label for i in tasks["shape"].items).values()) / len(
        tasks["shape"].items
    )


def test_vqa_prior_baseline_uses_the_top_answer_per_type() -> None:
    train = [
        _vqa_item(1, ["yes"] * 10, "exists"),
        _vqa_item(2, ["yes"] * 10, "exists"),
        _vqa_item(3, ["no"] * 10, "exists"),
        _vqa_item(4, ["red"] * 10, "color"),
    ]
    evaluated = [
        _vqa_item(10, ["yes"] * 10, "exists"),
        _vqa_item(11, ["no"] * 10, "exists"),
        _vqa_item(12, ["blue"] * 10, "color"),
        _vqa_item(13, ["yes"] * 10, "spatial"),
    ]
    scores = vqa_prior_baseline(train, evaluated)
    # exists -> "yes", color -> "red", spatial is unseen -> the overall top answer "yes".
    assert scores.accuracy == pytest.approx(0.5)
    assert scores.accuracy_by_type == {"color": 0.0, "exists": 0.5, "spatial": 1.0}


def test_retrieval_chance_recall_counts_exact_duplicates() -> None:
    images = tuple(Path(f"{k}.png") for k in range(4))
    unique = RetrievalGallery(images, ("a.", "b.", "c.", "d."), (0, 1, 2, 3), "unique")
    chance = retrieval_chance_recall(unique, ks=(1, 2))
    assert chance["text_to_image@1"] == pytest.approx(1 / 4) and chance[
        "text_to_image@2"
    ] == pytest.approx(1 / 2)
    assert chance["image_to_text@1"] == pytest.approx(1 / 4)
    shared = RetrievalGallery(images, ("a.", "a.", "c.", "d."), (0, 1, 2, 3), "coco")
    aware = retrieval_chance_recall(shared, ks=(1,))
    # Two of four texts have two positive images: (2 * 2/4 + 2 * 1/4) / 4.
    assert aware["text_to_image@1"] == pytest.approx(0.375)
    assert retrieval_chance_recall(shared, ks=(1,), duplicate_aware=False)[
        "text_to_image@1"
    ] == pytest.approx(0.25)


def test_task_sizes_follow_the_config(tmp_path: Path) -> None:
    generate_shapes(
        _base(num_train=10, num_val=0, num_test=4, num_test_comp=0), tmp_path, progress=False
    )
    config = ClassicTasksConfig(single_object_images_per_image=2.0, reasoning_groups_per_image=1.0)
    manifest = generate_classic_tasks(tmp_path, progress=False, config=config)
    assert manifest["splits"]["train"]["zeroshot"]["shape"]["items"] == 20
    assert manifest["splits"]["train"]["reasoning"]["records"] == 20
    assert manifest["splits"]["val"]["reasoning"]["records"] == 0
    assert manifest["vqa_answers"]["coverage"]["val"] is None
