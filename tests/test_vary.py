"""Vary: the ViTDet encoder (windowed and global attention, conv neck with a fixed token grid),
two vision towers joined by sequence or by channels in the LVLM, Vary-tiny's prompt-free data
with natural negatives, mixed stage data, and a tiny Vary-tiny → Vary-base run that learns and
hands the new vocabulary over frozen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tessera.connectors.projector import ProjectorConfig
from tessera.data.readers import shapes_split_paths
from tessera.data.records import SkipStats
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.data.shapes_reading import generate_reading_tasks
from tessera.models.lvlm import LVLM, LVLMConfig, VisionBranchConfig
from tessera.models.slot_reader import SlotReader
from tessera.pipeline import build_lvlm, read_stage_conversations, train_lvlm
from tessera.presets import vary
from tessera.presets.base import PRETRAIN_STAGES, LVLMPreset
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig
from tessera.text.tokenizer import train_bpe
from tessera.train.checkpoint import load_checkpoint
from tessera.train.freeze import set_trainable
from tessera.vision.vit import ViTConfig
from tessera.vision.vitdet import ViTDet, ViTDetConfig, window_partition, window_unpartition


def test_neck_gives_a_fixed_token_grid() -> None:
    model = ViTDet(vary.tiny_vocabulary_network()).eval()
    out = model([torch.randn(3, 64, 64) for _ in range(3)])
    assert out.grids == [(4, 4)] * 3 and out.hidden.shape == (48, 128)
    assert out.cu_seqlens.tolist() == [0, 16, 32, 48] and not out.has_class_token
    assert model.num_tokens(64, 64) == 16
    # the paper's network: 1024 px → 64×64 patches → 16×16 = 256 tokens (widths shrunk to build fast)
    paper = vary.paper()["extra_towers"][0].vision
    small = paper.model_copy(update={"hidden_size": 12, "num_heads": 1, "intermediate_size": 12,
                                     "neck_channels": 4, "downsample_channels": (4, 8)})
    assert ViTDet(small).token_grid(1024, 1024) == (16, 16) and paper.output_width == 1024
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model([torch.randn(3, 62, 64)])


def test_conv_stem_keeps_the_patch_grid_and_sees_neighbouring_pixels() -> None:
    stem_cfg = vary.tiny_vocabulary_network()
    assert stem_cfg.patch_embed == "conv_stem" and vary.paper()["extra_towers"][0].vision.patch_embed == "patch"
    patch_cfg = stem_cfg.model_copy(update={"patch_embed": "patch"})
    stem, patch = ViTDet(stem_cfg).eval(), ViTDet(patch_cfg).eval()
    names = set(dict(stem.named_parameters()))
    assert not any(n.startswith("patch_embed.proj") for n in names) and "patch_embed.stem.0.weight" in names
    x = torch.randn(2, 3, 64, 48)
    assert stem.patch_embed(x).shape == patch.patch_embed(x).shape == (2, 16, 12, 64)
    # A pixel changed in patch (0, 0) reaches patch (0, 1) through the 3×3 stem, never through SAM's p×p convolution.
    y = x.clone()
    y[:, :, 2, 3] += 1.0
    with torch.no_grad():
        assert not torch.allclose(stem.patch_embed(x)[:, 0, 1], stem.patch_embed(y)[:, 0, 1])
        assert torch.equal(patch.patch_embed(x)[:, 0, 1], patch.patch_embed(y)[:, 0, 1])
    with pytest.raises(ValueError, match="power of 2"):
        ViTDetConfig(image_size=60, patch_size=6, patch_embed="conv_stem")


def _sam_names(name: str) -> str:
    """A Tessera ViTDet parameter name → Hugging Face SamVisionEncoder's."""
    for ours, theirs in (("blocks.", "layers."), (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
                         ("patch_embed.proj.", "patch_embed.projection."), ("neck.0.", "neck.conv1."),
                         ("neck.1.", "neck.layer_norm1."), ("neck.2.", "neck.conv2."), ("neck.3.", "neck.layer_norm2.")):
        name = name.replace(ours, theirs)
    return name


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_encoder_matches_transformers_sam_with_the_same_weights(use_rel_pos: bool) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=3,
                                          num_attention_heads=2, image_size=40, patch_size=4, window_size=4,
                                          global_attn_indexes=[1], use_rel_pos=use_rel_pos, mlp_dim=64)
    torch.manual_seed(0)
    theirs = transformers.SamVisionModel(hf_cfg).vision_encoder.eval()
    with torch.no_grad():
        for p in theirs.parameters():  # HF initialises pos / rel-pos tables to zero: make them count
            p.normal_(0, 0.3)
    ours = ViTDet(ViTDetConfig(image_size=40, patch_size=4, hidden_size=32, num_layers=3, num_heads=2,
                               intermediate_size=64, window_size=4, global_attn_indexes=(1,),
                               use_rel_pos=use_rel_pos, neck_channels=16)).eval()
    state = theirs.state_dict()
    mine = {n: state[_sam_names(n)] for n in ours.state_dict() if not n.startswith(("net_2", "net_3"))}
    missing = ours.load_state_dict(mine, strict=False).missing_keys
    assert sorted(missing) == ["net_2.weight", "net_3.weight"]
    pixels = torch.randn(2, 3, 40, 40)  # a 10x10 grid: windows of 4 are padded, as SAM pads them
    with torch.no_grad():
        expected = theirs(pixels).last_hidden_state
        got = ours.neck_map(pixels)
    assert got.shape == expected.shape == (2, 16, 10, 10)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_relative_positions_make_attention_depend_on_offsets() -> None:
    cfg = ViTDetConfig(image_size=16, patch_size=4, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       window_size=0, global_attn_indexes=(0,), use_rel_pos=True, neck_channels=8,
                       downsample_channels=(8, 8))
    attn = ViTDet(cfg).blocks[0].attn
    assert attn.rel_pos_h.shape == attn.rel_pos_w.shape == (7, 8)  # 2 * 4 - 1 offsets, head dim 8
    q = torch.randn(1, 2, 16, 8)
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    bias = attn.relative_bias(q, 4, 4).view(1, 2, 4, 4, 4, 4)  # query (i, j), key (k, l)
    # query (1, 2) to key (3, 0): row offset -2, column offset +2 (table index offset + 3)
    expected = q[0, :, 1 * 4 + 2] @ attn.rel_pos_h[1 - 3 + 3] + q[0, :, 1 * 4 + 2] @ attn.rel_pos_w[2 - 0 + 3]
    torch.testing.assert_close(bias[0, :, 1, 2, 3, 0], expected)


