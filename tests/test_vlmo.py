"""VLMo: modality-expert routing (each token against its expert run alone), the stagewise
recipe's freezing, modality-type embeddings, ITC with shared images, masked image modelling,
the checkpoint round trip, and a tiny three-stage run that learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_vilt import COLORS, ZOO_METRICS, colour_dataset
from torch import Tensor, nn

from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.records import SkipStats
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.data.shapes_tasks import generate_classic_tasks
from tessera.eval.fusion_eval import shortened_finetune_stages
from tessera.models.vlmo import VLMo, VLMoConfig, patchify, soft_itc_loss, stage_trainable
from tessera.objectives.contrastive import clip_loss
from tessera.presets.vilt import tokenizer_fields
from tessera.presets.vlmo import VLMoPreset, run
from tessera.text.bert import feed_forward
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.fusion_tasks import (
    FUSION_SPECIAL_TOKENS,
    ImageTextBatch,
    ImageTextTask,
    encode_captions,
)
from tessera.train.stage import StageConfig
from tessera.train.trainer import Trainer
from tessera.zoo.core import SPLITS, ZooContext

TINY = dict(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, vl_expert_layers=1, image_size=32,
            patch_size=16, max_position_embeddings=16, projection_dim=32)



@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [f"a {c} picture with a square." for c in COLORS] * 4
    return train_bpe(texts, vocab_size=300, extra_special_tokens=FUSION_SPECIAL_TOKENS)


def tiny_model(tokenizer: Tokenizer, **overrides: object) -> VLMo:
    return VLMo(VLMoConfig(**{**TINY, **tokenizer_fields(tokenizer), **overrides}))


def sample(tokenizer: Tokenizer, n: int = 3) -> tuple[list[Tensor], Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    texts = [f"a {c} picture with a square." for c in list(COLORS)[:n]]
    texts[0] = "a red picture."  # rows of different lengths: padding in the batch
    ids, mask = encode_captions(tokenizer, texts, 16)
    return [torch.randn(3, 32, 32, generator=gen) for _ in range(n)], ids, mask


# ------------------------------------------------------------------ routing


def ffn_inputs_and_outputs(model: VLMo, run: callable) -> list[tuple[Tensor, Tensor]]:
    """Per layer: (the attention block's output = the FFN input, the layer's output)."""
    captured: list[list[Tensor]] = [[] for _ in model.transformer.encoder.layer]
    hooks = []
    for i, layer in enumerate(model.transformer.encoder.layer):
        hooks.append(layer.attention.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out)))
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return [(c[0], c[1]) for c in captured]


def text_ffn(layer: nn.Module, x: Tensor) -> Tensor:
    return feed_forward(layer.intermediate, layer.output, x)


def test_each_token_goes_to_exactly_its_modality_expert(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer).eval()
    images, ids, mask = sample(tokenizer)
    layers = model.transformer.encoder.layer
    first_vl = model.cfg.num_layers - model.cfg.vl_expert_layers
    length = ids.shape[1]
    with torch.no_grad():
        # The experts really differ, so a wrong route could not pass unnoticed.
        probe = torch.randn(5, model.cfg.hidden_size)
        for layer in layers:
            assert (text_ffn(layer, probe) - layer.image_expert(probe)).abs().max() > 1e-3
    # Fused: below the top layers text tokens use the L-FFN and image tokens the V-FFN, each
    # exactly as that expert alone computes them on those tokens; in the top layers every
    # token uses the VL-FFN.
    fused = ffn_inputs_and_outputs(model, lambda: model.fuse(images, ids, mask))
    for i, (a, out) in enumerate(fused):
        text_in, image_in = a[:, :length].reshape(-1, a.shape[-1]), a[:, length:].reshape(-1, a.shape[-1])
        text_out, image_out = out[:, :length].reshape(-1, a.shape[-1]), out[:, length:].reshape(-1, a.shape[-1])
        with torch.no_grad():
            if i < first_vl:
                assert torch.allclose(text_out, text_ffn(layers[i], text_in), atol=1e-6)
                assert torch.allclose(image_out, layers[i].image_expert(image_in), atol=1e-6)
            else:
                assert torch.allclose(out, layers[i].vl_expert(a), atol=1e-6)
    # Dual encoder: images alone take the V-FFN and texts alone the L-FFN in EVERY layer.
    for call, expert in ((lambda: model.encode_image(images), lambda layer, x: layer.image_expert(x)),
                         (lambda: model.encode_text(ids, mask), text_ffn)):
        for i, (a, out) in enumerate(ffn_inputs_and_outputs(model, call)):
            with torch.no_grad():
                assert torch.allclose(out, expert(layers[i], a), atol=1e-6)


def test_dual_encoder_passes_see_one_modality_only(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer).eval()
    images, ids, mask = sample(tokenizer)
    with torch.no_grad():
        img, txt = model.image_embeddings(images), model.text_embeddings(ids, mask)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
        # A row's text embedding does not depend on the other rows (padding is masked).
        assert torch.allclose(model.text_embeddings(ids[:1, :int(mask[0].sum())], mask[:1, :int(mask[0].sum())]),
                              txt[:1], atol=1e-5)
        assert torch.allclose(model.image_embeddings(images[1:2]), img[1:2], atol=1e-5)
        fused = model.fused_features(images, ids, mask)
        assert fused.shape == (3, model.fused_width)
        # The fused state does depend on the image.
        assert (model.fused_features(images[::-1], ids, mask) - fused).abs().max() > 1e-4


def test_modality_type_embeddings_differ_per_modality(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer).eval()
    images, ids, _ = sample(tokenizer)
    table = model.transformer.embeddings.token_type_embeddings.weight
    assert table.shape[0] == 2 and (table[0] - table[1]).abs().max() > 1e-3
    with torch.no_grad():
        text, image = model.transformer.embeddings(ids), model._image_tokens(images)[0]
        shift = torch.randn(table.shape[1])  # not a constant: LayerNorm would remove that
        table[1] += shift  # the image type: every image token moves, no text token
        assert torch.equal(model.transformer.embeddings(ids), text)
        assert (model._image_tokens(images)[0] - image).abs().amax(-1).gt(1e-3).all()
        image = model._image_tokens(images)[0]
        table[0] += shift  # the text type: every text token moves, no image token
        assert (model.transformer.embeddings(ids) - text).abs().amax(-1).gt(1e-3).all()
        assert torch.equal(model._image_tokens(images)[0], image)


# ------------------------------------------------------------------ stagewise training


def colour_task(tokenizer: Tokenizer, root: Path, objectives: dict[str, float], modality: str,
                images: ImageCache) -> ImageTextTask:
    return ImageTextTask(colour_dataset(root, per_colour=4), tokenizer, images, 16, objectives, modality=modality)


def changed(before: dict[str, Tensor], model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def test_text_stage_leaves_attention_and_vision_expert_untouched(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = tiny_model(tokenizer)
    images = ImageCache(ImageTransform(size=(32, 32)), SkipStats())
    task = colour_task(tokenizer, tmp_path, {"mlm": 1.0}, "text", images)
    stage = StageConfig(name="text", trainable=stage_trainable(model.cfg, "text"), objectives={"mlm": 1.0},
                        steps=5, batch_size=8, lr=1e-2, weight_decay=0.1, log_every=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = Trainer(model, stage, task, progress=False).fit()
    moved = changed(before, model)
    untouched_kinds = (".attention.", ".image_expert.", ".vl_expert.", "vision_embeddings.", "token_type_embeddings")
    assert not [n for n in moved if any(k in n for k in untouched_kinds)]
    for i in range(model.cfg.num_layers):
        assert f"transformer.encoder.layer.{i}.intermediate.dense.weight" in moved
        assert f"transformer.encoder.layer.{i}.output.dense.weight" in moved
    assert "transformer.embeddings.word_embeddings.weight" in moved
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(".attention." in n or "_expert." in n for n in frozen if n.startswith("transformer.encoder"))
    assert result.trainable.trainable < result.trainable.frozen


def test_image_stage_trains_attention_and_vision_expert_only(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = tiny_model(tokenizer)
    images = ImageCache(ImageTransform(size=(32, 32)), SkipStats())
    task = colour_task(tokenizer, tmp_path, {"mim": 1.0}, "image", images)
    stage = StageConfig(name="image", trainable=stage_trainable(model.cfg, "image"), objectives={"mim": 1.0},
                        steps=3, batch_size=8, lr=1e-2, log_every=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model, stage, task, progress=False).fit()
    moved = changed(before, model)
    assert moved and all(n.startswith(("vision_embeddings", "image_layernorm", "mim_", "transformer.embeddings."
                                       "token_type_embeddings")) or ".attention." in n or ".image_expert." in n
                         for n in moved)
    assert "transformer.encoder.layer.0.image_expert.output.dense.weight" in moved
    assert "transformer.encoder.layer.0.attention.self.query.weight" in moved
    with pytest.raises(ValueError, match="unknown VLMo stage"):
        stage_trainable(model.cfg, "fusion")  # type: ignore[arg-type]


def test_objectives_need_their_modalities(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer)
    images, ids, mask = sample(tokenizer)
    text_only = ImageTextBatch([], ids, mask, torch.arange(3))
    image_only = ImageTextBatch(images, None, None, torch.arange(3))
    with pytest.raises(ValueError, match="need image-text pairs"):
        model.pretrain_losses(text_only, {"itc": 1.0}, 0)
    with pytest.raises(ValueError, match="'mim' needs images"):
        model.pretrain_losses(text_only, {"mim": 1.0}, 0)
    with pytest.raises(ValueError, match="'mlm' needs texts"):
        model.pretrain_losses(image_only, {"mlm": 1.0}, 0)
    with pytest.raises(ValueError, match="no objective \\['lm'\\]"):
        model.pretrain_losses(image_only, {"lm": 1.0}, 0)
    assert set(model.pretrain_losses(ImageTextBatch(images, ids, mask, torch.arange(3)),
                                     {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "mim": 1.0}, 0)) == {"itc", "itm", "mlm",
                                                                                              "mim"}


# ------------------------------------------------------------------ objectives


def test_itc_equals_clip_loss_without_duplicates_and_spreads_over_them() -> None:
    gen = torch.Generator().manual_seed(2)
    img, txt = F.normalize(torch.randn(4, 8, generator=gen), dim=-1), F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    scale = torch.tensor(math.log(10.0))
    eye = torch.eye(4, dtype=torch.bool)
    assert torch.allclose(soft_itc_loss(img, txt, scale, eye), clip_loss(img, txt, scale), atol=1e-6)
    # Two rows of one image: each of them has both texts as targets, half each.
    logits = [[2.0, 1.0], [0.5, -1.0]]  # scale · image @ text, written out
    img2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt2 = torch.tensor([[2.0, 0.5], [1.0, -1.0]])  # columns of img2 @ txt2ᵀ give `logits` at scale 1
    def lse(xs: list[float]) -> float:
        return math.log(sum(math.exp(x) for x in xs))
    i2t = sum(-0.5 * (row[0] + row[1]) + lse(row) for row in logits) / 2
    cols = [[logits[0][j], logits[1][j]] for j in range(2)]
    t2i = sum(-0.5 * (col[0] + col[1]) + lse(col) for col in cols) / 2
    expected = 0.5 * (i2t + t2i)
    got = soft_itc_loss(img2, txt2, torch.tensor(0.0), torch.ones(2, 2, dtype=torch.bool))
    assert abs(float(got) - expected) < 1e-6


def test_patchify_reads_patches_in_the_patch_embedding_order() -> None:
    pixels = torch.randn(2, 3, 32, 48)
    patches = patchify(pixels, 16)  # (2, 2·3, 3·16·16)
    assert patches.shape == (2, 6, 768)
    for r in range(2):
        for c in range(3):
            assert torch.equal(patches[:, r * 3 + c], pixels[:, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].flatten(1))
    conv = nn.Conv2d(3, 768, 16, stride=16, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(768).view(768, 3, 16, 16))  # output channel k reads input value k of a patch
    assert torch.allclose(conv(pixels).flatten(2).transpose(1, 2), patches)


def test_masked_patches_are_hidden_from_the_encoder(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer).eval()
    pixels = torch.randn(2, 3, 32, 32)
    patch_mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    edited = pixels.clone()
    edited[0, :, :16, :16] += 5.0  # patch 0 of image 0: masked
    edited[1, :, :16, 16:] -= 3.0  # patch 1 of image 1: masked
    with torch.no_grad():
        same = model.encode_image(edited, patch_mask)[0]
        assert torch.equal(same, model.encode_image(pixels, patch_mask)[0])
        edited[0, :, :16, 16:] += 1.0  # patch 1 of image 0: visible
        assert (model.encode_image(edited, patch_mask)[0] - same).abs().max() > 1e-3
    counts = model.random_patch_mask(5, 16, torch.device("cpu")).sum(1)
    assert torch.equal(counts, torch.full((5,), round(0.4 * 16)))


@pytest.mark.parametrize(("loss_on", "scored"), [("masked", 3), ("all", 8)])
def test_mim_loss_scores_the_masked_or_all_patches(tokenizer: Tokenizer, loss_on: str, scored: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(tokenizer, mim_loss_on=loss_on)
    patch_mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    monkeypatch.setattr(model, "random_patch_mask", lambda *args: patch_mask)
    rows: list[int] = []
    model.mim_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    pixels = list(torch.randn(2, 3, 32, 32))
    loss = model.pretrain_losses(ImageTextBatch(pixels, None, None, torch.arange(2)), {"mim": 1.0}, 0)["mim"]
    assert rows == [scored] and loss.ndim == 0
    with torch.no_grad():
        hidden, _ = model.encode_image(torch.stack(pixels), patch_mask)
        predicted = model.mim_head(hidden[:, 1:])
    chosen = patch_mask if loss_on == "masked" else torch.ones_like(patch_mask)
    expected = F.mse_loss(predicted[chosen], patchify(torch.stack(pixels), 16)[chosen])
    assert torch.allclose(loss, expected, atol=1e-6)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = tiny_model(tokenizer).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.kind == "vlmo"
    back = loaded.model.eval()
    assert back.mlm_score.decoder.weight is back.transformer.embeddings.word_embeddings.weight
    images, ids, mask = sample(tokenizer)
    with torch.no_grad():
        assert torch.equal(back.itm_logits(images, ids, mask), model.itm_logits(images, ids, mask))
        assert torch.equal(back.image_embeddings(images), model.image_embeddings(images))


def test_the_tiny_preset_starts_with_a_cls_state_that_reads_image_and_text(tokenizer: Tokenizer) -> None:
    # Issue 3 (see the ViLT test of the same name): BERT's N(0, 0.02) linear init left the fused
    # [CLS] state, and the ITC embeddings, nearly one vector for every input at width 128.
    from test_vilt import assert_fresh_state_reads_input

    from tessera.presets.vlmo import tiny

    assert_fresh_state_reads_input(lambda **f: VLMo(VLMoConfig(**f)), tiny().model.to_dict(), tokenizer)


# ------------------------------------------------------------------ a tiny run learns


def test_a_tiny_three_stage_run_learns(tokenizer: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(tokenizer, mlm_probability=0.3)
    images = ImageCache(ImageTransform(size=(32, 32)), SkipStats())
    plan = [
        ("image", {"mim": 1.0}, 60, 1e-3),
        ("text", {"mlm": 1.0}, 60, 3e-3),
        ("image_text", {"itc": 1.0, "itm": 1.0, "mlm": 1.0}, 200, 3e-3),
    ]
    histories = {}
    for stage_name, objectives, steps, lr in plan:
        task = colour_task(tokenizer, tmp_path, objectives, stage_name, images)
        stage = StageConfig(name=stage_name, trainable=stage_trainable(model.cfg, stage_name),
                            objectives=objectives, steps=steps, batch_size=12, lr=lr, warmup_steps=5, log_every=10)
        histories[stage_name] = Trainer(model, stage, task, progress=False).fit().history
    first, last = histories["image"][0], histories["image"][-1]
    assert last["mim"] < 0.7 * first["mim"]
    first, last = histories["text"][0], histories["text"][-1]
    # 0.55, not 0.5: the drop sits near half, just under it with one random stream and at 0.5004
    # with another (the ViT's own position-table init, which VLMo re-initialises, shifts it).
    assert last["mlm"] < 0.55 * first["mlm"]
    # Stage 3: the dual encoder retrieves each colour's caption, and ITM re-scores it first too.
    texts = [f"a {name} picture with a square." for name in COLORS]
    ids, mask = encode_captions(tokenizer, texts, 16)
    captions = colour_dataset(tmp_path, per_colour=4)
    pixels = [images.normalize(images.get(c.image)) for c in captions[::4]]
    model.eval()
    with torch.no_grad():
        sim = model.image_embeddings(pixels) @ model.text_embeddings(ids, mask).t()
        itm = torch.stack([model.itm_logits([p] * len(texts), ids, mask) for p in pixels])
    target = torch.arange(len(COLORS))
    assert (sim.argmax(1) == target).float().mean() >= 5 / 6
    assert (itm.argmax(1) == target).float().mean() >= 5 / 6


# ------------------------------------------------------------------ the zoo runner


@pytest.fixture(scope="module")
def shapes_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vlmo_shapes")
    generate_shapes(ShapesConfig(seed=2, num_train=48, num_val=2, num_test=10, num_test_comp=10), root,
                    progress=False)
    generate_classic_tasks(root, progress=False)
    return root


def test_zoo_runner_runs_the_three_stages_and_reports_every_task(shapes_tasks: Path, tmp_path: Path) -> None:
    model = VLMoConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vl_expert_layers=1,
                       image_size=64, patch_size=32, max_position_embeddings=40, projection_dim=16)

    def stage(name: str, objectives: dict[str, float], data: str) -> StageConfig:
        return StageConfig(name=name, trainable=stage_trainable(model, name), objectives=objectives, data=data,
                           steps=2, batch_size=8, lr=1e-3, max_length=40)

    preset = VLMoPreset(name="vlmo-micro", model=model, tokenizer_vocab_size=400,
                        image_stage=stage("image", {"mim": 1.0}, "images"),
                        text_stage=stage("text", {"mlm": 1.0}, "captions"),
                        image_text_stage=stage("image_text", {"itc": 1.0, "itm": 1.0, "mlm": 1.0}, "captions"),
                        finetune=shortened_finetune_stages(2), rerank_k=3)
    result = run(ZooContext(shapes_tasks, tmp_path, progress=False), preset)
    for label in SPLITS.values():
        assert set(result.metrics[label]) == set(result.baselines[label]) == ZOO_METRICS
    assert {"image", "text", "image_text"} <= set(result.trainable_params_by_stage)
    total = sum(p.numel() for p in load_checkpoint(tmp_path / "image_text" / "final").model.parameters())
    assert result.trainable_params_by_stage["image_text"] == total
    assert result.trainable_params_by_stage["text"] < result.trainable_params_by_stage["image"] < total
    # Stage 2 kept stage 1's attention and V-FFN.
    after_image = load_checkpoint(tmp_path / "image" / "final").model.state_dict()
    after_text = load_checkpoint(tmp_path / "text" / "final").model.state_dict()
    kept = [k for k in after_image if ".attention." in k or ".image_expert." in k]
    assert kept and all(torch.equal(after_image[k], after_text[k]) for k in kept)
    with pytest.raises(ValueError, match="cannot train \\['itc'\\]"):
        VLMoPreset(name="bad", model=model, image_stage=stage("image", {"itc": 1.0}, "images"), text_stage=None,
                   image_text_stage=stage("image_text", {"itc": 1.0}, "captions"))
