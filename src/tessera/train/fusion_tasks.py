"""The shared pretraining side of the fusion models (ALBEF, BLIP, ViLT, VLMo): one batch type,
one trainer Task, the caption encoding and the ShapesWorld tokenizer they all use.

The fusion-model contract (each model implements it, this module calls it):

    model.pretrain_losses(batch: ImageTextBatch, objectives: dict[str, float], step: int)
        -> dict[str, Tensor]     unweighted scalar losses, one per objective name asked for
                                 ("itc", "itm", "mlm", "lm", "mim", ...); other entries the model
                                 adds (e.g. "itm_acc") are logged, not added to the loss
    model.after_step() -> None   optional: momentum EMA, temperature clamp, queue bookkeeping

`ImageTextTask` turns caption records into `ImageTextBatch`es, asks the model for the losses of
the stage's objectives, returns Σ weight · loss, logs each loss, and calls `model.after_step()`
after every optimizer step. `step` counts optimizer steps of the stage (resumed runs continue
the count: the trainer calls `start_at`).

Batch modalities (`ImageTextTask(modality=...)`), for recipes with unimodal stages (VLMo:
stage 1 on images only, stage 2 on text only):
    "image_text"  one row per caption record: its image and "<s> caption </s>";
    "image"       one row per distinct image: images set, input_ids / attention_mask None;
    "text"        one row per caption record: images == [], input_ids set.
`image_ids` always has one entry per row: the row's image (for "text", the image the caption
was written for), as a dataset-wide index, so rows with equal ids describe the same image
and must not be treated as negatives of each other by ITC / ITM.

Texts are encoded as BOS + tokens + EOS ("<s> caption </s>"; <s> plays [CLS] and </s> [SEP]),
truncated to `max_length` (the caption is cut, the EOS kept) and right-padded with <pad> to the
longest row of the batch, or to `max_length` with `pad_to_max_length=True`.

Bad samples are skipped and counted: unreadable images (by the ImageCache) and captions that
tokenise to nothing. A batch left with fewer than `min_rows` rows (2 by default: contrastive
losses need a negative) is dropped and the trainer counts it.

Shapes: B rows, L tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import load_meta, read_coco_captions, read_vqa, shapes_split_paths
from tessera.data.records import Caption, SkipStats
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.stage import StageConfig

Modality = Literal["image_text", "image", "text"]
MODALITIES: tuple[str, ...] = ("image_text", "image", "text")

# The special tokens every fusion preset's tokenizer carries, after the fixed ones: BERT's
# [MASK] for MLM and BLIP's [ENC] / [DEC] first tokens. One set for all presets keeps their
# tokenizers interchangeable.
MASK_TOKEN = "<mask>"
ENC_TOKEN = "<enc>"
DEC_TOKEN = "<dec>"
FUSION_SPECIAL_TOKENS: tuple[str, ...] = (MASK_TOKEN, ENC_TOKEN, DEC_TOKEN)


@dataclass
class ImageTextBatch:
    """One batch of the fusion-model contract (see the module docstring).

    images:          B normalised float (3, H, W) tensors, row order; [] when text-only
    input_ids:       (B, L) long "<s> caption </s>" + <pad>; None when image-only
    attention_mask:  (B, L) bool, True at real tokens; None when image-only
    image_ids:       (B,) long, equal for rows sharing an image
    """

    images: list[Tensor]
    input_ids: Tensor | None
    attention_mask: Tensor | None
    image_ids: Tensor

    def __post_init__(self) -> None:
        rows = self.image_ids.shape[0]
        if self.image_ids.ndim != 1:
            raise ValueError(f"image_ids must be (B,), got {tuple(self.image_ids.shape)}")
        if not self.images and self.input_ids is None:
            raise ValueError("an ImageTextBatch needs images, texts or both")
        if self.images and len(self.images) != rows:
            raise ValueError(f"{len(self.images)} images for {rows} image_ids")
        if (self.input_ids is None) != (self.attention_mask is None):
            raise ValueError("input_ids and attention_mask go together")
        if self.input_ids is not None:
            assert self.attention_mask is not None
            if self.input_ids.ndim != 2 or self.input_ids.shape[0] != rows:
                raise ValueError(f"input_ids {tuple(self.input_ids.shape)} must be ({rows}, L)")
            if self.attention_mask.shape != self.input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(self.attention_mask.shape)} differs from input_ids "
                    f"{tuple(self.input_ids.shape)}"
                )

    @property
    def size(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    @property
    def has_text(self) -> bool:
        return self.input_ids is not None

    def same_image(self) -> Tensor:
        """(B, B) bool: rows i and j show the same image (the diagonal included)."""
        return self.image_ids[:, None] == self.image_ids[None, :]

    def to(self, device: torch.device | str) -> ImageTextBatch:
        return ImageTextBatch(
            images=[img.to(device) for img in self.images],
            input_ids=None if self.input_ids is None else self.input_ids.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            image_ids=self.image_ids.to(device),
        )


def caption_token_rows(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> list[list[int] | None]:
    """Each text as [BOS, tokens…, EOS], the tokens cut to fit `max_length`; None for a text
    that is blank or tokenises to nothing."""
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 (<s>, one token, </s>), got {max_length}")
    rows: list[list[int] | None] = []
    for text in texts:
        ids = tokenizer.encode(text)[: max_length - 2] if text.strip() else []
        rows.append([tokenizer.bos_id, *ids, tokenizer.eos_id] if ids else None)
    return rows


def pad_token_rows(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad token rows to `length` (default: the longest) → ids (B, L) long, mask (B, L) bool."""
    if not rows:
        raise ValueError("no token rows to pad")
    longest = max(len(r) for r in rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"a row of {longest} tokens does not fit length {length}")
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def encode_captions(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int, pad_to_max_length: bool = False
) -> tuple[Tensor, Tensor]:
    """"<s> text </s>" rows padded → (input_ids (B, L), attention_mask (B, L) bool). Raises on a
    text that tokenises to nothing (datasets skip those before; see caption_token_rows)."""
    rows = caption_token_rows(tokenizer, texts, max_length)
    empty = [texts[i] for i, r in enumerate(rows) if r is None]
    if empty:
        raise ValueError(f"texts are blank or tokenise to nothing: {empty[:5]}")
    return pad_token_rows([r for r in rows if r is not None], tokenizer.pad_id,
                          max_length if pad_to_max_length else None)


