"""BLIP: weight sharing between encoder and decoder, attention masks, the three losses, greedy
captioning with its cache, momentum encoders, checkpoints, CapFilt and a tiny run that learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tessera.capfilt import SUMMARY_FILE, capfilt, corrupt_captions
from tessera.config import ConfigError
from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.models.blip import BLIP, BLIP_VISION, BLIPConfig, MomentumConfig, blip_token_ids
from tessera.presets.blip import TRAINABLE, BLIPPreset, train_blip
from tessera.text.bert import BertConfig
from tessera.text.tokenizer import Tokenizer
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.fusion_tasks import ImageTextBatch, ImageTextTask, train_fusion_tokenizer
from tessera.train.stage import StageConfig

PAD, BOS, EOS, ENC, DEC = 0, 2, 3, 12, 13
VOCAB = 60


def _vision(size: int = 16) -> object:
    return BLIP_VISION.model_copy(update={"image_size": size, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                                          "num_heads": 2, "intermediate_size": 64})


def _text(vocab: int = VOCAB, layers: int = 2, positions: int = 32) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64,
                      max_position_embeddings=positions, type_vocab_size=0, cross_attention_layers=tuple(range(layers)),
                      encoder_width=32, separate_decoder_attention=True)


def _config(**overrides: object) -> BLIPConfig:
    fields: dict[str, object] = {"vision": _vision(), "text": _text(), "embed_dim": 16, "pad_id": PAD, "bos_id": BOS,
                                 "eos_id": EOS, "enc_id": ENC, "dec_id": DEC}
    return BLIPConfig(**{**fields, **overrides})


def _texts(batch: int, length: int = 7, pad_last: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(20, VOCAB, (batch, length))
    ids[:, 0] = BOS
    ids[:, -1 - pad_last] = EOS
    mask = torch.ones_like(ids, dtype=torch.bool)
    if pad_last:
        ids[:, -pad_last:] = PAD
        mask[:, -pad_last:] = False
    return ids, mask


def _batch(batch: int = 4, image_ids: list[int] | None = None, pad_last: int = 0) -> ImageTextBatch:
    ids, mask = _texts(batch, pad_last=pad_last)
    return ImageTextBatch(list(torch.randn(batch, 3, 16, 16)), ids, mask,
                          torch.tensor(image_ids if image_ids is not None else list(range(batch))))


# --- weight sharing -----------------------------------------------------------------------------


def test_encoder_and_decoder_share_every_parameter_but_self_attention() -> None:
    model = BLIP(_config())
    encode = model.text_encoder.parameters_for("encode")
    decode = model.text_encoder.parameters_for("decode")
    assert encode.keys() == decode.keys()
    shared = distinct = 0
    for name, p in encode.items():
        if ".attention." in name:  # self-attention: the decoder's own weights
            assert decode[name] is not p and decode[name].data_ptr() != p.data_ptr(), name
            distinct += 1
        else:  # embeddings, cross-attention, feed-forward: one tensor, not a copy
            assert decode[name] is p and decode[name].data_ptr() == p.data_ptr(), name
            shared += 1
    assert distinct == 2 * 10 and shared > distinct  # 2 layers × (q, k, v, dense, LayerNorm) × (weight, bias)
    # The decoder's LM head writes with the shared word embedding.
    assert model.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight


def test_each_functionality_trains_the_parameters_it_uses() -> None:
    model = BLIP(_config())
    layer = model.text_encoder.encoder.layer[0]

    def grads(objective: str) -> dict[str, bool]:
        model.zero_grad(set_to_none=True)
        model.pretrain_losses(_batch(), {objective: 1.0}, 0)[objective].backward()
        parts = {"self": layer.attention, "decoder_self": layer.decoder_attention, "cross": layer.crossattention,
                 "ffn": layer.intermediate}
        return {k: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
                for k, m in parts.items()}

    assert grads("lm") == {"self": False, "decoder_self": True, "cross": True, "ffn": True}
    assert grads("itm") == {"self": True, "decoder_self": False, "cross": True, "ffn": True}
    assert grads("itc") == {"self": True, "decoder_self": False, "cross": False, "ffn": True}


def test_sharing_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    model = BLIP(_config(momentum=MomentumConfig(queue_size=8))).eval()
    batch = _batch()
    expected = model.itm_logits(batch.images, batch.input_ids, batch.attention_mask)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.kind == "blip" and isinstance(loaded.model, BLIP)
    m = loaded.model.eval()
    torch.testing.assert_close(m.itm_logits(batch.images, batch.input_ids, batch.attention_mask), expected)
    assert m.cls.predictions.decoder.weight is m.text_encoder.embeddings.word_embeddings.weight
    enc, dec = m.text_encoder.parameters_for("encode"), m.text_encoder.parameters_for("decode")
    assert all((dec[n] is p) == (".attention." not in n) for n, p in enc.items())


# --- masks ---------------------------------------------------------------------------------------


def _change_token(ids: torch.Tensor, position: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, position] = 20 + (changed[:, position] - 20 + 7) % (VOCAB - 20)
    return changed


def test_decoder_is_causal_and_encoders_are_bidirectional() -> None:
    model = BLIP(_config()).eval()
    tokens, mask = model.encode_images(list(torch.randn(2, 3, 16, 16)))
    assert mask is None and tokens.shape == (2, 1 + 4, 32)
    ids, text_mask = _texts(2)
    changed = _change_token(ids, 4)
    dec_ids, dec_changed = (model._with_first_token(x, DEC) for x in (ids, changed))
    before = model.grounded_decoder(dec_ids, text_mask, tokens, None)
    after = model.grounded_decoder(dec_changed, text_mask, tokens, None)
    torch.testing.assert_close(after[:, :4], before[:, :4])  # earlier positions never see token 4
    assert not torch.allclose(after[:, 4:], before[:, 4:])
    for encode in (lambda x: model.grounded_encoder(x, text_mask, tokens, None),
                   lambda x: model.text_features(x, text_mask)):
        assert not torch.allclose(encode(changed)[:, :4], encode(ids)[:, :4])  # [CLS]/[ENC] sees later tokens


def test_padding_changes_nothing_and_first_tokens_are_replaced() -> None:
    model = BLIP(_config()).eval()
    images = list(torch.randn(2, 3, 16, 16))
    ids, mask = _texts(2)
    padded = torch.cat([ids, torch.full((2, 3), PAD)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model.itm_logits(images, padded, padded_mask), model.itm_logits(images, ids, mask))
    torch.testing.assert_close(model.text_embeddings(padded, padded_mask), model.text_embeddings(ids, mask))
    # The grounded encoder reads <enc> where the text has <s>; the unimodal encoder keeps <s>.
    tokens, _ = model.encode_images(images)
    manual = model.text_encoder(model._with_first_token(ids, ENC), attention_mask=mask, encoder_hidden_states=tokens)
    torch.testing.assert_close(model.grounded_encoder(ids, mask, tokens, None), manual)
    with pytest.raises(ValueError, match="start with <s>"):
        model.text_embeddings(ids[:, 1:], mask[:, 1:])


def test_images_of_different_sizes_are_masked_for_cross_attention() -> None:
    model = BLIP(_config()).eval()
    small, large = torch.randn(3, 16, 16), torch.randn(3, 16, 24)
    ids, mask = _texts(2)
    tokens, image_mask = model.encode_images([small, large])
    assert tokens.shape == (2, 7, 32) and image_mask is not None and image_mask.sum(1).tolist() == [5, 7]
    together = model.fused_features([small, large], ids, mask)
    alone = model.fused_features([small], ids[:1], mask[:1])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-4)


# --- losses ----------------------------------------------------------------------------------------


def test_lm_loss_is_label_smoothed_cross_entropy_over_real_next_tokens() -> None:
    model = BLIP(_config())
    assert model.cfg.label_smoothing == 0.1
    batch = _batch(3, pad_last=2)
    loss = model.pretrain_losses(batch, {"lm": 1.0}, 0)["lm"]
    tokens, _ = model.encode_images(batch.images)
    hidden = model.grounded_decoder(model._with_first_token(batch.input_ids, DEC), batch.attention_mask, tokens, None)
    log_probs = F.log_softmax(model.cls(hidden).float(), dim=-1)
    terms = []
    for b in range(3):
        length = int(batch.attention_mask[b].sum())  # "<dec> w1 … </s>": positions 0..length-2 predict the next
        for t in range(length - 1):
            target = int(batch.input_ids[b, t + 1])
            nll, uniform = -log_probs[b, t, target], -log_probs[b, t].mean()
            terms.append(0.9 * nll + 0.1 * uniform)
    assert len(terms) == 3 * 4
    torch.testing.assert_close(loss, torch.stack(terms).mean())


# ITC targets of a 4-row batch whose rows 0 and 1 are matches of each other.
ROWS_0_AND_1_MATCH = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _soft_itc(model: BLIP, batch: ImageTextBatch, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric ITC against soft targets, by hand (temperature 0.07, the fresh model's)."""
    img = model.image_embeddings(batch.images)
    txt = model.text_embeddings(batch.input_ids, batch.attention_mask)
    sim = img @ txt.t() / 0.07
    return 0.5 * (-(F.log_softmax(sim, 1) * targets).sum(1).mean() - (F.log_softmax(sim.t(), 1) * targets).sum(1).mean())