def test_window_partition_round_trip_with_padding() -> None:
    x = torch.randn(2, 6, 7, 5)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 2, 4, 4, 5) and padded == (8, 8)
    assert torch.equal(window_unpartition(windows, 4, padded, (6, 7)), x)


def test_windowed_blocks_attend_within_windows_and_global_blocks_everywhere() -> None:
    cfg = ViTDetConfig(image_size=32, patch_size=4, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                       window_size=4, global_attn_indexes=(1,), neck_channels=8, downsample_channels=(8, 8))
    model = ViTDet(cfg).eval()
    x = torch.randn(1, 8, 8, 16)
    changed = x.clone()
    changed[0, 0, 0] += 3.0 * torch.randn(16)  # a token of the top-left window
    local, glob = model.blocks
    with torch.no_grad():
        a, b = local(x), local(changed)
        assert torch.equal(a[0, 4:, :], b[0, 4:, :]) and torch.equal(a[0, :4, 4:], b[0, :4, 4:])
        assert (a[0, :4, :4] - b[0, :4, :4]).abs().amax(-1).min() > 0  # its own window all moves
        a, b = glob(x), glob(changed)
        assert (a - b).abs().amax(-1).min() > 0


def test_mixed_sizes_equal_each_image_alone() -> None:
    model = ViTDet(vary.tiny_vocabulary_network()).eval()
    images = [torch.randn(3, 64, 64), torch.randn(3, 32, 96)]
    out = model(images)
    assert out.grids == [(4, 4), (2, 6)]
    for i, image in enumerate(images):
        start, end = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        torch.testing.assert_close(out.hidden[start:end], model([image]).hidden, atol=1e-5, rtol=0)


def two_tower_lvlm(merge: str, size: int = 32) -> LVLM:
    return LVLM(LVLMConfig(
        vision=ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
        connector=ProjectorConfig(kind="linear"),
        extra_towers=[VisionBranchConfig(
            vision=ViTDetConfig(image_size=64, patch_size=4, hidden_size=16, num_layers=2, num_heads=2,
                                intermediate_size=32, window_size=4, global_attn_indexes=(1,), neck_channels=8,
                                downsample_channels=(8, 12)),
            connector=ProjectorConfig(kind="linear"), image_size=size)],
        tower_merge=merge,
        llm=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2),
        image_token_id=5, vision_feature_layer=-2,
    )).eval()


def test_two_towers_joined_by_sequence() -> None:
    model = two_tower_lvlm("sequence")
    # CLIP branch: 4×4 patches of the 32 px image; new vocabulary at 32 px: 8×8 patches → 2×2 tokens
    assert model.num_image_tokens(32, 32) == 16 + 4
    images = [torch.randn(3, 32, 32), torch.randn(3, 32, 32)]
    with torch.no_grad():
        feats = model.image_features(images)
        main = model.connector(model.vision_tokens(images))
        extra = model.extra_towers[0](images)
    assert feats.shape == (40, 32)
    torch.testing.assert_close(feats[:16], main[:16])
    torch.testing.assert_close(feats[16:20], extra[:4])
    torch.testing.assert_close(feats[20:36], main[16:])
    torch.testing.assert_close(feats[36:], extra[4:])


