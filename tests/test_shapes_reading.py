"""The grounding and reading tasks on ShapesWorld: determinism, LLaVA compatibility, boxes that
point at the named object, phrases that name exactly one object, held-out combos only in
test_comp, OCR and chart ground truth that matches what is drawn."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tessera.data.boxes import denormalize_box, parse_box, parse_grounded
from tessera.data.readers import read_llava
from tessera.data.shapes import COLORS, SPLITS, ShapeObject, ShapesConfig, generate_shapes
from tessera.data.shapes_reading import (
    READING_FILES,
    READING_META_FILE,
    ReadingTasksConfig,
    generate_reading_tasks,
    read_reading_items,
    reading_task_paths,
    unique_descriptions,
)
from tessera.data.shapes_tasks import _load_split_scenes


@pytest.fixture(scope="module")
def reading_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reading")
    generate_shapes(
        ShapesConfig(seed=3, num_train=40, num_val=6, num_test=12, num_test_comp=12),
        root,
        progress=False,
    )
    generate_reading_tasks(root, progress=False, config=ReadingTasksConfig(rec_per_image=2))
    return root


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for path in reading_task_paths(root, split).values():
            h.update(path.read_bytes())
    for png in sorted((root / "images" / "reading").rglob("*.png")):
        h.update(png.read_bytes())
    return h.hexdigest()


def test_deterministic_per_seed(reading_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_shapes(
        ShapesConfig(seed=3, num_train=40, num_val=6, num_test=12, num_test_comp=12),
        again,
        progress=False,
    )
    generate_reading_tasks(again, progress=False, config=ReadingTasksConfig(rec_per_image=2))
    assert _digest(again) == _digest(reading_root)
    other = tmp_path / "other"
    generate_shapes(
        ShapesConfig(seed=4, num_train=40, num_val=6, num_test=12, num_test_comp=12),
        other,
        progress=False,
    )
    generate_reading_tasks(other, progress=False, config=ReadingTasksConfig(rec_per_image=2))
    assert _digest(other) != _digest(reading_root)


def test_every_file_is_llava_and_reads_back(reading_root: Path) -> None:
    manifest = json.loads((reading_root / READING_META_FILE).read_text())
    for split in SPLITS:
        for name, path in reading_task_paths(reading_root, split).items():
            conversations, skips = read_llava(path, reading_root)
            items, item_skips = read_reading_items(path, reading_root)
            assert skips.total == 0 and item_skips.total == 0, (
                path,
                skips.summary(),
                item_skips.summary(),
            )
            assert len(conversations) == len(items) == manifest["splits"][split][name] > 0
            assert all(c.turns[0].text.startswith("<image>\n") for c in conversations)
    assert set(manifest["files"]) == {*READING_FILES, "images"}


def _objects_by_file(root: Path, split: str) -> dict[str, tuple[ShapeObject, ...]]:
    scenes = _load_split_scenes(root, split)
    return dict(zip(scenes.file_names, scenes.objects, strict=True))


@pytest.mark.parametrize("fmt", ["qwen", "cogvlm"])
def test_rec_boxes_point_at_the_one_named_object(reading_root: Path, fmt: str) -> None:
    for split in SPLITS:
        objects_of = _objects_by_file(reading_root, split)
        items, _ = read_reading_items(
            reading_task_paths(reading_root, split)[f"rec_{fmt}"], reading_root
        )
        for it in items:
            objects = objects_of[str(it.image.relative_to(reading_root))]
            phrase = it.prompt
            target = [o for o in objects if tuple(float(v) for v in o.box) == it.box]
            assert len(target) == 1
            # the asked phrase is one of the target's unique descriptions
            assert any(f"the {d}" in phrase for d in unique_descriptions(target[0], objects))
            # and the answer's box, read back, lands on the target (quantisation only)
            box = denormalize_box(parse_box(it.answer, fmt), it.width, it.height)
            assert all(
                abs(a - b) <= it.width / 1000 + 1e-9 for a, b in zip(box, it.box, strict=True)
            )
            assert it.answer.startswith("<ref>") == (fmt == "qwen")


def test_reg_targets_name_exactly_one_object(reading_root: Path) -> None:
    for split in SPLITS:
        objects_of = _objects_by_file(reading_root, split)
        items, _ = read_reading_items(
            reading_task_paths(reading_root, split)["reg_cogvlm"], reading_root
        )
        for it in items:
            objects = objects_of[str(it.image.relative_to(reading_root))]
            (target,) = [o for o in objects if tuple(float(v) for v in o.box) == it.box]
            assert it.answer == it.references[0]
            for ref in it.references:
                words = set(ref.removeprefix("the ").split())
                matching = [o for o in objects if words <= {o.size, o.color, o.shape}]
                assert matching == [target], (ref, objects)
            assert parse_box(it.prompt, "cogvlm") is not None


def test_grounded_captions_list_every_object_with_its_box(reading_root: Path) -> None:
    objects_of = _objects_by_file(reading_root, "test")
    items, _ = read_reading_items(
        reading_task_paths(reading_root, "test")["grounded_caption_qwen"], reading_root
    )
    assert len(items) == len(objects_of)
    for it in items:
        objects = objects_of[str(it.image.relative_to(reading_root))]
        pairs = parse_grounded(it.answer, "qwen")
        assert (
            [p for p, _ in pairs]
            == [p for p, _ in it.objects]
            == [("an " if o.size[0] in "aeiou" else "a ") + o.phrase() for o in objects]
        )
        assert [b for _, b in it.objects] == [tuple(float(v) for v in o.box) for o in objects]


def test_held_out_combos_only_in_test_comp(reading_root: Path) -> None:
    held = [f"{c} {s}" for c, s in ShapesConfig().held_out_combos]
    for split in SPLITS:
        texts = [
            t
            for name, path in reading_task_paths(reading_root, split).items()
            for r in json.loads(path.read_text())
            for t in (r["conversations"][0]["value"], r["conversations"][1]["value"])
        ]
        named = any(h in t for t in texts for h in held)
        assert named == (split == "test_comp"), split
    ocr = json.loads(reading_task_paths(reading_root, "test_comp")["ocr"].read_text())
    assert all(r["lines"][0] in held for r in ocr)


def test_pretraining_texts_are_train_only_and_drawn_on_their_own(reading_root: Path) -> None:
    assert "ocr_pretrain" not in reading_task_paths(reading_root, "test")
    pretrain = json.loads(reading_task_paths(reading_root, "train")["ocr_pretrain"].read_text())
    ocr = json.loads(reading_task_paths(reading_root, "train")["ocr"].read_text())
    assert len(pretrain) == 4 * 40 and len(ocr) == 20  # pretrain_texts_per_image=4, ocr 0.5
    assert {r["image"] for r in pretrain}.isdisjoint(r["image"] for r in ocr)
    # its own random stream: not the OCR set's texts again in the same order
    assert [r["lines"] for r in pretrain[:20]] != [r["lines"] for r in ocr]
    manifest = json.loads((reading_root / READING_META_FILE).read_text())
    assert manifest["splits"]["train"]["ocr_pretrain"] == 160 and "ocr_pretrain" not in manifest["splits"]["test"]


def _ink_rows(path: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.int32)
    return (pixels < 160).any(axis=1)


@pytest.mark.parametrize("task", ["ocr", "ocr_pretrain"])
def test_ocr_images_show_their_lines(reading_root: Path, task: str) -> None:
    records = json.loads(reading_task_paths(reading_root, "train")[task].read_text())
    assert {len(r["lines"]) for r in records} >= {1, 2}
    for r in records:
        assert r["conversations"][1]["value"] == "\n".join(r["lines"])
        rows = _ink_rows(reading_root / r["image"])
        # one band of dark rows per line of text
        bands = int(rows[0]) + int(np.sum(rows[1:] & ~rows[:-1]))
        assert bands == len(r["lines"]), r["lines"]


def test_chart_dicts_match_the_drawn_bars(reading_root: Path) -> None:
    for split, sizes in (("train", {2, 3, 4}), ("test_comp", {5})):
        records = json.loads(reading_task_paths(reading_root, split)["chart"].read_text())
        assert {len(r["values"]) for r in records} <= sizes
        for r in records:
            values = ast.literal_eval(r["conversations"][1]["value"])
            assert values == r["values"] and list(values) == list(r["values"])
            pixels = np.asarray(
                Image.open(reading_root / r["image"]).convert("RGB"), dtype=np.int32
            )
            heights = {}
            for name in values:
                mask = np.abs(pixels - np.array(COLORS[name])).sum(-1) == 0
                columns = np.nonzero(mask.any(axis=0))[0]
                heights[name] = (columns.min(), mask.sum(axis=0).max())
            order = sorted(values, key=lambda n: heights[n][0])
            assert order == list(values)  # left to right in dict order
            tallest = max(values, key=lambda n: heights[n][1])
            assert values[tallest] == max(values.values())
            # bar heights are proportional to the values
            ratio = {n: heights[n][1] / values[n] for n in values}
            assert max(ratio.values()) - min(ratio.values()) <= 1.5


def test_missing_base_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="meta.json|ShapesWorld"):
        generate_reading_tasks(tmp_path, progress=False)


def test_too_small_images_are_refused(tmp_path: Path) -> None:
    generate_shapes(
        ShapesConfig(image_size=32, num_train=2, num_val=1, num_test=1, num_test_comp=1),
        tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="too small for rendered text"):
        generate_reading_tasks(
            tmp_path, progress=False, config=ReadingTasksConfig(text_images_per_image=1)
        )


def test_bad_records_are_skipped_and_counted(reading_root: Path, tmp_path: Path) -> None:
    good = json.loads(reading_task_paths(reading_root, "test")["rec_qwen"].read_text())
    bad = [
        good[0],
        {"id": "x"},
        {**good[0], "box": [5, 5, 1, 1]},
        {**good[0], "image": "nope.png"},
        {**good[0], "box_format": "yolo"},
    ]
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(bad))
    items, skips = read_reading_items(path, reading_root)
    assert len(items) == 1 and skips.total == 4
    assert "invalid box" in skips.summary() and "image file not found" in skips.summary()