def test_itc_targets_spread_over_rows_of_the_same_image() -> None:
    model = BLIP(_config())
    batch = _batch(4, image_ids=[0, 0, 1, 2])
    loss = model.pretrain_losses(batch, {"itc": 1.0}, 0)["itc"]
    torch.testing.assert_close(loss, _soft_itc(model, batch, ROWS_0_AND_1_MATCH))


def test_itm_scores_positives_and_hard_negatives_of_other_images() -> None:
    model = BLIP(_config())
    losses = model.pretrain_losses(_batch(4, image_ids=[0, 0, 1, 2]), {"itm": 1.0, "itc": 1.0, "lm": 1.0}, 0)
    assert set(losses) == {"itc", "itm", "lm"} and all(torch.isfinite(v) for v in losses.values())
    # A batch of one image twice has no negative at all: only the two positives are scored.
    only = model.pretrain_losses(_batch(2, image_ids=[5, 5]), {"itm": 1.0}, 0)["itm"]
    assert torch.isfinite(only)
    with pytest.raises(ValueError, match="no objective"):
        model.pretrain_losses(_batch(), {"mlm": 1.0}, 0)


def test_identical_captions_of_different_images_are_matches_not_negatives() -> None:
    # ShapesWorld's captions repeat across images (46% of the zoo's training captions have a
    # twin under another image). BLIP used to treat such a twin as an ITC negative and, worse,
    # as the hardest ITM negative (its ITC similarity equals the positive's): a true match
    # labelled 0. ALBEF, ViLT and VLMo already exclude it.
    torch.manual_seed(0)
    model = BLIP(_config())
    ids, mask = _texts(4)
    ids[1] = ids[0]  # rows 0 and 1: two images, one caption text
    batch = ImageTextBatch(list(torch.randn(4, 3, 16, 16)), ids, mask, torch.tensor([0, 1, 2, 3]))
    loss = model.pretrain_losses(batch, {"itc": 1.0}, 0)["itc"]
    torch.testing.assert_close(loss, _soft_itc(model, batch, ROWS_0_AND_1_MATCH))
    # ITM: two rows with one caption have no negative left, so only the two positives are scored.
    twins = ImageTextBatch(list(torch.randn(2, 3, 16, 16)), ids[:2], mask[:2], torch.tensor([0, 1]))
    scored: list[torch.Tensor] = []
    model.itm_head.register_forward_hook(lambda m, args, out: scored.append(args[0]))
    model.pretrain_losses(twins, {"itm": 1.0}, 0)
    assert [t.shape[0] for t in scored] == [2]


