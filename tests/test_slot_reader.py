"""The character-slot reader that pretrains an encoder to read (Vary-tiny's "read" stage)."""

from __future__ import annotations

import pytest
import torch

from tessera.models.registry import build_model, kind_of
from tessera.models.slot_reader import (
    PRESENCE_OBJECTIVE,
    READING_OBJECTIVE,
    SlotReader,
    SlotReaderConfig,
)
from tessera.presets import vary
from tessera.presets.base import LVLMPreset
from tessera.train.stage import StageConfig
from tessera.vision.vit import ViTConfig
from tessera.vision.vitdet import ViTDet, ViTDetConfig

VOCABULARY = ViTDetConfig(image_size=32, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          window_size=4, global_attn_indexes=(1,), neck_channels=16, downsample_channels=(32, 32))


def reader(**update) -> SlotReader:
    torch.manual_seed(0)
    return SlotReader(SlotReaderConfig.for_texts(VOCABULARY, ["red", "a 12", "cross"], num_heads=2, **update))


def test_charset_and_slots_cover_the_training_texts() -> None:
    cfg = reader().cfg
    assert cfg.charset == " 12acdeors" and cfg.max_chars == len("cross") + 1 and cfg.end_id == 10


def test_targets_spell_each_text_then_the_end_mark() -> None:
    r = reader()
    end = r.cfg.end_id
    charset = r.cfg.charset
    assert r.targets(["red"]).tolist() == [[charset.index("r"), charset.index("e"), charset.index("d"), end, end, end]]
    assert r.targets([""]).tolist() == [[end] * 6]
    with pytest.raises(ValueError, match=r"outside the reader's charset: \['z'\]"):
        r.targets(["zed"])
    with pytest.raises(ValueError, match="at most 5"):
        r.targets(["crosses"])


def test_decoding_stops_at_the_first_end_mark() -> None:
    r = reader()
    end, charset = r.cfg.end_id, r.cfg.charset
    ids = torch.tensor([[charset.index("a"), charset.index(" "), charset.index("1"), end, charset.index("2"), end]])
    logits = torch.nn.functional.one_hot(ids, end + 1).float()
    assert r.decode(logits) == ["a 1"]
    spelled = torch.nn.functional.one_hot(r.targets(["cross", "a 12"]), end + 1).float()
    assert r.decode(spelled) == ["cross", "a 12"]  # targets and decoding round-trip


def test_logits_per_slot_and_a_shared_encoder_trains_in_place() -> None:
    tower = ViTDet(VOCABULARY)
    r = SlotReader(reader().cfg, encoder=tower)
    assert r.encoder is tower  # the LVLM's own tower, not a copy
    pixels = torch.randn(3, 3, 32, 32)
    assert r(pixels).shape == (3, r.cfg.max_chars, r.cfg.end_id + 1)
    before = tower.net_3.weight.detach().clone()
    opt = torch.optim.SGD(r.parameters(), lr=0.1)
    r.loss(pixels, r.targets(["red", "a 12", "cross"])).backward()
    opt.step()
    assert not torch.equal(before, tower.net_3.weight)


def test_an_image_reads_the_same_alone_and_in_a_batch() -> None:
    r = reader().eval()
    pixels = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(r(pixels)[1:2], r(pixels[1:2]), atol=1e-5, rtol=1e-5)


def test_a_tiny_reader_learns_to_tell_texts_apart() -> None:
    # Two "texts": a dark left half or a dark right half; 60 steps fit them.
    r = reader()
    left, right = torch.full((3, 32, 32), 1.0), torch.full((3, 32, 32), 1.0)
    left[:, :, :16] = -1
    right[:, :, 16:] = -1
    pixels = torch.stack([left, right] * 4)
    targets = r.targets(["red", "cross"] * 4)
    opt = torch.optim.AdamW(r.parameters(), lr=3e-3)
    for _ in range(60):
        loss = r.loss(pixels, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r.eval().read(pixels[:2]) == ["red", "cross"]


def test_checkpoint_kind_and_config_round_trip() -> None:
    r = reader()
    assert kind_of(r) == "slot_reader"
    again = build_model("slot_reader", r.cfg.to_dict())
    assert again.cfg == r.cfg and isinstance(again.encoder, ViTDet)
    vit = SlotReaderConfig.for_texts(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                               intermediate_size=64), ["ab"], num_heads=2)
    assert SlotReader(vit)(torch.randn(1, 3, 32, 32)).shape == (1, 3, 3)  # class token left out


