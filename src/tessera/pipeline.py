"""The LLaVA pipeline as library calls: tokenizer → CLIP-style ViT → LM → LLaVA stage 1
(align) → stage 2 (instruct), and VQA evaluation of a checkpoint on ShapesWorld splits.

`tessera train`, `tessera eval` and `tessera quickstart` are thin wrappers over these.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tessera.data.datasets import ConversationDataset, ImageCache, group_by_image, group_captions
from tessera.data.images import ImageTransform, transform_from_meta
from tessera.data.readers import read_coco_captions, read_llava, read_vqa, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.eval.vqa_eval import evaluate_vqa
from tessera.eval.vqa_metrics import VQAScores
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.presets.llava import LLaVAPreset
from tessera.text.llama import LlamaDecoder
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.checkpoint import load_checkpoint
from tessera.train.stage import StageConfig
from tessera.train.tasks import ContrastiveTask, ConversationTask, LanguageModelTask
from tessera.train.trainer import StageResult, Trainer, seed_everything

STAGES = ("clip", "lm", "align", "instruct")
SPLIT_LABELS = {"test": "in-distribution", "test_comp": "compositional"}


def corpus_texts(data_dir: Path) -> list[str]:
    """Text for the tokenizer and LM pretraining: train captions and conversation turns."""
    paths = shapes_split_paths(data_dir, "train")
    captions, _ = read_coco_captions(paths["captions"], data_dir)
    convs, _ = read_llava(paths["llava_instruct"], data_dir)
    texts = [c.caption for c in captions]
    texts += [" ".join(t.text.replace("<image>", "").strip() for t in conv.turns) for conv in convs]
    return texts


def build_lvlm(preset: LLaVAPreset, tokenizer: Tokenizer) -> LVLM:
    llm = preset.llm.model_copy(update={"vocab_size": tokenizer.vocab_size})
    return LVLM(LVLMConfig(vision=preset.vision, connector=preset.connector, llm=llm,
                           image_token_id=tokenizer.image_id, vision_feature_layer=preset.vision_feature_layer))


def scaled(stage: StageConfig, scale: float, seed: int) -> StageConfig:
    """The stage shortened by `scale` (tests and smoke runs), with the run's seed. The warm-up
    shrinks with it, so a short run keeps the schedule's shape instead of warming up throughout."""
    steps = max(2, int(stage.steps * scale))
    warmup = min(int(stage.warmup_steps * scale), steps - 1)
    return stage.model_copy(update={"steps": steps, "warmup_steps": warmup, "seed": seed})


@dataclass
class PipelineResult:
    model: LVLM
    tokenizer: Tokenizer
    stages: list[StageResult] = field(default_factory=list)
    skips: SkipStats = field(default_factory=SkipStats)
    checkpoint: Path | None = None


