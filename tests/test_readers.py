"""Tests of the format readers (LLaVA, COCO captions, VQA v2) and of safe image loading."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tessera.data.images import CLIP_MEAN, CLIP_STD, ImageError, ImageTransform, load_image
from tessera.data.readers import (
    load_meta,
    read_coco_captions,
    read_llava,
    read_vqa,
    shapes_split_paths,
)
from tessera.data.shapes import SPLITS, ShapesConfig, generate_shapes


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    config = ShapesConfig(seed=1, num_train=20, num_val=10, num_test=10, num_test_comp=10)
    generate_shapes(config, root, progress=False)
    return root


def _write_json(path: Path, payload: Any) -> Path:
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (30, 20, 10)).save(tmp_path / "b.png")
    return tmp_path


# --- ShapesWorld round trip -------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_readers_round_trip_shapes(shapes_root: Path, split: str) -> None:
    meta = load_meta(shapes_root)
    paths = shapes_split_paths(shapes_root, split)
    counts = meta["splits"][split]

    captions, stats = read_coco_captions(paths["captions"], shapes_root)
    assert stats.total == 0 and len(captions) == counts["captions"]
    assert all(c.image.is_file() for c in captions)

    vqa, stats = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], shapes_root)
    assert stats.total == 0 and len(vqa) == counts["questions"]
    assert all(len(item.answers) == 10 and item.question_type for item in vqa)

    for name in ("llava_pretrain", "llava_instruct"):
        conversations, stats = read_llava(paths[name], shapes_root)
        assert stats.total == 0, stats.summary()
        assert len(conversations) == counts[name]
        for conversation in conversations:
            assert len(conversation.images) == 1 and conversation.images[0].is_file()
            assert conversation.turns[0].role == "user"
            assert conversation.turns[0].text.startswith("<image>\n")
            assert conversation.turns[-1].role == "assistant"


def test_load_meta_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a ShapesWorld folder"):
        load_meta(tmp_path)
    _write_json(tmp_path / "meta.json", {"format": "something-else"})
    with pytest.raises(ValueError, match="not ShapesWorld metadata"):
        load_meta(tmp_path)


def test_shapes_split_paths_rejects_unknown_split(tmp_path: Path) -> None:
    assert shapes_split_paths(tmp_path, "val")["captions"] == tmp_path / "val" / "captions.json"
    with pytest.raises(ValueError, match="unknown ShapesWorld split"):
        shapes_split_paths(tmp_path, "dev")


# --- LLaVA ------------------------------------------------------------------------------------


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": speaker, "value": text} for speaker, text in pairs]


def test_read_llava_skips_and_counts_malformed_records(image_dir: Path) -> None:
    good = _turns(("human", "<image>\nwhat is it?"), ("gpt", "a square"))
    records = [
        {"id": "ok", "image": "a.png", "conversations": good},
        {"id": "no-conversations", "image": "a.png"},
        {"id": "empty", "image": "a.png", "conversations": []},
        {
            "id": "two-placeholders",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\n<image>\nhi"), ("gpt", "yo")),
        },
        {
            "id": "no-placeholder",
            "image": "a.png",
            "conversations": _turns(("human", "hi"), ("gpt", "yo")),
        },
        {"id": "missing-file", "image": "nope.png", "conversations": good},
        {
            "id": "gpt-first",
            "image": "a.png",
            "conversations": _turns(("gpt", "<image>\nhello"), ("human", "hi")),
        },
        {
            "id": "ends-with-human",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nhi"), ("gpt", "yo"), ("human", "more")),
        },
        {
            "id": "bad-speaker",
            "image": "a.png",
            "conversations": _turns(("robot", "<image>\nhi"), ("gpt", "yo")),
        },
        {
            "id": "bad-turn",
            "image": "a.png",
            "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}],
        },
        {"id": "bad-image-field", "image": 7, "conversations": good},
        "not a record",
        {
            "id": 12,
            "conversations": _turns(("system", "be brief"), ("human", "text only"), ("gpt", "ok")),
        },
        {
            "id": "two-images",
            "images": ["a.png", "b.png"],
            "conversations": _turns(("human", "<image>\n<image>\nsame?"), ("gpt", "no")),
        },
    ]
    path = _write_json(image_dir / "llava.json", records)
    conversations, stats = read_llava(path, image_dir)

    assert [c.id for c in conversations] == ["ok", "12", "two-images"]
    assert conversations[0].images == (image_dir / "a.png",)
    assert [t.role for t in conversations[1].turns] == ["system", "user", "assistant"]
    assert conversations[1].images == ()
    assert conversations[2].images == (image_dir / "a.png", image_dir / "b.png")
    assert conversations[0].turns[0].text == "<image>\nwhat is it?"

    assert stats.total == len(records) - 3
    assert stats.reasons["image placeholder count differs from image count"] == 2
    assert stats.reasons["turn order violation"] == 2
    assert stats.reasons["image file not found"] == 1
    assert stats.reasons["empty conversation"] == 1
    assert stats.reasons["missing or invalid 'conversations'"] == 1
    assert "llava.json[5] id=missing-file" in stats.examples["image file not found"]
    assert "skipped 11 samples" in stats.summary()


def test_readers_raise_on_missing_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_llava(tmp_path / "missing.json", tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    with pytest.raises(ValueError, match="broken.json"):
        read_llava(broken, tmp_path)
    with pytest.raises(ValueError, match="broken.json"):
        read_coco_captions(broken, tmp_path)
    with pytest.raises(ValueError, match="broken.json"):
        read_vqa(broken, None, tmp_path)
    wrong_shape = _write_json(tmp_path / "dict.json", {"annotations": []})
    with pytest.raises(ValueError, match="dict.json"):
        read_llava(wrong_shape, tmp_path)
    with pytest.raises(ValueError, match="dict.json"):
        read_coco_captions(wrong_shape, tmp_path)


# --- COCO captions and VQA --------------------------------------------------------------------


def test_read_coco_captions_skips_bad_annotations(image_dir: Path) -> None:
    payload = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2, "file_name": "gone.png"},
            {"id": "x"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "  A red square.\n"},
            {"id": 11, "image_id": 2, "caption": "missing image"},
            {"id": 12, "image_id": 3, "caption": "unknown image"},
            {"id": 13, "image_id": 1},
            {"id": 14, "image_id": "1", "caption": "string id"},
        ],
    }
    captions, stats = read_coco_captions(
        _write_json(image_dir / "captions.json", payload), image_dir
    )
    assert [(c.image_id, c.caption, c.image) for c in captions] == [
        (1, "A red square.", image_dir / "a.png")
    ]
    assert stats.reasons["image file not found"] == 1
    assert stats.reasons["unknown image_id"] == 1
    assert stats.reasons["missing or empty 'caption'"] == 1
    assert stats.reasons["missing or invalid 'image_id'"] == 1
    assert stats.reasons["malformed image entry"] == 1


def test_read_vqa_resolves_images_and_skips_bad_questions(image_dir: Path) -> None:
    (image_dir / "val2014").mkdir()
    Image.new("RGB", (4, 4)).save(image_dir / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = {
        "data_subtype": "val2014",
        "images": [{"id": 1, "file_name": "a.png"}],
        "questions": [
            {"question_id": 100, "image_id": 1, "question": "what color?"},
            {"question_id": 101, "image_id": 42, "question": "coco naming?"},
            {"question_id": 102, "image_id": 7, "question": "mapped?"},
            {"question_id": 103, "image_id": 1, "question": "no annotation?"},
            {"question_id": 104, "image_id": 1},
            {"question_id": 105, "image_id": 5, "question": "no image?"},
        ],
    }
    answers = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i}
        for i, a in enumerate(["red", "red", "blue"])
    ]
    annotations = {
        "annotations": [
            {"question_id": q, "image_id": i, "question_type": "color", "answers": answers}
            for q, i in [(100, 1), (101, 42), (102, 7), (104, 1), (105, 5)]
        ]
    }
    q_path = _write_json(image_dir / "q.json", questions)
    a_path = _write_json(image_dir / "a.json", annotations)
    items, stats = read_vqa(q_path, a_path, image_dir, image_paths={7: "b.png"})

    assert [(i.question_id, i.image.name) for i in items] == [
        (100, "a.png"),
        (101, "COCO_val2014_000000000042.jpg"),
        (102, "b.png"),
    ]
    assert items[0].answers == ("red", "red", "blue") and items[0].question_type == "color"
    assert stats.reasons["no annotation for question"] == 1
    assert stats.reasons["missing or empty 'question'"] == 1
    assert stats.reasons["image file not found"] == 1  # 105 falls back to the COCO name

    unanswered, stats = read_vqa(q_path, None, image_dir, image_paths={7: "b.png"})
    assert len(unanswered) == 4 and all(i.answers == () for i in unanswered)


# --- images -----------------------------------------------------------------------------------


def test_load_image_raises_image_error_naming_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(os.urandom(512))
    with pytest.raises(ImageError, match="x.png"):
        load_image(corrupt)

    whole = tmp_path / "whole.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)

    with pytest.raises(ImageError, match="absent.png.*not found"):
        load_image(tmp_path / "absent.png")

    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(text)


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (5, 4), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (5, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    gray = load_image(tmp_path / "gray.png")
    assert gray.mode == "RGB" and gray.size == (5, 4) and gray.getpixel((0, 0)) == (128, 128, 128)
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_image_transform_shapes_and_values() -> None:
    transform = ImageTransform(size=(24, 32))
    image = Image.new("RGB", (50, 40), (255, 0, 128))
    pixels = transform.to_uint8(image)
    assert pixels.shape == (3, 24, 32) and pixels.dtype == torch.uint8
    assert pixels[:, 0, 0].tolist() == [255, 0, 128]
    tensor = transform(image)
    assert tensor.shape == (3, 24, 32) and tensor.dtype == torch.float32
    expected = [
        (v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD, strict=True)
    ]
    assert torch.allclose(tensor[:, 5, 5], torch.tensor(expected), atol=1e-5)
    batch = transform.normalize_uint8(torch.stack([pixels, pixels]))
    assert batch.shape == (2, 3, 24, 32) and torch.equal(batch[1], tensor)


def test_image_transform_validation() -> None:
    with pytest.raises(ValueError, match="size"):
        ImageTransform(size=(0, 32))
    with pytest.raises(ValueError, match="std"):
        ImageTransform(size=(8, 8), std=(1.0, 0.0, 1.0))
    transform = ImageTransform(size=(8, 8))
    with pytest.raises(ValueError, match="uint8"):
        transform.normalize_uint8(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        transform.normalize_uint8(torch.zeros(4, 8, 8, dtype=torch.uint8))
