"""The BERT-style encoder: parity with Hugging Face's BertModel and BLIP text model (encoder and
decoder modes, cross-attention to features of another width), layer ranges, BLIP's
encoder/decoder sharing, and VLMo's modality-expert routing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tessera.config import ConfigError
from tessera.text.bert import BertConfig, BertModel

transformers = pytest.importorskip("transformers")
from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager, randomize_  # noqa: E402

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
            max_position_embeddings=32)
HF_TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-12)
IMAGE_WIDTH = 48  # BLIP's ViT may be wider or narrower than the text model



def randomize_bert_(model: nn.Module, seed: int) -> None:
    """randomize_ keeps gains near 1 only for names with a lower-case "norm"; BERT spells it
    LayerNorm, so its gains are set here (near 0 they would shrink every output)."""
    randomize_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def padded_text(lengths: list[int], seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def image_features(batch: int, tokens: int, seed: int, width: int = IMAGE_WIDTH, padded: bool = True
                   ) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, tokens, width, generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if padded:
        mask[0, -3:] = 0  # a padded image sequence: those keys must be ignored
    return feats, mask


# ------------------------------------------------------------------ Hugging Face parity


def test_plain_encoder_matches_hf_bert_model() -> None:
    hf = hf_eager(transformers.BertModel, transformers.BertConfig(**HF_TINY, type_vocab_size=2))
    randomize_bert_(hf, seed=1)
    ours = BertModel(BertConfig(**TINY, type_vocab_size=2, pooler=True)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = padded_text([12, 7, 10], seed=0)
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours(ids, attention_mask=mask, token_type_ids=types)
        no_types = ours(ids, attention_mask=mask)
        ref_no_types = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        from_embeds = ours(inputs_embeds=ours.embeddings.word_embeddings(ids), attention_mask=mask,
                           token_type_ids=types)
    assert ref.last_hidden_state.std() > 0.5  # the weights are not degenerate
    assert_close("bert last_hidden_state", hidden, ref.last_hidden_state, HF_TOLERANCE)
    assert_close("bert pooler", ours.pool(hidden), ref.pooler_output, HF_TOLERANCE)
    assert_close("bert without token types", no_types, ref_no_types, HF_TOLERANCE)
    assert_close("bert from inputs_embeds", from_embeds, ref.last_hidden_state, HF_TOLERANCE)


def test_masked_cross_attention_decoder_matches_hf_bert_model() -> None:
    """BertModel's own cross-attention (decoder mode, image width = hidden size) is the reference
    for a padded image sequence: Hugging Face's BLIP text model drops encoder_attention_mask
    (BlipTextAttention does not pass it on to its cross-attention), BERT's applies it."""
    hf_cfg = transformers.BertConfig(**HF_TINY, is_decoder=True, add_cross_attention=True)
    hf = hf_eager(transformers.BertModel, hf_cfg)
    randomize_bert_(hf, seed=9)
    ours = BertModel(BertConfig(**TINY, cross_attention_layers=(0, 1), pooler=True)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = padded_text([9, 14], seed=1)
    feats, feats_mask = image_features(2, 7, seed=2, width=64)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=feats,
                 encoder_attention_mask=feats_mask).last_hidden_state
        got = ours(ids, attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=feats_mask,
                   causal=True)
    assert_close("bert decoder with masked cross-attention", got, ref, HF_TOLERANCE)


def blip_text_pair(seed: int) -> tuple[nn.Module, BertModel]:
    hf_cfg = transformers.BlipTextConfig(**HF_TINY, encoder_hidden_size=IMAGE_WIDTH, is_decoder=True)
    hf = hf_eager(transformers.models.blip.modeling_blip_text.BlipTextModel, hf_cfg)
    randomize_bert_(hf, seed)
    ours = BertModel(BertConfig(
        **TINY, type_vocab_size=0, pooler=True, cross_attention_layers=(0, 1), encoder_width=IMAGE_WIDTH,
    )).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def test_cross_attention_encoder_and_decoder_match_hf_blip_text_model() -> None:
    hf, ours = blip_text_pair(seed=2)
    ids, mask = padded_text([9, 14], seed=1)
    # Unpadded image features: BLIP's ViT output has none, and HF's BLIP ignores the mask.
    feats, feats_mask = image_features(2, 7, seed=2, padded=False)
    with torch.no_grad():
        for causal in (False, True):
            ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=feats,
                     encoder_attention_mask=feats_mask, is_decoder=causal).last_hidden_state
            got = ours(ids, attention_mask=mask, encoder_hidden_states=feats,
                       encoder_attention_mask=feats_mask, causal=causal)
            assert_close(f"blip text causal={causal}", got, ref, HF_TOLERANCE)
        # BLIP's unimodal text encoder: the same weights without image features.
        ref = hf(input_ids=ids, attention_mask=mask, is_decoder=False).last_hidden_state
        assert_close("blip text unimodal", ours(ids, attention_mask=mask), ref, HF_TOLERANCE)