def test_after_step_clamps_temperature_and_moves_momentum_encoders() -> None:
    model = BLIP(_config(momentum=MomentumConfig(queue_size=6, momentum=0.5, alpha=0.4, alpha_ramp_steps=2)))
    # The momentum encoders start as exact copies, never train, and follow by EMA.
    assert not any(p.requires_grad for n in model.momentum_modules for p in getattr(model, n).parameters())
    batch = _batch(4)
    model.pretrain_losses(batch, {"itc": 1.0}, 0)["itc"].backward()
    assert len(model.queue) == 4 and model.queue.get("idx").tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        model.temp.fill_(5.0)
        model.vision_proj.weight.add_(1.0)
    before = model.vision_proj_m.weight.clone()
    model.after_step()
    assert float(model.temp.detach()) == 0.5
    torch.testing.assert_close(model.vision_proj_m.weight, 0.5 * before + 0.5 * model.vision_proj.weight)
    model.pretrain_losses(_batch(4), {"itc": 1.0}, 1)
    assert len(model.queue) == 6  # wrapped: K = 6


def test_bad_configs_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="separate_decoder_attention"):
        BLIPConfig.parse({**_config().to_dict(), "text": _text().model_copy(
            update={"separate_decoder_attention": False}).to_dict()})
    with pytest.raises(ConfigError, match="cross_attention_layers"):
        BLIPConfig.parse({**_config().to_dict(), "text": {**_text().to_dict(), "cross_attention_layers": [1]}})
    with pytest.raises(ConfigError, match="distinct"):
        BLIPConfig.parse({**_config().to_dict(), "dec_id": ENC})
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        BLIPConfig.parse({**_config().to_dict(), "dec_id": VOCAB})


