"""Tasks bind a stage's data to its objectives for the trainer (see trainer.Task).

- ContrastiveTask: image-caption pairs, CLIP's symmetric ITC loss, logit scale clamped.
- LanguageModelTask: plain texts, packed, next-token loss (decoder pretraining).
- ConversationTask: LLaVA-style conversations with images, padded or packed, loss on the
  assistant's answers only (both LLaVA stages).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tessera.data.collate import Batch, Sample, pack_collate, pad_collate
from tessera.data.datasets import CaptionPairs, ConversationDataset, ImageCache, text_sample
from tessera.data.records import SkipStats
from tessera.models.dual_encoder import DualEncoder
from tessera.objectives.contrastive import clip_loss
from tessera.objectives.lm import next_token_loss
from tessera.text.tokenizer import Tokenizer


def _check_objectives(objectives: dict[str, float], allowed: set[str], task: str) -> None:
    unknown = set(objectives) - allowed
    if unknown:
        raise ValueError(f"{task} has no objective {sorted(unknown)}; allowed: {sorted(allowed)}")


class ContrastiveTask:
    def __init__(
        self, pairs: Sequence[CaptionPairs], tokenizer: Tokenizer, images: ImageCache,
        max_text_length: int, objectives: dict[str, float] | None = None,
    ) -> None:
        _check_objectives(objectives or {"itc": 1.0}, {"itc"}, "ContrastiveTask")
        self.pairs, self.tokenizer, self.images = pairs, tokenizer, images
        self.max_text_length = max_text_length
        self.skips: SkipStats = images.skips

    @property
    def num_examples(self) -> int:
        return len(self.pairs)

    def encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded ids ending in EOS (B, L) and their mask."""
        rows = [self.tokenizer.encode(t)[: self.max_text_length - 1] + [self.tokenizer.eos_id] for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.tokenizer.pad_id

    def make_batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        pixels, texts = [], []
        # One caption per image, drawn from torch's RNG so a resumed run draws the same.
        choices = torch.randint(0, 1 << 30, (len(indices),)).tolist()
        for i, choice in zip(indices, choices, strict=True):
            pair = self.pairs[i]
            px = self.images.get(pair.image)
            if px is None:
                continue
            pixels.append(px)
            texts.append(pair.captions[choice % len(pair.captions)])
        if len(pixels) < 2:
            return None
        ids, mask = self.encode_texts(texts)
        return self.images.normalize(torch.stack(pixels)), ids, mask

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        assert isinstance(model, DualEncoder)
        images, ids, mask = batch
        img, txt = model.encode_image(images), model.encode_text(ids, mask)
        loss = clip_loss(img, txt, model.logit_scale)
        with torch.no_grad():
            acc = float(((img @ txt.t()).argmax(1) == torch.arange(len(img))).float().mean())
        return loss, {"i2t_acc": acc, "logit_scale": float(model.logit_scale.detach().exp())}

    def after_step(self, model: nn.Module) -> None:
        model.clamp_logit_scale()


class LanguageModelTask:
    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, max_length: int) -> None:
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.skips = SkipStats()

    @property
    def num_examples(self) -> int:
        return len(self.texts)

    def make_batch(self, indices: list[int]) -> Batch | None:
        samples = []
        for i in indices:
            s = text_sample(self.tokenizer, self.texts[i], self.max_length)
            if s is None:
                self.skips.skip("empty text", f"text {i}")
            samples.append(s)
        if all(s is None for s in samples):
            return None
        return pack_collate(samples, self.tokenizer.pad_id)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        hidden = model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)
        return next_token_loss(hidden, model.lm_head, batch.targets), {}

    def after_step(self, model: nn.Module) -> None:
        pass


class ConversationTask:
    def __init__(self, dataset: ConversationDataset, packing: bool, objectives: dict[str, float] | None = None) -> None:
        _check_objectives(objectives or {"lm": 1.0}, {"lm"}, "ConversationTask")
        self.dataset, self.packing = dataset, packing
        self.skips = dataset.skips
        self.pad_id = dataset.tokenizer.pad_id

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def collate(self, samples: Sequence[Sample | None]) -> Batch:
        batch = pack_collate(samples, self.pad_id) if self.packing else pad_collate(samples, self.pad_id)
        batch.images = [self.dataset.images.normalize(px) for px in batch.images]
        return batch

    def make_batch(self, indices: list[int]) -> Batch | None:
        samples = [self.dataset[i] for i in indices]
        if all(s is None for s in samples):
            return None
        return self.collate(samples)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        hidden = model(
            batch.input_ids, batch.images, position_ids=batch.position_ids,
            cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask,
        )
        return next_token_loss(hidden, model.language_model.lm_head, batch.targets), {}

    def after_step(self, model: nn.Module) -> None:
        pass
