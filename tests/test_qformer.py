"""The Q-Former: its three self-attention masks position by position and in effect, the fixed
token count for any image size, padding of mixed image sizes, the connector inside an LVLM, and
numerical parity with Hugging Face's Blip2QFormerModel."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tessera.connectors.base import VisionTokens
from tessera.connectors.qformer import (
    QFormerConfig,
    QFormerConnector,
    QFormerModel,
    qformer_attention_mask,
)
from tessera.connectors.registry import build_connector
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.text.llama import LlamaConfig
from tessera.vision.vit import ViTConfig

E_V = 24
CFG = QFormerConfig(num_queries=3, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, text_input=True)


def _model(cfg: QFormerConfig = CFG) -> QFormerModel:
    torch.manual_seed(0)
    return QFormerModel(cfg, E_V).eval()


# ---------------------------------------------------------------------------------- masks

# Q = 2 queries (q0 q1), then text t0 t1 t2 where t2 is padding. 1 = may attend.
TEXT_MASK = torch.tensor([[True, True, False]])
EXPECTED = {
    #              q0 q1 t0 t1 t2
    "itc": [[1, 1, 0, 0, 0],   # q0: queries only
            [1, 1, 0, 0, 0],   # q1
            [0, 0, 1, 1, 0],   # t0: text only, never the padding
            [0, 0, 1, 1, 0],   # t1
            [0, 0, 1, 1, 0]],  # t2 (padding row; its output is never read)
    "itg": [[1, 1, 0, 0, 0],   # queries see queries only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],   # t0: all queries and itself
            [1, 1, 1, 1, 0],   # t1: all queries, t0, itself
            [1, 1, 1, 1, 0]],  # t2: causal, padding column excluded
    "itm": [[1, 1, 1, 1, 0],   # everything sees every real token
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0]],
}


@pytest.mark.parametrize("mode", ["itc", "itg", "itm"])
def test_masks_position_by_position(mode: str) -> None:
    mask = qformer_attention_mask(mode, 2, TEXT_MASK)
    assert mask.shape == (1, 5, 5) and mask.dtype == torch.bool
    assert mask[0].int().tolist() == EXPECTED[mode]


def test_mask_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="itc, itg, itm|'itc', 'itg', 'itm'"):
        qformer_attention_mask("causal", 2, TEXT_MASK)  # type: ignore[arg-type]


def _inputs(b: int = 2, length: int = 5, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, CFG.num_queries + length, CFG.hidden_size, generator=g)
    image = torch.randn(b, 7, E_V, generator=g)
    text_mask = torch.ones(b, length, dtype=torch.bool)
    return embeds, image, text_mask


def _run(model: QFormerModel, mode: str, embeds: Tensor, image: Tensor, text_mask: Tensor) -> Tensor:
    mask = qformer_attention_mask(mode, CFG.num_queries, text_mask)  # type: ignore[arg-type]
    return model(embeds, num_queries=CFG.num_queries, attn_mask=mask, image_embeds=image)


@torch.no_grad()
def test_masks_hold_in_the_computation() -> None:
    model = _model()
    q = CFG.num_queries
    embeds, image, text_mask = _inputs()
    other_text = embeds.clone()
    other_text[:, q + 2 :] = torch.randn_like(other_text[:, q + 2 :])  # change text tokens 2..
    other_image = torch.randn_like(image)

    itc, itc_t, itc_i = (_run(model, "itc", e, i, text_mask) for e, i in
                         ((embeds, image), (other_text, image), (embeds, other_image)))
    # ITC: queries ignore the text, the text ignores queries and the image.
    assert torch.equal(itc[:, :q], itc_t[:, :q])
    assert torch.allclose(itc[:, q:], itc_i[:, q:], atol=0, rtol=0)
    assert not torch.allclose(itc[:, :q], itc_i[:, :q])
    # ITG: queries still ignore the text; text token t sees only tokens ≤ t, and sees the image.
    itg, itg_t, itg_i = (_run(model, "itg", e, i, text_mask) for e, i in
                         ((embeds, image), (other_text, image), (embeds, other_image)))
    assert torch.equal(itg[:, :q], itg_t[:, :q])
    assert torch.allclose(itg[:, : q + 2], itg_t[:, : q + 2], atol=1e-6)
    assert not torch.allclose(itg[:, q + 2 :], itg_t[:, q + 2 :])
    assert not torch.allclose(itg[:, q:], itg_i[:, q:])
    assert torch.allclose(itg[:, :q], itc[:, :q], atol=1e-6)  # the same query computation as ITC
    # ITM: queries read the text.
    itm, itm_t = (_run(model, "itm", e, image, text_mask) for e in (embeds, other_text))
    assert not torch.allclose(itm[:, :q], itm_t[:, :q])


@torch.no_grad()
def test_itc_mask_equals_separate_query_and_text_passes() -> None:
    """The unimodal mask is what Hugging Face / LAVIS compute as two separate passes."""
    model = _model()
    q = CFG.num_queries
    embeds, image, text_mask = _inputs()
    text_mask[1, 3:] = False
    joint = _run(model, "itc", embeds, image, text_mask)
    queries = model(embeds[:, :q], num_queries=q, image_embeds=image)
    text = model(embeds[:, q:], num_queries=0, key_padding_mask=text_mask)
    assert torch.allclose(joint[:, :q], queries, atol=1e-5)
    assert torch.allclose(joint[:, q:][text_mask], text[text_mask], atol=1e-5)


def test_cross_attention_every_other_layer_and_separate_ffns() -> None:
    model = _model(CFG.model_copy(update={"num_layers": 5}))
    assert [layer.has_cross_attention for layer in model.encoder.layer] == [True, False, True, False, True]
    layer = model.encoder.layer[0]
    assert layer.intermediate_query.dense.weight is not layer.intermediate.dense.weight
    no_text = _model(CFG.model_copy(update={"text_input": False}))
    assert not hasattr(no_text.encoder.layer[0], "intermediate")
    embeds, image, text_mask = _inputs()
    with pytest.raises(ValueError, match="text_input"):
        no_text(embeds, num_queries=CFG.num_queries, image_embeds=image)


def test_queries_need_an_image() -> None:
    embeds, _, _ = _inputs()
    with pytest.raises(ValueError, match="image_embeds"):
        _model()(embeds, num_queries=CFG.num_queries)


# ------------------------------------------------------------------------ the connector


def _connector() -> QFormerConnector:
    torch.manual_seed(0)
    connector = build_connector(CFG.model_copy(update={"text_input": False}), E_V, 40)
    assert isinstance(connector, QFormerConnector)
    return connector.eval()


@torch.no_grad()
def test_fixed_token_count_for_any_image_size() -> None:
    connector = _connector()
    grids = [(1, 1), (2, 3), (8, 8), (3, 17), (40, 2)]
    for rows, cols in grids:
        assert connector.num_output_tokens(rows, cols) == CFG.num_queries
    tokens = torch.randn(sum(1 + r * c for r, c in grids), E_V)
    out = connector(VisionTokens(tokens, grids, prefix_tokens=1))
    assert out.shape == (len(grids) * CFG.num_queries, 40)
    with pytest.raises(ValueError, match="1x1"):
        connector.num_output_tokens(0, 4)


@torch.no_grad()
def test_mixed_image_sizes_are_padded_without_leaking() -> None:
    """An image's output does not depend on the other images of the batch (padding is masked)."""
    connector = _connector()
    small, large = torch.randn(1 + 4, E_V), torch.randn(1 + 30, E_V)
    alone = connector(VisionTokens(small, [(2, 2)], prefix_tokens=1))
    together = connector(VisionTokens(torch.cat([large, small]), [(5, 6), (2, 2)], prefix_tokens=1))
    assert torch.allclose(together[CFG.num_queries :], alone, atol=1e-5)


