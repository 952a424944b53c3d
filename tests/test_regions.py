"""Region phrases: reading object boxes, pooling patch tokens under them, and the region loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.data.datasets import ImageCache, group_captions
from tessera.data.images import ImageTransform
from tessera.data.readers import (
    position_phrase,
    read_coco_captions,
    read_coco_regions,
    region_phrase,
    shapes_split_paths,
)
from tessera.data.records import Caption, RegionPhrase, SkipStats
from tessera.data.shapes import COLORS, ShapesConfig, generate_shapes
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig
from tessera.objectives.contrastive import clip_loss, region_phrase_loss
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.text.word_swaps import WordSwapper
from tessera.train.tasks import ContrastiveTask, GrayscaleViews, to_grayscale
from tessera.vision.vit import ViTConfig, box_pool, patches_in_boxes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(ShapesConfig(seed=3, num_train=8, num_val=1, num_test=1, num_test_comp=1, image_size=32), root,
                    progress=False)
    return root


def test_region_phrases_name_size_colour_and_shape(shapes: Path) -> None:
    path = shapes_split_paths(shapes, "train")["objects"]
    regions, skips = read_coco_regions(path, shapes)
    data = json.loads(path.read_text())
    assert sum(len(r) for r in regions.values()) == len(data["annotations"]) and skips.total == 0
    first = data["annotations"][0]
    names = {c["id"]: c["name"] for c in data["categories"]}
    image = next(shapes / i["file_name"] for i in data["images"] if i["id"] == first["image_id"])
    phrase = f"{first['size']} {first['color']} {names[first['category_id']]}."
    entry = next(i for i in data["images"] if i["id"] == first["image_id"])
    x, y, w, h = first["bbox"]
    relative = (x / entry["width"], y / entry["height"], w / entry["width"], h / entry["height"])
    assert any(r.phrase.endswith(phrase) and r.box == pytest.approx(relative) for r in regions[image])
    assert region_phrase("circle", ["orange"]) == "an orange circle."


def test_bad_region_records_are_skipped_and_counted(shapes: Path, tmp_path: Path) -> None:
    data = json.loads(shapes_split_paths(shapes, "train")["objects"].read_text())
    good = len(data["annotations"])
    data["annotations"] += [
        "not an object",
        {**data["annotations"][0], "bbox": [1, 2, 0, 4]},
        {**data["annotations"][0], "bbox": None},
        {**data["annotations"][0], "category_id": 999},
        {**data["annotations"][0], "image_id": 999},
    ]
    bad = tmp_path / "objects.json"
    bad.write_text(json.dumps(data))
    regions, skips = read_coco_regions(bad, shapes)
    assert sum(len(r) for r in regions.values()) == good
    assert skips.total == 5
    assert {"missing or invalid 'bbox'", "unknown category_id", "unknown image_id"} <= set(skips.reasons)


def test_box_pool_averages_the_patches_a_box_touches() -> None:
    grid = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).view(2, 4, 4, 3)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [9.0, 3.0, 6.0, 14.0], [31.0, 31.0, 1.0, 1.0]])
    owners = torch.tensor([0, 1, 1])
    pooled = box_pool(grid, owners, boxes, patch_size=8)
    torch.testing.assert_close(pooled[0], grid[0, 0, 0])  # exactly one 8x8 patch
    torch.testing.assert_close(pooled[1], grid[1, 0:3, 1].mean(0))  # x 9..14 → col 1; y 3..16 → rows 0..2
    torch.testing.assert_close(pooled[2], grid[1, 3, 3])
    with pytest.raises(ValueError, match="outside"):
        box_pool(grid, torch.tensor([0]), torch.tensor([[40.0, 40.0, 2.0, 2.0]]), patch_size=8)


def test_patches_in_boxes_keeps_patches_whose_centre_only_one_box_holds() -> None:
    # 4 × 4 grid of 8-pixel patches (centres at 4, 12, 20, 28); image 0 has two overlapping boxes.
    boxes = torch.tensor([[0.0, 0.0, 16.0, 9.0],  # centres x 4, 12; y 4 → patches (0,0), (0,1)
                          [10.0, 0.0, 12.0, 16.0],  # x 12, 20; y 4, 12 → (0,1) shared, (0,2), (1,1), (1,2)
                          [27.0, 27.0, 5.0, 5.0],  # image 1: centre (28, 28) → patch (3,3)
                          [1.0, 1.0, 2.0, 2.0]])  # holds no centre
    owners = torch.tensor([0, 0, 1, 1])
    box, patch = patches_in_boxes(owners, boxes, (4, 4), 2, patch_size=8)
    assert sorted(zip(box.tolist(), patch.tolist(), strict=True)) == [
        (0, 0), (1, 2), (1, 5), (1, 6), (2, 16 + 15)]


def _region_data(shapes: Path) -> tuple[list[Caption], dict[Path, list[RegionPhrase]], Tokenizer, ImageCache]:
    """ShapesWorld's train captions and region phrases, a BPE over both, a 32-px image cache."""
    paths = shapes_split_paths(shapes, "train")
    captions, _ = read_coco_captions(paths["captions"], shapes)
    regions, _ = read_coco_regions(paths["objects"], shapes)
    tok = train_bpe([c.caption for c in captions] + [r.phrase for rs in regions.values() for r in rs], vocab_size=300)
    return captions, regions, tok, ImageCache(ImageTransform(size=(32, 32)), SkipStats())