# --- captioning ------------------------------------------------------------------------------------


def test_cached_greedy_decoding_equals_full_recomputation() -> None:
    model = BLIP(_config()).eval()
    images = list(torch.randn(3, 3, 16, 16))
    cached = model.caption_ids(images, 12, use_cache=True)
    full = model.caption_ids(images, 12, use_cache=False)
    assert cached == full and all(len(r) <= 12 for r in cached)
    assert all(t not in (PAD, BOS, ENC, DEC) for row in cached for t in row)
    with pytest.raises(ValueError, match="tokenizer"):
        model.caption(images, 4)


# --- data: a tiny ShapesWorld ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_shapes: Path) -> Tokenizer:
    return train_fusion_tokenizer(tiny_shapes, vocab_size=400)


def _tiny_preset(steps: int = 40) -> BLIPPreset:
    stage = StageConfig(name="pretrain", trainable=TRAINABLE, objectives={"itc": 1.0, "itm": 1.0, "lm": 1.0},
                        steps=steps, batch_size=16, lr=2e-3, warmup_steps=4, weight_decay=0.05, max_length=40,
                        log_every=10)
    return BLIPPreset(name="test", vision=_vision(32), text=_text(1024, positions=40), embed_dim=16, pretrain_stage=stage,
                      bootstrap_stage=stage.model_copy(update={"name": "bootstrap"}))


def _transform() -> ImageTransform:
    return ImageTransform(size=(32, 32))


# --- VQA by the answer decoder -------------------------------------------------------------------------


