"""BLIP-2 stage 1 (ViT + Q-Former with ITC / ITG / ITM): ITC is the max over the queries, ITM
averages the queries' logits, ITG reads [DEC] + causal text, hard negatives never pair rows of
the same image, a tiny run learns, the checkpoint reloads, and the Q-Former moves into the
stage-2 connector key for key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tessera.connectors.base import VisionTokens
from tessera.connectors.qformer import QFormerConfig, QFormerConnector, qformer_attention_mask
from tessera.models.blip2 import Blip2PretrainConfig, Blip2QFormerPretrain
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.fusion_tasks import (
    DEC_TOKEN,
    ImageTextBatch,
    encode_captions,
    train_fusion_tokenizer,
)
from tessera.train.stage import StageConfig
from tessera.train.trainer import Trainer
from tessera.vision.vit import ViTConfig

IMAGE = 32
VOCAB = 60


def _cfg(vocab_size: int = VOCAB, dec_token_id: int = 13, **qformer: object) -> Blip2PretrainConfig:
    return Blip2PretrainConfig(
        vision=ViTConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64),
        qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              text_input=True, **qformer),
        vocab_size=vocab_size, max_position_embeddings=32, embed_dim=16, dec_token_id=dec_token_id,
    )


def _batch(b: int = 4, length: int = 6, seed: int = 0) -> ImageTextBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, VOCAB, (b, length), generator=g)
    ids[:, 0] = 2  # <s> as [CLS]
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 4:] = False
    ids[1, 4:] = 0
    images = [torch.randn(3, IMAGE, IMAGE, generator=g) for _ in range(b)]
    images[3] = images[0]
    return ImageTextBatch(images, ids, mask, torch.tensor([0, 1, 2, 0]))


@pytest.fixture()
def model() -> Blip2QFormerPretrain:
    torch.manual_seed(0)
    return Blip2QFormerPretrain(_cfg()).eval()


@torch.no_grad()
def test_itc_is_the_max_over_queries(model: Blip2QFormerPretrain) -> None:
    batch = _batch()
    image = model.image_embeddings(batch.images)  # (B, Q, P)
    text = model.text_embeddings(batch.input_ids, batch.attention_mask)  # (B, P)
    assert image.shape == (4, 4, 16) and text.shape == (4, 16)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4, 4), atol=1e-5)
    sim = model.similarity(image, text)
    for i in range(4):
        for j in range(4):
            by_query = [float(image[i, q] @ text[j]) for q in range(4)]
            assert sim[i, j].item() == pytest.approx(max(by_query), abs=1e-6)
    # The ITC loss of pretrain_losses is built from these similarities: rows 0 and 3 show the
    # same image and are each other's positives (soft targets), label smoothing 0.1.
    losses = model.pretrain_losses(batch, {"itc": 1.0}, 0)
    logits = sim / model.temp
    same = batch.same_image().float()
    targets = same / same.sum(1, keepdim=True)
    expected = 0.5 * (F.cross_entropy(logits, targets, label_smoothing=0.1)
                      + F.cross_entropy(logits.t(), targets, label_smoothing=0.1))
    assert losses["itc"].item() == pytest.approx(expected.item(), abs=1e-5)


@torch.no_grad()
def test_itm_logits_are_averaged_over_queries(model: Blip2QFormerPretrain) -> None:
    batch = _batch()
    got = model.itm_logits(batch.images, batch.input_ids, batch.attention_mask)
    embeds, _ = model.encode_images(batch.images)
    q = model.num_queries
    hidden = model.joint("itm", embeds, None, batch.input_ids, batch.attention_mask)
    per_query = [model.itm_head(hidden[:, k]) for k in range(q)]  # each query output alone through the head
    mean = torch.stack(per_query).mean(0)
    assert got.shape == (4,)
    assert torch.allclose(got, mean[:, 1] - mean[:, 0], atol=1e-5)
    assert model.fused_features(batch.images, batch.input_ids, batch.attention_mask).shape == (4, model.fused_width)


@torch.no_grad()
def test_itg_reads_dec_and_predicts_the_next_token(model: Blip2QFormerPretrain) -> None:
    batch = _batch()
    loss = model.pretrain_losses(batch, {"itg": 1.0}, 0)["itg"]
    dec = model.decoder_input_ids(batch.input_ids)
    assert (dec[:, 0] == 13).all() and torch.equal(dec[:, 1:], batch.input_ids[:, 1:])
    embeds, _ = model.encode_images(batch.images)
    hidden = model.joint("itg", embeds, None, dec, batch.attention_mask)[:, model.num_queries :]
    logits = model.cls(hidden)  # (B, L, V)
    losses = []
    for row in range(4):
        for t in range(5):
            if batch.attention_mask[row, t + 1]:
                losses.append(F.cross_entropy(logits[row, t][None], batch.input_ids[row, t + 1][None],
                                              label_smoothing=0.1))
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    # Causal: the prediction at text position 1 does not change when a later token changes.
    changed = dec.clone()
    changed[:, 3] = 21
    hidden2 = model.joint("itg", embeds, None, changed, batch.attention_mask)[:, model.num_queries :]
    assert torch.allclose(hidden[:, :3], hidden2[:, :3], atol=1e-6)


def test_hard_negatives_never_pair_rows_of_the_same_image(model: Blip2QFormerPretrain,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import tessera.models.blip2 as blip2

    seen = {}
    original = blip2.sample_hard_negatives

    def spy(sim_i2t: Tensor, sim_t2i: Tensor, generator=None, same_pair=None):  # type: ignore[no-untyped-def]
        seen["same_pair"] = same_pair
        return original(sim_i2t, sim_t2i, generator, same_pair)

    monkeypatch.setattr(blip2, "sample_hard_negatives", spy)
    losses = model.pretrain_losses(_batch(), {"itm": 1.0}, 0)
    assert set(losses) == {"itm", "itm_acc"} and torch.isfinite(losses["itm"])
    assert seen["same_pair"][0, 3] and seen["same_pair"][3, 0] and not seen["same_pair"][0, 1]


def test_images_shared_by_rows_are_encoded_once(model: Blip2QFormerPretrain) -> None:
    batch = _batch()
    calls = []
    original = model.vision_model.forward
    model.vision_model.forward = lambda images, **kw: calls.append(len(images)) or original(images, **kw)  # type: ignore[method-assign]
    embeds, mask = model.encode_images(batch.images, batch.image_ids)
    assert calls == [3] and embeds.shape[0] == 4 and mask is None
    assert torch.equal(embeds[0], embeds[3])


def test_bad_objective_and_config_errors(model: Blip2QFormerPretrain) -> None:
    with pytest.raises(ValueError, match="no objective"):
        model.pretrain_losses(_batch(), {"mlm": 1.0}, 0)
    with pytest.raises(ValueError, match="text_input"):
        Blip2PretrainConfig(qformer=QFormerConfig(text_input=False))
    with pytest.raises(ValueError, match="dec_token_id"):
        _cfg(dec_token_id=VOCAB)


def test_checkpoint_roundtrip_and_transfer_to_the_connector(model: Blip2QFormerPretrain, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.kind == "blip2_qformer"
    reloaded = loaded.model.eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # Stage 2: the connector (no text FFNs) takes ln_vision, query_tokens and qformer key for key.
    connector = QFormerConnector(model.qformer_cfg.model_copy(update={"text_input": False}), 32, 48).eval()
    connector.load_shared_state_dict(model.shared_state_dict())
    images = _batch().images
    with torch.no_grad():
        vision = model.vision_tokens(images)
        embeds, mask = model.image_inputs(vision)
        z = model.query_outputs(embeds, mask)
        out = connector(VisionTokens(vision.tokens, vision.grids, vision.prefix_tokens))
    assert torch.allclose(out, connector.language_projection(z).reshape(-1, 48), atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        connector.load_shared_state_dict({})


def test_masks_used_by_the_model_are_the_documented_ones() -> None:
    mask = torch.tensor([[True, True, False]])
    itc = qformer_attention_mask("itc", 2, mask)[0]
    assert not itc[:2, 2:].any() and not itc[2:, :2].any()


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40),
          "purple": (150, 40, 180), "orange": (240, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}


def _color_pairs(folder: Path, per_color: int = 6) -> list:  # type: ignore[type-arg]
    """Solid-colour pictures (with noise) captioned by their colour: image content a random
    frozen ViT already separates, so the run shows what the Q-Former learns on top of it."""
    from PIL import Image

    from tessera.data.records import Caption

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pairs = []
    for c, (name, rgb) in enumerate(COLORS.items()):
        for k in range(per_color):
            pixels = (torch.tensor(rgb)[:, None, None] + 20 * torch.randn(3, IMAGE, IMAGE, generator=g)).clamp(0, 255)
            path = folder / f"{name}_{k}.png"
            Image.fromarray(pixels.byte().permute(1, 2, 0).numpy()).save(path)
            pairs.append(Caption(image_id=c * 100 + k, image=path, caption=f"a {name} picture."))
    return pairs


def test_tiny_stage1_run_learns(tiny_shapes: Path, tmp_path: Path) -> None:
    from tessera.data.datasets import ImageCache
    from tessera.data.images import ImageTransform
    from tessera.data.records import SkipStats
    from tessera.train.fusion_tasks import ImageTextTask

    tokenizer: Tokenizer = train_fusion_tokenizer(tiny_shapes, vocab_size=400)
    torch.manual_seed(0)
    model = Blip2QFormerPretrain(_cfg(tokenizer.vocab_size, tokenizer.token_id(DEC_TOKEN)))
    stage = StageConfig(name="qformer", trainable=["ln_vision", "query_tokens", "qformer", "embeddings",
                                                   "vision_projection", "text_projection", "itm_head", "cls", "temp"],
                        objectives={"itc": 1.0, "itg": 1.0, "itm": 1.0}, steps=60, batch_size=16, lr=2e-3,
                        warmup_steps=5, max_length=16, log_every=5)
    images = ImageCache(ImageTransform(size=(IMAGE, IMAGE)), SkipStats())
    task = ImageTextTask(_color_pairs(tmp_path / "colors"), tokenizer, images, stage.max_length, dict(stage.objectives))
    result = Trainer(model, stage, task, progress=False).fit()
    assert result.trainable.frozen == sum(p.numel() for p in model.vision_model.parameters())
    first, last = result.history[0], result.history[-1]
    print({k: (round(first[k], 3), round(last[k], 3)) for k in ("itc", "itg", "itm", "itm_acc")})
    assert last["itg"] < 0.5 * first["itg"]
    assert last["itc"] < first["itc"] - 0.5
    assert 0.001 <= float(model.temp.detach()) <= 0.5
    # Retrieval by the max-over-queries similarity: each colour's texts find images of that colour.
    model.eval()
    texts = [f"a {name} picture." for name in COLORS]
    ids, mask = encode_captions(tokenizer, texts, 16)
    pixels = [images.normalize(images.get(tmp_path / "colors" / f"{name}_0.png")) for name in COLORS]
    with torch.no_grad():
        sim = model.similarity(model.image_embeddings(pixels), model.text_embeddings(ids, mask))
    hits = (sim.argmax(dim=1) == torch.arange(len(COLORS))).float().mean().item()
    assert hits >= 0.5, f"image→text top-1 {hits:.2f} (chance {1 / len(COLORS):.2f})"

    # ITM with its hard negatives learns on its own (in the joint run above, from scratch and this
    # short, it stays at the 2/3 "no match" prior while ITC and ITG take the shared layers).
    torch.manual_seed(0)
    model = Blip2QFormerPretrain(_cfg(tokenizer.vocab_size, tokenizer.token_id(DEC_TOKEN)))
    itm_stage = stage.model_copy(update={"objectives": {"itm": 1.0}, "steps": 80, "lr": 3e-3, "log_every": 10})
    task = ImageTextTask(_color_pairs(tmp_path / "colors"), tokenizer, images, stage.max_length, {"itm": 1.0})
    history = Trainer(model, itm_stage, task, progress=False).fit().history
    assert history[0]["itm_acc"] <= 0.7 and history[-1]["itm_acc"] >= 0.8, [h["itm_acc"] for h in history]


# ------------------------------------------------------------- import from Hugging Face


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """test_parity_hf.randomize_, with BERT's "LayerNorm" gains and the query tokens at unit scale
    as well (its name test looks for a lower-case "norm")."""
    from test_parity_hf import randomize_

    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name == "query_tokens":
                p.copy_(torch.randn(p.shape, generator=gen))


TINY_BERT = dict(vocab_size=90, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=24, type_vocab_size=2)


def _bert_tokenizer(transformers, folder: Path) -> None:  # type: ignore[no-untyped-def]
    """A WordPiece tokenizer saved as transformers saves BERT's: [CLS] / [SEP], no bos / eos."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "the"]
    backend = Backend(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder)