def train_llava(
    preset: LLaVAPreset, data_dir: str | Path, out: str | Path, *, stages: Sequence[str] = STAGES,
    step_scale: float = 1.0, seed: int = 0, progress: bool = True, resume: dict[str, Path] | None = None,
) -> PipelineResult:
    """Train the named stages in order, each from the previous one's weights. Stages left
    out load their result from `out` (e.g. rerun only "instruct" after a change).
    `resume` maps a stage name to a step checkpoint to continue it from."""
    data_dir, out = Path(data_dir), Path(out)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; allowed: {list(STAGES)}")
    resume = resume or {}
    seed_everything(seed)  # model initialisation depends on the run's seed, not the caller's RNG
    skips = SkipStats()
    tok_file = out / "tokenizer" / "tokenizer.json"
    if "clip" in stages or not tok_file.is_file():
        tokenizer = train_bpe(corpus_texts(data_dir), vocab_size=preset.tokenizer_vocab_size)
        tokenizer.save(tok_file.parent)
    tokenizer = Tokenizer.load(tok_file)
    images = ImageCache(ImageTransform(size=(preset.vision.image_size, preset.vision.image_size)), skips)
    train_paths = shapes_split_paths(data_dir, "train")
    meta = {"preset": preset.name, "template": preset.template,
            "image_size": [preset.vision.image_size, preset.vision.image_size]}
    results: list[StageResult] = []

    def run(model: nn.Module, stage: StageConfig, task, folder: Path) -> None:
        trainer = Trainer(model, scaled(stage, step_scale, seed), task, out_dir=folder, checkpoint_meta=meta,
                          tokenizer_file=tok_file, progress=progress)
        results.append(trainer.fit(resume_from=resume.get(stage.name)))

    if "clip" in stages:
        clip = DualEncoder(DualEncoderConfig(
            vision=preset.vision, projection_dim=preset.clip_projection_dim,
            text=preset.text_tower.model_copy(update={"vocab_size": tokenizer.vocab_size,
                                                      "eos_token_id": tokenizer.eos_id}),
        ))
        captions, cap_skips = read_coco_captions(train_paths["captions"], data_dir)
        skips.merge(cap_skips)
        task = ContrastiveTask(group_captions(captions), tokenizer, images, preset.text_tower.max_position_embeddings)
        run(clip, preset.clip_stage, task, out / "clip")
    if "lm" in stages:
        lm = LlamaDecoder(preset.llm.model_copy(update={"vocab_size": tokenizer.vocab_size}))
        run(lm, preset.lm_stage, LanguageModelTask(corpus_texts(data_dir), tokenizer, 128), out / "lm")

    model = build_lvlm(preset, tokenizer)
    llava_stages = [s for s in (preset.align_stage, preset.instruct_stage) if s.name in stages]
    if llava_stages:
        before = "align" if llava_stages[0].name == "instruct" else None
        if before is not None:
            model.load_state_dict(load_checkpoint(out / "llava" / before / "final").model.state_dict())
        else:
            model.vision_tower.load_state_dict(load_checkpoint(out / "clip" / "final").model.vision_model.state_dict())
            model.language_model.load_state_dict(load_checkpoint(out / "lm" / "final").model.state_dict())
    for stage in llava_stages:
        convs, conv_skips = read_llava(train_paths[stage.data], data_dir)
        skips.merge(conv_skips)
        if stage.group_by_image:
            convs = group_by_image(convs, seed=seed)
        dataset = ConversationDataset(convs, tokenizer, preset.template, images, model.num_image_tokens,
                                      stage.max_length)
        run(model, stage, ConversationTask(dataset, packing=stage.packing, objectives=stage.objectives),
            out / "llava" / stage.name)
    last = out / "llava" / llava_stages[-1].name / "final" if llava_stages else None
    return PipelineResult(model=model, tokenizer=tokenizer, stages=results, skips=skips, checkpoint=last)


def evaluate_shapes_vqa(
    model: LVLM, tokenizer: Tokenizer, template: str, data_dir: str | Path, *,
    splits: Sequence[str] = tuple(SPLIT_LABELS), limit: int | None = None, progress: bool = True,
    skips: SkipStats | None = None, meta: dict | None = None,
) -> tuple[dict[str, VQAScores], float]:
    """VQA accuracy per split (labelled in-distribution / compositional); returns the scores
    and the seconds it took. `meta` (a checkpoint's) gives the image size and statistics."""
    start = time.perf_counter()
    data_dir = Path(data_dir)
    skips = skips if skips is not None else SkipStats()
    images = ImageCache(transform_from_meta(meta or {}, model.cfg.vision.image_size), skips)
    scores: dict[str, VQAScores] = {}
    for split in splits:
        paths = shapes_split_paths(data_dir, split)
        items, vqa_skips = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], data_dir)
        skips.merge(vqa_skips)
        items = items[:limit] if limit else items
        scores[SPLIT_LABELS.get(split, split)], _ = evaluate_vqa(
            model, tokenizer, template, items, images, progress=progress, desc=f"eval {split}")
    return scores, time.perf_counter() - start
