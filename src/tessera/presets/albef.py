"""ALBEF preset: the parts, their sizes and the recipe, and the zoo runner.

`tiny` trains on a 2-core CPU in minutes on ShapesWorld: a 4-layer ViT (64 px, patch 8) and a
4-layer BERT split 2 + 2 (text encoder, fusion encoder), width 128, ITC space 256, pretrained
from scratch with ITC (momentum queue of 1024) + ITM (hard negatives) + MLM (15%), momentum
0.995 and momentum distillation α = 0.4 ramped over the first `alpha_ramp_fraction` of the
pretraining (capped at one epoch). `paper` records the published ALBEF-4M setting (ViT-B/16,
BERT-base split 6 + 6, queue 65,536, 30 epochs at batch 512, AdamW lr 1e-4, weight decay
0.02) for use with imported weights.

The zoo runner trains the tiny recipe with `ImageTextTask` on the ShapesWorld train captions and
evaluates with `eval.fusion_eval`: retrieval (ITC ranking, top-k re-ranked by ITM + ITC), VQA
(classification head on the fused [CLS]), reasoning over image pairs, entailment.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import model_validator

from tessera.config import Config
from tessera.data.datasets import ImageCache
from tessera.data.records import SkipStats
from tessera.eval.fusion_eval import check_finetune, evaluate_fusion_model
from tessera.models.albef import ALBEF, ALBEF_TEXT, ALBEF_VISION, OBJECTIVES, ALBEFConfig
from tessera.pipeline import scaled
from tessera.text.bert import BertConfig
from tessera.text.tokenizer import Tokenizer
from tessera.train.fusion_tasks import (
    MASK_TOKEN,
    shapes_pretrain_task,
    shapes_transform,
    train_fusion_tokenizer,
)
from tessera.train.stage import StageConfig, check_stages
from tessera.train.trainer import Trainer, seed_everything
from tessera.vision.vit import ViTConfig
from tessera.zoo.core import ZooContext, ZooResult


class ALBEFPreset(Config):
    name: str
    model: ALBEFConfig  # vocab_size and mask_token_id are set from the trained tokenizer
    tokenizer_vocab_size: int = 1024
    alpha_ramp_fraction: float = 0.2  # of the first stage's steps, capped at one epoch (ALBEF: epoch 1 of 30)
    stages: list[StageConfig]  # pretraining stages, run in order on image-caption pairs
    finetune: dict[str, StageConfig] = {}  # downstream fine-tuning overrides ("vqa", "reasoning", "entailment")
    rerank_k: int = 16  # retrieval: each query's ITC top-k re-ranked by ITM + ITC

    @model_validator(mode="after")
    def _check(self) -> ALBEFPreset:
        if not self.stages:
            raise ValueError("an ALBEF preset needs at least one pretraining stage")
        check_stages(self.stages, OBJECTIVES, "ALBEF")
        check_finetune(self.finetune)
        if not 0 <= self.alpha_ramp_fraction <= 1:
            raise ValueError(f"alpha_ramp_fraction must be in [0, 1], got {self.alpha_ramp_fraction}")
        return self


def tiny() -> ALBEFPreset:
    return ALBEFPreset(
        name="albef-tiny",
        model=ALBEFConfig(vision=ALBEF_VISION, text=ALBEF_TEXT, embed_dim=256, queue_size=1024, momentum=0.995,
                          alpha=0.4),
        stages=[
            StageConfig(name="pretrain", trainable=["*"], objectives={"itc": 1.0, "itm": 1.0, "mlm": 1.0},
                        data="captions", steps=600, batch_size=64, lr=5e-4, warmup_steps=30, weight_decay=0.02,
                        max_length=40, log_every=25),
        ],
    )


def paper() -> ALBEFPreset:
    """ALBEF-4M: ViT-B/16 at 256 px, BERT-base (layers 0-5 text, 6-11 fusion), ITC space 256,
    queue 65,536, momentum 0.995, α 0.4 over the first of 30 epochs; batch 512, AdamW lr 1e-4
    (warm-up 1000 steps, cosine), weight decay 0.02. 4M pairs × 30 epochs / 512 ≈ 234k steps."""
    vision = ViTConfig(image_size=256, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                       intermediate_size=3072, act="gelu", layer_norm_eps=1e-6, class_token=True,
                       pre_layernorm=False, patch_bias=True, post_layernorm_on="all_tokens")
    text = BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      max_position_embeddings=512, cross_attention_layers=tuple(range(6, 12)), encoder_width=768)
    return ALBEFPreset(
        name="albef-4m",
        model=ALBEFConfig(vision=vision, text=text, embed_dim=256, queue_size=65536, momentum=0.995, alpha=0.4,
                          mask_token_id=103, pad_token_id=0, bos_token_id=101, eos_token_id=102),
        tokenizer_vocab_size=30522,
        alpha_ramp_fraction=1 / 30,
        stages=[
            StageConfig(name="pretrain", trainable=["*"], objectives={"itc": 1.0, "itm": 1.0, "mlm": 1.0},
                        data="captions", steps=234_375, batch_size=512, lr=1e-4, warmup_steps=1000,
                        weight_decay=0.02, max_length=30, bf16=True),
        ],
    )


PRESETS = {"albef-tiny": tiny, "albef-4m": paper}


def get_preset(name: str) -> ALBEFPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]()


def model_config_for(preset: ALBEFPreset, tokenizer: Tokenizer, alpha_ramp_steps: int) -> ALBEFConfig:
    """The preset's model config with the tokenizer's vocabulary and special ids."""
    data = preset.model.to_dict()
    data["text"]["vocab_size"] = tokenizer.vocab_size
    data.update(
        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        mask_token_id=tokenizer.token_id(MASK_TOKEN), alpha_ramp_steps=alpha_ramp_steps,
    )
    return ALBEFConfig.parse(data, where=f"preset {preset.name}")


def run(ctx: ZooContext, preset: ALBEFPreset | None = None) -> ZooResult:
    """Train the tiny recipe on ctx.data_dir and evaluate retrieval, VQA, reasoning and entailment."""
    preset = preset or tiny()
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(ctx.seed)
    tokenizer = train_fusion_tokenizer(ctx.data_dir, preset.tokenizer_vocab_size)
    tokenizer_file = tokenizer.save(out / "tokenizer")
    images = ImageCache(shapes_transform(ctx.data_dir, preset.model.vision.image_size), SkipStats())
    stages = [scaled(s, ctx.scale, ctx.seed) for s in preset.stages]
    model: ALBEF | None = None
    seconds: dict[str, float] = {}
    trainable: dict[str, int] = {}
    history: dict[str, list[dict[str, float]]] = {}
    for stage in stages:
        task = shapes_pretrain_task(ctx.data_dir, tokenizer, stage, images=images)
        if model is None:
            epoch_steps = max(1, task.num_examples // stage.batch_size)
            ramp = min(epoch_steps, round(preset.alpha_ramp_fraction * stage.steps))
            seed_everything(ctx.seed)
            model = ALBEF(model_config_for(preset, tokenizer, ramp))
        result = Trainer(model, stage, task, out_dir=out / stage.name, checkpoint_meta={"preset": preset.name},
                         tokenizer_file=tokenizer_file, progress=ctx.progress).fit()
        seconds[stage.name] = result.seconds
        trainable[stage.name] = result.trainable.trainable
        history[stage.name] = result.history
    assert model is not None
    evaluation = evaluate_fusion_model(
        model, tokenizer, ctx.data_dir, scale=ctx.scale, seed=ctx.seed,
        transform=shapes_transform(ctx.data_dir, preset.model.vision.image_size),
        max_length=max(s.max_length for s in stages), stages=preset.finetune, rerank_k=preset.rerank_k,
        progress=ctx.progress,
    )
    for task_name, secs in evaluation.seconds_by_task.items():
        seconds[f"eval_{task_name}"] = secs
    for finetuned in evaluation.finetune_stages:
        trainable[finetuned.stage] = finetuned.trainable.trainable
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    notes = {
        "preset": preset.name,
        "alpha_ramp_steps": model.cfg.alpha_ramp_steps,
        "final_losses": {name: h[-1] for name, h in history.items() if h},
        "skipped_pretraining": images.skips.summary(),
        **evaluation.notes,
    }
    return ZooResult(metrics=evaluation.metrics, baselines=evaluation.baselines,
                     trainable_params_by_stage=trainable, seconds_by_stage=seconds, notes=notes)


ZOO = {"albef": run}