@pytest.mark.parametrize("pooler", [True, False])
@torch.no_grad()
def test_bert_import_matches_hf(pooler: bool, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager

    from tessera.interop import import_hf, load_hf
    from tessera.text.bert import BertModel

    config = transformers.BertConfig(**TINY_BERT)
    config._attn_implementation = "eager"
    hf = transformers.BertModel(config, add_pooling_layer=pooler).eval()
    del hf_eager
    _randomize(hf, 11)
    hf.save_pretrained(tmp_path / "hf")
    _bert_tokenizer(transformers, tmp_path / "hf")
    imported = load_hf(tmp_path / "hf")
    model = imported.model
    assert isinstance(model, BertModel) and imported.kind == "bert" and model.cfg.pooler == pooler
    # BERT's [CLS] / [SEP] stand in for the bos / eos roles, said in the notes.
    tok = imported.tokenizer
    assert tok is not None and (tok.special_tokens["bos"], tok.special_tokens["eos"]) == ("[CLS]", "[SEP]")
    assert any("cls token" in n for n in imported.notes)
    assert tok.encode("the red circle") == [7, 5, 6]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 90, (2, 9), generator=g)
    types = torch.randint(0, 2, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ours = model(ids, attention_mask=mask.bool(), token_type_ids=types)
    real = mask.bool()
    assert_close("bert last_hidden_state", ours[real], ref.last_hidden_state[real], HF_TOLERANCE)
    if pooler:
        assert_close("bert pooler", model.pool(ours), ref.pooler_output, HF_TOLERANCE)
    # And through a Tessera checkpoint.
    import_hf(tmp_path / "hf", tmp_path / "tessera")
    reloaded = load_checkpoint(tmp_path / "tessera").model
    assert torch.equal(reloaded(ids, attention_mask=real, token_type_ids=types), ours)


def _tiny_blip2(transformers, **overrides: object):  # type: ignore[no-untyped-def]
    text = dict(model_type="llama", vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   encoder_hidden_size=24, vocab_size=50, max_position_embeddings=16)
    qformer.update(overrides.pop("qformer", {}))  # type: ignore[arg-type]
    return transformers.Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=qformer, text_config=text, num_query_tokens=5, image_token_index=79, **overrides,
    )