def test_bad_configs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="repeated"):
        SlotReaderConfig(vision=VOCABULARY, charset="aa", max_chars=3)
    with pytest.raises(ValueError, match="max_chars"):
        SlotReaderConfig(vision=VOCABULARY, charset="ab", max_chars=1)
    with pytest.raises(ValueError, match="at least one training text"):
        SlotReaderConfig.for_texts(VOCABULARY, [])
    stage = StageConfig(name="read", trainable=["*"], objectives={READING_OBJECTIVE: 1.0, "lm": 1.0}, data="ocr",
                        steps=1, batch_size=1, lr=1e-3)
    for objectives in ({READING_OBJECTIVE: 1.0, "lm": 1.0}, {PRESENCE_OBJECTIVE: 1.0}):
        stage = stage.model_copy(update={"objectives": objectives})
        with pytest.raises(ValueError, match="optionally with 'char_presence' and no other objective"):
            LVLMPreset.parse({**vary.tiny_vary_tiny().model_dump(), "stages": [stage.model_dump()]})
    stage = stage.model_copy(update={"objectives": {READING_OBJECTIVE: 1.0, PRESENCE_OBJECTIVE: 0.5}})
    LVLMPreset.parse({**vary.tiny_vary_tiny().model_dump(), "stages": [stage.model_dump()]})  # accepted


def test_presence_loss_is_the_bce_of_each_characters_best_token() -> None:
    """PRESENCE_OBJECTIVE: per character, the max over encoder tokens of a linear score, BCE
    against whether the text holds that character (repeats count once, the end mark never)."""
    r = reader(presence_head=True)
    pixels = torch.randn(2, 3, 32, 32)
    targets = r.targets(["a 12", "cross"])
    parts = r.losses(pixels, targets)
    assert set(parts) == {READING_OBJECTIVE, PRESENCE_OBJECTIVE}
    vision = r.encoder(pixels)
    tokens = vision.patch_tokens().reshape(2, -1, r.cfg.width)
    scores = r.presence(tokens).amax(1)
    present = torch.tensor([[float(c in text) for c in r.cfg.charset] for text in ("a 12", "cross")])
    assert present[0, r.cfg.charset.index(" ")] == 1.0  # the charset's first character counts too
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores, present)
    torch.testing.assert_close(parts[PRESENCE_OBJECTIVE], expected)
    torch.testing.assert_close(r.loss(pixels, targets, {READING_OBJECTIVE: 1.0, PRESENCE_OBJECTIVE: 0.5}),
                               parts[READING_OBJECTIVE] + 0.5 * expected)
    torch.testing.assert_close(r.loss(pixels, targets), parts[READING_OBJECTIVE])  # default: slots alone
    with pytest.raises(ValueError, match="presence_head=True"):
        reader().loss(pixels, targets, {READING_OBJECTIVE: 1.0, PRESENCE_OBJECTIVE: 1.0})


def test_reading_task_weights_the_stage_objectives_and_logs_each(tmp_path) -> None:
    from PIL import Image

    from tessera.data.datasets import ImageCache
    from tessera.data.images import ImageTransform
    from tessera.data.records import SkipStats
    from tessera.train.tasks import ReadingTask

    pairs = []
    for i, text in enumerate(["red", "a 12"]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(path)
        pairs.append((path, text))
    images = ImageCache(ImageTransform(size=(32, 32)), SkipStats())
    task = ReadingTask(pairs, images, {READING_OBJECTIVE: 1.0, PRESENCE_OBJECTIVE: 0.5})
    batch = task.make_batch([0, 1])
    assert batch is not None
    r = reader(presence_head=True)
    loss, logs = task.loss(r, batch)
    assert set(logs) == {READING_OBJECTIVE, PRESENCE_OBJECTIVE}
    assert loss.item() == pytest.approx(logs[READING_OBJECTIVE] + 0.5 * logs[PRESENCE_OBJECTIVE], rel=1e-5)
    plain, plain_logs = ReadingTask(pairs, images).loss(r, batch)  # default: the slot loss alone
    assert plain.item() == pytest.approx(plain_logs[READING_OBJECTIVE], rel=1e-5)
    assert ReadingTask(pairs, images).loss(reader(), batch)[1] == {}  # one loss: nothing extra logged
    with pytest.raises(ValueError, match="presence_head=True"):
        task.loss(reader(), batch)