def test_blip_encoder_and_decoder_share_all_but_self_attention() -> None:
    hf_encoder, ours_shared = blip_text_pair(seed=3)
    ours = BertModel(ours_shared.cfg.model_copy(update={"separate_decoder_attention": True})).eval()
    ours.load_state_dict(hf_encoder.state_dict(), strict=False)
    # BLIP's decoder checkpoint: the encoder's weights with its own self-attention.
    hf_decoder = hf_eager(transformers.models.blip.modeling_blip_text.BlipTextModel, hf_encoder.config)
    randomize_bert_(hf_decoder, seed=4)
    decoder_state = hf_decoder.state_dict()
    with torch.no_grad():
        for name, p in ours.parameters_for("decode").items():
            if ".attention." in name:
                p.copy_(decoder_state[name])
        hf_decoder.load_state_dict(
            {k: v for k, v in hf_encoder.state_dict().items() if ".attention." not in k}, strict=False
        )

    encode, decode = ours.parameters_for("encode"), ours.parameters_for("decode")
    hf_names = {name for name, _ in hf_encoder.named_parameters()}
    assert set(encode) == hf_names and set(decode) == hf_names
    shared = [n for n in hf_names if ".attention." not in n]
    own = [n for n in hf_names if ".attention." in n]
    assert shared and own
    assert all(encode[n] is decode[n] for n in shared)
    assert not any(encode[n] is decode[n] for n in own)
    assert ours.encoder.layer[0].crossattention.self.key.weight is decode["encoder.layer.0.crossattention.self.key.weight"]

    ids, mask = padded_text([11, 6], seed=5)
    feats, feats_mask = image_features(2, 5, seed=6, padded=False)
    kwargs = dict(attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=feats_mask)
    with torch.no_grad():
        assert_close("blip encode", ours(ids, **kwargs),
                     hf_encoder(input_ids=ids, is_decoder=False, **kwargs).last_hidden_state, HF_TOLERANCE)
        assert_close("blip decode", ours(ids, causal=True, **kwargs),
                     hf_decoder(input_ids=ids, is_decoder=True, **kwargs).last_hidden_state, HF_TOLERANCE)

    # A step on the decoder's loss moves the shared tensors the encoder reads.
    shared_weight = ours.encoder.layer[1].intermediate.dense.weight
    ours(ids, causal=True, **kwargs).sum().backward()
    assert shared_weight.grad is not None
    assert ours.encoder.layer[0].attention.self.query.weight.grad is None
    assert ours.encoder.layer[0].decoder_attention.self.query.weight.grad is not None


# ------------------------------------------------------------------ layer ranges, masks


def test_albef_split_text_layers_then_fusion_layers_equal_one_call() -> None:
    model = BertModel(BertConfig(**{**TINY, "num_layers": 4}, cross_attention_layers=(2, 3),
                                 encoder_width=IMAGE_WIDTH)).eval()
    randomize_bert_(model, seed=5)
    ids, mask = padded_text([10, 6], seed=7)
    feats, feats_mask = image_features(2, 6, seed=8)
    with torch.no_grad():
        text = model(ids, attention_mask=mask, end_layer=2)
        fused = model(hidden_states=text, attention_mask=mask, encoder_hidden_states=feats,
                      encoder_attention_mask=feats_mask, start_layer=2)
        whole = model(ids, attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=feats_mask)
        text_only = model(ids, attention_mask=mask)
    assert_close("text layers + fusion layers", fused, whole, 1e-6)
    assert (whole - text_only).abs().max() > 1e-2  # the fusion layers did read the image


def test_padded_keys_and_image_tokens_are_ignored() -> None:
    model = BertModel(BertConfig(**TINY, cross_attention_layers=(1,), encoder_width=IMAGE_WIDTH)).eval()
    randomize_bert_(model, seed=6)
    ids, mask = padded_text([8, 5], seed=9)
    feats, feats_mask = image_features(2, 6, seed=10)
    changed_ids, changed_feats = ids.clone(), feats.clone()
    changed_ids[1, 5:] = 7  # padding tokens
    changed_feats[0, -3:] += 5.0  # padded image tokens
    kwargs = dict(attention_mask=mask, encoder_attention_mask=feats_mask)
    with torch.no_grad():
        base = model(ids, encoder_hidden_states=feats, **kwargs)
        moved = model(changed_ids, encoder_hidden_states=changed_feats, **kwargs)
    real = mask.bool()
    assert_close("real tokens", moved[real], base[real], 1e-6)