class ImageTextTask:
    """Trainer Task of fusion-model pretraining over caption records (see the module docstring).

    `captions` are COCO-style records (one per caption; `read_coco_captions`). `images` caches
    and normalises the pictures; it is not touched for modality "text" (pass any ImageCache).
    """

    def __init__(
        self,
        captions: Sequence[Caption],
        tokenizer: Tokenizer,
        images: ImageCache,
        max_length: int,
        objectives: dict[str, float],
        *,
        modality: Modality = "image_text",
        pad_to_max_length: bool = False,
        min_rows: int = 2,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
        if not objectives or any(w <= 0 for w in objectives.values()):
            raise ValueError(f"objectives need at least one entry, each with a positive weight: {objectives}")
        if min_rows < 1:
            raise ValueError(f"min_rows must be at least 1, got {min_rows}")
        self.tokenizer, self.images, self.max_length = tokenizer, images, max_length
        self.objectives = dict(objectives)
        self.modality: Modality = modality
        self.pad_to_max_length, self.min_rows = pad_to_max_length, min_rows
        self.skips: SkipStats = images.skips
        self.step = 0
        image_index: dict[Path, int] = {}
        for c in captions:
            image_index.setdefault(c.image, len(image_index))
        self.image_paths: list[Path] = list(image_index)
        if modality == "image":
            self.rows: list[tuple[int, str | None]] = [(i, None) for i in range(len(self.image_paths))]
        else:
            self.rows = [(image_index[c.image], c.caption) for c in captions]
        if not self.rows:
            raise ValueError("ImageTextTask got no caption records")
        self._tokens: dict[int, list[int] | None] = {}

    @classmethod
    def from_coco(
        cls, captions_file: str | Path, image_root: str | Path, tokenizer: Tokenizer, transform: ImageTransform,
        max_length: int, objectives: dict[str, float], **kwargs: object,
    ) -> ImageTextTask:
        """Read a COCO captions file (its reader's skips are counted in the task's) and build the task."""
        captions, skips = read_coco_captions(captions_file, image_root)
        task = cls(captions, tokenizer, ImageCache(transform, skips), max_length, objectives, **kwargs)  # type: ignore[arg-type]
        return task

    @property
    def num_examples(self) -> int:
        return len(self.rows)

    def _token_row(self, index: int, text: str) -> list[int] | None:
        if index not in self._tokens:
            row = caption_token_rows(self.tokenizer, [text], self.max_length)[0]
            if row is None:
                self.skips.skip("caption is blank or tokenises to nothing", f"caption row {index}: {text!r}")
            self._tokens[index] = row
        return self._tokens[index]

    def make_batch(self, indices: list[int]) -> ImageTextBatch | None:
        pixels: list[Tensor] = []
        token_rows: list[list[int]] = []
        image_ids: list[int] = []
        for index in indices:
            image, text = self.rows[index]
            row: list[int] | None = None
            if self.modality != "image":
                assert text is not None
                row = self._token_row(index, text)
                if row is None:
                    continue
            if self.modality != "text":
                px = self.images.get(self.image_paths[image])
                if px is None:
                    continue
                pixels.append(px)
            if row is not None:
                token_rows.append(row)
            image_ids.append(image)
        if len(image_ids) < self.min_rows:
            return None
        images = list(self.images.normalize(torch.stack(pixels)).unbind(0)) if pixels else []
        input_ids = attention_mask = None
        if token_rows:
            length = self.max_length if self.pad_to_max_length else None
            input_ids, attention_mask = pad_token_rows(token_rows, self.tokenizer.pad_id, length)
        return ImageTextBatch(images, input_ids, attention_mask, torch.tensor(image_ids, dtype=torch.long))

    def loss(self, model: nn.Module, batch: ImageTextBatch) -> tuple[Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        losses = model.pretrain_losses(batch.to(device), self.objectives, self.step)
        missing = [name for name in self.objectives if name not in losses]
        if missing:
            raise ValueError(
                f"{type(model).__name__}.pretrain_losses gave no {missing} (asked for {list(self.objectives)}, "
                f"got {list(losses)})"
            )
        total = sum(weight * losses[name] for name, weight in self.objectives.items())
        assert isinstance(total, Tensor)
        logs = {name: float(value.detach()) if isinstance(value, Tensor) else float(value)
                for name, value in losses.items()}
        return total, logs

    def start_at(self, step: int) -> None:
        """Called by the trainer when a stage starts (0) or resumes (its saved step)."""
        self.step = step

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        after_step = getattr(model, "after_step", None)
        if callable(after_step):
            after_step()


# --- ShapesWorld -----------------------------------------------------------------------------------


def fusion_corpus_texts(data_dir: str | Path) -> list[str]:
    """Texts of the train split that the fusion presets' tokenizer is trained on: captions, VQA
    questions and answers, reasoning sentences and entailment hypotheses (when those task files
    exist), so every downstream text tokenises into known merges."""
    from tessera.data.shapes_tasks import classic_task_paths
    from tessera.data.task_readers import read_entailment, read_reasoning

    data_dir = Path(data_dir)
    paths = shapes_split_paths(data_dir, "train")
    captions, _ = read_coco_captions(paths["captions"], data_dir)
    texts = [c.caption for c in captions]
    vqa, _ = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], data_dir)
    texts += [f"{item.question} {' '.join(sorted(set(item.answers)))}" for item in vqa]
    tasks = classic_task_paths(data_dir, "train")
    if tasks["reasoning"].is_file():
        texts += [item.sentence for item in read_reasoning(tasks["reasoning"], data_dir)[0]]
    if tasks["entailment"].is_file():
        texts += [item.hypothesis for item in read_entailment(tasks["entailment"], data_dir)[0]]
    return texts


