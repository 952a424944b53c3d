"""The zoo runner every LLM-based preset shares: train the preset's tiny recipe through
`tessera.pipeline.train_lvlm`, evaluate it, and report in the zoo's terms.

    ZOO = {"qwen-vl": zoo_runner(tiny)}      in a preset module

What it measures: VQA accuracy (generated answers, official normalisation) on the splits
"test" (in_distribution) and "test_comp" (compositional), with the prior-per-question-type
baseline; the visual tokens one image costs; the trainable parameters and seconds of each of
the preset's stages. More tasks plug in through `extra_evals` (grounding, OCR, captioning:
each returns metrics and baselines per split label).

The ViT and LM pretraining (stages "clip" and "lm") depend only on the shared tiny towers,
the data, the seed and the scale, so it runs once and is cached next to the presets' own
folders (<zoo out>/_lvlm_pretrain/<key>/): every LVLM preset then starts from the same
pretrained encoder and language model, as the real systems start from public checkpoints.
Its seconds are reported in the notes of the preset that ran it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tessera.data.readers import read_vqa, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.data.shapes_reading import reading_task_paths
from tessera.data.task_readers import vqa_prior_baseline
from tessera.models.lvlm import LVLM
from tessera.pipeline import (
    SPLIT_LABELS,
    PipelineResult,
    evaluate_shapes_reading,
    evaluate_shapes_vqa,
    stage_template,
    train_lvlm,
)
from tessera.presets.base import PRETRAIN_STAGES, LVLMPreset
from tessera.text.tokenizer import Tokenizer
from tessera.zoo.core import SPLITS, ZooContext, ZooResult, ZooRunner

# (model, tokenizer, preset, ctx) → (metrics, baselines) per split label; an evaluation should
# cap its items with `eval_limit(ctx.scale, n)` so that smoke runs stay short.
ExtraEval = Callable[[LVLM, Tokenizer, LVLMPreset, ZooContext],
                     tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]]
_DONE = "done.json"


def pretrain_key(preset: LVLMPreset, data_dir: Path, seed: int, scale: float) -> str:
    """What the shared pretraining depends on, hashed."""
    # exclude_defaults: a new config field with a default must not invalidate earlier caches
    parts = {
        "towers": preset.model_dump(mode="json", exclude_defaults=True,
                                    include={"vision", "text_tower", "clip_projection_dim", "llm",
                                             "tokenizer_vocab_size", "special_tokens", "clip_stage", "lm_stage"}),
        "data": str(data_dir.resolve()), "seed": seed, "scale": scale,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def shared_pretraining(preset: LVLMPreset, ctx: ZooContext) -> tuple[Path, dict[str, Any]]:
    """The folder holding tokenizer/, clip/final and lm/final for this preset's towers, trained
    now if no earlier preset did; returns it and notes (its seconds when trained here)."""
    folder = ctx.out_dir.parent / "_lvlm_pretrain" / pretrain_key(preset, Path(ctx.data_dir), ctx.seed, ctx.scale)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two zoo processes must not train it twice at once
        if (folder / _DONE).is_file():
            return folder, {"pretraining": f"shared, from {folder}"}
        result = train_lvlm(preset, ctx.data_dir, folder, stages=PRETRAIN_STAGES, step_scale=ctx.scale,
                            seed=ctx.seed, progress=ctx.progress)
        seconds = {r.stage: r.seconds for r in result.stages}
        (folder / _DONE).write_text(json.dumps({"seconds_by_stage": seconds}, indent=2) + "\n")
    return folder, {"pretraining": f"trained here, shared from {folder}", "pretraining_seconds": seconds}


def eval_limit(scale: float, full: int) -> int | None:
    """Every question at scale ≥ 1; a proportional sample (at least 40) for smoke runs."""
    return None if scale >= 1 else min(full, max(40, round(full * scale)))


def evaluate_vqa_zoo(
    result: PipelineResult, preset: LVLMPreset, ctx: ZooContext,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, Any]]:
    """vqa_accuracy per split label, the prior baseline on the same questions, and per-type notes."""
    skips = SkipStats()
    train_paths = shapes_split_paths(ctx.data_dir, "train")
    train_items, _ = read_vqa(train_paths["vqa_questions"], train_paths["vqa_annotations"], ctx.data_dir)
    metrics: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    notes: dict[str, Any] = {}
    size = preset.image_size
    for split, label in SPLITS.items():
        paths = shapes_split_paths(ctx.data_dir, split)
        items, _ = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], ctx.data_dir)
        limit = eval_limit(ctx.scale, len(items))
        scores, _ = evaluate_shapes_vqa(
            result.model, result.tokenizer, stage_template(preset, None), ctx.data_dir, splits=[split],
            limit=limit, progress=ctx.progress, skips=skips, meta={"image_size": [size, size]})
        (score,) = scores.values()
        prior = vqa_prior_baseline(train_items, items[:limit] if limit else items)
        metrics[label] = {"vqa_accuracy": score.accuracy}
        baselines[label] = {"vqa_accuracy": prior.accuracy}
        notes[f"vqa_accuracy_by_type/{label}"] = score.accuracy_by_type
        notes[f"vqa_questions/{label}"] = score.count
    if skips.total:
        notes["eval_skips"] = skips.summary()
    return metrics, baselines, notes


def reading_eval(file: str) -> ExtraEval:
    """An extra evaluation on a reading-task file of `tessera.data.shapes_reading`
    ("rec_cogvlm", "rec_qwen", "ocr", "chart", ...): greedy answers to its prompts in the
    preset's template, scored with the task's metrics (rec → grounding_acc50, ocr → ocr_cer,
    chart → chart_relaxed_accuracy, ...) beside the majority-answer baseline of the train
    split. Gives nothing when the data set has no reading tasks."""

    def evaluate(model: LVLM, tokenizer: Tokenizer, preset: LVLMPreset, ctx: ZooContext
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        if not reading_task_paths(ctx.data_dir, "train")[file].is_file():
            return {}, {}
        size = preset.image_size
        results, _ = evaluate_shapes_reading(
            model, tokenizer, stage_template(preset, file), ctx.data_dir, file, splits=list(SPLITS),
            limit=lambda count: eval_limit(ctx.scale, count), progress=ctx.progress,
            meta={"image_size": [size, size]})
        metrics: dict[str, dict[str, float]] = {}
        baselines: dict[str, dict[str, float]] = {}
        for split, label in SPLITS.items():
            result = results.get(SPLIT_LABELS[split])
            if result is not None:
                metrics[label], baselines[label] = result["scores"], result["baseline"]
        return metrics, baselines

    return evaluate


def run_lvlm_zoo(preset: LVLMPreset, ctx: ZooContext, extra_evals: Sequence[ExtraEval] = (),
                 before: Sequence[LVLMPreset] = ()) -> ZooResult:
    """Train `preset` (after the presets `before`, into the same folder: Vary-tiny's new vision
    vocabulary before Vary-base), evaluate it and report every stage of all of them."""
    pretrained, notes = shared_pretraining(preset, ctx)
    earlier = []
    for first in before:
        first_pretrained, _ = shared_pretraining(first, ctx)
        earlier += train_lvlm(first, ctx.data_dir, ctx.out_dir, stages=[s.name for s in first.stages],
                              step_scale=ctx.scale, seed=ctx.seed, progress=ctx.progress,
                              pretrained=first_pretrained).stages
    result = train_lvlm(preset, ctx.data_dir, ctx.out_dir, stages=[s.name for s in preset.stages],
                        step_scale=ctx.scale, seed=ctx.seed, progress=ctx.progress, pretrained=pretrained)
    result.stages[:0] = earlier
    start = time.perf_counter()
    metrics, baselines, eval_notes = evaluate_vqa_zoo(result, preset, ctx)
    for extra in extra_evals:
        more, more_baselines = extra(result.model, result.tokenizer, preset, ctx)
        for label in more:
            metrics.setdefault(label, {}).update(more[label])
            baselines.setdefault(label, {}).update(more_baselines.get(label, {}))
    seconds = {r.stage: r.seconds for r in result.stages}
    seconds["eval"] = time.perf_counter() - start
    first = {r.stage: r.history[0]["loss"] for r in result.stages if r.history and "loss" in r.history[0]}
    notes.update(eval_notes)
    notes.update({
        "final_loss_by_stage": {r.stage: r.final_loss for r in result.stages},
        "first_logged_loss_by_stage": first,
        "connector": preset.connector.kind,
        "template": preset.template,
        "image_size": preset.image_size,
        "skips": result.skips.summary(),
    })
    size = preset.image_size
    return ZooResult(
        metrics=metrics, baselines=baselines,
        trainable_params_by_stage={r.stage: r.trainable.trainable for r in result.stages},
        seconds_by_stage=seconds, visual_tokens_per_image=result.model.num_image_tokens(size, size), notes=notes,
    )


def zoo_runner(make_preset: Callable[[], LVLMPreset], extra_evals: Sequence[ExtraEval] = (),
               before: Sequence[Callable[[], LVLMPreset]] = ()) -> ZooRunner:
    """A zoo runner for the preset `make_preset()` builds (built at run time, so the module
    imports cheaply), trained after the presets `before` build."""

    def run(ctx: ZooContext) -> ZooResult:
        return run_lvlm_zoo(make_preset(), ctx, extra_evals, before=[make() for make in before])

    return run