@torch.no_grad()
def test_lvlm_with_a_qformer_connector() -> None:
    cfg = LVLMConfig(
        vision=ViTConfig(image_size=32, patch_size=8, hidden_size=E_V, num_layers=2, num_heads=4, intermediate_size=48),
        connector=CFG.model_copy(update={"text_input": False}),
        llm=LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=80, num_layers=1, num_heads=4, num_kv_heads=2),
        image_token_id=4, vision_feature_layer=-1, vision_feature_select="full",
    )
    model = LVLM(cfg).eval()
    for h, w in [(32, 32), (16, 64), (64, 24)]:
        assert model.num_image_tokens(h, w) == CFG.num_queries
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 64)]
    q = CFG.num_queries
    ids = torch.tensor([[2, *[4] * q, 9, 10], [2, *[4] * q, 11, 12]])
    hidden = model(ids, images)
    assert hidden.shape == (2, q + 3, 40)
    # The round trip through the config union keeps the Q-Former.
    assert isinstance(LVLM(LVLMConfig.parse(cfg.to_dict())).connector, QFormerConnector)


# -------------------------------------------------------------------- Hugging Face parity


@torch.no_grad()
def test_parity_with_hugging_face_blip2_qformer() -> None:
    transformers = pytest.importorskip("transformers")
    from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager, randomize_

    hf_cfg = transformers.Blip2QFormerConfig(
        hidden_size=CFG.hidden_size, num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
        intermediate_size=CFG.intermediate_size, encoder_hidden_size=E_V, use_qformer_text_input=True,
        cross_attention_frequency=2,
    )
    hf = hf_eager(transformers.Blip2QFormerModel, hf_cfg)
    randomize_(hf, 3)
    ours = QFormerModel(CFG, E_V).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same names, one to one
    embeds, image, text_mask = _inputs(length=4, seed=5)
    text_mask[0, 2:] = False
    q = CFG.num_queries
    # Queries alone (BLIP-2's image side) and queries with text, bidirectional (its ITM pass).
    ref_q = hf(query_embeds=embeds[:, :q], encoder_hidden_states=image).last_hidden_state
    assert_close("q-former queries", ours(embeds[:, :q], num_queries=q, image_embeds=image), ref_q, HF_TOLERANCE)
    full_mask = torch.cat([torch.ones(2, q, dtype=torch.bool), text_mask], dim=1)
    ref = hf(query_embeds=embeds, query_length=q, attention_mask=full_mask.long(),
             encoder_hidden_states=image).last_hidden_state
    got = _run(ours, "itm", embeds, image, text_mask)
    assert_close("q-former itm", got[full_mask], ref[full_mask], HF_TOLERANCE)
