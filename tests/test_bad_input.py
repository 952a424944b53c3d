"""Bad input never stops a run silently or wrongly: corrupt images, malformed records and
conversations that do not fit are skipped and counted, empty batches are skipped, and the
model and generator reject inconsistent input with a clear error."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tessera.data.datasets import ConversationDataset, ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_llava
from tessera.data.records import Conversation, SkipStats
from tessera.infer.generate import generate
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.text.llama import LlamaConfig
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.stage import StageConfig
from tessera.train.tasks import ConversationTask
from tessera.train.trainer import Trainer
from tessera.vision.vit import ViTConfig

IMAGE_SIZE = 16
TINY_VIT = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64)
UNREADABLE = "unreadable image"
DOES_NOT_FIT = "conversation does not fit the template"
EMPTY_BATCH = "batch with no usable example"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(["what color is the circle?", "red", "how many shapes are there?", "2", "yes"] * 4,
                     vocab_size=300)


def tiny_lvlm(tokenizer: Tokenizer) -> LVLM:
    torch.manual_seed(0)
    llm = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    return LVLM(LVLMConfig(vision=TINY_VIT, llm=llm, image_token_id=tokenizer.image_id))


def llava_record(record_id: str, image: str, question: str = "what color is the circle?",
                 answer: str = "red") -> dict[str, Any]:
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    """good_0.png … good_2.png and corrupt.png (random bytes under an image name)."""
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), color).save(tmp_path / f"good_{i}.png")
    noise = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (tmp_path / "corrupt.png").write_bytes(noise.numpy().tobytes())
    return tmp_path


def read_records(root: Path, records: list[Any]) -> tuple[list[Conversation], SkipStats]:
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return read_llava(path, root)


def conversation_task(conversations: list[Conversation], tokenizer: Tokenizer, model: LVLM,
                      max_length: int = 96) -> ConversationTask:
    images = ImageCache(ImageTransform(size=(IMAGE_SIZE, IMAGE_SIZE)), SkipStats())
    dataset = ConversationDataset(conversations, tokenizer, "vicuna", images, model.num_image_tokens, max_length)
    return ConversationTask(dataset, packing=True)


def stage(steps: int, batch_size: int) -> StageConfig:
    return StageConfig(name="bad-input", trainable=["*"], steps=steps, batch_size=batch_size, lr=1e-2,
                       log_every=1)


def test_corrupt_image_in_a_training_record_is_skipped_and_training_continues(
    image_root: Path, tokenizer: Tokenizer,
) -> None:
    records = [llava_record(f"good-{i}", f"good_{i}.png") for i in range(3)]
    records.insert(1, llava_record("corrupt", "corrupt.png"))
    conversations, read_skips = read_records(image_root, records)
    assert len(conversations) == 4 and read_skips.total == 0  # the file exists; only decoding fails

    model = tiny_lvlm(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    task = conversation_task(conversations, tokenizer, model)
    result = Trainer(model, stage(steps=3, batch_size=4), task, progress=False).fit()

    assert result.steps == 3
    assert [row["step"] for row in result.history] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # Every step drew the corrupt record; it is decoded (and counted) once.
    assert result.skips.reasons == Counter({UNREADABLE: 1})
    assert "corrupt.png" in result.skips.examples[UNREADABLE]


def test_malformed_llava_records_are_skipped_and_counted(image_root: Path) -> None:
    good = llava_record("good", "good_0.png")
    records = [
        good,
        42,
        {"id": "no-conversations", "image": "good_0.png"},
        {"id": "ends-with-user", "image": "good_0.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat color?"}]},
        {"id": "bad-speaker", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "hi"}]},
        {**good, "id": "two-placeholders", "conversations": [
            {"from": "human", "value": "<image><image>\nwhat color?"}, {"from": "gpt", "value": "red"}]},
        llava_record("missing-file", "nowhere.png"),
    ]
    conversations, skips = read_records(image_root, records)
    assert [c.id for c in conversations] == ["good"]
    assert skips.reasons == Counter({
        "record is not a JSON object": 1,
        "missing or invalid 'conversations'": 1,
        "turn order violation": 1,
        "unknown speaker": 1,
        "image placeholder count differs from image count": 1,
        "image file not found": 1,
    })
    assert "id=missing-file" in skips.examples["image file not found"]


def test_a_file_that_is_not_json_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json"):
        read_llava(path, tmp_path)


def test_conversation_that_does_not_fit_the_template_is_skipped_and_counted(
    image_root: Path, tokenizer: Tokenizer,
) -> None:
    conversations, _ = read_records(image_root, [llava_record("long", "good_0.png")])
    model = tiny_lvlm(tokenizer)
    # BOS and "USER: " come first, so a cut after 3 tokens goes through the image's tokens.
    task = conversation_task(conversations, tokenizer, model, max_length=3)
    assert task.dataset[0] is None
    assert task.dataset[0] is None
    assert task.skips.reasons == Counter({DOES_NOT_FIT: 1})
    assert "long" in task.skips.examples[DOES_NOT_FIT]
    assert "truncation through an image" in task.skips.examples[DOES_NOT_FIT]


def test_a_batch_with_no_usable_example_is_skipped_and_counted(
    image_root: Path, tokenizer: Tokenizer, tmp_path: Path,
) -> None:
    records = [llava_record("good", "good_0.png")]
    records += [llava_record(f"corrupt-{i}", "corrupt.png") for i in range(5)]
    conversations, _ = read_records(image_root, records)
    model = tiny_lvlm(tokenizer)
    steps = 3
    result = Trainer(model, stage(steps=steps, batch_size=1), conversation_task(conversations, tokenizer, model),
                     out_dir=tmp_path / "run", progress=False).fit()

    assert result.steps == steps and all(math.isfinite(row["loss"]) for row in result.history)
    batches_seen = torch.load(tmp_path / "run" / "final" / "trainer_state.pt", weights_only=False)["batches_seen"]
    skipped = result.skips.reasons[EMPTY_BATCH]
    assert skipped == batches_seen - steps
    # One usable record per epoch of six: the third usable batch comes after ≥ 2 × 5 bad ones.
    assert skipped >= 10
    assert result.skips.reasons[UNREADABLE] == 1
    assert result.skips.examples[EMPTY_BATCH].startswith("batch ")


def test_a_dataset_with_no_usable_example_fails_instead_of_hanging(
    image_root: Path, tokenizer: Tokenizer,
) -> None:
    conversations, _ = read_records(image_root, [llava_record(f"corrupt-{i}", "corrupt.png") for i in range(4)])
    model = tiny_lvlm(tokenizer)
    task = conversation_task(conversations, tokenizer, model)
    with pytest.raises(ValueError, match="no usable example"):
        Trainer(model, stage(steps=2, batch_size=2), task, progress=False).fit()
    assert task.skips.reasons[UNREADABLE] == 1


def image_prompt(model: LVLM, tokenizer: Tokenizer, placeholders: int) -> torch.Tensor:
    n = model.num_image_tokens(IMAGE_SIZE, IMAGE_SIZE)
    text = tokenizer.encode("what color is the circle?")
    return torch.tensor([[tokenizer.bos_id, *([tokenizer.image_id] * n * placeholders), *text]])


@pytest.mark.parametrize(("placeholders", "images"), [(2, 1), (1, 2), (0, 1)])
def test_lvlm_rejects_image_tokens_that_do_not_match_the_images(
    tokenizer: Tokenizer, placeholders: int, images: int,
) -> None:
    model = tiny_lvlm(tokenizer)
    ids = image_prompt(model, tokenizer, placeholders)
    pixels = [torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE) for _ in range(images)]
    with pytest.raises(ValueError, match=f"{images} images give .* the text has {int(ids.eq(tokenizer.image_id).sum())} "):
        model(ids, pixels)


def test_lvlm_rejects_image_tokens_without_images(tokenizer: Tokenizer) -> None:
    model = tiny_lvlm(tokenizer)
    with pytest.raises(ValueError, match="no image was given"):
        model(image_prompt(model, tokenizer, 1), [])


def test_lvlm_accepts_matching_images(tokenizer: Tokenizer) -> None:
    model = tiny_lvlm(tokenizer)
    ids = image_prompt(model, tokenizer, 2)
    hidden = model(ids, [torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE), torch.ones(3, IMAGE_SIZE, IMAGE_SIZE)])
    assert hidden.shape == (1, ids.shape[1], model.cfg.llm.hidden_size)


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2, 3], []]], ids=["no-prompt", "empty", "one-empty"])
def test_generate_rejects_empty_prompts(tokenizer: Tokenizer, prompts: list[list[int]]) -> None:
    model = tiny_lvlm(tokenizer)
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(model, prompts, stop_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id)
