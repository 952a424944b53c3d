"""BLIP preset: the MED model's sizes, its pretraining recipe, CapFilt, and the zoo runner.

`tiny()` trains on a 2-core CPU in minutes on ShapesWorld: a 4-layer ViT (64 px, patch 16: 16
patches + class token, so that cross-attention in every text layer stays cheap) and a 2-layer
BERT (width 128) whose layers all cross-attend, ITC space 128, no momentum encoders (they cost a
second ViT + text forward per step; the model supports them, `paper()` uses them).
`paper()` records the published BLIP (ViT-B/16) dimensions and pretraining settings, for
imported weights or large machines.

The zoo runner tells BLIP's whole story at toy scale:
  1. noisy "web" data: a fraction of the training captions get their colour and shape words
     swapped (`capfilt.corrupt_captions`), marked so the filter's choices can be counted;
  2. model A pretrains on them with ITC + ITM (hard negatives) + LM (ImageTextTask);
  3. CapFilt: A's decoder captions every training image, A's ITM filter scores the original and
     the synthetic captions and drops those below the threshold → a cleaned COCO-captions
     dataset (the summary says how many noisy vs clean captions were removed);
  4. model B, a NEW model, pretrains on the cleaned dataset (BLIP's bootstrapping);
  5. model B is evaluated: captioning (CIDEr-D, BLEU-4) with greedy decoding against each
     image's captions in <split>/captions.json, retrieval with ITM re-ranking, and the
     fine-tuned VQA / reasoning / entailment heads of eval/fusion_eval.py.
The caption baseline is the single most common training caption, given for every image.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import model_validator

from tessera.capfilt import CapFiltSummary, capfilt, corrupt_captions
from tessera.config import Config
from tessera.data.datasets import ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import load_meta, read_coco_captions, shapes_split_paths
from tessera.eval.caption_metrics import CaptionScores, score_captions
from tessera.eval.fusion_eval import ANSWER_TASK, FINETUNE_TASKS, evaluate_fusion_model
from tessera.models.blip import BLIP, BLIP_VISION, BLIPConfig, MomentumConfig, blip_token_ids
from tessera.models.blip import OBJECTIVES as BLIP_OBJECTIVES
from tessera.models.vilt import LinearInit
from tessera.pipeline import scaled
from tessera.text.bert import BertConfig
from tessera.text.tokenizer import Tokenizer
from tessera.train.fusion_tasks import (
    ImageStats,
    ImageTextTask,
    shapes_transform,
    train_fusion_tokenizer,
)
from tessera.train.stage import StageConfig, check_stages
from tessera.train.trainer import StageResult, Trainer, seed_everything
from tessera.vision.vit import ViTConfig
from tessera.zoo.core import SPLITS, ZooContext, ZooResult

# Everything but the momentum encoders trains (those follow by EMA).
TRAINABLE: list[str] = ["vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head", "cls", "temp"]
OBJECTIVES: dict[str, float] = {"itc": 1.0, "itm": 1.0, "lm": 1.0}


class BLIPPreset(Config):
    name: str
    vision: ViTConfig = BLIP_VISION
    text: BertConfig  # vocab_size is replaced by the tokenizer's
    embed_dim: int = 256
    momentum: MomentumConfig | None = None
    label_smoothing: float = 0.1
    linear_init: LinearInit = "pytorch"  # see BLIPConfig.linear_init
    tokenizer_vocab_size: int = 1024
    pretrain_stage: StageConfig  # model A (zoo: on the noisy captions)
    bootstrap_stage: StageConfig  # model B, a new model on the CapFilt output
    noise_fraction: float = 0.3  # zoo: share of training captions corrupted before model A
    capfilt_threshold: float = 0.5  # ITM match probability a caption needs to stay
    capfilt_min_captions: int = 1  # every image keeps its best caption(s), so none drops out
    caption_max_new_tokens: int = 30
    eval_max_length: int = 40
    rerank_k: int = 16
    finetune_stages: dict[str, StageConfig] = {}  # fusion_eval overrides, by task
    # downstream tasks after retrieval: the fusion heads, and VQA by BLIP's answer decoder
    finetune_tasks: tuple[str, ...] = (*FINETUNE_TASKS, ANSWER_TASK)
    image_stats: ImageStats = "dataset"  # ShapesWorld pixel normalisation (fusion_tasks.shapes_transform)

    @model_validator(mode="after")
    def _check(self) -> BLIPPreset:
        check_stages([self.pretrain_stage, self.bootstrap_stage], BLIP_OBJECTIVES, "BLIP")
        longest = max(self.pretrain_stage.max_length, self.bootstrap_stage.max_length, self.eval_max_length,
                      self.caption_max_new_tokens + 1)
        if longest > self.text.max_position_embeddings:
            raise ValueError(f"texts of up to {longest} tokens exceed text.max_position_embeddings "
                             f"{self.text.max_position_embeddings}")
        if not 0.0 <= self.noise_fraction <= 1.0 or not 0.0 <= self.capfilt_threshold <= 1.0:
            raise ValueError("noise_fraction and capfilt_threshold must be in [0, 1]")
        return self

    def blip_config(self, tokenizer: Tokenizer) -> BLIPConfig:
        text = self.text.model_copy(update={"vocab_size": tokenizer.vocab_size})
        return BLIPConfig(vision=self.vision, text=BertConfig.model_validate(text.model_dump()),
                          embed_dim=self.embed_dim, momentum=self.momentum, label_smoothing=self.label_smoothing,
                          linear_init=self.linear_init,
                          **blip_token_ids(tokenizer))


def _text(vocab: int, width: int, layers: int, heads: int, ffn: int, positions: int, vision_width: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads, intermediate_size=ffn,
        max_position_embeddings=positions, type_vocab_size=0, cross_attention_layers=tuple(range(layers)),
        encoder_width=vision_width, separate_decoder_attention=True,
    )


def _stage(name: str, steps: int, batch_size: int, lr: float, warmup: int) -> StageConfig:
    return StageConfig(name=name, trainable=TRAINABLE, objectives=OBJECTIVES, data="captions", steps=steps,
                       batch_size=batch_size, lr=lr, warmup_steps=warmup, weight_decay=0.05, max_length=40,
                       log_every=20)


def tiny() -> BLIPPreset:
    vision = BLIP_VISION.model_copy(update={"image_size": 64, "patch_size": 16, "hidden_size": 128, "num_layers": 4,
                                            "num_heads": 4, "intermediate_size": 512})
    return BLIPPreset(
        name="blip-tiny",
        vision=vision,
        text=_text(1024, 128, 2, 4, 512, 64, vision.hidden_size),
        embed_dim=128,
        # 1,000 steps per model, not 250: after 250 the ITM loss still sat at 0.63, the entropy of its
        # 1:2 label prior (re-ranking and the CapFilt filter then add nothing); by step 1,000 it is
        # 0.48 (ALBEF-tiny's level) and ITC 2.39 -> 1.56 (RESULTS.md / ZOO.md, session 11).
        pretrain_stage=_stage("pretrain", 1000, 64, 1e-3, 25),
        bootstrap_stage=_stage("bootstrap", 1000, 64, 1e-3, 25),
        rerank_k=8,
    )


def paper() -> BLIPPreset:
    """BLIP with ViT-B/16 (224 px) and BERT-base (12 layers, 768 wide; vocabulary 30522 + [DEC],
    [ENC]); 14M images, 20 epochs at batch 2880, AdamW (weight decay 0.05), lr 3e-4 warmed up
    over 3000 steps, max 30 text tokens, momentum encoders with a 57,600 queue, α = 0.4."""
    vision = BLIP_VISION.model_copy(update={"image_size": 224, "patch_size": 16, "hidden_size": 768,
                                            "num_layers": 12, "num_heads": 12, "intermediate_size": 3072})
    steps = 20 * 14_000_000 // 2880
    stage = StageConfig(name="pretrain", trainable=TRAINABLE, objectives=OBJECTIVES, data="captions", steps=steps,
                        batch_size=2880, lr=3e-4, warmup_steps=3000, weight_decay=0.05, max_length=30, bf16=True)
    return BLIPPreset(
        name="blip-base",
        vision=vision,
        text=_text(30524, 768, 12, 12, 3072, 512, vision.hidden_size),
        embed_dim=256,
        momentum=MomentumConfig(momentum=0.995, queue_size=57600, alpha=0.4, alpha_ramp_steps=steps // 20),
        linear_init="normal",
        image_stats="clip",
        tokenizer_vocab_size=30524,
        pretrain_stage=stage,
        bootstrap_stage=stage.model_copy(update={"name": "bootstrap"}),
    )


PRESETS = {"blip-tiny": tiny, "blip-base": paper}


def get_preset(name: str) -> BLIPPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown BLIP preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()


# --- training and evaluation ----------------------------------------------------------------------


def train_blip(
    preset: BLIPPreset, stage: StageConfig, tokenizer: Tokenizer, tokenizer_file: Path, captions_file: Path,
    image_root: Path, transform: ImageTransform, out_dir: Path, *, progress: bool = False,
) -> tuple[BLIP, StageResult]:
    """A new BLIP pretrained by `stage` on a COCO-captions file; checkpoint in out_dir/final.
    The stage's seed (`pipeline.scaled` gives it the run's) seeds the initialisation and the data order."""
    seed_everything(stage.seed)
    model = BLIP(preset.blip_config(tokenizer))
    model.tokenizer = tokenizer
    task = ImageTextTask.from_coco(captions_file, image_root, tokenizer, transform, stage.max_length,
                                   dict(stage.objectives))
    meta = {"preset": preset.name, "image_size": [transform.height, transform.width],
            "image_mean": list(transform.mean), "image_std": list(transform.std), "captions": str(captions_file)}
    result = Trainer(model, stage, task, out_dir=out_dir, checkpoint_meta=meta,
                     tokenizer_file=tokenizer_file, progress=progress).fit()
    return model, result


def most_common_caption(captions_file: Path, image_root: Path) -> str:
    captions, _ = read_coco_captions(captions_file, image_root)
    if not captions:
        raise ValueError(f"{captions_file}: no caption to take a baseline from")
    return Counter(c.caption for c in captions).most_common(1)[0][0]


@torch.no_grad()
def evaluate_captioning(
    model: BLIP, tokenizer: Tokenizer, data_dir: Path, split: str, transform: ImageTransform, *,
    max_new_tokens: int = 30, batch_size: int = 128, baseline_caption: str | None = None,
) -> tuple[CaptionScores, CaptionScores | None, dict[int, str]]:
    """Greedy captions of a split's images scored against that image's captions (references from
    <split>/captions.json); also the baseline caption's scores when given. Returns (scores,
    baseline scores, predictions by image id)."""
    captions, skips = read_coco_captions(shapes_split_paths(data_dir, split)["captions"], data_dir)
    references: dict[int, list[str]] = {}
    paths: dict[int, Path] = {}
    for c in captions:
        references.setdefault(c.image_id, []).append(c.caption)
        paths[c.image_id] = c.image
    if not references:
        raise ValueError(f"{data_dir}/{split}: no captioned image to evaluate")
    images = ImageCache(transform, skips)
    model.eval()
    device = next(model.parameters()).device
    ids = list(references)
    predictions: dict[int, str] = {}
    for start in range(0, len(ids), batch_size):
        chunk = [i for i in ids[start : start + batch_size] if images.get(paths[i]) is not None]
        if not chunk:
            continue
        pixels = [images.normalize(images.get(paths[i])).to(device) for i in chunk]  # type: ignore[arg-type]
        for image_id, text in zip(chunk, model.caption(pixels, max_new_tokens, tokenizer=tokenizer), strict=True):
            predictions[image_id] = text
    scores = score_captions(predictions, references)
    baseline = None
    if baseline_caption is not None:
        baseline = score_captions(dict.fromkeys(references, baseline_caption), references)
    return scores, baseline, predictions


def _capfilt_note(summary: CapFiltSummary) -> dict[str, Any]:
    keys = ("images", "original_total", "original_kept", "original_removed", "synthetic_total", "synthetic_kept",
            "synthetic_removed", "synthetic_duplicate", "synthetic_empty", "noisy_total", "noisy_removed",
            "clean_total", "clean_removed", "kept_as_best", "images_without_captions", "threshold")
    return {**{k: getattr(summary, k) for k in keys}, "noisy_removal_rate": summary.noisy_removal_rate,
            "clean_removal_rate": summary.clean_removal_rate}


def run(ctx: ZooContext, preset: BLIPPreset | None = None) -> ZooResult:
    """The zoo runner (see the module docstring)."""
    preset = preset or tiny()
    data, out = Path(ctx.data_dir), Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    params: dict[str, int] = {}
    notes: dict[str, Any] = {}

    start = time.perf_counter()
    tokenizer = train_fusion_tokenizer(data, preset.tokenizer_vocab_size)
    tokenizer_file = tokenizer.save(out / "tokenizer")
    transform = shapes_transform(data, preset.vision.image_size, preset.image_stats)
    meta = load_meta(data)
    clean_file = shapes_split_paths(data, "train")["captions"]
    noisy_file = out / "web" / "train" / "captions.json"
    corrupted = corrupt_captions(clean_file, noisy_file, preset.noise_fraction, seed=ctx.seed,
                                 colors=list(meta["colors"]), shapes=meta["shapes"],
                                 held_out_combos=meta["held_out_combos"], image_root=data)
    notes["web_captions"] = corrupted
    seconds["data"] = time.perf_counter() - start

    stage_a = scaled(preset.pretrain_stage, ctx.scale, ctx.seed)
    model_a, result_a = train_blip(preset, stage_a, tokenizer, tokenizer_file, noisy_file, noisy_file.parent,
                                   transform, out / "model_a", progress=ctx.progress)
    seconds["pretrain_noisy"], params["pretrain_noisy"] = result_a.seconds, result_a.trainable.trainable
    notes["pretrain_noisy_final_losses"] = result_a.history[-1] if result_a.history else {}

    start = time.perf_counter()
    capfilt_dir = out / "capfilt"
    summary = capfilt(model_a, tokenizer, noisy_file, noisy_file.parent, capfilt_dir, transform,
                      threshold=preset.capfilt_threshold, max_new_tokens=preset.caption_max_new_tokens,
                      max_length=preset.eval_max_length, min_captions_per_image=preset.capfilt_min_captions,
                      progress=ctx.progress)
    seconds["capfilt"] = time.perf_counter() - start
    notes["capfilt"] = _capfilt_note(summary)

    stage_b = scaled(preset.bootstrap_stage, ctx.scale, ctx.seed + 1)  # model B starts from other weights than A
    model_b, result_b = train_blip(preset, stage_b, tokenizer, tokenizer_file, capfilt_dir / "train" / "captions.json",
                                   capfilt_dir, transform, out / "model_b", progress=ctx.progress)
    seconds["pretrain_capfilt"], params["pretrain_capfilt"] = result_b.seconds, result_b.trainable.trainable
    notes["pretrain_capfilt_final_losses"] = result_b.history[-1] if result_b.history else {}

    metrics: dict[str, dict[str, float]] = {label: {} for label in SPLITS.values()}
    baselines: dict[str, dict[str, float]] = {label: {} for label in SPLITS.values()}
    start = time.perf_counter()
    baseline_caption = most_common_caption(clean_file, data)
    notes["caption_baseline"] = baseline_caption
    for split, label in SPLITS.items():
        for name, model in (("model_a", model_a), ("model_b", model_b)):
            scores, base, predictions = evaluate_captioning(
                model, tokenizer, data, split, transform, max_new_tokens=preset.caption_max_new_tokens,
                baseline_caption=baseline_caption)
            if name == "model_b":
                metrics[label].update({"caption_cider": scores.cider_d, "caption_bleu4": scores.bleu[4]})
                assert base is not None
                baselines[label].update({"caption_cider": base.cider_d, "caption_bleu4": base.bleu[4]})
                notes[f"caption_examples_{label}"] = dict(list(predictions.items())[:5])
            else:
                notes[f"model_a_caption_{label}"] = {"cider": scores.cider_d, "bleu4": scores.bleu[4]}
    seconds["captioning_eval"] = time.perf_counter() - start

    evaluation = evaluate_fusion_model(
        model_b, tokenizer, data, ("retrieval", *preset.finetune_tasks), scale=ctx.scale, seed=ctx.seed,
        transform=transform, max_length=preset.eval_max_length, stages=preset.finetune_stages,
        rerank_k=preset.rerank_k, progress=ctx.progress,
    )
    for label in metrics:
        metrics[label].update(evaluation.metrics.get(label, {}))
        baselines[label].update(evaluation.baselines.get(label, {}))
    seconds.update({f"eval_{k}": v for k, v in evaluation.seconds_by_task.items()})
    params.update({r.stage: r.trainable.trainable for r in evaluation.finetune_stages})
    notes["fusion_eval"] = evaluation.notes
    notes["model"] = "model_b (new model pretrained on the CapFilt output of model_a, itself pretrained on noisy captions)"
    return ZooResult(metrics=metrics, baselines=baselines, trainable_params_by_stage=params,
                     seconds_by_stage=seconds, notes=notes)


ZOO = {"blip": run}
