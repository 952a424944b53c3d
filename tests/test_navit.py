"""NaViT encoder and the POINTS preset: packed output equals running each image alone; token
dropping keeps the per-image bookkeeping (counts, cu_seqlens, kept patches) right and pooling
reads only kept tokens; fractional factorised positions give finite output for unseen sizes
and extreme aspect ratios; the LVLM asks for each image's own token count; a tiny run learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tessera.data.collate import Sample, pad_collate
from tessera.data.records import Turn
from tessera.data.templates import encode_conversation
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.pipeline import build_lvlm, train_lvlm
from tessera.presets import points
from tessera.presets.base import PRETRAIN_STAGES, LVLMPreset
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.llama import LlamaConfig
from tessera.text.tokenizer import train_bpe
from tessera.train.freeze import set_trainable
from tessera.vision.navit import NaViT, NaViTConfig
from tessera.vision.vit import VisionTransformer, ViTConfig


def navit(**kw) -> NaViT:
    cfg = NaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      position_buckets=4, **kw)
    return NaViT(cfg).eval()


def test_packed_output_equals_each_image_alone() -> None:
    model = navit()
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 48), torch.randn(3, 8, 8), torch.randn(3, 64, 16)]
    out = model(images)
    assert out.grids == [(4, 4), (2, 6), (1, 1), (8, 2)]
    assert out.cu_seqlens.tolist() == [0, 16, 28, 29, 45]
    for i, image in enumerate(images):
        alone = model([image]).hidden
        start, end = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        torch.testing.assert_close(out.hidden[start:end], alone, atol=1e-5, rtol=0)
    # the same holds for the pooled vectors
    torch.testing.assert_close(model.pooled(out)[1], model.pooled(model([images[1]]))[0], atol=1e-5, rtol=0)


def test_dropping_keeps_the_bookkeeping_right() -> None:
    model = navit().train()
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 48), torch.randn(3, 8, 8)]
    rates = [0.5, 0.25, 0.9]
    gen = torch.Generator().manual_seed(3)
    out = model(images, drop_rate=rates, generator=gen)
    expected = [NaViT.kept_count(16, 0.5), NaViT.kept_count(12, 0.25), NaViT.kept_count(1, 0.9)]
    assert expected == [8, 9, 1] and out.lengths == expected
    assert out.cu_seqlens.tolist() == [0, 8, 17, 18] and out.hidden.shape == (18, 32)
    for i, (rows, cols) in enumerate(out.grids):
        kept = out.kept[i]
        assert kept.tolist() == sorted(set(kept.tolist())) and 0 <= int(kept.min()) and int(kept.max()) < rows * cols
        coords = out.coords(i)
        assert torch.equal(coords[:, 0] * cols + coords[:, 1], kept)
    # each image's output is the encoder run on its kept patches alone (positions kept)
    for i, image in enumerate(images):
        tokens = model.embeddings(image)[out.kept[i]]
        x = model.pre_layrnorm(tokens[None])
        for layer in model.encoder.layers:
            x = layer(x)
        start, end = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        torch.testing.assert_close(out.hidden[start:end], x[0], atol=1e-5, rtol=0)
    # one rate for all images; the config's rate applies in training mode only
    assert model(images, drop_rate=0.5).lengths == [8, 6, 1]
    dropping = navit(token_drop_rate=0.5)
    assert dropping.train()(images).lengths == [8, 6, 1]
    assert dropping.eval()(images).lengths == [16, 12, 1]
    with pytest.raises(ValueError, match="drop_rate"):
        model(images, drop_rate=[0.5, 0.5])
    with pytest.raises(ValueError, match="drop_rate"):
        model(images, drop_rate=1.0)


def test_pooling_reads_only_the_kept_tokens() -> None:
    model = navit().train()
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 16)]
    out = model(images, drop_rate=[0.5, 0.0], generator=torch.Generator().manual_seed(0))
    pooled = model.pooled(out)
    for i in range(2):
        start, end = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        torch.testing.assert_close(pooled[i], model.post_layernorm(out.hidden[start:end].mean(0)), atol=1e-6, rtol=0)
    # pixels of a dropped patch change nothing
    dropped = sorted(set(range(16)) - set(out.kept[0].tolist()))[0]
    r, c = divmod(dropped, 4)
    changed = images[0].clone()
    changed[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 5.0
    again = model([changed, images[1]], drop_rate=[0.5, 0.0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.kept[0], out.kept[0])
    torch.testing.assert_close(model.pooled(again), pooled, atol=1e-6, rtol=0)
    # ... while a kept patch's pixels do
    kept = int(out.kept[0][0])
    r, c = divmod(kept, 4)
    changed = images[0].clone()
    changed[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 5.0
    moved = model([changed, images[1]], drop_rate=[0.5, 0.0], generator=torch.Generator().manual_seed(0))
    assert (model.pooled(moved)[0] - pooled[0]).abs().max() > 1e-4


def test_fractional_positions_cover_unseen_sizes_and_aspect_ratios() -> None:
    model = navit()
    emb = model.embeddings
    assert emb.position_index(4, "high").tolist() == [0, 1, 2, 3]  # the table's own grid: one entry each
    assert emb.position_index(8, "high").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert emb.position_index(3, "high").tolist() == [0, 1, 2]
    assert emb.position_index(1, "high").tolist() == [0]
    # factorised: row table + column table
    pos = emb.positions(2, 3)
    torch.testing.assert_close(pos[1 * 3 + 2], emb.row_embedding.weight[2] + emb.col_embedding.weight[2])
    for size in [(8, 512), (512, 8), (200, 40), (8, 8), (128, 128)]:
        out = model([torch.randn(3, *size)])
        assert out.hidden.shape[0] == (size[0] // 8) * (size[1] // 8)
        assert torch.isfinite(out.hidden).all() and torch.isfinite(model.pooled(out)).all()
    absolute = navit(fractional_positions=False)
    absolute([torch.randn(3, 32, 32)])
    with pytest.raises(ValueError, match="absolute position table"):
        absolute([torch.randn(3, 8, 48)])


def test_bad_image_sizes_get_clear_errors() -> None:
    model = navit(max_patches=64)
    with pytest.raises(ValueError, match="smaller than one"):
        model([torch.randn(3, 4, 32)])
    with pytest.raises(ValueError, match="not a multiple"):
        model([torch.randn(3, 30, 32)])
    with pytest.raises(ValueError, match="max_patches"):
        model([torch.randn(3, 128, 128)])
    with pytest.raises(ValueError, match="expected"):
        model([torch.randn(1, 32, 32)])


def test_init_from_vit_reproduces_a_vit_with_additive_positions() -> None:
    vit_cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, class_token=False)
    vit = VisionTransformer(vit_cfg).eval()
    with torch.no_grad():  # a position table that is exactly row + column
        rows, cols = torch.randn(4, 1, 32), torch.randn(1, 4, 32)
        vit.embeddings.position_embedding.weight.copy_((rows + cols).reshape(16, 32))
    model = points.navit_like(vit_cfg)
    assert model.position_buckets == 4
    nav = NaViT(model).eval()
    nav.init_from_vit(vit.state_dict())
    image = torch.randn(3, 32, 32)
    torch.testing.assert_close(nav([image]).hidden, vit([image]).hidden, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        NaViT(points.navit_like(vit_cfg.model_copy(update={"patch_size": 4}))).init_from_vit(vit.state_dict())


def tiny_navit_lvlm() -> LVLM:
    return LVLM(LVLMConfig(
        vision=NaViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, position_buckets=4),
        llm=LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2),
        image_token_id=4, vision_feature_layer=-1,
    )).eval()


def test_lvlm_expands_each_image_to_its_own_token_count() -> None:
    tok = train_bpe(["what colour is the circle? red blue"] * 10, vocab_size=320)
    model = tiny_navit_lvlm()
    assert model.cfg.image_token_id == tok.image_id
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 64), torch.randn(3, 8, 24)]
    counts = [model.num_image_tokens(im.shape[1], im.shape[2]) for im in images]
    assert counts == [16, 16, 3]
    turns = (Turn("user", "<image>\nwhat colour?"), Turn("assistant", "red"))
    samples = []
    for image, count in zip(images, counts, strict=True):
        enc = encode_conversation(tok, "chatml", turns, [count])
        samples.append(Sample(enc.input_ids, enc.labels, [image]))
    batch = pad_collate(samples, tok.pad_id)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.images, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask)
        # the image features of sample 2 are its NaViT tokens alone, projected
        alone = model.image_features(images[2:])
        embeds, _ = model.embed(batch.input_ids, batch.images)
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(embeds[2][batch.input_ids[2] == tok.image_id], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must not drop tokens"):
        LVLMConfig(vision=NaViTConfig(token_drop_rate=0.5), image_token_id=4)


def test_points_preset_stages() -> None:
    preset = points.tiny()
    assert preset.encoder is not None and preset.encoder.hidden_size == preset.vision.hidden_size
    assert [s.name for s in preset.stages] == ["align", "warmup", "instruct"]
    tok = train_bpe(["a red circle"] * 10, vocab_size=300)
    model = build_lvlm(preset, tok)
    assert isinstance(model.vision_tower, NaViT) and model.connector.cfg.kind == "mlp"
    count = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("vision_tower", "connector", "language_model")}
    # The tiny recipe's encoder stays frozen throughout (it degrades under stage 1's caption loss).
    expected = [count["connector"], count["connector"], count["connector"] + count["language_model"]]
    assert [set_trainable(model, s.trainable).trainable for s in preset.stages] == expected
    assert points.paper()["encoder"].patch_size == 14


SMALL = {
    "vision": ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "text_tower": CLIPTextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=64),
    "clip_projection_dim": 32,
    "llm": LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=512),
    "tokenizer_vocab_size": 400,
}


@pytest.mark.slow
def test_tiny_run_learns(tiny_shapes: Path, tmp_path: Path) -> None:
    base = points.tiny()
    steps = (20, 10, 60)
    preset = LVLMPreset.parse({
        **base.model_dump(), **{k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in SMALL.items()},
        "encoder": points.navit_like(SMALL["vision"]).model_dump(),
        "clip_stage": base.clip_stage.model_copy(update={"steps": 6, "batch_size": 16, "warmup_steps": 0}).model_dump(),
        "lm_stage": base.lm_stage.model_copy(update={"steps": 120, "batch_size": 16, "warmup_steps": 4}).model_dump(),
        "stages": [s.model_copy(update={"steps": n, "batch_size": 8, "warmup_steps": 2, "log_every": 1}).model_dump()
                   for s, n in zip(base.stages, steps, strict=True)],
    })
    train_lvlm(preset, tiny_shapes, tmp_path, stages=PRETRAIN_STAGES, progress=False)
    result = train_lvlm(preset, tiny_shapes, tmp_path, stages=[s.name for s in preset.stages],
                        pretrained=tmp_path, progress=False)
    assert isinstance(result.model.vision_tower, NaViT)
    for stage, n in zip(result.stages, steps, strict=True):
        losses = [h["loss"] for h in stage.history]
        assert len(losses) == n and all(math.isfinite(x) for x in losses)
    last = [h["loss"] for h in result.stages[-1].history]
    first, end = sum(last[:8]) / 8, sum(last[-8:]) / 8
    assert end < 0.8 * first, f"instruct loss {first:.3f} → {end:.3f}"