@pytest.mark.parametrize("text_input", [False, True])
@torch.no_grad()
def test_blip2_import_matches_hf(text_input: bool, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager

    from tessera.interop import import_hf, load_hf
    from tessera.models.lvlm import LVLM

    config = _tiny_blip2(transformers, qformer={"use_qformer_text_input": text_input})
    hf = hf_eager(transformers.Blip2ForConditionalGeneration, config)
    _randomize(hf, 21)
    hf.save_pretrained(tmp_path)
    imported = load_hf(tmp_path)
    model = imported.model
    assert isinstance(model, LVLM) and isinstance(model.connector, QFormerConnector)
    assert model.connector.cfg.text_input == text_input and imported.meta["template"] == "blip2"
    assert model.num_image_tokens(32, 32) == 5
    g = torch.Generator().manual_seed(4)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(0, 79, (2, 7), generator=g)
    ids = torch.cat([torch.full((2, 5), 79), text], dim=1)  # the image's 5 query slots first
    reference = hf(pixel_values=pixels, input_ids=ids).logits
    logits = model.language_model.logits(model(ids, list(pixels)))
    assert_close(f"blip2 logits (text_input={text_input})", logits, reference, HF_TOLERANCE)
    # The connector's output alone: Hugging Face's language_model_inputs.
    ref_z = hf.get_image_features(pixel_values=pixels).pooler_output
    assert_close("blip2 projected queries", model.image_features(list(pixels)), ref_z.reshape(-1, 48),
                 HF_TOLERANCE)
    # As a Tessera checkpoint: an LVLM whose config names the Q-Former connector.
    import_hf(tmp_path, tmp_path / "tessera")
    reloaded = load_checkpoint(tmp_path / "tessera").model
    assert torch.equal(reloaded.language_model.logits(reloaded(ids, list(pixels))), logits)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["text_config"].update(model_type="opt"), "text_config: config key 'model_type' = 'opt'"),
        (lambda d: d.pop("image_token_index"), "'image_token_index' is missing"),
        (lambda d: d["qformer_config"].update(encoder_hidden_size=99), "encoder_hidden_size"),
        (lambda d: d["qformer_config"].update(hidden_act="gelu_10"), "qformer_config: config key 'hidden_act'"),
    ],
)
def test_blip2_unsupported_configs_name_file_and_key(change, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    transformers = pytest.importorskip("transformers")
    from tessera.interop import HFImportError, load_hf

    transformers.Blip2ForConditionalGeneration(_tiny_blip2(transformers)).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    change(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(HFImportError, match=rf"config.json: .*{message}"):
        load_hf(tmp_path)


def test_bert_unsupported_configs_are_named(tmp_path: Path) -> None:
    import json

    from tessera.interop import HFImportError, load_hf

    for key, value in (("is_decoder", True), ("position_embedding_type", "relative_key")):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], **TINY_BERT, key: value}))
        with pytest.raises(HFImportError, match=rf"config.json: config key '{key}'"):
            load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(HFImportError, match="only BertModel"):
        load_hf(tmp_path)


