"""Collators: encoded samples → a `Batch`, either padded (B, L) or packed into one row (1, T).

The next-token shift happens here, per sample, before samples are put side by side:
`targets = labels[1:] + [IGNORE_INDEX]`. A target therefore never crosses into the next
sample of a packed row, and each sample's last token predicts nothing. Position ids restart
at 0 for every sample, padded or packed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from tessera.data.templates import IGNORE_INDEX

PaddingSide = Literal["right", "left"]


@dataclass
class Sample:
    """One encoded example: unshifted labels (IGNORE_INDEX where not trained) and its images,
    one per image-token run in `input_ids`, in order."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids and labels differ in length: {len(self.input_ids)} vs {len(self.labels)}"
            )
        if not self.input_ids:
            raise ValueError("a sample needs at least one token")

    @property
    def targets(self) -> list[int]:
        """Next-token targets within this sample: target[t] is the label of token t + 1."""
        return self.labels[1:] + [IGNORE_INDEX]


@dataclass
class Batch:
    """Model input for one step.

    Padded: input_ids, targets, position_ids and attention_mask are (B, L), cu_seqlens is None.
    Packed: those are (1, T), attention_mask is None and cu_seqlens (S + 1,) int32 holds the
    start offset of each of the S samples in the row, with cu_seqlens[-1] == T.
    """

    input_ids: torch.Tensor  # long
    targets: torch.Tensor  # long, IGNORE_INDEX at padding and at each sample's last token
    position_ids: torch.Tensor  # long, restarting at 0 for every sample
    attention_mask: torch.Tensor | None  # bool, True = real token; None when packed
    cu_seqlens: torch.Tensor | None  # int32; None when padded
    images: list[torch.Tensor]  # every sample's images, in sample order
    num_samples: int
    num_target_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device, non_blocking=non_blocking)
            elif f.name == "images":
                moved[f.name] = [image.to(device, non_blocking=non_blocking) for image in value]
        return replace(self, **moved)


def _as_samples(samples: Iterable[Sample | Mapping[str, Any] | None]) -> list[Sample]:
    """Drop the None entries a dataset yields for skipped examples; accept plain dicts."""
    kept = [s if isinstance(s, Sample) else Sample(**s) for s in samples if s is not None]
    if not kept:
        raise ValueError("cannot collate an empty batch (every sample was None or none given)")
    return kept


def _gather_images(samples: Sequence[Sample]) -> list[torch.Tensor]:
    return [image for sample in samples for image in sample.images]


def pad_collate(
    samples: Iterable[Sample | Mapping[str, Any] | None],
    pad_id: int,
    padding_side: PaddingSide = "right",
    pad_to_multiple_of: int | None = None,
) -> Batch:
    """Pad samples to a common length L (rounded up to `pad_to_multiple_of` if given).

    Left padding is for batched generation: the last column holds every sample's last real
    token. Positions count from 0 at each sample's first real token; pad positions are 0
    (they are masked out by attention_mask and carry no target).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    batch = _as_samples(samples)
    length = max(len(s.input_ids) for s in batch)
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of

    shape = (len(batch), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.bool)
    for row, sample in enumerate(batch):
        n = len(sample.input_ids)
        columns = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, columns] = torch.tensor(sample.input_ids, dtype=torch.long)
        targets[row, columns] = torch.tensor(sample.targets, dtype=torch.long)
        position_ids[row, columns] = torch.arange(n, dtype=torch.long)
        attention_mask[row, columns] = True

    return Batch(
        input_ids=input_ids,
        targets=targets,
        position_ids=position_ids,
        attention_mask=attention_mask,
        cu_seqlens=None,
        images=_gather_images(batch),
        num_samples=len(batch),
        num_target_tokens=int((targets != IGNORE_INDEX).sum()),
    )


def pack_collate(samples: Iterable[Sample | Mapping[str, Any] | None], pad_id: int) -> Batch:
    """Concatenate all samples into a single row (1, T) with no padding.

    One row per batch keeps the trainer's view simple: the batch size in tokens is set by the
    sampler, and `cu_seqlens` tells attention where each sample starts so no token attends
    across samples. `pad_id` is accepted, and unused, so both collators share a signature.
    """
    batch = _as_samples(samples)
    lengths = [len(s.input_ids) for s in batch]
    input_ids = torch.tensor([[t for s in batch for t in s.input_ids]], dtype=torch.long)
    targets = torch.tensor([[t for s in batch for t in s.targets]], dtype=torch.long)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0)

    return Batch(
        input_ids=input_ids,
        targets=targets,
        position_ids=position_ids,
        attention_mask=None,
        cu_seqlens=cu_seqlens,
        images=_gather_images(batch),
        num_samples=len(batch),
        num_target_tokens=int((targets != IGNORE_INDEX).sum()),
    )


def share_image_positions(position_ids: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """CogVLM's position ids: all image tokens of one image share ONE position id (the id of
    the image's first token) and the tokens after the image continue from it + 1.

    position_ids (B, L) as the collators (or generation) make them: restarting at 0 for every
    sample, padded or packed; is_image (B, L) bool. A run of consecutive image tokens is one
    image (two images with nothing between them would share one id; templates put text or
    markers between images). The first token of a sample (position 0) and padding are never
    shifted, so the shift restarts with every sample of a packed row. The released CogVLM code
    gives the first and last image token their own ids; the paper's rule is used here.
    Returns a new (B, L) long tensor.
    """
    if position_ids.shape != is_image.shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} and is_image {tuple(is_image.shape)} differ in shape")
    repeat = torch.zeros_like(is_image, dtype=torch.bool)
    repeat[:, 1:] = is_image[:, 1:] & is_image[:, :-1] & (position_ids[:, 1:] != 0)
    saved = repeat.long().cumsum(1)  # ids saved so far along the row
    index = torch.arange(position_ids.shape[1], device=position_ids.device).expand_as(position_ids)
    sample_start = torch.where(position_ids == 0, index, torch.zeros_like(index)).cummax(1).values
    return position_ids - (saved - saved.gather(1, sample_start))
