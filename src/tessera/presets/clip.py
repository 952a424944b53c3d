"""CLIP preset: a ViT and a causal text transformer trained with the symmetric ITC loss, its
tiny ShapesWorld recipe for the zoo, and the zoo side shared by every dual encoder.

- `tiny()` trains on 2 CPU cores in a few minutes; `paper()` records CLIP ViT-B/16's
  published dimensions and recipe (224 px, width 768, 12 layers; text 512 wide, 12 layers,
  77 tokens; embeddings 512; batch 32,768), for use with imported weights.
- The learnable temperature is stored as a log scale (init ln(1/0.07)), clamped to
  [0, ln 100] after every optimizer step (ContrastiveTask.after_step) and never weight-decayed
  (the trainer decays only matrices).
- The dual-encoder zoo helpers below (`zoo_tokenizer`, `evaluate_dual_encoder`,
  `train_stage`, `dual_encoder_result`) also serve the SigLIP and LiT presets.

Evaluation protocol of every dual encoder (splits "test" → in_distribution, "test_comp" →
compositional):
- retrieval on <split>/retrieval.json, both directions, R@1/5/10 by cosine similarity over the
  whole gallery. ShapesWorld's COCO-style captions repeat across images ("a red circle."), so
  an identical caption string counts as a caption of every image it describes, in the recall
  and in its chance baseline alike (the fusion models' protocol, eval.fusion_eval);
- zero-shot classification on <split>/zeroshot.json, tasks shape / color / count: every class
  name in every prompt template, template embeddings averaged and renormalised;
  zeroshot_top1 is the mean of the three tasks' top-1 accuracies. Baseline: the best constant
  prediction on the evaluated items (task_readers.zeroshot_baseline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tessera.config import Config
from tessera.data.datasets import CaptionPairs, ImageCache, group_captions
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.data.shapes_tasks import ZEROSHOT_TASKS, classic_task_paths
from tessera.data.task_readers import (
    read_retrieval_gallery,
    read_zeroshot,
    retrieval_chance_recall,
    zeroshot_baseline,
)
from tessera.eval.retrieval import retrieval_recall
from tessera.eval.zeroshot import build_zeroshot_classifier, topk_accuracy, zeroshot_logits
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig, SigLIPDualEncoder
from tessera.pipeline import scaled
from tessera.text.clip_text import CLIPTextConfig
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.stage import StageConfig
from tessera.train.tasks import ContrastiveTask, count_phrases_for
from tessera.train.trainer import StageResult, Trainer, seed_everything
from tessera.vision.vit import ViTConfig
from tessera.zoo.core import SPLITS, ZooContext, ZooResult

RECALL_KS: tuple[int, ...] = (1, 5, 10)
TOKENIZER_DIR = "tokenizer"


class CLIPPreset(Config):
    name: str
    model: DualEncoderConfig
    tokenizer_vocab_size: int = 1024
    max_text_length: int = 40  # tokens per caption, EOS included (CLIP: 77)
    stage: StageConfig


def tiny() -> CLIPPreset:
    """A 4-layer ViT on 8-pixel patches of the 64-pixel ShapesWorld images (65 tokens) and a
    2-layer causal text tower, both 128 wide, trained from scratch with ITC. (16-pixel patches,
    17 tokens, are cheaper per step but reached image→text R@1 0.19 on the 500-image test
    gallery after the same 300 steps, against 0.35.)"""
    return CLIPPreset(
        name="clip-tiny",
        model=DualEncoderConfig(
            vision=ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_layers=4, num_heads=4,
                             intermediate_size=512),
            text=CLIPTextConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                                max_position_embeddings=40),
            projection_dim=128,
        ),
        # 1,500 steps, not 300: in-batch negatives differ in colour first, and shape is only learnt
        # later (zero-shot shape 0.14 -> 0.37 against the constant 0.23, i2t R@1 0.35 -> 0.66; the
        # same samples as 375 steps of 512 reached 0.20, so it is steps, not negatives per step).
        # The count objective (ContrastiveTask; after CountCLIP): without it ITC never needs count and
        # zero-shot count sat at 0.15 against the constant 0.18; with it 0.54 / 0.51, shape 0.38 / 0.43
        # (was 0.37 / 0.44), image->text R@1 0.62 / 0.58 (was 0.66 / 0.60) (RESULTS.md, session 16).
        stage=StageConfig(name="clip", trainable=["*"], objectives={"itc": 1.0, "count": 1.0}, data="captions",
                          steps=1500, batch_size=128, lr=2e-3, warmup_steps=75, weight_decay=0.1, log_every=25),
    )


def paper() -> CLIPPreset:
    """CLIP ViT-B/16 (Radford et al. 2021): 224 px, 16-pixel patches, width 768, 12 layers;
    text transformer 512 wide, 12 layers, 8 heads, 77 tokens, BPE vocabulary 49,408; shared
    embedding 512. 32 epochs of 400M pairs at batch 32,768, AdamW (β2 0.98, wd 0.2), lr 5e-4,
    2,000 warm-up steps, mixed precision."""
    return CLIPPreset(
        name="clip-vit-b-16",
        model=DualEncoderConfig(
            vision=ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                             intermediate_size=3072),
            text=CLIPTextConfig(vocab_size=49408, hidden_size=512, num_layers=12, num_heads=8,
                                intermediate_size=2048, max_position_embeddings=77, eos_token_id=49407),
            projection_dim=512,
        ),
        tokenizer_vocab_size=49408,
        max_text_length=77,
        stage=StageConfig(name="clip", trainable=["*"], objectives={"itc": 1.0}, data="captions",
                          steps=390_625, batch_size=32_768, lr=5e-4, warmup_steps=2000, weight_decay=0.2,
                          betas=(0.9, 0.98), bf16=True, max_length=77),
    )


# --- shared by the dual-encoder zoo runners ---------------------------------------------------------


def zoo_tokenizer(data_dir: Path, vocab_size: int, out_dir: Path) -> tuple[Tokenizer, Path, list[CaptionPairs]]:
    """A byte-level BPE trained on the train split's captions, saved under out_dir; also returns
    the train captions grouped by image (the contrastive pairs)."""
    captions, skips = read_coco_captions(shapes_split_paths(data_dir, "train")["captions"], data_dir)
    if not captions:
        raise ValueError(f"{data_dir}: the train split has no usable caption ({skips.summary()})")
    tokenizer = train_bpe([c.caption for c in captions], vocab_size=vocab_size)
    tokenizer_file = tokenizer.save(out_dir / TOKENIZER_DIR)
    return tokenizer, tokenizer_file, group_captions(captions)


def with_tokenizer(text: CLIPTextConfig, tokenizer: Tokenizer) -> CLIPTextConfig:
    """The text tower's config with the vocabulary size and EOS id of `tokenizer`."""
    return text.model_copy(update={"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id})


def train_stage(model: nn.Module, stage: StageConfig, task: ContrastiveTask, ctx: ZooContext,
                tokenizer_file: Path, meta: dict[str, Any]) -> StageResult:
    """One stage of a zoo recipe: steps times ctx.scale, the run's seed, the final checkpoint in
    ctx.out_dir/<stage name>/final."""
    trainer = Trainer(model, scaled(stage, ctx.scale, ctx.seed), task, out_dir=ctx.out_dir / stage.name,
                      checkpoint_meta=meta, tokenizer_file=tokenizer_file, progress=ctx.progress)
    return trainer.fit()


DualModel = DualEncoder | SigLIPDualEncoder
TextEncoder = Callable[[Sequence[str]], tuple[Tensor, Tensor]]


def _pixels(paths: Sequence[Path], images: ImageCache) -> Tensor:
    pixels = []
    for path in paths:
        px = images.get(path)
        if px is None:
            raise ValueError(f"evaluation image {path} is unreadable; evaluation sets must be complete")
        pixels.append(px)
    return images.normalize(torch.stack(pixels))


@torch.no_grad()
def embed_images(model: DualModel, paths: Sequence[Path], images: ImageCache, batch_size: int = 256) -> Tensor:
    """(N, P) unit-norm image embeddings."""
    return torch.cat([model.encode_image(_pixels(paths[s : s + batch_size], images)).float()
                      for s in range(0, len(paths), batch_size)])


@torch.no_grad()
def embed_texts(model: DualModel, texts: Sequence[str], encode: TextEncoder, batch_size: int = 256) -> Tensor:
    """(M, P) unit-norm text embeddings; `encode` tokenises exactly as in training."""
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = encode(texts[s : s + batch_size])
        out.append(model.encode_text(ids, mask).float())
    return torch.cat(out)


def evaluate_dual_encoder(
    model: DualModel, tokenizer: Tokenizer, encode: TextEncoder, data_dir: Path, images: ImageCache,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, Any]]:
    """(metrics, baselines, notes) per split label, by the protocol of the module docstring."""
    model.eval()
    metrics: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    notes: dict[str, Any] = {}
    for split, label in SPLITS.items():
        paths = classic_task_paths(data_dir, split)
        m, b = metrics.setdefault(label, {}), baselines.setdefault(label, {})
        split_notes: dict[str, Any] = notes.setdefault(label, {})

        gallery, skips = read_retrieval_gallery(paths["retrieval"], data_dir)
        if not gallery.images or not gallery.captions:
            raise ValueError(f"{paths['retrieval']}: empty retrieval gallery")
        sim = embed_images(model, gallery.images, images) @ embed_texts(model, gallery.captions, encode).t()
        scores = retrieval_recall(sim, gallery.text_to_image, RECALL_KS, texts=gallery.captions,
                                  identical_texts_match=True)
        chance = retrieval_chance_recall(gallery, RECALL_KS, duplicate_aware=True)
        for k in RECALL_KS:
            m[f"retrieval_i2t_r{k}"] = scores.image_to_text[k]
            m[f"retrieval_t2i_r{k}"] = scores.text_to_image[k]
            b[f"retrieval_i2t_r{k}"] = chance[f"image_to_text@{k}"]
            b[f"retrieval_t2i_r{k}"] = chance[f"text_to_image@{k}"]
        split_notes["retrieval"] = {"images": len(gallery.images), "captions": len(gallery.captions),
                                    "duplicate_texts": scores.duplicate_texts, "skipped": skips.total}

        tasks, skips = read_zeroshot(paths["zeroshot"], data_dir)
        missing = [name for name in ZEROSHOT_TASKS if name not in tasks or not tasks[name].items]
        if missing:
            raise ValueError(f"{paths['zeroshot']}: zero-shot tasks {missing} are missing or empty")
        accuracies, constant = [], []
        for name in ZEROSHOT_TASKS:
            task = tasks[name]
            classifier = build_zeroshot_classifier(lambda texts: embed_texts(model, texts, encode), task.class_names,
                                                   task.templates, tokenize=tokenizer.encode)
            image_emb = embed_images(model, [item.image for item in task.items], images)
            top1 = topk_accuracy(zeroshot_logits(image_emb, classifier), [i.label for i in task.items], ks=(1,))[1]
            m[f"zeroshot_{name}_top1"] = top1
            b[f"zeroshot_{name}_top1"] = zeroshot_baseline(task).accuracy
            accuracies.append(top1)
            constant.append(b[f"zeroshot_{name}_top1"])
        m["zeroshot_top1"] = sum(accuracies) / len(accuracies)
        b["zeroshot_top1"] = sum(constant) / len(constant)
        split_notes["zeroshot_items"] = {name: len(tasks[name].items) for name in ZEROSHOT_TASKS}
        split_notes["zeroshot_skipped"] = skips.total
    return metrics, baselines, notes


def dual_encoder_result(
    model: DualModel, tokenizer: Tokenizer, task: ContrastiveTask, ctx: ZooContext, images: ImageCache,
    stages: Sequence[StageResult], notes: dict[str, Any] | None = None,
) -> ZooResult:
    """Evaluate `model` and gather the zoo result of a dual-encoder recipe."""
    start = time.perf_counter()
    metrics, baselines, eval_notes = evaluate_dual_encoder(model, tokenizer, task.encode_texts, ctx.data_dir, images)
    seconds = {r.stage: r.seconds for r in stages}
    seconds["eval"] = time.perf_counter() - start
    logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    all_notes: dict[str, Any] = {
        "final_loss_by_stage": {r.stage: r.final_loss for r in stages},
        "loss_curve_by_stage": {r.stage: [[h["step"], round(h["loss"], 4)] for h in r.history] for r in stages},
        "steps_by_stage": {r.stage: r.steps for r in stages},
        "logit_scale": logit_scale,
        "evaluation": eval_notes,
        "skipped_training_examples": images.skips.total,
        **(notes or {}),
    }
    return ZooResult(
        metrics=metrics, baselines=baselines,
        trainable_params_by_stage={r.stage: r.trainable.trainable for r in stages},
        seconds_by_stage=seconds, notes=all_notes,
    )


def image_cache(vision: ViTConfig) -> ImageCache:
    return ImageCache(ImageTransform(size=(vision.image_size, vision.image_size)), SkipStats())


# --- the zoo runner ---------------------------------------------------------------------------------


def run(ctx: ZooContext, preset: CLIPPreset | None = None) -> ZooResult:
    """Train CLIP's tiny recipe on ctx.data_dir and evaluate retrieval and zero-shot."""
    preset = preset or tiny()
    seed_everything(ctx.seed)
    tokenizer, tokenizer_file, pairs = zoo_tokenizer(ctx.data_dir, preset.tokenizer_vocab_size, ctx.out_dir)
    model = DualEncoder(preset.model.model_copy(update={"text": with_tokenizer(preset.model.text, tokenizer)}))
    images = image_cache(preset.model.vision)
    task = ContrastiveTask(pairs, tokenizer, images, preset.max_text_length, preset.stage.objectives,
                           counts=count_phrases_for(ctx.data_dir, preset.stage.objectives))
    meta = {"preset": preset.name, "image_size": [preset.model.vision.image_size] * 2}
    stage = train_stage(model, preset.stage, task, ctx, tokenizer_file, meta)
    return dual_encoder_result(model, tokenizer, task, ctx, images, [stage], notes={
        "recipe": preset.name, "logit_scale_init": math.exp(preset.model.logit_scale_init),
    })


ZOO = {"clip": run}