# ------------------------------------------------------------------ presets (tiny runs)

from tessera.presets import blip2 as blip2_preset  # noqa: E402
from tessera.presets import minigpt4 as minigpt4_preset  # noqa: E402
from tessera.presets.base import LVLMPreset  # noqa: E402
from tessera.text.clip_text import CLIPTextConfig  # noqa: E402
from tessera.text.llama import LlamaConfig  # noqa: E402

STEPS = 24
SMALL = {
    "vision": ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "text_tower": CLIPTextConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=64),
    "clip_projection_dim": 32,
    "llm": LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_position_embeddings=512),
    "tokenizer_vocab_size": 400,
    "connector": QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
}


def shrink(recipe: blip2_preset.Blip2Recipe) -> blip2_preset.Blip2Recipe:
    """The recipe (stage list, trainables, template) on small towers, every stage STEPS long."""
    lvlm = recipe.lvlm
    update = {
        **SMALL,
        "clip_stage": lvlm.clip_stage.model_copy(update={"steps": 10, "batch_size": 32, "warmup_steps": 0}),
        "lm_stage": lvlm.lm_stage.model_copy(update={"steps": 60, "batch_size": 32, "warmup_steps": 5}),
        "stages": [s.model_copy(update={"steps": STEPS, "batch_size": 8 if i else 24, "warmup_steps": 2,
                                        "log_every": 1, "lr": 3e-3})
                   for i, s in enumerate(lvlm.stages)],
    }
    small = LVLMPreset.parse({**lvlm.model_dump(), **{k: v.model_dump() if hasattr(v, "model_dump") else v
                                                      for k, v in update.items()}})
    return recipe.model_copy(update={"lvlm": small, "qformer_tokenizer_vocab_size": 400})


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blip2_zoo")