def train_fusion_tokenizer(
    data_dir: str | Path, vocab_size: int = 1024, extra_special_tokens: Iterable[str] = FUSION_SPECIAL_TOKENS
) -> Tokenizer:
    """Byte-level BPE on `fusion_corpus_texts`, with <mask>, <enc>, <dec> after the fixed tokens."""
    return train_bpe(fusion_corpus_texts(data_dir), vocab_size=vocab_size,
                     extra_special_tokens=tuple(extra_special_tokens))


ImageStats = Literal["clip", "dataset"]


def shapes_image_stats(data_dir: str | Path, image_size: int | None = None, *, split: str = "train",
                       max_images: int = 1000) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and standard deviation, in [0, 1] units, of the pixels of a ShapesWorld
    split's first `max_images` captioned images (in caption-file order, resized as the models
    see them). Unreadable images are left out; none readable raises."""
    data_dir = Path(data_dir)
    if max_images < 1:
        raise ValueError(f"max_images must be positive, got {max_images}")
    captions, _ = read_coco_captions(shapes_split_paths(data_dir, split)["captions"], data_dir)
    paths = list(dict.fromkeys(c.image for c in captions))[:max_images]
    cache = ImageCache(shapes_transform(data_dir, image_size), SkipStats())
    pixels = [px for px in (cache.get(p) for p in paths) if px is not None]
    if not pixels:
        raise ValueError(f"{data_dir}/{split}: no readable image to take pixel statistics from")
    x = torch.stack(pixels).to(torch.float64) / 255.0
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)  # type: ignore[return-value]


def shapes_transform(data_dir: str | Path, image_size: int | None = None, stats: ImageStats = "clip") -> ImageTransform:
    """The ImageTransform for a ShapesWorld folder: square `image_size`, or the dataset's own size.

    `stats` picks the normalisation: "clip" (CLIP's mean / std, the default) or "dataset" (the
    train split's own, `shapes_image_stats`). Under CLIP's statistics ShapesWorld's light-grey
    background, most of every picture, becomes a large constant (≈ +1.7 in each channel), and a
    linear patch embedding trained by Adam amplifies that constant until it drowns the shapes:
    ViLT's ITM and MLM then never learned to read the image (issue 3; zoo ITM loss 0.638 → 0.258
    with the dataset's statistics, which centre the background near 0; BLIP's captions and
    retrieval gained too, VLMo's did not).
    """
    if image_size is None:
        config = load_meta(data_dir)["config"]
        height = int(config.get("image_size", 64))
        width = round(height * float(config.get("aspect_ratio", 1.0)))
        size = (height, width)
    else:
        size = (image_size, image_size)
    if stats == "clip":
        return ImageTransform(size=size)
    if stats != "dataset":
        raise ValueError(f"stats must be 'clip' or 'dataset', got {stats!r}")
    mean, std = shapes_image_stats(data_dir, image_size)
    return ImageTransform(size=size, mean=mean, std=std)


def shapes_pretrain_task(
    data_dir: str | Path,
    tokenizer: Tokenizer,
    stage: StageConfig,
    *,
    image_size: int | None = None,
    modality: Modality = "image_text",
    split: str = "train",
    images: ImageCache | None = None,
) -> ImageTextTask:
    """`ImageTextTask` over a ShapesWorld split's captions, with the stage's objectives and
    max_length. Pass `images` to share one ImageCache (decoded pictures) between stages."""
    data_dir = Path(data_dir)
    captions, skips = read_coco_captions(shapes_split_paths(data_dir, split)["captions"], data_dir)
    if images is None:
        images = ImageCache(shapes_transform(data_dir, image_size), skips)
    else:
        images.skips.merge(skips)
    return ImageTextTask(captions, tokenizer, images, stage.max_length, dict(stage.objectives), modality=modality)
