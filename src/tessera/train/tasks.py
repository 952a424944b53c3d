"""Tasks bind a stage's data to its objectives for the trainer (see trainer.Task).

- ContrastiveTask: image-caption pairs, CLIP's symmetric ITC loss (logit scale clamped) or
  SigLIP's pairwise sigmoid loss, on one process or over the global batch of all ranks.
- LanguageModelTask: plain texts, packed, next-token loss (decoder pretraining).
- ConversationTask: LLaVA-style conversations with images, padded or packed, loss on the
  assistant's answers only (both LLaVA stages).
- ReadingTask: images of rendered text and their texts, for a SlotReader (an encoder's
  reading pretraining, Vary-tiny's "read" stage).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tessera.data.collate import Batch, Sample, pack_collate, pad_collate
from tessera.data.datasets import CaptionPairs, ConversationDataset, ImageCache, text_sample
from tessera.data.readers import load_meta, position_phrase, region_phrase
from tessera.data.records import RegionPhrase, SkipStats
from tessera.data.templates import IGNORE_INDEX
from tessera.models.dual_encoder import DualEncoder, SigLIPDualEncoder
from tessera.models.slot_reader import READING_OBJECTIVE, SlotReader, weighted_total
from tessera.objectives.contrastive import clip_loss, region_phrase_loss, siglip_loss
from tessera.objectives.distributed import world_size_and_rank
from tessera.objectives.lm import next_token_loss
from tessera.text.tokenizer import Tokenizer
from tessera.text.word_swaps import CountPhrases, WordSwapper


def _check_objectives(objectives: dict[str, float], allowed: set[str], task: str) -> None:
    unknown = set(objectives) - allowed
    if unknown:
        raise ValueError(f"{task} has no objective {sorted(unknown)}; allowed: {sorted(allowed)}")


# ContrastiveTask's losses: CLIP's softmax ITC or SigLIP's pairwise sigmoid, plus optionally
# (with itc) the region-phrase ITC of object boxes ("region": each box's pooled patch tokens;
# "region_patches": every patch a box owns on its own; "region_category": every such patch
# against the category phrases alone, "a circle."; "region_position": every such patch against
# its box's place in a 3x3 grid, "at the top left.").
REGION_OBJECTIVES: tuple[str, ...] = ("region", "region_patches", "region_category", "region_position")
# The objectives that score each patch a box owns against one label of the box (its category, its
# place) among the distinct labels of the batch, each label written as a short phrase.
PATCH_LABEL_OBJECTIVES: tuple[str, ...] = ("region_category", "region_position")
# Each image among the count phrases "there is 1 shape." … (CountCLIP; ContrastiveTask's docstring).
COUNT_OBJECTIVE = "count"
CONTRASTIVE_OBJECTIVES: tuple[str, ...] = ("itc", "sigmoid", *REGION_OBJECTIVES, COUNT_OBJECTIVE)


def count_phrases_for(data_dir: str | Path, objectives: Mapping[str, float]) -> CountPhrases | None:
    """What the count objective reads a ShapesWorld folder's captions with (its meta.json gives the
    largest count), when `objectives` train it; else None."""
    return CountPhrases.for_shapesworld(load_meta(data_dir)) if COUNT_OBJECTIVE in objectives else None


@dataclass
class ContrastiveBatch:
    """Images (B, 3, H, W), their captions' ids and mask (B, L); optionally hard-negative
    captions (M, L') for the image→text side."""

    pixels: Tensor
    ids: Tensor
    mask: Tensor
    negative_ids: Tensor | None = None
    negative_mask: Tensor | None = None
    # Region phrases: box (M, 4) in pixels of `pixels`, its image in the batch (M,), the distinct phrases'
    # ids and mask (U, L'') and each box's phrase index (M,).
    region_boxes: Tensor | None = None
    region_image_index: Tensor | None = None
    phrase_ids: Tensor | None = None
    phrase_mask: Tensor | None = None
    region_targets: Tensor | None = None
    # PATCH_LABEL_OBJECTIVES: objective → its distinct label phrases and each box's label.
    patch_labels: dict[str, PatchLabels] = field(default_factory=dict)
    # The count objective: each image's count − 1 (B,), IGNORE_INDEX where no caption states one,
    # and the count phrases' ids and mask (C, Lc).
    count_targets: Tensor | None = None
    count_ids: Tensor | None = None
    count_mask: Tensor | None = None


@dataclass
class PatchLabels:
    """The distinct label phrases' ids and mask (V, L'') and each box's label index (M,)."""

    ids: Tensor
    mask: Tensor
    targets: Tensor


@dataclass(frozen=True)
class GrayscaleViews:
    """Show an image in grayscale with probability `probability`, its caption and region phrases
    stripped of the words of `groups` (colours): the view tells shape apart from colour without
    ever showing a colour-shape pair the data lacks, so shape features cannot lean on colour."""

    probability: float
    words: WordSwapper
    groups: tuple[str, ...] = ("color",)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"grayscale probability must lie in [0, 1], got {self.probability}")


