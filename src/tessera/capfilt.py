"""CapFilt (BLIP's Captioning and Filtering): bootstrap a cleaner caption dataset.

For every image of a COCO-captions file, BLIP's image-grounded decoder (the captioner) writes a
synthetic caption, and BLIP's image-grounded encoder (the filter) scores each original caption
and the synthetic one with its ITM head; a caption whose match probability (sigmoid of
`itm_logits`, i.e. the head's softmax) is below `threshold` is removed. What survives is written
as a new COCO-captions file that a new model trains on (BLIP pretrains its next model on it).

Output layout under `out_dir` (a drop-in for a dataset's split folder; image paths are relative
to `out_dir` and point at the ORIGINAL image files, which are not copied)::

    <split>/captions.json    COCO captions: "images" (every input image, ids kept),
                             "annotations" [{"id", "image_id", "caption", "source":
                             "original" | "synthetic", "itm_score", ...fields of the input
                             annotation (e.g. "noisy")}]
    capfilt_summary.json     counts: images, original kept / removed, synthetic kept /
                             removed / duplicate / empty, and, when the input marks
                             annotations with a boolean "noisy" field, removal rates of noisy
                             versus clean captions

`corrupt_captions` makes such a noisy input from a clean file (ShapesWorld stand-in for web
alt-text): a fraction of captions get their colour words, shape words or both swapped for other
ones, and are marked "noisy": true, so the summary can say whether the filter removes noisy captions more
often than clean ones.

Differences from BLIP: the synthetic caption is greedy (BLIP samples with nucleus sampling for
diversity), one per image; captioner and filter are the same pretrained model (BLIP fine-tunes
each on COCO first).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import _coco_image_files, _is_int, _load_json, _require_keys
from tessera.data.records import SkipStats
from tessera.data.shapes import COLORS, PLURALS, SHAPES
from tessera.eval.report import write_json_atomic
from tessera.models.blip import BLIP
from tessera.text.tokenizer import Tokenizer
from tessera.text.word_swaps import WordGroup, WordSwapper
from tessera.train.fusion_tasks import caption_token_rows, pad_token_rows

SUMMARY_FILE = "capfilt_summary.json"
CAPTIONS_FILE = "captions.json"


@dataclass
class CapFiltSummary:
    images: int = 0
    images_unreadable: int = 0
    original_total: int = 0
    original_kept: int = 0
    original_removed: int = 0
    synthetic_total: int = 0  # one per readable image
    synthetic_kept: int = 0
    synthetic_removed: int = 0
    synthetic_duplicate: int = 0  # same text as one of the image's original captions: not added
    synthetic_empty: int = 0
    kept_as_best: int = 0  # below the threshold, kept as their image's best (min_captions_per_image)
    images_without_captions: int = 0  # after filtering
    threshold: float = 0.5
    # Only when the input annotations carry a boolean "noisy" field.
    noisy_total: int | None = None
    noisy_removed: int | None = None
    clean_total: int | None = None
    clean_removed: int | None = None
    removed_examples: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""

    @property
    def noisy_removal_rate(self) -> float | None:
        return None if not self.noisy_total else (self.noisy_removed or 0) / self.noisy_total

    @property
    def clean_removal_rate(self) -> float | None:
        return None if not self.clean_total else (self.clean_removed or 0) / self.clean_total

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "noisy_removal_rate": self.noisy_removal_rate,
                "clean_removal_rate": self.clean_removal_rate}


@dataclass
class _Annotation:
    record: dict[str, Any]  # the input annotation (all its fields)
    image_id: int
    caption: str


def _read_annotations(path: Path, stats: SkipStats) -> tuple[dict[int, str], list[_Annotation]]:
    """COCO captions → (image id → file name, usable annotations), malformed ones skipped."""
    data = _require_keys(_load_json(path), path, ("images", "annotations"), "COCO captions")
    files = _coco_image_files(data["images"], path, stats)
    annotations: list[_Annotation] = []
    for index, record in enumerate(data["annotations"]):
        where = f"{path}[annotations {index}]"
        if not isinstance(record, dict):
            stats.skip("record is not a JSON object", where)
            continue
        image_id, caption = record.get("image_id"), record.get("caption")
        if not _is_int(image_id) or image_id not in files:
            stats.skip("missing or unknown 'image_id'", where)
        elif not isinstance(caption, str) or not caption.strip():
            stats.skip("missing or empty 'caption'", where)
        else:
            annotations.append(_Annotation(record, image_id, caption.strip()))
    return files, annotations


@torch.no_grad()
def itm_match_probabilities(
    model: BLIP, tokenizer: Tokenizer, image_tokens: torch.Tensor, image_mask: torch.Tensor | None,
    image_index: Sequence[int], texts: Sequence[str], max_length: int, batch_size: int = 256,
) -> list[float | None]:
    """P(match) of text k with image image_index[k] (rows of image_tokens); None for a text that
    tokenises to nothing."""
    rows = caption_token_rows(tokenizer, texts, max_length)
    scores: list[float | None] = [None] * len(texts)
    usable = [k for k, r in enumerate(rows) if r is not None]
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        ids, mask = pad_token_rows([rows[k] for k in chunk], tokenizer.pad_id)  # type: ignore[misc]
        which = torch.tensor([image_index[k] for k in chunk], device=image_tokens.device)
        logits = model.itm_logits_from_tokens(
            image_tokens[which], None if image_mask is None else image_mask[which], ids.to(image_tokens.device),
            mask.to(image_tokens.device),
        )
        for k, p in zip(chunk, torch.sigmoid(logits).tolist(), strict=True):
            scores[k] = p
    return scores


def capfilt(
    model: BLIP,
    tokenizer: Tokenizer,
    captions_file: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    transform: ImageTransform,
    *,
    split: str = "train",
    threshold: float = 0.5,
    max_new_tokens: int = 30,
    max_length: int = 40,
    batch_size: int = 64,
    max_images: int | None = None,
    min_captions_per_image: int = 0,
    progress: bool = True,
) -> CapFiltSummary:
    """Caption, filter and write `out_dir/<split>/captions.json` and the summary (module docstring).

    Images are read from `image_root` / file_name and resized by `transform` (the one the model
    was trained with); an unreadable image is skipped with its captions and counted.
    `max_images` processes (and writes) only the first images of the file (smoke runs).
    `min_captions_per_image` > 0 keeps each image's best-scoring captions (original or
    synthetic) up to that many even below the threshold, so no image drops out of the data
    (BLIP: 0, a rejected image-text pair is simply gone); they count as kept, and in
    `kept_as_best`.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be ≥ 1, got {max_images}")
    captions_file, image_root, out_dir = Path(captions_file), Path(image_root), Path(out_dir)
    stats = SkipStats()
    files, annotations = _read_annotations(captions_file, stats)
    by_image: dict[int, list[_Annotation]] = {image_id: [] for image_id in files}
    for a in annotations:
        by_image[a.image_id].append(a)
    marks_noise = any(isinstance(a.record.get("noisy"), bool) for a in annotations)
    summary = CapFiltSummary(threshold=threshold)
    if marks_noise:
        summary.noisy_total = summary.noisy_removed = summary.clean_total = summary.clean_removed = 0
    images = ImageCache(transform, stats)
    model.eval()
    device = next(model.parameters()).device
    next_id = 1 + max((a.record["id"] for a in annotations if _is_int(a.record.get("id"))), default=0)
    out_images: list[dict[str, Any]] = []
    out_annotations: list[dict[str, Any]] = []
    image_ids = list(files)[:max_images]
    for start in tqdm(range(0, len(image_ids), batch_size), desc="capfilt", disable=not progress,
                      dynamic_ncols=True):
        chunk_ids = image_ids[start : start + batch_size]
        pixels, readable = [], []
        for image_id in chunk_ids:
            px = images.get(image_root / files[image_id])
            if px is None:
                summary.images_unreadable += 1
                continue
            pixels.append(images.normalize(px).to(device))
            readable.append(image_id)
        if not readable:
            continue
        tokens, image_mask = model.encode_images(pixels)
        synthetic = model.caption(pixels, max_new_tokens, tokenizer=tokenizer)
        pair_image: list[int] = []
        pair_text: list[str] = []
        pair_source: list[_Annotation | None] = []  # None: the synthetic caption
        for row, image_id in enumerate(readable):
            originals = by_image[image_id]
            for a in originals:
                pair_image.append(row)
                pair_text.append(a.caption)
                pair_source.append(a)
            text = synthetic[row]
            summary.synthetic_total += 1
            if not text:
                summary.synthetic_empty += 1
            elif any(text == a.caption for a in originals):
                summary.synthetic_duplicate += 1
            else:
                pair_image.append(row)
                pair_text.append(text)
                pair_source.append(None)
        scores = itm_match_probabilities(model, tokenizer, tokens, image_mask, pair_image, pair_text, max_length)
        kept_per_image = dict.fromkeys(readable, 0)
        rescued = _best_below_threshold(pair_image, scores, threshold, min_captions_per_image)
        summary.kept_as_best += len(rescued)
        for k, (row, text, source, score) in enumerate(zip(pair_image, pair_text, pair_source, scores, strict=True)):
            image_id = readable[row]
            keep = score is not None and (score >= threshold or k in rescued)
            if source is None:
                summary.synthetic_kept += keep
                summary.synthetic_removed += not keep
                if keep:
                    out_annotations.append({"id": next_id, "image_id": image_id, "caption": text,
                                            "source": "synthetic", "itm_score": score})
                    next_id += 1
            else:
                summary.original_total += 1
                summary.original_kept += keep
                summary.original_removed += not keep
                if marks_noise:
                    noisy = source.record.get("noisy") is True
                    if noisy:
                        summary.noisy_total += 1  # type: ignore[operator]
                        summary.noisy_removed += not keep  # type: ignore[operator]
                    else:
                        summary.clean_total += 1  # type: ignore[operator]
                        summary.clean_removed += not keep  # type: ignore[operator]
                if keep:
                    out_annotations.append({**source.record, "caption": text, "source": "original",
                                            "itm_score": score})
                elif len(summary.removed_examples) < 20:
                    summary.removed_examples.append({"image_id": image_id, "caption": text, "itm_score": score,
                                                     "synthetic": synthetic[row],
                                                     **({"noisy": source.record["noisy"]}
                                                        if "noisy" in source.record else {})})
            kept_per_image[image_id] += keep
        for image_id in readable:
            out_images.append({"id": image_id,
                               "file_name": os.path.relpath(image_root / files[image_id], out_dir)})
            summary.images += 1
            summary.images_without_captions += kept_per_image[image_id] == 0
    summary.skipped = stats.summary()
    info = {"description": f"CapFilt of {captions_file}", "threshold": threshold, "max_new_tokens": max_new_tokens}
    write_json_atomic(out_dir / split / CAPTIONS_FILE,
                      {"info": info, "images": out_images, "annotations": out_annotations})
    write_json_atomic(out_dir / SUMMARY_FILE, summary.to_json())
    return summary