def test_two_towers_joined_by_channels() -> None:
    model = two_tower_lvlm("channels", size=64)  # 64 px: 16×16 patches → 4×4 = 16 tokens, as many as CLIP's
    assert model.connector.linear_1.out_features == 16 == model.extra_towers[0].connector.linear_1.out_features
    assert model.num_image_tokens(32, 32) == 16
    images = [torch.randn(3, 32, 32)]
    with torch.no_grad():
        feats = model.image_features(images)
        ids = torch.tensor([[1, *([5] * 16), 9]])
        hidden = model(ids, images)
    torch.testing.assert_close(feats[:, :16], model.connector(model.vision_tokens(images)))
    torch.testing.assert_close(feats[:, 16:], model.extra_towers[0](images))
    assert hidden.shape == (1, 18, 32)
    with pytest.raises(ValueError, match="same number of tokens"):
        two_tower_lvlm("channels", size=32).num_image_tokens(32, 32)
    with pytest.raises(ValueError, match="divide evenly"):
        LVLMConfig(extra_towers=[VisionBranchConfig(vision=ViTDetConfig())], tower_merge="channels",
                   llm=LlamaConfig(hidden_size=33, num_heads=3, num_kv_heads=1), image_token_id=4)


@pytest.fixture(scope="module")
def reading_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vary_shapes")
    generate_shapes(ShapesConfig(seed=2, num_train=60, num_val=4, num_test=8, num_test_comp=8), root, progress=False)
    generate_reading_tasks(root, progress=False)
    return root


def test_vary_tiny_data_has_no_text_input_and_natural_negatives(reading_shapes: Path) -> None:
    skips = SkipStats()
    convs = vary.vary_tiny_conversations(reading_shapes, "train", skips)
    assert all(c.turns[0].text == "<image>" and len(c.turns) == 2 and len(c.images) == 1 for c in convs)
    negatives = [c for c in convs if c.turns[1].text == vary.NEGATIVE_ANSWER]
    reading = [c for c in convs if c.turns[1].text != vary.NEGATIVE_ANSWER]
    # as many negatives as NEGATIVE_SHARE asks, at most every train image once (60 here)
    assert reading and len(negatives) == min(60, round(vary.NEGATIVE_SHARE * len(reading)))
    assert len({c.images[0] for c in negatives}) == len(negatives)
    assert any(c.id.startswith("train_ocr_pretrain_") for c in reading)  # the pretraining texts too
    assert all("/reading/" in c.images[0].as_posix() for c in reading)
    assert not any("/reading/" in c.images[0].as_posix() for c in negatives)
    assert any(c.turns[1].text.startswith("{") for c in reading)  # charts answer with a dict
    # the same set through the stage-data registry, mixed with another file
    paths = shapes_split_paths(reading_shapes, "train")
    mixed = read_stage_conversations(paths, "vary_tiny+llava_pretrain", reading_shapes, SkipStats())
    assert len(mixed) == len(convs) + len(read_stage_conversations(paths, "llava_pretrain", reading_shapes, skips))


def test_stage_data_mixtures_and_optional_parts(tiny_shapes: Path) -> None:
    paths = shapes_split_paths(tiny_shapes, "train")
    skips = SkipStats()
    plain = read_stage_conversations(paths, "llava_pretrain", tiny_shapes, skips)
    # tiny_shapes has no reading tasks: an optional part is left out and counted
    assert len(read_stage_conversations(paths, "llava_pretrain+ocr?", tiny_shapes, skips)) == len(plain)
    assert skips.reasons["optional stage data missing"] == 1
    with pytest.raises(FileNotFoundError, match="tessera data reading"):
        read_stage_conversations(paths, "llava_pretrain+ocr", tiny_shapes, skips)
    with pytest.raises(ValueError, match="not a conversation file"):
        read_stage_conversations(paths, "llava_pretrain+nonsense", tiny_shapes, skips)


def test_vary_presets_freeze_both_vocabularies_in_vary_base() -> None:
    tok = train_bpe(["a red circle"] * 10, vocab_size=300)
    tiny_model = build_lvlm(vary.tiny_vary_tiny(), tok)
    assert isinstance(tiny_model.vision_tower, ViTDet) and tiny_model.num_image_tokens(64, 64) == 16
    base = vary.tiny()
    model = build_lvlm(base, tok)
    assert model.num_image_tokens(64, 64) == 64 + 16
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith(("connector.", "extra_towers.0.connector.", "language_model.")))
    vision = sum(p.numel() for n, p in model.named_parameters() if ".vision_tower." in f".{n}")
    for stage in base.stages:
        report = set_trainable(model, stage.trainable)
        assert report.trainable == trainable and report.frozen == vision
    assert base.template == "chatml" and vary.tiny_vary_tiny().template == "chatml"