def to_grayscale(pixels: Tensor) -> Tensor:
    """(3, H, W) uint8 RGB → the same shape, every channel the ITU-R 601 luma."""
    luma = (0.299 * pixels[0].float() + 0.587 * pixels[1].float() + 0.114 * pixels[2].float()).round()
    return luma.clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()


class ContrastiveTask:
    """Image-caption pairs (one caption drawn per image and step) for a dual encoder.

    `objectives` names the one loss and its weight: {"itc": w} (CLIP) or {"sigmoid": w}
    (SigLIP; the model needs a `logit_bias`). None takes the model's own loss: sigmoid for a
    SigLIPDualEncoder, itc otherwise. `distributed` makes the loss cover the global batch of
    all ranks (features gathered with gradients, see objectives.contrastive); None (default):
    whenever a process group of more than one rank runs (the data-parallel Trainer). SigLIP's text
    tower pools the LAST position, so its texts must all have one length: `pad_to_max_length`
    pads every text to `max_text_length`, as SigLIP pads to its 64 tokens. `hard_negatives`
    adds, for each drawn caption, that caption with one attribute word swapped as an
    extra image→text negative (NegCLIP; see text/word_swaps.py): on ShapesWorld the in-batch
    negatives differ in their colours almost always, and without such captions the ViT learns
    colour but hardly shape. `grayscale` shows some images without colour (GrayscaleViews).
    {"count": w} beside either loss adds the count objective of CountCLIP (Paiss et al. 2023,
    "Teaching CLIP to Count to Ten"): each image whose captions state a count (`counts` reads
    them) is classified among the count phrases "there is 1 shape." … "there are 6 shapes." by
    scaled cosine, cross-entropy, local to each process. CountCLIP contrasts the true caption
    with one whose number is swapped; ShapesWorld's count captions also list every object, so
    a swapped number would contradict the list, which the text tower could spot without the
    image. The phrases alone carry nothing but the count, and all of them are candidates. In the
    ITC batch the listing already tells images apart, so without this the dual encoders never
    learn to count (zero-shot count stayed at its constant baseline).
    {"region": w} beside "itc" adds the region-phrase loss over `regions` (image file → its
    objects' boxes and phrases, `read_coco_regions`): object boxes
    pooled from the patch tokens against phrases like "a large red circle.", the local signal
    that makes the patch tokens (what LLaVA's connector reads) encode shape. {"region_patches": w}
    scores every patch a box owns against the phrases on its own: pooled boxes leave single
    patches weak on shape (linear shape probe of one patch 0.52 vs 0.78 for the box mean), and
    LLaVA's language model reads single patches. {"region_category": w} scores the same patches
    against the category alone ("a circle."), one phrase shared by every colour: the full phrases
    let the ViT learn colour-shape conjunctions, which fail on combinations never seen.
    {"region_position": w} scores them against their box's place ("at the top left.", a 3x3
    grid over the image): the other objectives pool or equate a box's patches and wash out
    where the box is, which spatial questions ("is the red circle left of the cross?") need.
    """

    def __init__(
        self, pairs: Sequence[CaptionPairs], tokenizer: Tokenizer, images: ImageCache,
        max_text_length: int, objectives: dict[str, float] | None = None, *,
        distributed: bool | None = None, pad_to_max_length: bool = False, hard_negatives: WordSwapper | None = None,
        regions: Mapping[Path, Sequence[RegionPhrase]] | None = None, grayscale: GrayscaleViews | None = None,
        counts: CountPhrases | None = None,
    ) -> None:
        if objectives is not None:
            _check_objectives(objectives, set(CONTRASTIVE_OBJECTIVES), "ContrastiveTask")
            main = set(objectives) - set(REGION_OBJECTIVES) - {COUNT_OBJECTIVE}
            if len(main) != 1:
                raise ValueError(f"ContrastiveTask trains one loss, 'itc' or 'sigmoid' (plus {list(REGION_OBJECTIVES)} "
                                 f"with itc, {COUNT_OBJECTIVE!r} with either); got {sorted(objectives)}")
            asked = sorted(set(objectives) & set(REGION_OBJECTIVES))
            if asked and main != {"itc"}:
                raise ValueError(f"the region objectives {asked} go with itc, not sigmoid")
            if asked and regions is None:
                raise ValueError(f"the region objectives {asked} need `regions` (image file → boxes and phrases)")
            if COUNT_OBJECTIVE in objectives and counts is None:
                raise ValueError("the count objective needs `counts` (CountPhrases: what a caption's count clause says)")
        uses_regions = objectives is not None and bool(set(objectives) & set(REGION_OBJECTIVES))
        self.regions = regions if uses_regions else None
        self.objectives = objectives
        self.hard_negatives = hard_negatives
        self.grayscale = grayscale
        self.counts = counts if objectives is not None and COUNT_OBJECTIVE in objectives else None
        self.distributed, self.pad_to_max_length = distributed, pad_to_max_length
        self.pairs, self.tokenizer, self.images = pairs, tokenizer, images
        self.max_text_length = max_text_length
        if self.counts is not None:  # fixed per image and for the run: read and tokenised once
            stated = [next((n for n in map(self.counts.count, p.captions) if n is not None), None) for p in pairs]
            self._count_targets = [IGNORE_INDEX if n is None else n - 1 for n in stated]
            self._count_phrases = self.encode_texts(self.counts.phrases())
        self.skips: SkipStats = images.skips

    @property
    def num_examples(self) -> int:
        return len(self.pairs)

    def token_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, truncated to max_text_length with the EOS kept last."""
        return [self.tokenizer.encode(t)[: self.max_text_length - 1] + [self.tokenizer.eos_id] for t in texts]

    def encode_texts(self, texts: Sequence[str] | None = None, rows: list[list[int]] | None = None) -> tuple[Tensor, Tensor]:
        """Right-padded ids ending in EOS (B, L) and their mask, from texts or `token_rows`."""
        rows = self.token_rows(texts or []) if rows is None else rows
        length = self.max_text_length if self.pad_to_max_length else max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.tokenizer.pad_id

    def make_batch(self, indices: list[int]) -> ContrastiveBatch | None:
        pixels, texts, negatives, gray = [], [], [], []
        kept: list[int] = []  # the pairs whose image could be read
        # One caption per image, drawn from torch's RNG so a resumed run draws the same.
        choices = torch.randint(0, 1 << 30, (len(indices),)).tolist()
        gray_draws = torch.rand(len(indices)).tolist() if self.grayscale is not None else [1.0] * len(indices)
        for i, choice, draw in zip(indices, choices, gray_draws, strict=True):
            pair = self.pairs[i]
            px = self.images.get(pair.image)
            if px is None:
                continue
            text = pair.captions[choice % len(pair.captions)]
            is_gray = self.grayscale is not None and draw < self.grayscale.probability
            if is_gray:
                assert self.grayscale is not None
                px, text = to_grayscale(px), self.grayscale.words.drop(text, self.grayscale.groups)
            pixels.append(px)
            kept.append(i)
            gray.append(is_gray)
            texts.append(text)
            if self.hard_negatives is not None:
                negatives.append(self.hard_negatives.swap(text, random.Random(choice)))
        if len(pixels) < 2:
            return None
        rows = self.token_rows(texts)
        ids, mask = self.encode_texts(rows=rows)
        batch = ContrastiveBatch(self.images.normalize(torch.stack(pixels)), ids, mask)
        if self.regions is not None:
            self._add_regions(batch, [self.pairs[i].image for i in kept], gray)
        if self.counts is not None:
            batch.count_targets = torch.tensor([self._count_targets[i] for i in kept])
            batch.count_ids, batch.count_mask = self._count_phrases
        if self.hard_negatives is None:
            return batch
        # A swap past the truncation point would leave the positive itself as a "negative".
        swapped = [(row, text) for row, text in zip(rows, negatives, strict=True) if text is not None]
        negative_rows = [negative for (row, _), negative in zip(swapped, self.token_rows([t for _, t in swapped]),
                                                                strict=True) if negative != row]
        if negative_rows:
            batch.negative_ids, batch.negative_mask = self.encode_texts(rows=negative_rows)
        return batch

    def _add_regions(self, batch: ContrastiveBatch, images: Sequence[Path], gray: Sequence[bool]) -> None:
        assert self.regions is not None
        boxes, owners, phrases, categories = [], [], [], []
        for k, (image, is_gray) in enumerate(zip(images, gray, strict=True)):
            for region in self.regions.get(image, ()):
                boxes.append(region.box)
                owners.append(k)
                if is_gray:
                    assert self.grayscale is not None
                    phrases.append(self.grayscale.words.drop(region.phrase, self.grayscale.groups))
                else:
                    phrases.append(region.phrase)
                categories.append(region.category)
        if not boxes:
            return
        distinct = sorted(set(phrases))
        height, width = batch.pixels.shape[-2:]
        batch.region_boxes = torch.tensor(boxes, dtype=torch.float32) * torch.tensor([width, height, width, height])
        batch.region_image_index = torch.tensor(owners)
        batch.phrase_ids, batch.phrase_mask = self.encode_texts(distinct)
        batch.region_targets = torch.tensor([distinct.index(p) for p in phrases])
        labels: dict[str, list[str]] = {}
        if self.objectives is not None and "region_category" in self.objectives:
            if not all(categories):
                raise ValueError("the region_category objective needs each region's category "
                                 "(RegionPhrase.category, filled by read_coco_regions)")
            labels["region_category"] = [region_phrase(c) for c in categories]
        if self.objectives is not None and "region_position" in self.objectives:
            labels["region_position"] = [position_phrase(box) for box in boxes]
        for objective, per_box in labels.items():
            kinds = sorted(set(per_box))
            ids, mask = self.encode_texts(kinds)
            batch.patch_labels[objective] = PatchLabels(ids, mask, torch.tensor([kinds.index(k) for k in per_box]))

    def objective(self, model: nn.Module) -> tuple[str, float]:
        """(loss name, weight) this task trains `model` with."""
        if self.objectives is None:
            return ("sigmoid" if isinstance(model, SigLIPDualEncoder) else "itc"), 1.0
        ((name, weight),) = ((n, w) for n, w in self.objectives.items()
                             if n not in REGION_OBJECTIVES and n != COUNT_OBJECTIVE)
        return name, weight

    def loss(self, model: nn.Module, batch: ContrastiveBatch) -> tuple[Tensor, dict[str, float]]:
        if not isinstance(model, DualEncoder | SigLIPDualEncoder):
            raise TypeError(f"ContrastiveTask trains a dual encoder, not a {type(model).__name__}")
        name, weight = self.objective(model)
        extra_losses: dict[str, Tensor] = {}
        if self.regions is not None and batch.region_boxes is not None:
            if not isinstance(model, DualEncoder):
                raise TypeError(f"the region objectives need a CLIP-style DualEncoder, not {type(model).__name__}")
            assert self.objectives is not None and batch.region_targets is not None
            per_patch = bool({"region_patches", *PATCH_LABEL_OBJECTIVES} & set(self.objectives))
            enc = model.encode_image_and_regions(batch.pixels, batch.region_image_index, batch.region_boxes,
                                                 per_patch=per_patch)
            img = enc.images
            phrases = model.encode_text(batch.phrase_ids, batch.phrase_mask)
            if "region" in self.objectives:
                extra_losses["region"] = region_phrase_loss(enc.boxes, phrases, batch.region_targets, model.logit_scale)
            if enc.patches is not None and enc.patch_box is not None and len(enc.patch_box):
                if "region_patches" in self.objectives:
                    extra_losses["region_patches"] = region_phrase_loss(
                        enc.patches, phrases, batch.region_targets[enc.patch_box], model.logit_scale)
                for objective, labels in batch.patch_labels.items():
                    kinds = model.encode_text(labels.ids, labels.mask)
                    extra_losses[objective] = region_phrase_loss(
                        enc.patches, kinds, labels.targets[enc.patch_box], model.logit_scale)
        else:
            img = model.encode_image(batch.pixels)
        txt = model.encode_text(batch.ids, batch.mask)
        logs = {"logit_scale": float(model.logit_scale.detach().exp())}
        negatives = None
        # By default the loss covers the global batch whenever the Trainer runs data parallel.
        distributed = self.distributed if self.distributed is not None else world_size_and_rank()[0] > 1
        if self.hard_negatives is not None:
            # Every rank encodes (possibly zero) negatives, so the gather in the loss matches.
            negatives = (model.encode_text(batch.negative_ids, batch.negative_mask)
                         if batch.negative_ids is not None else txt[:0])
        if name == "sigmoid":
            bias = getattr(model, "logit_bias", None)
            if bias is None:
                raise ValueError(f"the sigmoid objective needs a model with a logit_bias; {type(model).__name__} has none")
            loss = siglip_loss(img, txt, model.logit_scale, bias, hard_negative_texts=negatives,
                               distributed=distributed)
            logs["logit_bias"] = float(bias.detach())
        else:
            loss = clip_loss(img, txt, model.logit_scale, hard_negative_texts=negatives,
                             distributed=distributed)
        with torch.no_grad():
            logs["i2t_acc"] = float(((img @ txt.t()).argmax(1) == torch.arange(len(img), device=img.device)).float().mean())
        if batch.count_targets is not None and batch.count_ids is not None:
            stated = batch.count_targets != IGNORE_INDEX
            if bool(stated.any()):
                phrases = model.encode_text(batch.count_ids, batch.count_mask)
                extra_losses[COUNT_OBJECTIVE] = region_phrase_loss(img[stated], phrases, batch.count_targets[stated],
                                                                    model.logit_scale)
        if not extra_losses:
            return weight * loss, logs
        assert self.objectives is not None
        logs[name] = float(loss.detach())
        total = weight * loss
        for objective, value in extra_losses.items():
            logs[objective] = float(value.detach())
            total = total + self.objectives[objective] * value
        return total, logs

    def after_step(self, model: nn.Module) -> None:
        clamp = getattr(model, "clamp_logit_scale", None)  # CLIP clamps its scale; SigLIP does not
        if clamp is not None:
            clamp()


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
        # The last decoder layer runs only for the supervised positions (the answers): the
        # loss reads nothing else, and prompts and image tokens are most of every sequence.
        hidden = model(
            batch.input_ids, batch.images, position_ids=batch.position_ids,
            cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask,
            keep=batch.targets != IGNORE_INDEX,
        )
        return next_token_loss(hidden, model.language_model.lm_head, batch.targets), {}

    def after_step(self, model: nn.Module) -> None:
        pass


@dataclass
class ReadingBatch:
    pixels: Tensor  # (N, 3, H, W) normalised
    texts: list[str]


class ReadingTask:
    """(image, text) pairs: each image shows its text; a SlotReader learns to read it."""

    def __init__(self, pairs: Sequence[tuple[Path, str]], images: ImageCache,
                 objectives: Mapping[str, float] | None = None) -> None:
        """`objectives`: weights of the SlotReader's losses by name (default the slot loss alone)."""
        if not pairs:
            raise ValueError("a reading stage needs at least one (image, text) pair")
        self.pairs, self.images = pairs, images
        self.objectives = dict(objectives or {READING_OBJECTIVE: 1.0})
        self.skips: SkipStats = images.skips

    @property
    def num_examples(self) -> int:
        return len(self.pairs)

    def make_batch(self, indices: list[int]) -> ReadingBatch | None:
        pixels, texts = [], []
        for i in indices:
            image, text = self.pairs[i]
            px = self.images.get(image)  # an unreadable image is counted in skips and left out
            if px is not None:
                pixels.append(px)
                texts.append(text)
        if not pixels:
            return None
        return ReadingBatch(self.images.normalize(torch.stack(pixels)), texts)

    def loss(self, model: nn.Module, batch: ReadingBatch) -> tuple[Tensor, dict[str, float]]:
        if not isinstance(model, SlotReader):
            raise TypeError(f"ReadingTask trains a SlotReader, not a {type(model).__name__}")
        parts = model.losses(batch.pixels, model.targets(batch.texts).to(batch.pixels.device))
        logs = {name: float(v.detach()) for name, v in parts.items()} if len(parts) > 1 else {}
        return weighted_total(parts, self.objectives), logs

    def after_step(self, model: nn.Module) -> None:
        pass