def test_answer_model_copies_the_decoder_and_leaves_the_pretrained_model_alone() -> None:
    model = BLIP(_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vqa = model.answer_model()
    # the question encoder and the answer decoder start equal but are separate tensors
    decoder = dict(vqa.answer_decoder.named_parameters())
    for name, param in vqa.blip.text_encoder.named_parameters():
        assert torch.equal(param, decoder[name]) and param.data_ptr() != decoder[name].data_ptr(), name
    # the answer head's output matrix is the answer decoder's own word embedding
    assert vqa.answer_head.predictions.decoder.weight is vqa.answer_decoder.embeddings.word_embeddings.weight
    ids, mask = _texts(2, pad_last=2)
    answers, answer_mask = _texts(3, length=4)
    vqa.loss(list(torch.randn(2, 3, 16, 16)), ids, mask, answers, answer_mask, torch.tensor([0, 0, 1]),
             torch.tensor([1.0, 0.3, 1.0])).backward()
    torch.optim.SGD(vqa.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the pretrained BLIP unchanged


def test_answer_loss_is_the_weighted_negative_log_likelihood_that_rank_scores() -> None:
    torch.manual_seed(0)
    vqa = BLIP(_config()).answer_model().eval()
    images = list(torch.randn(2, 3, 16, 16))
    ids, mask = _texts(2, pad_last=1)
    candidates, candidate_mask = _texts(3, length=5, pad_last=1)
    candidate_mask[1, 2:] = False  # a shorter answer: "<s> x </s>" + padding
    candidates[1, 2], candidates[1, 3:] = EOS, PAD
    ranked = vqa.rank(images, ids, mask, candidates, candidate_mask)
    assert ranked.shape == (2, 3) and bool((ranked < 0).all())
    # question 0 with answers 1 (weight 1) and 2 (weight 0.5); question 1 with answer 0
    owner, weights = torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.5, 1.0])
    rows = torch.tensor([1, 2, 0])
    loss = vqa.loss(images, ids, mask, candidates[rows], candidate_mask[rows], owner, weights)
    expected = -(ranked[0, 1] + 0.5 * ranked[0, 2] + ranked[1, 0]) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # padding after an answer changes nothing
    wider = torch.cat([candidates, torch.full((3, 2), PAD)], 1), torch.cat([candidate_mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
    torch.testing.assert_close(vqa.rank(images, ids, mask, *wider), ranked, rtol=1e-5, atol=1e-5)


def test_generated_answers_with_and_without_the_cache_agree_on_padded_questions() -> None:
    from tessera.models.blip import greedy_decode

    torch.manual_seed(0)
    vqa = BLIP(_config()).answer_model().eval()
    images = list(torch.randn(3, 3, 16, 16))
    ids, mask = _texts(3, pad_last=3)
    mask[0, 2:], ids[0, 2:] = False, PAD  # questions of different lengths
    generated = vqa.generate(images, ids, mask, max_new_tokens=6)
    states = vqa.question_states(images, ids, mask)
    full = greedy_decode(vqa.answer_decoder, vqa.answer_head, states, mask.bool(), vqa.cfg, 6, use_cache=False)
    assert generated == full and all(len(r) <= 6 for r in generated)


def test_blip_answers_shapesworld_questions_after_a_short_fine_tune(tiny_shapes: Path, tokenizer: Tokenizer) -> None:
    """AnswerGenerationTask trains a BLIPVQA; ranking over the answers and greedy generation then
    beat the per-question-type prior on the training questions (a learning check, not a test
    score; 96 questions are memorised by step 250)."""
    from tessera.data.datasets import ImageCache
    from tessera.data.readers import read_vqa
    from tessera.data.records import SkipStats
    from tessera.data.task_readers import vqa_prior_baseline
    from tessera.eval.vqa_metrics import score_vqa
    from tessera.train.downstream import AnswerGenerationTask
    from tessera.train.trainer import Trainer

    paths = shapes_split_paths(tiny_shapes, "train")
    items = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], tiny_shapes)[0][:96]
    torch.manual_seed(0)
    vqa = BLIP(_tiny_preset().blip_config(tokenizer)).answer_model()
    task = AnswerGenerationTask(items, tokenizer, ImageCache(_transform(), SkipStats()), max_length=32)
    batch = task.make_batch([0, 1])
    assert batch is not None and set(batch.answer_question.tolist()) == {0, 1}  # each question's answer rows
    assert batch.answer_ids.shape[0] == len(batch.answer_weights) >= 2
    stage = StageConfig(name="vqa_answer", trainable=["*"], objectives={"lm": 1.0}, steps=250, batch_size=32, lr=3e-3,
                        warmup_steps=10, max_length=32, log_every=50)
    result = Trainer(vqa, stage, task, progress=False).fit()
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"], result.history
    answers = sorted({a for i in items for a in i.answers})
    ranked = task.predict(vqa, answers)
    generated = task.predict(vqa)
    ranked_acc = score_vqa({i.question_id: a for i, a in zip(items, ranked, strict=True) if a}, items).accuracy
    generated_acc = score_vqa({i.question_id: a for i, a in zip(items, generated, strict=True) if a}, items).accuracy
    prior = vqa_prior_baseline(items, items).accuracy
    assert ranked_acc > prior + 0.2 and generated_acc > prior + 0.2, (ranked_acc, generated_acc, prior)


def test_the_tiny_preset_starts_with_an_enc_state_that_reads_image_and_text(tokenizer: Tokenizer) -> None:
    # Issue 3: with BERT's N(0, 0.02) linear weights the [ENC] state ITM reads hardly moved with
    # the image or the caption (relative spread ~0.005, see test_vilt.fused_spread): ITM sat at its
    # 1:2 label prior, so CapFilt's filter rejected 92% of the clean captions, and ITC learned
    # slowly (zoo retrieval at chance). PyTorch's default init (ALBEF's) gives ~0.04.
    from test_vilt import fused_spread

    from tessera.presets.blip import tiny

    torch.manual_seed(0)
    fresh = BLIP(tiny().blip_config(tokenizer)).eval()
    torch.manual_seed(0)
    bert_init = BLIP(tiny().model_copy(update={"linear_init": "normal"}).blip_config(tokenizer)).eval()
    spread, bert_spread = fused_spread(fresh, tokenizer), fused_spread(bert_init, tokenizer)
    assert min(spread) > 0.02 and max(bert_spread) < 0.01, (spread, bert_spread)


