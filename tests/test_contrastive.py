"""Contrastive losses on one process: values worked by hand, the models' scale inits and clamp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tessera.models.dual_encoder import (
    SIGLIP_TEXT,
    SIGLIP_VISION,
    DualEncoder,
    DualEncoderConfig,
    SigLIPDualEncoder,
    SigLIPDualEncoderConfig,
)
from tessera.objectives.contrastive import clip_loss, siglip_loss
from tessera.text.clip_text import CLIPTextConfig
from tessera.vision.vit import ViTConfig

TINY_VIT = {"image_size": 16, "patch_size": 8, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
            "intermediate_size": 32}
TINY_TEXT = {"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 8}


def test_clip_loss_3x3_by_hand() -> None:
    # Scale t = 2 (log-scale ln 2). Cosines are 1, 0 or -1, so the logits are
    #   row 0: [ 2, 0,  0]  (image 0 vs texts)   column 0: [2,  0, -2]  (text 0 vs images)
    #   row 1: [ 0, 2, -2]                       column 1: [0,  2,  0]
    #   row 2: [-2, 0,  0]                       column 2: [0, -2,  0]
    # with targets 0, 1, 2. Cross-entropy of each:
    #   row 0 = -log(e²/(e²+1+1))        = log(1 + 2e⁻²)     = column 1
    #   row 1 = -log(e²/(1+e²+e⁻²))      = log(1 + e⁻² + e⁻⁴) = column 0
    #   row 2 = -log(1/(e⁻²+1+1))        = log(2 + e⁻²)      = column 2
    # so loss = ½(mean rows + mean columns) = (1/3)·(sum of the three).
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    e2 = math.exp(-2.0)
    expected = (math.log(1 + 2 * e2) + math.log(1 + e2 + e2 * e2) + math.log(2 + e2)) / 3
    assert math.isclose(float(clip_loss(images, texts, torch.tensor(math.log(2.0)))), expected, rel_tol=1e-6)


def test_siglip_loss_2x2_by_hand() -> None:
    # t = 10 (t' = ln 10), b = -10: the SigLIP inits. Cosines [[1, 0.6], [0, 0.8]] give
    # logits t·cos + b = [[0, -4], [-10, -2]]; labels [[+1, -1], [-1, +1]]; each pair costs
    # -log σ(label · logit) = log(1 + exp(-label · logit)):
    #   (0,0): log(1 + e⁰) = log 2        (0,1): log(1 + e⁻⁴)
    #   (1,0): log(1 + e⁻¹⁰)              (1,1): log(1 + e²)
    # and the loss is their sum divided by the 2 images.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expected = (math.log(2) + math.log1p(math.exp(-4)) + math.log1p(math.exp(-10)) + math.log1p(math.exp(2))) / 2
    loss = siglip_loss(images, texts, torch.tensor([math.log(10.0)]), torch.tensor([-10.0]))
    assert loss.ndim == 0
    assert math.isclose(float(loss), expected, rel_tol=1e-6)


def test_siglip_loss_uses_the_models_inits_and_pair_logits() -> None:
    vision = ViTConfig(**{**SIGLIP_VISION.to_dict(), **TINY_VIT})
    text = CLIPTextConfig(**{**SIGLIP_TEXT.to_dict(), **TINY_TEXT, "head_size": vision.hidden_size})
    model = SigLIPDualEncoder(SigLIPDualEncoderConfig(vision=vision, text=text))
    assert math.isclose(float(model.logit_scale.detach()), math.log(10.0), rel_tol=1e-6)
    assert float(model.logit_bias.detach()) == -10.0
    images = F.normalize(torch.randn(3, 5), dim=-1)
    texts = F.normalize(torch.randn(3, 5), dim=-1)
    signs = 2 * torch.eye(3) - 1
    expected = -F.logsigmoid(signs * model.pair_logits(images, texts)).sum() / 3
    assert torch.allclose(siglip_loss(images, texts, model.logit_scale, model.logit_bias), expected, atol=1e-6)


def test_distributed_flag_without_process_group_is_the_single_process_loss() -> None:
    images, texts = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    scale, bias = torch.tensor(2.0), torch.tensor(-1.0)
    assert torch.equal(clip_loss(images, texts, scale, distributed=True), clip_loss(images, texts, scale))
    assert torch.equal(siglip_loss(images, texts, scale, bias, distributed=True), siglip_loss(images, texts, scale, bias))


def test_losses_reject_mismatched_or_empty_batches() -> None:
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="empty batch"):
        siglip_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor(0.0), torch.tensor(0.0))


def test_dual_encoder_clamps_log_scale_to_0_and_ln_100() -> None:
    model = DualEncoder(DualEncoderConfig(vision=ViTConfig(**TINY_VIT), text=CLIPTextConfig(**TINY_TEXT),
                                          projection_dim=8))
    assert math.isclose(float(model.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)
    for value, clamped in ((10.0, math.log(100.0)), (-1.0, 0.0), (math.log(50.0), math.log(50.0))):
        with torch.no_grad():
            model.logit_scale.fill_(value)
        model.clamp_logit_scale()
        assert math.isclose(float(model.logit_scale.detach()), clamped, rel_tol=1e-6, abs_tol=1e-7)
