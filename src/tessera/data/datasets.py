"""Datasets that turn records into model-ready samples, skipping and counting bad ones.

- ImageCache: decodes each image file once into a small uint8 tensor (resized), keeps it.
- ConversationDataset: LLaVA-style conversations → token ids, labels, images (placeholders
  expanded to the model's exact visual-token count).
- CaptionPairs: one image with all its captions (contrastive pretraining picks one).
- text_samples: plain texts → BOS … EOS samples for language-model pretraining.

A sample that cannot be made (unreadable image, conversation that does not fit) is None,
and its reason is counted in `skips`; it never stops a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from tessera.data.collate import Sample
from tessera.data.images import ImageError, ImageTransform, load_image
from tessera.data.records import Caption, Conversation, SkipStats, Turn
from tessera.data.templates import ChatTemplate, TemplateError, encode_conversation
from tessera.text.tokenizer import Tokenizer


class ImageCache:
    """path → (3, H, W) uint8 tensor resized by `transform`; None (counted) when unreadable."""

    def __init__(self, transform: ImageTransform, skips: SkipStats) -> None:
        self.transform, self.skips = transform, skips
        self._cache: dict[Path, Tensor | None] = {}

    def get(self, path: Path) -> Tensor | None:
        if path not in self._cache:
            try:
                self._cache[path] = self.transform.to_uint8(load_image(path))
            except ImageError as err:
                self.skips.skip("unreadable image", str(err))
                self._cache[path] = None
        return self._cache[path]

    def normalize(self, pixels: Tensor) -> Tensor:
        return self.transform.normalize_uint8(pixels)


class ConversationDataset:
    def __init__(
        self,
        records: Sequence[Conversation],
        tokenizer: Tokenizer,
        template: ChatTemplate | str,
        images: ImageCache,
        num_image_tokens: Callable[[int, int], int],
        max_length: int,
    ) -> None:
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.images, self.num_image_tokens, self.max_length = images, num_image_tokens, max_length
        self.skips = images.skips
        self._encoded: dict[int, tuple[list[int], list[int]] | None] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        pixels = [self.images.get(p) for p in record.images]
        if any(p is None for p in pixels):
            return None
        if index not in self._encoded:
            counts = [self.num_image_tokens(p.shape[1], p.shape[2]) for p in pixels]
            try:
                enc = encode_conversation(self.tokenizer, self.template, record.turns, counts, self.max_length)
                self._encoded[index] = (enc.input_ids, enc.labels)
            except TemplateError as err:
                self.skips.skip("conversation does not fit the template", f"{record.id}: {err}")
                self._encoded[index] = None
        encoded = self._encoded[index]
        if encoded is None:
            return None
        return Sample(input_ids=encoded[0], labels=encoded[1], images=pixels)


def group_by_image(conversations: Sequence[Conversation], max_turns: int = 16, seed: int = 0) -> list[Conversation]:
    """Merge the conversations about one image into multi-turn conversations (LLaVA-1.5
    does this with VQA questions): the image's tokens are then computed once for many
    answers. The image placeholder stays in the first user turn only; turn order within an
    image is shuffled with `seed`. Conversations with several images or none pass through.
    A merged conversation holds at most `max_turns` turns, in whole question/answer pairs.

    A single question/answer conversation that repeats a pair already present for the image
    (ShapesWorld's chats reuse its VQA questions) is dropped: in one merged conversation the
    second copy's answer could be read off the first, teaching copying instead of looking.
    Multi-turn conversations are kept whole, since their later turns may refer to earlier ones.
    """
    import random

    if max_turns < 2:
        raise ValueError(f"max_turns must be ≥ 2 (one question and its answer), got {max_turns}")
    chunk_turns = max_turns - max_turns % 2  # an odd cut would start a chunk with an answer
    rng = random.Random(seed)
    by_image: dict[Path, list[Conversation]] = {}
    passthrough: list[Conversation] = []
    for conv in conversations:
        if len(conv.images) == 1:
            by_image.setdefault(conv.images[0], []).append(conv)
        else:
            passthrough.append(conv)
    merged: list[Conversation] = []
    for image, convs in by_image.items():
        convs = _without_repeated_pairs(convs)
        rng.shuffle(convs)
        turns: list[Turn] = []
        for conv in convs:
            for turn in conv.turns:
                if turn.role == "system":
                    continue
                text = turn.text.replace("<image>", "").lstrip("\n").strip() if turn.role == "user" else turn.text
                turns.append(Turn(turn.role, text))
        for start in range(0, len(turns), chunk_turns):
            chunk = turns[start : start + chunk_turns]
            chunk[0] = Turn("user", "<image>\n" + chunk[0].text)
            merged.append(Conversation(id=f"{convs[0].id}+{start}", images=(image,), turns=tuple(chunk)))
    return merged + passthrough


def _qa_pairs(conv: Conversation) -> list[tuple[str, str]]:
    texts = [t.text.replace("<image>", "").strip() for t in conv.turns if t.role != "system"]
    return list(zip(texts[::2], texts[1::2], strict=False))


def _without_repeated_pairs(convs: list[Conversation]) -> list[Conversation]:
    """`convs` (one image's) less the single-pair conversations whose pair occurs in another one."""
    seen = {pair for conv in convs if len(_qa_pairs(conv)) > 1 for pair in _qa_pairs(conv)}
    kept: list[Conversation] = []
    for conv in convs:
        pairs = _qa_pairs(conv)
        if len(pairs) == 1:
            if pairs[0] in seen:
                continue
            seen.add(pairs[0])
        kept.append(conv)
    return kept


@dataclass(frozen=True)
class CaptionPairs:
    """One image and every caption written for it."""

    image: Path
    captions: tuple[str, ...]


def group_captions(captions: Sequence[Caption]) -> list[CaptionPairs]:
    by_image: dict[Path, list[str]] = {}
    for c in captions:
        by_image.setdefault(c.image, []).append(c.caption)
    return [CaptionPairs(image, tuple(caps)) for image, caps in by_image.items()]


def text_sample(tokenizer: Tokenizer, text: str, max_length: int) -> Sample | None:
    """BOS text EOS, every token after BOS supervised; None for an empty text."""
    ids = tokenizer.encode(text)[: max_length - 2]
    if not ids:
        return None
    ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    return Sample(input_ids=ids, labels=[-100, *ids[1:]])