def _best_below_threshold(pair_image: Sequence[int], scores: Sequence[float | None], threshold: float,
                          minimum: int) -> set[int]:
    """Indices of the pairs to keep although below the threshold: per image, its best-scoring
    ones until it has `minimum` captions."""
    if minimum <= 0:
        return set()
    by_image: dict[int, list[int]] = {}
    for k, row in enumerate(pair_image):
        if scores[k] is not None:
            by_image.setdefault(row, []).append(k)
    rescued: set[int] = set()
    for pairs in by_image.values():
        passing = sum(scores[k] >= threshold for k in pairs)  # type: ignore[operator]
        below = sorted((k for k in pairs if scores[k] < threshold), key=lambda k: -scores[k])  # type: ignore[operator]
        rescued.update(below[: max(0, minimum - passing)])
    return rescued


# --- noisy "web" captions for ShapesWorld -----------------------------------------------------------


def _swap_words(caption: str, rng: random.Random, swapper: WordSwapper) -> str | None:
    """The caption's colour words, its shape words, or both (one of the three, at random) swapped
    for other ones; None when nothing can be swapped."""
    words = set(re.split(r"\W+", caption))
    shape = swapper.groups["shape"]
    has_color = any(w in words for w in swapper.groups["color"].words)
    has_shape = any(w in words for w in (*shape.words, *shape.plurals.values()))
    modes = [m for m, ok in ((("color",), has_color), (("shape",), has_shape),
                             (("color", "shape"), has_color and has_shape)) if ok]
    if not modes:
        return None
    return swapper.swap(caption, rng, rng.choice(modes), every=True)


