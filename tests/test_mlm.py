"""Masked language modelling: the masking statistics (rate, 80/10/10 split, specials, whole
words), the head against Hugging Face's BertForMaskedLM, and the loss with soft targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.objectives.mlm import MLMHead, mask_tokens, mlm_logits, mlm_loss
from tessera.objectives.momentum import distillation_targets
from tessera.text.bert import BertConfig, BertModel

VOCAB = 1000
MASK_ID = 999
PAD_ID = 0


def corpus(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids in 5..998 with [CLS]=1 first, [SEP]=2 last and a ragged right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, MASK_ID, (rows, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
    pad = torch.arange(length)[None] >= lengths[:, None]
    ids[pad] = PAD_ID
    ids[:, 0] = 1
    ids[torch.arange(rows), lengths - 1] = 2
    special = pad | (ids == 1) | (ids == 2)
    return ids, special


def test_masking_rate_split_and_specials() -> None:
    ids, special = corpus(400, 64, seed=0)
    masked, labels = mask_tokens(ids, special, VOCAB, MASK_ID, generator=torch.Generator().manual_seed(1))
    selected = labels != -100
    maskable = ~special
    rate = selected.sum() / maskable.sum()
    assert abs(float(rate) - 0.15) < 0.01, rate  # about 19k maskable tokens: 4 sigma ≈ 0.01
    assert not bool((selected & special).any())
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    n = selected.sum()
    as_mask = (masked[selected] == MASK_ID).sum() / n
    as_random = ((masked[selected] != MASK_ID) & (masked[selected] != ids[selected])).sum() / n
    unchanged = (masked[selected] == ids[selected]).sum() / n
    # About 2,800 selected tokens: 4 sigma ≈ 0.03 for the 80% share, 0.023 for the 10% ones.
    assert abs(float(as_mask) - 0.8) < 0.03, as_mask
    assert abs(float(as_random) - 0.1) < 0.023, as_random
    assert abs(float(unchanged) - 0.1) < 0.023, unchanged


def test_masking_is_reproducible_from_the_generator() -> None:
    ids, special = corpus(8, 16, seed=2)
    a = mask_tokens(ids, special, VOCAB, MASK_ID, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, special, VOCAB, MASK_ID, generator=torch.Generator().manual_seed(5))
    c = mask_tokens(ids, special, VOCAB, MASK_ID, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_words_are_masked_together() -> None:
    rows, words = 300, 20
    gen = torch.Generator().manual_seed(3)
    word_ids = []
    for _ in range(rows):
        sizes = torch.randint(1, 4, (words,), generator=gen).tolist()  # 1-3 sub-tokens per word
        row = [-1] + [w for w, size in enumerate(sizes) for _ in range(size)] + [-1]  # [CLS] ... [SEP]
        word_ids.append(row + [-1] * (words * 3 + 2 - len(row)))
    word_ids_t = torch.tensor(word_ids)
    ids = torch.randint(5, MASK_ID, word_ids_t.shape, generator=gen)
    special = word_ids_t < 0
    ids[special] = PAD_ID
    _, labels = mask_tokens(ids, special, VOCAB, MASK_ID, generator=torch.Generator().manual_seed(4),
                            whole_word_ids=word_ids_t)
    selected = labels != -100
    assert not bool((selected & special).any())
    chosen_words, total_words = 0, 0
    for row in range(rows):
        for w in range(words):
            in_word = selected[row][word_ids_t[row] == w]
            assert bool(in_word.all()) or not bool(in_word.any()), (row, w, in_word)
            chosen_words += int(in_word.all())
            total_words += 1
    assert abs(chosen_words / total_words - 0.15) < 0.02  # 6,000 words: 4 sigma ≈ 0.018


def test_bad_masking_arguments_are_refused() -> None:
    ids, special = corpus(2, 8, seed=0)
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, special, VOCAB, MASK_ID, prob=0.0)
    with pytest.raises(ValueError, match="special_mask"):
        mask_tokens(ids, special[:, :4], VOCAB, MASK_ID)
    with pytest.raises(ValueError, match="whole_word_ids"):
        mask_tokens(ids, special, VOCAB, MASK_ID, whole_word_ids=torch.zeros(2, 4, dtype=torch.long))


def test_head_matches_hf_bert_for_masked_lm() -> None:
    transformers = pytest.importorskip("transformers")
    from test_bert import HF_TINY, TINY, padded_text, randomize_bert_
    from test_parity_hf import HF_TOLERANCE, assert_close, hf_eager

    hf = hf_eager(transformers.BertForMaskedLM, transformers.BertConfig(**HF_TINY, type_vocab_size=2))
    randomize_bert_(hf, seed=11)
    cfg = BertConfig(**TINY)
    encoder = BertModel(cfg).eval()
    head = MLMHead(cfg, encoder.embeddings.word_embeddings).eval()
    state = hf.state_dict()
    encoder.load_state_dict({k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}, strict=True)
    head.load_state_dict({k[len("cls."):]: v for k, v in state.items() if k.startswith("cls.")}, strict=True)
    assert head.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    assert head.predictions.bias is head.predictions.decoder.bias
    ids, mask = padded_text([12, 8], seed=12)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        logits = head(encoder(ids, attention_mask=mask))
    assert ref.std() > 0.5
    assert_close("bert mlm logits", logits, ref, HF_TOLERANCE)


def small_head() -> tuple[MLMHead, torch.Tensor, torch.Tensor]:
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    head = MLMHead(cfg, torch.nn.Embedding(50, 16))
    hidden = torch.randn(3, 7, 16)
    labels = torch.full((3, 7), -100)
    labels[0, 2], labels[1, 5], labels[2, 0], labels[2, 6] = 4, 9, 0, 49
    return head, hidden, labels


def test_loss_reads_only_masked_positions() -> None:
    head, hidden, labels = small_head()
    loss = mlm_loss(hidden, head, labels)
    keep = labels != -100
    expected = F.cross_entropy(head(hidden)[keep], labels[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    moved = hidden.clone()
    moved[~keep] += 3.0
    assert torch.allclose(mlm_loss(moved, head, labels), loss, atol=1e-6)
    assert mlm_logits(hidden, head, labels).shape == (4, 50)


def test_soft_targets_give_albef_momentum_distillation() -> None:
    head, hidden, labels = small_head()
    keep = labels != -100
    one_hot = F.one_hot(labels[keep], 50).float()
    assert torch.allclose(mlm_loss(hidden, head, labels, soft_targets=one_hot), mlm_loss(hidden, head, labels),
                          atol=1e-6)
    momentum_logits = torch.randn(4, 50)
    alpha = 0.4
    targets = distillation_targets(momentum_logits, one_hot, alpha)
    logits = head(hidden[keep])
    # ALBEF: (1 - α)·CE(labels) + α·mean(−Σ softmax(momentum) · log_softmax(logits)).
    kd = -(F.softmax(momentum_logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    expected = (1 - alpha) * F.cross_entropy(logits, labels[keep]) + alpha * kd
    assert torch.allclose(mlm_loss(hidden, head, labels, soft_targets=targets), expected, atol=1e-5)
    with pytest.raises(ValueError, match="soft_targets"):
        mlm_loss(hidden, head, labels, soft_targets=one_hot[:3])