SMALL = {
    "vision": ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "text_tower": CLIPTextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=64),
    "clip_projection_dim": 32,
    "llm": LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=512),
    "tokenizer_vocab_size": 400,
}
SMALL_VOCABULARY = ViTDetConfig(image_size=32, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, window_size=4, global_attn_indexes=(1,), neck_channels=16,
                                downsample_channels=(32, 32))


def small(preset: LVLMPreset, steps: list[int], **update) -> LVLMPreset:
    return LVLMPreset.parse({
        **preset.model_dump(), **{k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in SMALL.items()},
        "clip_stage": preset.clip_stage.model_copy(update={"steps": 6, "batch_size": 16, "warmup_steps": 0}).model_dump(),
        "lm_stage": preset.lm_stage.model_copy(update={"steps": 120, "batch_size": 16, "warmup_steps": 4}).model_dump(),
        "stages": [s.model_copy(update={"steps": n, "batch_size": 8, "warmup_steps": 2, "log_every": 1}).model_dump()
                   for s, n in zip(preset.stages, steps, strict=True)],
        **update,
    })


@pytest.mark.slow
def test_tiny_vary_tiny_then_vary_base_learn(reading_shapes: Path, tmp_path: Path) -> None:
    first = small(vary.tiny_vary_tiny(), [40, 60], encoder=SMALL_VOCABULARY.model_dump())
    branch = vary.tiny().extra_towers[0].model_copy(update={"vision": SMALL_VOCABULARY})
    second = small(vary.tiny(), [10, 40], extra_towers=[branch.model_dump()])
    train_lvlm(second, reading_shapes, tmp_path, stages=PRETRAIN_STAGES, progress=False)
    # Vary-tiny's first stage trains the vocabulary network alone, with a character-slot reader
    read_run = train_lvlm(first, reading_shapes, tmp_path, stages=["read"], pretrained=tmp_path, progress=False)
    read_losses = [h["loss"] for h in read_run.stages[0].history]
    assert sum(read_losses[-5:]) / 5 < 0.8 * sum(read_losses[:5]) / 5, read_losses
    reader = load_checkpoint(tmp_path / "vary" / "read" / "final").model
    assert isinstance(reader, SlotReader)
    # run on its own, the next stage starts from the reader's encoder (kept frozen here to see it)
    frozen = first.model_copy(update={"stages": [first.stages[0], first.stages[1].model_copy(
        update={"trainable": ["connector"], "steps": 2})]})
    start = train_lvlm(frozen, reading_shapes, tmp_path, stages=["vary_tiny"], pretrained=tmp_path, progress=False)
    for name, value in start.model.vision_tower.state_dict().items():
        assert torch.equal(value, reader.encoder.state_dict()[name]), name
    tiny_run = train_lvlm(first, reading_shapes, tmp_path, stages=["vary_tiny"], pretrained=tmp_path, progress=False)
    losses = [h["loss"] for h in tiny_run.stages[0].history]
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses
    base_run = train_lvlm(second, reading_shapes, tmp_path, stages=["pretrain", "sft"], pretrained=tmp_path,
                          progress=False)
    # the new vocabulary came from Vary-tiny and stayed frozen through Vary-base
    vocabulary = load_checkpoint(tmp_path / "vary" / "vary_tiny" / "final").model.vision_tower.state_dict()
    for name, value in base_run.model.extra_towers[0].vision_tower.state_dict().items():
        assert torch.equal(value, vocabulary[name]), name
    sft = [h["loss"] for h in base_run.stages[-1].history]
    assert all(math.isfinite(x) for x in sft) and sum(sft[-8:]) / 8 < 0.8 * sum(sft[:8]) / 8, sft


def test_configs_with_every_tower_kind_round_trip_through_json() -> None:
    from tessera.vision.navit import NaViTConfig

    for cfg in (two_tower_lvlm("sequence").cfg,
                LVLMConfig(vision=NaViTConfig(), image_token_id=4),
                LVLMConfig(vision=vary.tiny_vocabulary_network(), image_token_id=4,
                           llm=LlamaConfig(visual_expert=True), image_positions="shared")):
        again = LVLMConfig.parse(cfg.model_dump(mode="json"))
        assert again == cfg and type(again.vision) is type(cfg.vision)
    assert type(LVLMConfig.parse({"image_token_id": 4, "vision": {"image_size": 32}}).vision) is ViTConfig