def test_contrastive_task_adds_the_region_loss(shapes: Path) -> None:
    captions, regions, tok, images = _region_data(shapes)
    task = ContrastiveTask(group_captions(captions), tok, images, 48, {"itc": 1.0, "region": 0.5}, regions=regions)
    batch = task.make_batch(list(range(4)))
    assert batch is not None and batch.region_boxes is not None
    owners = batch.region_image_index.tolist()
    assert len(owners) == sum(len(regions[task.pairs[i].image]) for i in range(4))
    torch.manual_seed(0)
    model = DualEncoder(DualEncoderConfig(
        vision=ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        text=CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            max_position_embeddings=48, eos_token_id=tok.eos_id),
        projection_dim=16))
    loss, logs = task.loss(model, batch)
    enc = model.encode_image_and_regions(batch.pixels, batch.region_image_index, batch.region_boxes)
    torch.testing.assert_close(enc.images, model.encode_image(batch.pixels))
    phrase_emb = model.encode_text(batch.phrase_ids, batch.phrase_mask)
    expected = clip_loss(enc.images, model.encode_text(batch.ids, batch.mask), model.logit_scale) + 0.5 * region_phrase_loss(
        enc.boxes, phrase_emb, batch.region_targets, model.logit_scale)
    torch.testing.assert_close(loss, expected)
    assert {"itc", "region"} <= set(logs) and "region_patches" not in logs
    # Per patch: every patch a box owns is scored against the phrases with its box's target.
    task.objectives = {"itc": 1.0, "region_patches": 2.0}
    loss, logs = task.loss(model, batch)
    enc = model.encode_image_and_regions(batch.pixels, batch.region_image_index, batch.region_boxes, per_patch=True)
    assert enc.patches is not None and enc.patch_box is not None and len(enc.patch_box) >= len(owners) // 2
    grid = batch.pixels.shape[-1] // 8
    patch_rows = model.vision_model(batch.pixels).patch_tokens()
    _, patch = patches_in_boxes(batch.region_image_index, batch.region_boxes, (grid, grid), 4, 8)
    torch.testing.assert_close(enc.patches, torch.nn.functional.normalize(
        model.visual_projection(model.vision_model.post_layernorm(patch_rows[patch])), dim=-1))
    expected = clip_loss(enc.images, model.encode_text(batch.ids, batch.mask), model.logit_scale) + 2.0 * region_phrase_loss(
        enc.patches, phrase_emb, batch.region_targets[enc.patch_box], model.logit_scale)
    torch.testing.assert_close(loss, expected)
    assert {"itc", "region_patches"} <= set(logs) and "region" not in logs
    # Per category: the same patches against "a circle.", "a square.", ... (one phrase for every colour);
    # per position: against their box's place in a 3x3 grid ("at the top left.").
    for objective, label_of in (("region_category", lambda r: region_phrase(r.category)),
                                ("region_position", lambda r: position_phrase(r.box))):
        task.objectives = {"itc": 1.0, objective: 0.5}
        batch = task.make_batch(list(range(4)))
        assert batch is not None and set(batch.patch_labels) == {objective}
        labels = batch.patch_labels[objective]
        kinds = [tok.decode(row[m].tolist()) for row, m in zip(labels.ids, labels.mask, strict=True)]
        assert [kinds[t] for t in labels.targets.tolist()] == [
            label_of(r) for i in range(4) for r in regions[task.pairs[i].image]]
        loss, logs = task.loss(model, batch)
        enc = model.encode_image_and_regions(batch.pixels, batch.region_image_index, batch.region_boxes, per_patch=True)
        assert enc.patches is not None and enc.patch_box is not None
        expected = clip_loss(enc.images, model.encode_text(batch.ids, batch.mask), model.logit_scale) + 0.5 * region_phrase_loss(
            enc.patches, model.encode_text(labels.ids, labels.mask), labels.targets[enc.patch_box], model.logit_scale)
        torch.testing.assert_close(loss, expected)
        assert {"itc", objective} <= set(logs) and "region_patches" not in logs
    # Each region's own phrase is its target.
    phrases = [tok.decode(row[m].tolist()) for row, m in zip(batch.phrase_ids, batch.phrase_mask, strict=True)]
    flat = [r.phrase for i in range(4) for r in regions[task.pairs[i].image]]
    assert [phrases[t] for t in batch.region_targets.tolist()] == flat