def test_a_tiny_run_learns(tiny_shapes: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    preset = _tiny_preset(steps=60)
    tok_file = tokenizer.save(tmp_path / "tok")
    captions = shapes_split_paths(tiny_shapes, "train")["captions"]
    model, result = train_blip(preset, preset.pretrain_stage, tokenizer, tok_file, captions, tiny_shapes,
                               _transform(), tmp_path / "run")
    first, last = result.history[0], result.history[-1]
    # Captioning learns first; ITC's [CLS] needs longer to leave its uniform start (ln 16).
    assert last["lm"] < 0.8 * first["lm"], (first, last)
    assert last["itm"] < 0.7 and last["itc"] <= first["itc"] + 1e-3, (first, last)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    text = model.caption([torch.zeros(3, 32, 32)], 20)[0]
    assert isinstance(text, str)


def _perfect_filter(model: BLIP, tokenizer: Tokenizer, noisy: set[str]) -> None:
    """Make the ITM filter reject exactly the given texts (bookkeeping checks)."""

    def logits(image_tokens: torch.Tensor, image_mask: object, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        texts = [tokenizer.decode(row[m].tolist()) for row, m in zip(ids, mask, strict=True)]
        return torch.tensor([-10.0 if t.strip() in noisy else 10.0 for t in texts])

    model.itm_logits_from_tokens = logits  # type: ignore[method-assign]


def test_capfilt_writes_a_valid_dataset_with_right_bookkeeping(
    tiny_shapes: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    clean = shapes_split_paths(tiny_shapes, "train")["captions"]
    noisy_file = tmp_path / "web" / "train" / "captions.json"
    counts = corrupt_captions(clean, noisy_file, 0.4, seed=1, held_out_combos=[("red", "triangle")],
                              image_root=tiny_shapes)
    data = json.loads(noisy_file.read_text())
    flagged = [a for a in data["annotations"] if a["noisy"]]
    assert counts["noisy"] == len(flagged) and 0.25 < len(flagged) / counts["captions"] < 0.55
    originals = {a["id"]: a["caption"] for a in json.loads(clean.read_text())["annotations"]}
    assert all(originals[a["id"]] != a["caption"] for a in flagged)
    assert not any("red triangle" in a["caption"] for a in flagged)

    model = BLIP(_tiny_preset().blip_config(tokenizer)).eval()
    noisy_texts = {a["caption"] for a in flagged}
    _perfect_filter(model, tokenizer, noisy_texts)
    out = tmp_path / "capfilt"
    summary = capfilt(model, tokenizer, noisy_file, noisy_file.parent, out, _transform(), threshold=0.5,
                      max_new_tokens=8, batch_size=32, progress=False)
    assert summary.noisy_total == len(flagged) and summary.noisy_removed == len(flagged)
    # The stub judges text alone: a clean caption identical to some corrupted one goes too.
    clean_lookalikes = sum(not a["noisy"] and a["caption"] in noisy_texts for a in data["annotations"])
    assert summary.clean_removed == clean_lookalikes < summary.noisy_removed
    assert summary.clean_total == counts["captions"] - len(flagged)
    assert summary.original_kept + summary.original_removed == summary.original_total == counts["captions"]
    assert summary.synthetic_total == summary.images == 120
    assert (summary.synthetic_kept + summary.synthetic_removed + summary.synthetic_duplicate
            + summary.synthetic_empty) == summary.synthetic_total
    assert json.loads((out / SUMMARY_FILE).read_text())["noisy_removal_rate"] == 1.0
    # A valid COCO-captions file, images referenced where they are.
    records, skips = read_coco_captions(out / "train" / "captions.json", out)
    assert skips.total == 0 and all(r.image.is_file() for r in records)
    written = json.loads((out / "train" / "captions.json").read_text())["annotations"]
    assert not any(a.get("noisy") for a in written)
    assert sum(a["source"] == "original" for a in written) == summary.original_kept
    assert sum(a["source"] == "synthetic" for a in written) == summary.synthetic_kept
    assert len({a["id"] for a in written}) == len(written)
    # ... that a new model trains on.
    task = ImageTextTask(records, tokenizer, ImageCache(_transform(), SkipStats()), 40, {"itc": 1.0, "lm": 1.0})
    fresh = BLIP(_tiny_preset().blip_config(tokenizer))
    batch = task.make_batch(list(range(8)))
    loss, logs = task.loss(fresh, batch)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and set(logs) == {"itc", "lm"}


def test_capfilt_threshold_extremes_and_cli(tiny_shapes: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = BLIP(_tiny_preset().blip_config(tokenizer)).eval()
    model.tokenizer = tokenizer
    clean = shapes_split_paths(tiny_shapes, "train")["captions"]
    keep_all = capfilt(model, tokenizer, clean, tiny_shapes, tmp_path / "all", _transform(), threshold=0.0,
                       max_new_tokens=4, max_images=10, progress=False)
    assert keep_all.original_removed == 0 and keep_all.images == 10 and keep_all.noisy_total is None
    drop_all = capfilt(model, tokenizer, clean, tiny_shapes, tmp_path / "none", _transform(), threshold=1.0,
                       max_new_tokens=4, max_images=10, progress=False)
    assert drop_all.original_kept == 0 and drop_all.images_without_captions == 10
    best = capfilt(model, tokenizer, clean, tiny_shapes, tmp_path / "best", _transform(), threshold=1.0,
                   max_new_tokens=4, max_images=10, min_captions_per_image=1, progress=False)
    assert best.kept_as_best == 10 and best.images_without_captions == 0
    kept = json.loads((tmp_path / "best" / "train" / "captions.json").read_text())["annotations"]
    assert sorted(a["image_id"] for a in kept) == sorted({a["image_id"] for a in kept})  # one per image

    from tessera.cli import app

    save_checkpoint(tmp_path / "ckpt", model, meta={"image_size": [32, 32]},
                    tokenizer_file=tokenizer.save(tmp_path / "tok"))
    result = CliRunner().invoke(app, ["capfilt", str(tmp_path / "ckpt"), "--data", str(tiny_shapes), "--out",
                                      str(tmp_path / "cli"), "--max-images", "6", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "train" / "captions.json").is_file() and "6 images" in result.output
    bad = CliRunner().invoke(app, ["capfilt", str(tmp_path / "missing"), "--data", str(tiny_shapes), "--out",
                                   str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_token_ids_come_from_the_fusion_tokenizer(tokenizer: Tokenizer) -> None:
    ids = blip_token_ids(tokenizer)
    assert ids["enc_id"] == tokenizer.token_id("<enc>") and ids["dec_id"] == tokenizer.token_id("<dec>")
    assert len(set(ids.values())) == 5


def test_zoo_runner_smoke(tmp_path: Path) -> None:
    from tessera.data.shapes import ShapesConfig
    from tessera.presets.blip import ZOO, run
    from tessera.zoo.core import SPLITS, ZooContext
    from tessera.zoo.runner import ZooDataConfig, prepare_zoo_data

    data = prepare_zoo_data(tmp_path / "data", ZooDataConfig(shapes=ShapesConfig(
        seed=0, num_train=24, num_val=2, num_test=6, num_test_comp=6)), progress=False)
    # Test dimensions and of the fine-tuned tasks only BLIP's own answer decoder (fusion_eval's
    # tests cover the heads); the recipe itself is tiny().
    preset = _tiny_preset(steps=200).model_copy(update={"finetune_tasks": ("vqa_answer",), "caption_max_new_tokens": 8,
                                                        "rerank_k": 4})
    result = run(ZooContext(data_dir=data, out_dir=tmp_path / "blip", scale=0.01, progress=False), preset)
    for label in SPLITS.values():
        assert {"caption_cider", "caption_bleu4", "retrieval_i2t_r1", "retrieval_t2i_r1", "vqa_rank_accuracy",
                "vqa_generate_accuracy"} <= set(result.metrics[label])
        assert set(result.metrics[label]) == set(result.baselines[label])
        assert result.baselines[label]["vqa_rank_accuracy"] == result.baselines[label]["vqa_generate_accuracy"] > 0
    assert result.trainable_params_by_stage["finetune_vqa_answer"] > result.trainable_params_by_stage["pretrain_capfilt"]
    note = result.notes["capfilt"]
    assert note["noisy_total"] == result.notes["web_captions"]["noisy"] > 0
    assert note["noisy_total"] + note["clean_total"] == note["original_total"]
    assert (tmp_path / "blip" / "capfilt" / "train" / "captions.json").is_file()
    assert set(result.seconds_by_stage) >= {"pretrain_noisy", "capfilt", "pretrain_capfilt", "captioning_eval"}
    assert ZOO["blip"] is run
