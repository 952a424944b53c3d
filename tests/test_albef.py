"""ALBEF: config checks, the momentum model (EMA math, never trainable, saved), the feature
queue, ITC / ITM / MLM against hand computations, hard negatives, the α ramp, the contract
methods, and a tiny run that learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tessera.models.albef as albef_module
from tessera.data.templates import IGNORE_INDEX
from tessera.models.albef import ALBEF, ALBEFConfig
from tessera.objectives.contrastive import bank_itc_loss, clip_loss, positive_targets
from tessera.objectives.momentum import ema_update_buffers_, momentum_buffers
from tessera.text.bert import BertConfig
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.freeze import set_trainable
from tessera.train.fusion_tasks import ImageTextBatch
from tessera.train.stage import StageConfig
from tessera.train.trainer import build_optimizer
from tessera.vision.vit import ViTConfig

VOCAB = 64
MASK_ID = 11


def tiny_config(**overrides: object) -> ALBEFConfig:
    vision = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                       act="gelu", layer_norm_eps=1e-6, pre_layernorm=False, patch_bias=True,
                       post_layernorm_on="all_tokens")
    text = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_position_embeddings=16, cross_attention_layers=(1,), encoder_width=32)
    fields: dict[str, object] = dict(vision=vision, text=text, embed_dim=16, queue_size=24, mask_token_id=MASK_ID,
                                     alpha_ramp_steps=10)
    fields.update(overrides)
    return ALBEFConfig(**fields)


def make_batch(n: int, image_ids: list[int] | None = None, length: int = 6, seed: int = 0) -> ImageTextBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, VOCAB, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # <s> … </s>
    return ImageTextBatch(
        images=list(torch.randn(n, 3, 16, 16, generator=g).unbind(0)),
        input_ids=ids,
        attention_mask=torch.ones(n, length, dtype=torch.bool),
        image_ids=torch.tensor(image_ids if image_ids is not None else list(range(n))),
    )


MOMENTUM_PAIRS = (("visual_encoder_m", "visual_encoder"), ("text_encoder_m", "text_encoder"),
                  ("vision_proj_m", "vision_proj"), ("text_proj_m", "text_proj"))


def momentum_state(model: ALBEF) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.split(".")[0].endswith("_m")}


# --- config ---------------------------------------------------------------------------------------


def test_config_refuses_inconsistent_parts() -> None:
    cfg = tiny_config()
    assert cfg.fusion_layer == 1
    text = cfg.text.model_dump()
    with pytest.raises(ValueError, match="top layers"):
        tiny_config(text=BertConfig(**{**text, "cross_attention_layers": (0,)}))
    with pytest.raises(ValueError, match="encoder_width"):
        tiny_config(text=BertConfig(**{**text, "encoder_width": 48}))
    with pytest.raises(ValueError, match="post_layernorm_on"):
        tiny_config(vision=cfg.vision.model_copy(update={"post_layernorm_on": "class_token"}))
    with pytest.raises(ValueError, match="temp_init"):
        tiny_config(temp_init=0.9)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_config(mask_token_id=VOCAB)


# --- momentum model and queue ---------------------------------------------------------------------


def test_ema_of_buffers_by_hand_keeps_and_survives_ties() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(2, 2)
            self.head = nn.Linear(2, 2)
            self.head.weight = self.embed.weight

    source = Tied()
    with torch.no_grad():
        source.embed.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        source.head.bias.copy_(torch.tensor([10.0, -10.0]))
    twin = momentum_buffers(source)
    assert list(twin.parameters()) == []
    assert twin.head.weight is twin.embed.weight  # one tensor under both names
    with torch.no_grad():
        source.embed.weight.add_(1.0)
        source.head.bias.zero_()
    ema_update_buffers_(twin, source, momentum=0.9)
    # 0.9 · old + 0.1 · new, applied once to the shared tensor
    assert torch.allclose(twin.embed.weight, torch.tensor([[1.1, 2.1], [3.1, 4.1]]))
    assert torch.allclose(twin.head.bias, torch.tensor([9.0, -9.0]))
    # A tie split into two tensors (as .to(device) does to buffers) still moves both once.
    twin.head.weight = twin.embed.weight.clone()
    ema_update_buffers_(twin, source, momentum=0.5)
    assert torch.allclose(twin.embed.weight, twin.head.weight)
    assert torch.allclose(twin.embed.weight, torch.tensor([[1.55, 2.55], [3.55, 4.55]]))
    ema_update_buffers_(twin, source, momentum=0.0)
    assert torch.equal(twin.head.bias, source.head.bias)
    with pytest.raises(ValueError, match="does not mirror"):
        ema_update_buffers_(momentum_buffers(nn.Linear(2, 2, bias=False)), nn.Linear(2, 2), 0.9)


def test_momentum_model_is_never_trainable_nor_optimised() -> None:
    model = ALBEF(tiny_config())
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.split(".")[0].endswith("_m") or n.startswith("queue") for n in names)
    buffers = dict(model.named_buffers())
    assert "visual_encoder_m.embeddings.patch_embedding.weight" in buffers
    assert "text_encoder_m.cls.predictions.transform.dense.weight" in buffers
    m = model.text_encoder_m
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    # At construction the momentum model equals the main model.
    for twin, main in MOMENTUM_PAIRS:
        for name, p in getattr(model, main).named_parameters():
            assert torch.equal(getattr(model, twin).get_buffer(name), p), name

    report = set_trainable(model, ["*"])
    assert report.trainable == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="match no parameter"):
        set_trainable(model, ["text_encoder_m"])
    stage = StageConfig(name="s", trainable=["*"], steps=2, batch_size=4, lr=1e-2)
    optimizer = build_optimizer(model, stage)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    momentum_ids = {id(b) for n, b in model.named_buffers() if n.split(".")[0].endswith("_m")}
    assert in_optimizer.isdisjoint(momentum_ids)
    assert all(not b.requires_grad for b in model.buffers())

    before = momentum_state(model)
    main_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = model.pretrain_losses(make_batch(6), {"itc": 1.0, "itm": 1.0, "mlm": 1.0}, step=20)
    (losses["itc"] + losses["itm"] + losses["mlm"]).backward()
    optimizer.step()
    after_optimizer = momentum_state(model)
    assert all(torch.equal(before[n], after_optimizer[n]) for n in before), "the optimizer moved the momentum model"
    model.after_step()
    moved = 0
    for twin, main in MOMENTUM_PAIRS:
        for name, p in getattr(model, main).named_parameters():
            key = f"{twin}.{name}"
            expected = 0.995 * before[key] + 0.005 * p.detach()
            assert torch.allclose(getattr(model, twin).get_buffer(name), expected, atol=1e-6), key
            moved += int(not torch.equal(main_before[f"{main}.{name}"], p.detach()))
    assert moved > 10  # the step changed the main model, so the EMA had something to follow


def test_queue_fills_wraps_and_holds_momentum_features() -> None:
    model = ALBEF(tiny_config(queue_size=20))
    batches = [make_batch(8, image_ids=list(range(8 * k, 8 * k + 8)), seed=k) for k in range(3)]
    for k, batch in enumerate(batches):
        model.pretrain_losses(batch, {"itc": 1.0}, step=0)
        assert len(model.queue) == min(8 * (k + 1), 20)
    assert int(model.queue.ptr) == 24 % 20
    with torch.no_grad():
        embeds, _ = model._image_tokens(model.visual_encoder_m, batches[2].images)
        expected = F.normalize(model.vision_proj_m(embeds[:, 0]), dim=-1)
    slots = [(16 + i) % 20 for i in range(8)]  # the third batch starts at slot 16 and wraps to 0..3
    assert torch.allclose(model.queue.image[slots], expected, atol=1e-6)
    assert model.queue.image_id[slots].tolist() == list(range(16, 24))
    model.eval()  # evaluation never enqueues
    model.pretrain_losses(make_batch(8, seed=9), {"itc": 1.0}, step=0)
    assert int(model.queue.ptr) == 4


def test_checkpoint_keeps_momentum_model_and_queue(tmp_path: Path) -> None:
    model = ALBEF(tiny_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(2):
        losses = model.pretrain_losses(make_batch(6, seed=k), {"itc": 1.0, "mlm": 1.0}, step=k)
        (losses["itc"] + losses["mlm"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_step()
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model)).model
    assert isinstance(loaded, ALBEF)
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert len(loaded.queue) == 12 and int(loaded.queue.ptr) == 12
    m = loaded.text_encoder_m
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    # The momentum model really differs from the main one (the EMA ran), and loading kept that.
    assert not torch.equal(loaded.vision_proj_m.weight, loaded.vision_proj.weight)


# --- losses ---------------------------------------------------------------------------------------


def test_bank_itc_loss_by_hand() -> None:
    # sim_i2t = sim_t2i = [0, 2] / … with τ = 0.5; targets one-hot on column 0, resp. uniform.
    loss = bank_itc_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]),
        image_bank=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), text_bank=torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        temperature=torch.tensor(0.5), targets_i2t=torch.tensor([[1.0, 0.0]]), targets_t2i=torch.tensor([[0.5, 0.5]]),
    )
    i2t = math.log(1 + math.e**2)  # −log softmax([0, 2])[0]
    t2i = math.log(1 + math.e**2) - 1  # −½ log softmax[0] − ½ log softmax[1]
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-6)
    targets = positive_targets(torch.tensor([[True, False, True], [False, True, False]]))
    assert torch.equal(targets, torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one positive"):
        positive_targets(torch.tensor([[False, False]]))


def test_itc_without_queue_or_distillation_is_clip_loss() -> None:
    # Fresh model: the momentum model equals the main one and the queue is empty; at step 0 the
    # ramp gives α = 0, so ALBEF's ITC is CLIP's loss at scale 1/τ.
    model = ALBEF(tiny_config())
    batch = make_batch(6)
    loss = model.pretrain_losses(batch, {"itc": 1.0}, step=0)["itc"]
    with torch.no_grad():
        img = model.image_embeddings(batch.images)
        txt = model.text_embeddings(batch.input_ids, batch.attention_mask)
        expected = clip_loss(img, txt, torch.log(1 / model.temp))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_itc_with_queue_shared_images_and_distillation_matches_formula() -> None:
    model = ALBEF(tiny_config())
    warm = make_batch(4, image_ids=[100, 101, 1, 102], seed=3)  # queue: image 1 also appears below
    model.pretrain_losses(warm, {"itc": 1.0}, step=0)
    model.eval()  # keep the queue as it is for the checked call
    batch = make_batch(4, image_ids=[0, 0, 1, 2], seed=4)
    alpha = 0.4
    loss = model.pretrain_losses(batch, {"itc": 1.0}, step=50)["itc"]
    with torch.no_grad():
        tau = model.temp
        img = model.image_embeddings(batch.images)
        txt = model.text_embeddings(batch.input_ids, batch.attention_mask)
        text_bank = torch.cat([txt, model.queue.get("text")])  # momentum == main: nothing stepped
        image_bank = torch.cat([img, model.queue.get("image")])
        ids = torch.tensor([0, 0, 1, 2, 100, 101, 1, 102])
        positives = torch.tensor([0, 0, 1, 2])[:, None] == ids[None]
        hard = positives.float() / positives.float().sum(1, keepdim=True)
        sim_i2t, sim_t2i = img @ text_bank.t() / tau, txt @ image_bank.t() / tau
        t_i2t = alpha * sim_i2t.softmax(1) + (1 - alpha) * hard
        t_t2i = alpha * sim_t2i.softmax(1) + (1 - alpha) * hard
        expected = 0.5 * (-(t_i2t * sim_i2t.log_softmax(1)).sum(1).mean() - (t_t2i * sim_t2i.log_softmax(1)).sum(1).mean())
    assert hard[0].tolist() == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert hard[2].tolist() == [0, 0, 0.5, 0, 0, 0, 0.5, 0]  # the queued row of image 1 is a positive
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mlm_with_momentum_distillation_matches_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ALBEF(tiny_config())
    batch = make_batch(3)
    ids = batch.input_ids

    def fixed_mask(input_ids, special_mask, vocab_size, mask_id, prob):  # noqa: ANN001, ANN202
        assert special_mask[:, 0].all() and special_mask[:, -1].all()  # <s> and </s> are never masked
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, 1:3] = input_ids[:, 1:3]
        masked = input_ids.clone()
        masked[:, 1:3] = mask_id
        return masked, labels

    monkeypatch.setattr(albef_module, "mask_tokens", fixed_mask)
    alpha = 0.4
    loss = model.pretrain_losses(batch, {"mlm": 1.0}, step=100)["mlm"]
    with torch.no_grad():
        masked = ids.clone()
        masked[:, 1:3] = MASK_ID
        image_tokens, _ = model._image_tokens(model.visual_encoder, batch.images)
        hidden = model.text_encoder.bert(masked, attention_mask=batch.attention_mask,
                                         encoder_hidden_states=image_tokens)
        logits = model.text_encoder.cls(hidden[:, 1:3]).reshape(-1, VOCAB)
        targets = ids[:, 1:3].reshape(-1)
        # The momentum model equals the main one here, so its soft targets are softmax(logits).
        expected = (1 - alpha) * F.cross_entropy(logits, targets) + alpha * F.cross_entropy(logits, logits.softmax(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mlm_needs_a_mask_token() -> None:
    model = ALBEF(tiny_config(mask_token_id=None))
    with pytest.raises(ValueError, match="mask_token_id"):
        model.pretrain_losses(make_batch(2), {"mlm": 1.0}, step=0)
    with pytest.raises(ValueError, match="no objective"):
        model.pretrain_losses(make_batch(2), {"lm": 1.0}, step=0)


# --- hard negatives -------------------------------------------------------------------------------


def test_hard_negatives_never_pick_positive_same_image_or_same_caption() -> None:
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])
    text_keys = torch.tensor([10, 11, 12, 13, 14, 14])  # rows 4 and 5 carry the same caption
    excluded = (image_ids[:, None] == image_ids[None]) | (text_keys[:, None] == text_keys[None])
    # Similarities that make every excluded pair overwhelmingly likely if it were allowed.
    sim = torch.where(excluded, torch.tensor(50.0), torch.zeros(6, 6))
    drawn = torch.zeros(6, 6)
    for seed in range(100):
        torch.manual_seed(seed)
        neg = ALBEF.hard_negatives(sim, sim.t(), image_ids, text_keys)
        for i in range(6):
            t, v = int(neg.text_for_image[i]), int(neg.image_for_text[i])
            assert not excluded[i, t] and not excluded[v, i], (seed, i, t, v)
            drawn[i, t] += 1
    # Every allowed pair is drawn (sampling, not a fixed choice), with ∝ exp(sim) weights.
    assert bool((drawn[~excluded] > 0).all())
    sim = torch.zeros(6, 6)
    sim[0, 3] = 3.0  # image 0: text 3 e³ ≈ 20× likelier than each other allowed text
    counts = torch.zeros(6)
    for seed in range(200):
        torch.manual_seed(seed)
        counts[int(ALBEF.hard_negatives(sim, sim.t(), image_ids, text_keys).text_for_image[0])] += 1
    assert counts[3] / 200 > 0.75  # e³ / (e³ + 3) ≈ 0.87


def test_itm_batch_is_positives_then_hard_negatives(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ALBEF(tiny_config())
    batch = make_batch(6, image_ids=[0, 0, 1, 2, 3, 4])
    batch.input_ids[5] = batch.input_ids[4]  # one caption written twice
    seen = []
    real_itm_batch = albef_module.itm_batch

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        pairs = real_itm_batch(*args, **kwargs)
        seen.append(pairs)
        return pairs

    monkeypatch.setattr(albef_module, "itm_batch", recording)
    for step in range(20):
        losses = model.pretrain_losses(batch, {"itc": 1.0, "itm": 1.0}, step=step)
        assert 0.0 <= losses["itm_acc"].item() <= 1.0
    for pairs in seen:
        assert pairs.labels.tolist() == [1] * 6 + [0] * 12  # 3B rows: B positives, then 2B negatives
        assert pairs.image_index[:6].tolist() == pairs.text_index[:6].tolist() == list(range(6))
        for img, txt in zip(pairs.image_index[6:].tolist(), pairs.text_index[6:].tolist(), strict=True):
            assert batch.image_ids[img] != batch.image_ids[txt]
            assert not torch.equal(batch.input_ids[img], batch.input_ids[txt])


# --- α ramp, temperature, contract ----------------------------------------------------------------


def test_alpha_ramp_and_temperature_clamp() -> None:
    model = ALBEF(tiny_config(alpha_ramp_steps=10))
    assert [model.alpha_at(s) for s in (0, 5, 10, 1000)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert ALBEF(tiny_config(alpha_ramp_steps=0)).alpha_at(0) == pytest.approx(0.4)
    assert model.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temp.fill_(0.9)
    model.after_step()
    assert model.temp.item() == pytest.approx(0.5)
    with torch.no_grad():
        model.temp.fill_(1e-5)
    model.after_step()
    assert model.temp.item() == pytest.approx(0.001)


def test_contract_methods() -> None:
    model = ALBEF(tiny_config()).eval()
    batch = make_batch(4)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        img, txt = model.image_embeddings(batch.images), model.text_embeddings(ids, mask)
        fused = model.fused_features(batch.images, ids, mask)
        itm = model.itm_logits(batch.images, ids, mask)
    assert img.shape == txt.shape == (4, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4)) and torch.allclose(txt.norm(dim=-1), torch.ones(4))
    assert fused.shape == (4, model.fused_width) and model.fused_width == 32
    assert torch.allclose(itm, model.itm_head(fused)[:, 1])
    # The same tensor passed several times is encoded once and gives the same result as copies.
    repeated = [batch.images[0]] * 4
    with torch.no_grad():
        a = model.fused_features(repeated, ids, mask)
        b = model.fused_features([batch.images[0].clone() for _ in range(4)], ids, mask)
    assert torch.allclose(a, b, atol=1e-6)
    # Images of different sizes are padded and masked: a pair's result does not depend on the
    # other images of the call.
    big = torch.randn(3, 24, 16)
    with torch.no_grad():
        mixed = model.fused_features([batch.images[0], big], ids[:2], mask[:2])
        alone = model.fused_features([batch.images[0]], ids[:1], mask[:1])
        alone_big = model.fused_features([big], ids[1:2], mask[1:2])
    assert torch.allclose(mixed[0], alone[0], atol=1e-5) and torch.allclose(mixed[1], alone_big[0], atol=1e-5)


# --- a tiny run learns ----------------------------------------------------------------------------


def _colour_data(n: int, generator: torch.Generator) -> ImageTextBatch:
    """Four colours; the image is a noisy patch of the colour, the caption "<s> w_c w_c+4 </s>"."""
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = colours[labels][:, :, None, None] + 0.3 * torch.randn(n, 3, 16, 16, generator=generator)
    ids = torch.stack([torch.full_like(labels, 2), 20 + labels, 30 + labels, torch.full_like(labels, 3)], dim=1)
    return ImageTextBatch(list(images.unbind(0)), ids, torch.ones_like(ids, dtype=torch.bool),
                          torch.arange(n) + 1000 * int(torch.randint(0, 10**6, (1,), generator=generator)))


def test_tiny_run_learns() -> None:
    torch.manual_seed(0)
    model = ALBEF(tiny_config(queue_size=64, alpha_ramp_steps=20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(100):
        losses = model.pretrain_losses(_colour_data(16, g), {"itc": 1.0, "itm": 1.0, "mlm": 1.0}, step)
        (losses["itc"] + losses["itm"] + losses["mlm"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_step()
        history.append({k: v.item() for k, v in losses.items()})
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    last = {k: sum(h[k] for h in history[-10:]) / 10 for k in history[0]}
    # ITC's floor is high here (each caption has ~1/4 of the bank as positives): judge it by
    # retrieval below; MLM and ITM must drop clearly.
    assert last["mlm"] < 0.7 * first["mlm"], (first, last)
    assert last["itm"] < 0.5 * first["itm"], (first, last)

    model.eval()
    test = _colour_data(32, torch.Generator().manual_seed(7))
    colour = test.input_ids[:, 1] - 20
    with torch.no_grad():
        sim = model.image_embeddings(test.images) @ model.text_embeddings(test.input_ids, test.attention_mask).t()
        retrieved = colour[sim.argmax(dim=1)]
        # ITM: each image with its caption vs with a caption of another colour.
        other = torch.tensor([int((colour != c).nonzero()[0]) for c in colour.tolist()])
        pos = model.itm_logits(test.images, test.input_ids, test.attention_mask)
        neg = model.itm_logits(test.images, test.input_ids[other], test.attention_mask[other])
    assert (retrieved == colour).float().mean() > 0.9  # chance 0.25
    itm_accuracy = (pos > neg).float().mean().item()
    assert itm_accuracy > 0.9, itm_accuracy  # chance 0.5


# --- the zoo runner -------------------------------------------------------------------------------


def test_zoo_runner_trains_saves_and_reports(tmp_path: Path) -> None:
    from tessera.data.shapes import ShapesConfig, generate_shapes
    from tessera.data.shapes_tasks import generate_classic_tasks
    from tessera.presets import albef as preset_module
    from tessera.zoo.core import SPLITS, ZooContext, discover_presets

    assert discover_presets()["albef"] is preset_module.run
    root = tmp_path / "shapes"
    generate_shapes(ShapesConfig(seed=0, num_train=40, num_val=2, num_test=8, num_test_comp=8), root, progress=False)
    generate_classic_tasks(root, progress=False)
    base = preset_module.tiny()
    micro = tiny_config().model_copy(update={
        "vision": tiny_config().vision.model_copy(update={"image_size": 64, "patch_size": 16}),
        "text": tiny_config().text.model_copy(update={"max_position_embeddings": 40}),
    })
    stage = base.stages[0].model_copy(update={"steps": 100, "batch_size": 8, "warmup_steps": 10})
    finetune = {k: v.model_copy(update={"batch_size": 4}) for k, v in base.finetune.items()}
    preset = base.model_copy(update={"model": micro, "tokenizer_vocab_size": 300, "stages": [stage],
                                     "finetune": finetune})
    result = preset_module.run(ZooContext(data_dir=root, out_dir=tmp_path / "out", scale=0.03, progress=False),
                               preset)
    names = {f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    names |= {"vqa_accuracy", "reasoning_accuracy", "entailment_accuracy"}
    for label in SPLITS.values():
        assert set(result.metrics[label]) == names == set(result.baselines[label])
    assert result.trainable_params_by_stage["pretrain"] > 0 and result.seconds_by_stage["pretrain"] > 0
    assert result.notes["alpha_ramp_steps"] == 1  # 0.2 of the 3 scaled steps
    ckpt = load_checkpoint(tmp_path / "out" / "pretrain" / "final")
    assert isinstance(ckpt.model, ALBEF) and len(ckpt.model.queue) == 3 * 8
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    assert ckpt.model.cfg.mask_token_id == tokenizer.token_id("<mask>")
    assert ckpt.model.cfg.text.vocab_size == tokenizer.vocab_size