def test_region_objective_is_checked(shapes: Path) -> None:
    paths = shapes_split_paths(shapes, "train")
    captions, _ = read_coco_captions(paths["captions"], shapes)
    tok = train_bpe([c.caption for c in captions], vocab_size=300)
    images = ImageCache(ImageTransform(size=(32, 32)), SkipStats())
    pairs = group_captions(captions)
    with pytest.raises(ValueError, match="need `regions`"):
        ContrastiveTask(pairs, tok, images, 48, {"itc": 1.0, "region": 1.0})
    with pytest.raises(ValueError, match="need `regions`"):
        ContrastiveTask(pairs, tok, images, 48, {"itc": 1.0, "region_patches": 1.0})
    with pytest.raises(ValueError, match="go with itc"):
        ContrastiveTask(pairs, tok, images, 48, {"sigmoid": 1.0, "region": 1.0}, regions={})
    with pytest.raises(ValueError, match="one loss"):
        ContrastiveTask(pairs, tok, images, 48, {"region": 1.0}, regions={})


def test_position_phrase_names_the_grid_cell_of_the_box_centre() -> None:
    assert position_phrase((0.0, 0.0, 0.2, 0.2)) == "at the top left."
    assert position_phrase((0.4, 0.4, 0.2, 0.2)) == "in the middle."
    assert position_phrase((0.8, 0.45, 0.2, 0.1)) == "on the right."
    assert position_phrase((0.3, 0.9, 0.1, 0.1)) == "at the bottom."
    assert position_phrase((0.1, 0.7, 0.1, 0.2)) == "at the bottom left."
    assert position_phrase((0.35, 0.0, 0.3, 0.2)) == "at the top."
    # A centre exactly on the last edge still falls in the last cell.
    assert position_phrase((0.5, 0.5, 0.5, 0.5)) == "at the bottom right."


def test_grayscale_views_drop_colour_from_pixels_and_every_text(shapes: Path) -> None:
    captions, regions, tok, images = _region_data(shapes)
    words = WordSwapper.for_shapesworld()
    objectives = {"itc": 1.0, "region": 1.0}
    colours = set(COLORS)
    for probability in (0.0, 1.0):
        task = ContrastiveTask(group_captions(captions), tok, images, 48, objectives, regions=regions,
                               grayscale=GrayscaleViews(probability, words))
        torch.manual_seed(0)
        batch = task.make_batch(list(range(4)))
        assert batch is not None and batch.phrase_ids is not None
        raw = torch.stack([images.get(task.pairs[i].image) for i in range(4)])
        texts = [tok.decode(row[m].tolist()) for row, m in zip(batch.ids, batch.mask, strict=True)]
        phrases = [tok.decode(row[m].tolist()) for row, m in zip(batch.phrase_ids, batch.phrase_mask, strict=True)]
        said = set(" ".join(texts + phrases).replace(".", " ").split())
        if probability == 0.0:
            torch.testing.assert_close(batch.pixels, images.normalize(raw))
            assert said & colours
        else:
            gray = torch.stack([to_grayscale(px) for px in raw])
            assert (gray[:, 0] == gray[:, 1]).all() and (gray[:, 1] == gray[:, 2]).all()
            torch.testing.assert_close(batch.pixels, images.normalize(gray))
            assert not said & colours, said & colours
    with pytest.raises(ValueError, match="grayscale probability"):
        GrayscaleViews(1.5, words)