def test_causal_mode_does_not_see_later_tokens() -> None:
    model = BertModel(BertConfig(**TINY)).eval()
    randomize_bert_(model, seed=7)
    ids, _ = padded_text([10], seed=11)
    later = ids.clone()
    later[0, 6:] = (later[0, 6:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids, causal=True), model(later, causal=True)
        bidirectional = model(ids), model(later)
    assert_close("causal prefix", a[:, :6], b[:, :6], 1e-6)
    assert (bidirectional[0][:, :6] - bidirectional[1][:, :6]).abs().max() > 1e-2


# ------------------------------------------------------------------ VLMo modality experts


def vlmo(num_layers: int, vl_expert_layers: int) -> BertModel:
    model = BertModel(BertConfig(**{**TINY, "num_layers": num_layers}, modality_experts=True,
                                 vl_expert_layers=vl_expert_layers)).eval()
    randomize_bert_(model, seed=8)
    return model


def zeroed(model: BertModel, expert: str, layer: int) -> BertModel:
    """A copy whose given FFN expert adds nothing (its output projection is zero)."""
    twin = BertModel(model.cfg).eval()
    twin.load_state_dict(model.state_dict())
    target = twin.encoder.layer[layer]
    dense = target.output.dense if expert == "text" else getattr(target, f"{expert}_expert").output.dense
    with torch.no_grad():
        dense.weight.zero_()
        dense.bias.zero_()
    return twin


def test_each_token_goes_to_exactly_its_modality_expert() -> None:
    model = vlmo(num_layers=1, vl_expert_layers=1)
    embeds = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(12))
    modality = torch.tensor([[0] * 4 + [1] * 5, [1] * 3 + [0] * 6])
    text, image = modality == 0, modality == 1
    with torch.no_grad():
        base = model(inputs_embeds=embeds, modality_ids=modality)
        no_image_ffn = zeroed(model, "image", 0)(inputs_embeds=embeds, modality_ids=modality)
        no_text_ffn = zeroed(model, "text", 0)(inputs_embeds=embeds, modality_ids=modality)
        no_vl_ffn = zeroed(model, "vl", 0)(inputs_embeds=embeds, modality_ids=modality)
        all_text = model(inputs_embeds=embeds, modality_ids=torch.zeros_like(modality))
        all_image = model(inputs_embeds=embeds, modality_ids=torch.ones_like(modality))
    assert_close("text tokens without the image FFN", no_image_ffn[text], base[text], 1e-6)
    assert (no_image_ffn[image] - base[image]).abs().amax(dim=-1).gt(1e-3).all()
    assert_close("image tokens without the text FFN", no_text_ffn[image], base[image], 1e-6)
    assert (no_text_ffn[text] - base[text]).abs().amax(dim=-1).gt(1e-3).all()
    assert_close("unfused call without the VL FFN", no_vl_ffn, base, 1e-6)
    # Attention is shared, so a token's output depends on its own expert only.
    assert_close("text tokens as in an all-text call", base[text], all_text[text], 1e-5)
    assert_close("image tokens as in an all-image call", base[image], all_image[image], 1e-5)
    # Gradients reach exactly the experts that ran.
    model(inputs_embeds=embeds, modality_ids=modality).sum().backward()
    layer = model.encoder.layer[0]
    assert layer.output.dense.weight.grad is not None and layer.image_expert.output.dense.weight.grad is not None
    assert layer.vl_expert.output.dense.weight.grad is None


def test_fused_sequences_use_the_vl_expert_in_the_top_layers_only() -> None:
    model = vlmo(num_layers=2, vl_expert_layers=1)
    embeds = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(13))
    modality = torch.tensor([[0] * 4 + [1] * 4] * 2)
    kwargs = dict(inputs_embeds=embeds, modality_ids=modality, fused=True)
    with torch.no_grad():
        base = model(**kwargs)
        top_text = zeroed(model, "text", 1)(**kwargs)
        top_image = zeroed(model, "image", 1)(**kwargs)
        top_vl = zeroed(model, "vl", 1)(**kwargs)
        bottom_image = zeroed(model, "image", 0)(**kwargs)
    assert_close("top text FFN unused when fused", top_text, base, 1e-6)
    assert_close("top image FFN unused when fused", top_image, base, 1e-6)
    assert (top_vl - base).abs().amax(dim=-1).gt(1e-3).all()  # every token went to the VL FFN
    assert (bottom_image - base).abs().max() > 1e-2  # the bottom layer still routes by modality
    assert not hasattr(model.encoder.layer[0], "vl_expert")


def test_expert_misuse_is_refused() -> None:
    embeds = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="needs modality_ids"):
        vlmo(1, 0)(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="0 \\(text\\) or 1 \\(image\\)"):
        vlmo(1, 0)(inputs_embeds=embeds, modality_ids=torch.tensor([[0, 1, 2, 0]]))
    with pytest.raises(ValueError, match="no modality_experts"):
        BertModel(BertConfig(**TINY))(inputs_embeds=embeds, modality_ids=torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------ config and call errors


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(cross_attention_layers=[2]), "cross_attention_layers"),
        (dict(cross_attention_layers=[1, 1]), "repeats"),
        (dict(vl_expert_layers=1), "vl_expert_layers needs modality_experts"),
        (dict(num_heads=5), "not divisible"),
        (dict(causal=True), "causal"),
    ],
)
def test_bad_configs_name_the_problem(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        BertConfig.parse({**TINY, **overrides})


def test_bad_calls_are_refused() -> None:
    model = BertModel(BertConfig(**{**TINY, "type_vocab_size": 0}))
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, hidden_states=torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="layer range"):
        model(ids, start_layer=2, end_layer=1)
    with pytest.raises(ValueError, match="type_vocab_size 0"):
        model(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="pooler=False"):
        model.pool(model(ids))