def corrupt_captions(
    captions_file: str | Path,
    out_file: str | Path,
    fraction: float,
    *,
    seed: int = 0,
    colors: Sequence[str] = tuple(COLORS),
    shapes: Sequence[str] = SHAPES,
    plurals: dict[str, str] | None = None,
    held_out_combos: Sequence[Sequence[str]] = (),
    image_root: str | Path | None = None,
) -> dict[str, int]:
    """Copy a COCO-captions file with `fraction` of its captions corrupted (its colour words,
    shape words or both swapped for others) and marked "noisy": true; every other annotation gets "noisy":
    false. A corruption never writes a held-out "colour shape" pair, so a compositional test
    split stays unseen. With `image_root`, file names are rewritten relative to the output
    file's folder (the images stay where they are). Returns {"captions", "noisy"}.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    captions_file, out_file = Path(captions_file), Path(out_file)
    data = _require_keys(_load_json(captions_file), captions_file, ("images", "annotations"), "COCO captions")
    rng = random.Random(f"corrupt/{seed}")
    plural_map = dict(PLURALS) if plurals is None else plurals
    swapper = WordSwapper([WordGroup("color", tuple(colors)), WordGroup("shape", tuple(shapes), plural_map)],
                          held_out_pairs=held_out_combos)
    annotations: list[Any] = []
    noisy = 0
    for record in data["annotations"]:
        if not isinstance(record, dict):
            annotations.append(record)
            continue
        record = {**record, "noisy": False}
        caption = record.get("caption")
        if isinstance(caption, str) and rng.random() < fraction:
            swapped = _swap_words(caption, rng, swapper)
            if swapped is not None and swapped != caption:
                record["caption"], record["noisy"] = swapped, True
                noisy += 1
        annotations.append(record)
    images = data["images"]
    if image_root is not None:
        images = [{**e, "file_name": os.path.relpath(Path(image_root) / e["file_name"], out_file.parent)}
                  if isinstance(e, dict) and isinstance(e.get("file_name"), str) else e for e in images]
    write_json_atomic(out_file, {**data, "images": images, "annotations": annotations})
    return {"captions": len(annotations), "noisy": noisy}


def load_noisy_flags(captions_file: str | Path) -> dict[str, int]:
    """{"noisy", "clean"} counts of a file written by `corrupt_captions` (or CapFilt)."""
    data = json.loads(Path(captions_file).read_text())
    flags = [a.get("noisy") for a in data.get("annotations", []) if isinstance(a, dict)]
    return {"noisy": sum(f is True for f in flags), "clean": sum(f is False for f in flags)}


def capfilt_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    captions_file: str | Path | None = None,
    threshold: float = 0.5,
    max_new_tokens: int = 30,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: bool = True,
) -> CapFiltSummary:
    """`capfilt` with a saved BLIP checkpoint (model, tokenizer, image transform from its meta) on
    `data_dir/<split>/captions.json` (or `captions_file`; image paths relative to `data_dir`)."""
    from tessera.data.images import transform_from_meta
    from tessera.train.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.model, BLIP):
        raise CheckpointError(f"{checkpoint} holds a {ckpt.kind} model; CapFilt needs a BLIP checkpoint")
    if not ckpt.tokenizer_path.is_file():
        raise CheckpointError(f"{checkpoint} has no tokenizer.json; CapFilt needs the model's tokenizer")
    tokenizer = Tokenizer.load(ckpt.tokenizer_path)
    ckpt.model.tokenizer = tokenizer
    source = Path(captions_file) if captions_file is not None else Path(data_dir) / split / CAPTIONS_FILE
    return capfilt(ckpt.model, tokenizer, source, data_dir, out_dir,
                   transform_from_meta(ckpt.meta, ckpt.model.cfg.vision.image_size), split=split,
                   threshold=threshold, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   max_images=max_images, progress=progress)
