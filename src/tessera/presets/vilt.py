"""ViLT preset: the model's sizes, the pretraining recipe, and the zoo runner.

`tiny` trains on a 2-core CPU in minutes on ShapesWorld: one 4-layer transformer of width 128
over the caption's word embeddings and 16-pixel linear patch embeddings of the 64-pixel image
(16 patches + a class token), pretrained from scratch with ITM (random negatives: ViLT has no
ITC to mine hard ones from) and MLM with whole-word masking. `paper` records ViLT-B/32
(ViT-B/32 sizes at 384 px, BERT's uncased WordPiece vocabulary, 100k steps at batch 4096,
AdamW lr 1e-4, weight decay 0.01, 10% warm-up) for use with imported weights.

The zoo runner trains the tiny recipe with `ImageTextTask` on the ShapesWorld train captions and
evaluates with `eval.fusion_eval`: retrieval by the ITM logit over every pair of a gallery
subset (ViLT has no ITC embeddings), then VQA, reasoning (ViLT's "pair" head over both images'
fused states) and entailment, each a head fine-tuned on the fused [CLS].

`run_fusion_recipe` is the runner's body shared with the VLMo preset: tokenizer, stages in
order (each with its batch modality), evaluation, ZooResult.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import model_validator
from torch import nn

from tessera.config import Config
from tessera.data.datasets import ImageCache
from tessera.data.records import SkipStats
from tessera.eval.fusion_eval import check_finetune, evaluate_fusion_model
from tessera.models.vilt import ViLT, ViltConfig
from tessera.pipeline import scaled
from tessera.text.tokenizer import Tokenizer
from tessera.train.fusion_tasks import (
    MASK_TOKEN,
    ImageStats,
    Modality,
    shapes_pretrain_task,
    shapes_transform,
    train_fusion_tokenizer,
)
from tessera.train.stage import StageConfig, check_stages
from tessera.train.trainer import Trainer, seed_everything
from tessera.zoo.core import ZooContext, ZooResult

OBJECTIVES: tuple[str, ...] = ("itm", "mlm")


class ViLTPreset(Config):
    name: str
    model: ViltConfig  # vocab_size, mask_token_id and special_token_ids come from the tokenizer
    tokenizer_vocab_size: int = 1024
    stages: list[StageConfig]  # pretraining on image-caption pairs, in order
    finetune: dict[str, StageConfig] = {}  # overrides of fusion_eval's stages ("vqa", "reasoning", "entailment")
    itm_only_images: int = 100  # retrieval gallery subset scored pair by pair with ITM
    # Pixel normalisation on ShapesWorld (fusion_tasks.shapes_transform): "dataset" centres the
    # light-grey background; under CLIP's statistics ViLT never learns to read the image.
    image_stats: ImageStats = "dataset"

    @model_validator(mode="after")
    def _check(self) -> ViLTPreset:
        if not self.stages:
            raise ValueError("a ViLT preset needs at least one pretraining stage")
        check_stages(self.stages, OBJECTIVES, "ViLT")
        check_finetune(self.finetune)
        return self


def tiny() -> ViLTPreset:
    return ViLTPreset(
        name="vilt-tiny",
        model=ViltConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, image_size=64,
                         patch_size=16, max_position_embeddings=40),
        stages=[
            # 1,500 steps, not 500: i2t R@1 0.21 -> 0.64, VQA 0.58 -> 0.64, reasoning 0.63 -> 0.68,
            # entailment 0.68 -> 0.80 (RESULTS.md, session 18); 8-pixel patches instead of 16 gave
            # nothing at 500 steps.
            StageConfig(name="pretrain", trainable=["*"], objectives={"itm": 1.0, "mlm": 1.0}, data="captions",
                        steps=1500, batch_size=32, lr=5e-4, warmup_steps=25, weight_decay=0.01, max_length=40,
                        log_every=25),
        ],
    )


def paper() -> ViLTPreset:
    """ViLT-B/32: ViT-B/32 sizes (12 layers, width 768, 12 heads, MLP 3072) on images resized to
    a 384-pixel shorter side, text of at most 40 BERT-uncased tokens; ITM + whole-word MLM;
    100k steps at batch 4096, AdamW lr 1e-4, weight decay 0.01, warm-up 10%."""
    return ViLTPreset(
        name="vilt-b32",
        model=ViltConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                         image_size=384, patch_size=32, max_position_embeddings=40, mask_token_id=103,
                         special_token_ids=(0, 100, 101, 102, 103), layer_norm_eps=1e-12, linear_init="normal"),
        tokenizer_vocab_size=30522,
        stages=[
            StageConfig(name="pretrain", trainable=["*"], objectives={"itm": 1.0, "mlm": 1.0}, data="captions",
                        steps=100_000, batch_size=4096, lr=1e-4, warmup_steps=10_000, weight_decay=0.01,
                        max_length=40, bf16=True),
        ],
        image_stats="clip",
    )


PRESETS = {"vilt-tiny": tiny, "vilt-b32": paper}


def get_preset(name: str) -> ViLTPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()


def tokenizer_fields(tokenizer: Tokenizer) -> dict[str, Any]:
    """Config fields a fusion model takes from its tokenizer: the vocabulary size, the "<mask>"
    id and the ids MLM must never mask (every special token of the vocabulary)."""
    added = tokenizer.backend.get_added_tokens_decoder()
    return {
        "vocab_size": tokenizer.vocab_size,
        "mask_token_id": tokenizer.token_id(MASK_TOKEN),
        "special_token_ids": tuple(sorted(i for i, token in added.items() if token.special)),
    }


def model_config_for(preset: ViLTPreset, tokenizer: Tokenizer) -> ViltConfig:
    return ViltConfig.parse({**preset.model.to_dict(), **tokenizer_fields(tokenizer)}, where=f"preset {preset.name}")


def build_model(preset: ViLTPreset, tokenizer: Tokenizer) -> ViLT:
    model = ViLT(model_config_for(preset, tokenizer))
    model.set_word_starts(tokenizer)
    return model


def run_fusion_recipe(
    ctx: ZooContext,
    *,
    preset_name: str,
    tokenizer_vocab_size: int,
    image_size: int,
    stages: Sequence[tuple[StageConfig, Modality]],
    build: Callable[[Tokenizer], nn.Module],
    finetune: dict[str, StageConfig],
    itm_only_images: int = 100,
    rerank_k: int = 16,
    image_stats: ImageStats = "clip",
) -> ZooResult:
    """Train a fusion model's recipe on ctx.data_dir (each stage on batches of its modality,
    from the previous stage's weights, steps × ctx.scale) and evaluate retrieval, VQA,
    reasoning and entailment with eval.fusion_eval."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(ctx.seed)
    tokenizer = train_fusion_tokenizer(ctx.data_dir, tokenizer_vocab_size)
    tokenizer_file = tokenizer.save(out / "tokenizer")
    transform = shapes_transform(ctx.data_dir, image_size, image_stats)
    images = ImageCache(transform, SkipStats())
    meta = {"preset": preset_name, "image_size": [transform.height, transform.width],
            "image_mean": list(transform.mean), "image_std": list(transform.std)}
    seed_everything(ctx.seed)
    model = build(tokenizer)
    seconds: dict[str, float] = {}
    trainable: dict[str, int] = {}
    history: dict[str, list[dict[str, float]]] = {}
    max_length = 40
    for stage, modality in stages:
        stage = scaled(stage, ctx.scale, ctx.seed)
        max_length = stage.max_length
        task = shapes_pretrain_task(ctx.data_dir, tokenizer, stage, modality=modality, images=images)
        result = Trainer(model, stage, task, out_dir=out / stage.name, checkpoint_meta=meta,
                         tokenizer_file=tokenizer_file, progress=ctx.progress).fit()
        seconds[stage.name] = result.seconds
        trainable[stage.name] = result.trainable.trainable
        history[stage.name] = result.history
    evaluation = evaluate_fusion_model(
        model, tokenizer, ctx.data_dir, scale=ctx.scale, seed=ctx.seed, transform=transform,
        max_length=max_length, stages=finetune, itm_only_images=itm_only_images, rerank_k=rerank_k,
        progress=ctx.progress,
    )
    for task_name, secs in evaluation.seconds_by_task.items():
        seconds[f"eval_{task_name}"] = secs
    for finetuned in evaluation.finetune_stages:
        trainable[finetuned.stage] = finetuned.trainable.trainable
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    notes = {
        "preset": preset_name,
        "final_losses": {name: h[-1] for name, h in history.items() if h},
        "skipped_pretraining": images.skips.summary(),
        **evaluation.notes,
    }
    return ZooResult(metrics=evaluation.metrics, baselines=evaluation.baselines,
                     trainable_params_by_stage=trainable, seconds_by_stage=seconds, notes=notes)


def run(ctx: ZooContext, preset: ViLTPreset | None = None) -> ZooResult:
    """Train the tiny recipe on ctx.data_dir and evaluate retrieval (ITM), VQA, reasoning and entailment."""
    preset = preset or tiny()
    return run_fusion_recipe(
        ctx, preset_name=preset.name, tokenizer_vocab_size=preset.tokenizer_vocab_size,
        image_size=preset.model.image_size, stages=[(stage, "image_text") for stage in preset.stages],
        build=lambda tokenizer: build_model(preset, tokenizer), finetune=preset.finetune,
        itm_only_images=preset.itm_only_images, image_stats=preset.image_stats,
    )


ZOO = {"vilt": run}