def _answer_loss(model, recipe: blip2_preset.Blip2Recipe, tokenizer: Tokenizer, data: Path, count: int = 32) -> float:  # type: ignore[no-untyped-def]
    from tessera.data.datasets import ConversationDataset, ImageCache
    from tessera.data.images import ImageTransform
    from tessera.data.readers import read_llava, shapes_split_paths
    from tessera.data.records import SkipStats
    from tessera.train.tasks import ConversationTask

    convs, _ = read_llava(shapes_split_paths(data, "train")["llava_instruct"], data)
    size = recipe.lvlm.image_size
    dataset = ConversationDataset(convs[:count], tokenizer, recipe.lvlm.template,
                                  ImageCache(ImageTransform(size=(size, size)), SkipStats()),
                                  model.num_image_tokens, 512)
    task = ConversationTask(dataset, packing=False)
    model.eval()
    with torch.no_grad():
        loss, _ = task.loss(model, task.make_batch(list(range(count))))
    return float(loss)


def test_blip2_tiny_recipe_learns_with_vit_and_llm_frozen(tiny_shapes: Path, zoo_root: Path) -> None:
    from tessera.presets.lvlm_runner import shared_pretraining
    from tessera.zoo.core import ZooContext

    recipe = shrink(blip2_preset.tiny())
    ctx = ZooContext(data_dir=tiny_shapes, out_dir=zoo_root / "blip2", progress=False)
    pretrained, _ = shared_pretraining(recipe.lvlm, ctx)
    stage1, notes = blip2_preset._cached_stage1(recipe, ctx, pretrained)
    assert notes["qformer_final_losses"]["itg"] < notes["qformer_first_losses"]["itg"]
    q = load_checkpoint(stage1).model
    before_model, tokenizer = blip2_preset.lvlm_from_stage1(recipe, pretrained, q)
    before = _answer_loss(before_model, recipe, tokenizer, tiny_shapes)
    result = blip2_preset.train_blip2(recipe, tiny_shapes, ctx.out_dir, pretrained=pretrained, stage1=stage1,
                                      progress=False)
    model = result.model
    assert [r.stage for r in result.stages] == ["llm_chat", "generate", "instruct"]
    connector = sum(p.numel() for p in model.connector.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert [r.trainable.trainable for r in result.stages] == [llm, connector, connector]
    chat_model = load_checkpoint(ctx.out_dir / "blip2" / "llm_chat" / "final").model
    frozen = {"vision_tower": before_model, "language_model": chat_model}  # the LLM: frozen after llm_chat
    for part, reference in frozen.items():
        for (name, a), b in zip(getattr(model, part).state_dict().items(),
                                getattr(reference, part).state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{part}.{name} changed"
    assert model.num_image_tokens(32, 32) == model.num_image_tokens(64, 32) == 4
    # The LLM's conversation tuning teaches it the template; the Q-Former stages then lower the
    # answer loss further with the LLM frozen (only the soft visual prompt changes).
    chat = _answer_loss(chat_model, recipe, tokenizer, tiny_shapes)
    after = _answer_loss(model, recipe, tokenizer, tiny_shapes)
    assert chat < 0.7 * before, f"answer loss {before:.3f} → {chat:.3f} after llm_chat"
    assert after < chat, f"answer loss after llm_chat {chat:.3f} → {after:.3f} after the Q-Former stages"


def test_minigpt4_zoo_run_trains_only_the_linear_layer(tiny_shapes: Path, zoo_root: Path) -> None:
    from tessera.zoo.core import ZooContext

    recipe = shrink(minigpt4_preset.tiny())
    ctx = ZooContext(data_dir=tiny_shapes, out_dir=zoo_root / "minigpt4", progress=False)
    result = blip2_preset.run_blip2_family(recipe, ctx, lvlm_stages=["align"], extra_stage=minigpt4_preset.detail_stage,
                                           caption_prompt=minigpt4_preset.DETAIL_PROMPT)
    projection = 32 * 64 + 64  # the one linear layer: Q-Former width 32 → LLM width 64
    assert result.trainable_params_by_stage["align"] == result.trainable_params_by_stage["detail"] == projection
    assert list(result.trainable_params_by_stage) == ["qformer", "llm_chat", "align", "detail"]
    assert result.trainable_params_by_stage["qformer"] > projection
    assert result.visual_tokens_per_image == 4
    for label in ("in_distribution", "compositional"):
        assert set(result.metrics[label]) == set(result.baselines[label]) == {
            "vqa_accuracy", "caption_cider", "caption_bleu4"}
    assert set(result.notes["final_loss_by_stage"]) == {"llm_chat", "align", "detail"}
    # The Q-Former (everything of the connector but the projection) is BLIP-2's stage-1 one, untouched.
    final = load_checkpoint(ctx.out_dir / "minigpt4" / "detail" / "final").model
    stage1 = load_checkpoint(ctx.out_dir / "minigpt4" / "qformer" / "final").model
    for name, value in final.connector.state_dict().items():
        same = torch.equal(value, stage1.connector.state_dict()[name])
        assert same != name.startswith("language_projection"), name
    convs, _ = minigpt4_preset.detailed_description_conversations(tiny_shapes)
    assert len(convs) == 120 and convs[0].turns[1].text.count(" ") >= 2
    full = {c.images[0]: c.turns[1].text for c in convs}  # each image's full (first) caption
    # llm_chat's text: every image placeholder replaced by that image's full description
    from tessera.data.readers import read_llava, shapes_split_paths

    described, _ = blip2_preset.described_conversations(tiny_shapes)
    originals, _ = read_llava(shapes_split_paths(tiny_shapes, "train")["llava_instruct"], tiny_shapes)
    original = originals[0]
    match = next(c for c in described if c.id == f"{original.id}_described")
    assert not match.images and "<image>" not in match.turns[0].text
    assert match.turns[0].text == original.turns[0].text.replace("<image>", full[original.images[0]])
