"""Collators: per-sample shift, padding on either side, packing with cu_seqlens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tessera.data.collate import Batch, Sample, pack_collate, pad_collate
from tessera.data.templates import IGNORE_INDEX

PAD = 0
X = IGNORE_INDEX


def make_samples() -> list[Sample]:
    return [
        Sample(input_ids=[11, 12, 13, 14], labels=[X, X, 13, 14], images=[torch.zeros(3, 4, 4)]),
        Sample(input_ids=[21, 22], labels=[X, 22], images=[]),
        Sample(
            input_ids=[31, 32, 33, 34, 35],
            labels=[X, 32, 33, X, 35],
            images=[torch.ones(3, 2, 2), torch.full((3, 6, 5), 2.0)],
        ),
    ]


def real_triples(batch: Batch) -> Counter[tuple[int, int, int]]:
    mask = (
        batch.attention_mask
        if batch.attention_mask is not None
        else torch.ones_like(batch.input_ids, dtype=torch.bool)
    )
    return Counter(
        zip(
            batch.input_ids[mask].tolist(),
            batch.targets[mask].tolist(),
            batch.position_ids[mask].tolist(),
            strict=True,
        )
    )


def test_right_padding() -> None:
    batch = pad_collate(make_samples(), pad_id=PAD)
    assert batch.input_ids.tolist() == [
        [11, 12, 13, 14, PAD],
        [21, 22, PAD, PAD, PAD],
        [31, 32, 33, 34, 35],
    ]
    assert batch.targets.tolist() == [
        [X, 13, 14, X, X],
        [22, X, X, X, X],
        [32, 33, X, 35, X],
    ]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 0, 0], [0, 1, 2, 3, 4]]
    assert batch.attention_mask.tolist() == [
        [True, True, True, True, False],
        [True, True, False, False, False],
        [True] * 5,
    ]
    assert batch.cu_seqlens is None
    assert batch.input_ids.dtype == batch.targets.dtype == batch.position_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.bool
    assert batch.num_samples == 3
    assert batch.num_target_tokens == 6 == int((batch.targets != X).sum())


def test_left_padding_positions_start_at_first_real_token() -> None:
    batch = pad_collate(make_samples(), pad_id=PAD, padding_side="left")
    assert batch.input_ids.tolist() == [
        [PAD, 11, 12, 13, 14],
        [PAD, PAD, PAD, 21, 22],
        [31, 32, 33, 34, 35],
    ]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 1], [0, 1, 2, 3, 4]]
    assert batch.attention_mask[:, -1].all()
    assert batch.targets.tolist()[1] == [X, X, X, 22, X]


def test_pad_to_multiple_of() -> None:
    batch = pad_collate(make_samples(), pad_id=PAD, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (3, 8)
    assert batch.targets[:, 5:].eq(X).all() and batch.input_ids[:, 5:].eq(PAD).all()
    with pytest.raises(ValueError, match="padding_side"):
        pad_collate(make_samples(), pad_id=PAD, padding_side="middle")  # type: ignore[arg-type]


def test_packing() -> None:
    batch = pack_collate(make_samples(), pad_id=PAD)
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 21, 22, 31, 32, 33, 34, 35]]
    assert batch.targets.tolist() == [[X, 13, 14, X, 22, X, 32, 33, X, 35, X]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]]
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 11]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens[-1] == batch.input_ids.shape[1]
    assert batch.attention_mask is None
    assert batch.num_samples == 3 and batch.num_target_tokens == 6


def test_shift_never_crosses_sample_boundaries() -> None:
    # Every token labelled: a cross-boundary shift would leak the next sample's first token.
    samples = [
        Sample(input_ids=[i * 10 + j for j in range(n)], labels=[i * 10 + j for j in range(n)])
        for i, n in enumerate([3, 1, 4], start=1)
    ]
    packed = pack_collate(samples, pad_id=PAD)
    ends = packed.cu_seqlens[1:] - 1
    assert packed.targets[0, ends.long()].eq(X).all()
    assert packed.targets.tolist() == [[11, 12, X, X, 31, 32, 33, X]]
    padded = pad_collate(samples, pad_id=PAD)
    lengths = padded.attention_mask.sum(dim=1)
    assert padded.targets[torch.arange(3), lengths - 1].eq(X).all()


def test_packed_and_padded_hold_the_same_tokens() -> None:
    packed = pack_collate(make_samples(), pad_id=PAD)
    for side in ("right", "left"):
        padded = pad_collate(make_samples(), pad_id=PAD, padding_side=side)
        assert real_triples(packed) == real_triples(padded)
        assert padded.num_target_tokens == packed.num_target_tokens


def test_images_flattened_in_sample_order() -> None:
    samples = make_samples()
    expected = [image for sample in samples for image in sample.images]
    for batch in (pad_collate(samples, pad_id=PAD), pack_collate(samples, pad_id=PAD)):
        assert len(batch.images) == 3
        assert all(a is b for a, b in zip(batch.images, expected, strict=True))


def test_none_samples_are_dropped() -> None:
    samples = make_samples()
    with_gaps = [None, samples[0], None, samples[1], samples[2], None]
    assert pad_collate(with_gaps, pad_id=PAD).num_samples == 3
    packed = pack_collate(with_gaps, pad_id=PAD)
    assert packed.num_samples == 3 and packed.cu_seqlens.tolist() == [0, 4, 6, 11]
    with pytest.raises(ValueError, match="empty batch"):
        pack_collate([None, None], pad_id=PAD)


def test_dict_samples_and_validation() -> None:
    batch = pad_collate([{"input_ids": [1, 2], "labels": [X, 2], "images": []}], pad_id=PAD)
    assert batch.targets.tolist() == [[2, X]]
    with pytest.raises(ValueError, match="differ in length"):
        Sample(input_ids=[1, 2], labels=[X])


def test_to_device_moves_everything() -> None:
    batch = pack_collate(make_samples(), pad_id=PAD).to("cpu")
    assert isinstance(batch, Batch) and batch.attention_mask is None
    moved = pad_collate(make_samples(), pad_id=PAD).to(torch.device("meta"))
    assert moved.input_ids.device.type == "meta" and moved.attention_mask.device.type == "meta"
    assert all(image.device.type == "meta" for image in moved.images)
    assert moved.num_samples == 3
