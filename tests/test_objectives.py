"""Losses: packed equals padded, hand-computed contrastive values, sampling rules."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessera.data.collate import Sample, pack_collate, pad_collate
from tessera.infer.generate import GenerationConfig, sample_next
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.objectives.contrastive import clip_loss
from tessera.objectives.lm import next_token_loss
from tessera.text.llama import LlamaConfig
from tessera.vision.vit import ViTConfig


def _model() -> LVLM:
    torch.manual_seed(0)
    llm = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    vit = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    return LVLM(LVLMConfig(vision=vit, llm=llm, image_token_id=5)).eval()


def _samples(model: LVLM) -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    n_img = model.num_image_tokens(16, 16)
    out = []
    for length in (3, 9, 5):
        text = torch.randint(10, 64, (length,), generator=g).tolist()
        ids = [1, *[5] * n_img, *text]
        labels = [-100] * (1 + n_img) + text
        out.append(Sample(ids, labels, [torch.randn(3, 16, 16, generator=g)]))
    return out


def _loss(model: LVLM, batch) -> torch.Tensor:
    hidden = model(batch.input_ids, batch.images, position_ids=batch.position_ids,
                   cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask)
    return next_token_loss(hidden, model.language_model.lm_head, batch.targets)


def test_packed_loss_and_gradients_equal_padded() -> None:
    model = _model()
    samples = _samples(model)
    packed, padded = pack_collate(samples, 0), pad_collate(samples, 0)
    assert packed.num_target_tokens == padded.num_target_tokens
    loss_packed = _loss(model, packed)
    grads_packed = torch.autograd.grad(loss_packed, list(model.language_model.parameters()))
    loss_padded = _loss(model, padded)
    grads_padded = torch.autograd.grad(loss_padded, list(model.language_model.parameters()))
    assert torch.allclose(loss_packed, loss_padded, atol=1e-6)
    for a, b in zip(grads_packed, grads_padded, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_packed_loss_equals_mean_of_per_sample_token_losses() -> None:
    model = _model()
    samples = _samples(model)
    total, count = 0.0, 0
    for s in samples:
        b = pad_collate([s], 0)
        n = b.num_target_tokens
        total += float(_loss(model, b).detach()) * n
        count += n
    assert math.isclose(float(_loss(model, pack_collate(samples, 0)).detach()), total / count, rel_tol=1e-5)


def test_next_token_loss_ignores_unsupervised_positions() -> None:
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(1, 5, 4)
    targets = torch.tensor([[-100, 3, -100, 6, -100]])
    expected = F.cross_entropy(head(hidden[0, [1, 3]]), torch.tensor([3, 6]))
    assert torch.allclose(next_token_loss(hidden, head, targets), expected)


def test_clip_loss_hand_computed() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(math.log(10.0))
    logits = 10 * img @ txt.t()  # [[10, 6], [0, 8]]
    row = [-math.log(math.exp(10) / (math.exp(10) + math.exp(6))), -math.log(math.exp(8) / (math.exp(0) + math.exp(8)))]
    col = [-math.log(math.exp(10) / (math.exp(10) + math.exp(0))), -math.log(math.exp(8) / (math.exp(6) + math.exp(8)))]
    expected = 0.5 * (sum(row) / 2 + sum(col) / 2)
    assert torch.allclose(logits, torch.tensor([[10.0, 6.0], [0.0, 8.0]]))
    assert math.isclose(float(clip_loss(img, txt, scale)), expected, rel_tol=1e-6)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(temperature=1.0, top_p=0.75)
    drawn = {int(sample_next(logits, cfg, g)) for _ in range(300)}
    assert drawn == {0, 1}
    assert int(sample_next(logits, GenerationConfig(), None)) == 0
