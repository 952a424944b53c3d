"""The LVLM pipeline as library calls: tokenizer → CLIP-style ViT → LM → the preset's own
stages (LLaVA: stage 1 align → stage 2 instruct; MiniGPT-v2, Qwen-VL, InternVL: three
stages each), and VQA evaluation of a checkpoint on ShapesWorld splits.

`train_lvlm` trains any `LVLMPreset`; `train_llava` is the same function on a LLaVA preset.
`tessera train`, `tessera eval` and `tessera quickstart` are thin wrappers over these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tessera.data.datasets import ConversationDataset, ImageCache, group_by_image, group_captions
from tessera.data.images import ImageTransform, transform_from_meta
from tessera.data.readers import (
    load_meta,
    read_coco_captions,
    read_coco_regions,
    read_llava,
    read_vqa,
    shapes_split_paths,
)
from tessera.data.records import Conversation, SkipStats
from tessera.data.shapes_reading import READING_FILES, read_reading_items, reading_task_paths
from tessera.data.templates import ChatTemplate, get_template, with_task
from tessera.eval.grounding import evaluate_reading
from tessera.eval.vqa_eval import evaluate_vqa
from tessera.eval.vqa_metrics import VQAScores
from tessera.imported_parts import import_parts
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.models.slot_reader import (
    PRESENCE_OBJECTIVE,
    READING_OBJECTIVE,
    SlotReader,
    SlotReaderConfig,
)
from tessera.nn.lora import apply_lora, lora_config
from tessera.presets.base import LVLMPreset, from_llava
from tessera.presets.llava import LLaVAPreset
from tessera.text.llama import LlamaDecoder
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.text.word_swaps import WordSwapper
from tessera.train.checkpoint import load_checkpoint
from tessera.train.parallel import is_main_process, wait_for_everyone
from tessera.train.stage import StageConfig
from tessera.train.tasks import (
    REGION_OBJECTIVES,
    ContrastiveTask,
    ConversationTask,
    GrayscaleViews,
    LanguageModelTask,
    ReadingTask,
    count_phrases_for,
)
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


def build_lvlm(preset: LLaVAPreset | LVLMPreset, tokenizer: Tokenizer, vocab_size: int | None = None) -> LVLM:
    """The preset's LVLM with an embedding of `vocab_size` rows (default: the tokenizer's size;
    an imported LLM keeps its own table, which may be larger than its tokenizer)."""
    if isinstance(preset, LLaVAPreset):
        preset = from_llava(preset)
    llm = preset.llm.model_copy(update={"vocab_size": vocab_size or tokenizer.vocab_size,
                                        "visual_expert": preset.visual_expert})
    return LVLM(LVLMConfig(vision=preset.encoder or preset.vision, connector=preset.connector, llm=llm,
                           image_token_id=tokenizer.image_id, vision_feature_layer=preset.vision_feature_layer,
                           vision_feature_select=preset.vision_feature_select, tiling=preset.tiling,
                           extra_towers=preset.extra_towers, tower_merge=preset.tower_merge,
                           image_positions=preset.image_positions))


def load_stage_modules(model: nn.Module, folder: Path, mapping: dict[str, str]) -> None:
    """For each entry `module prefix here → "<stage>:<module prefix there>"`, load the weights
    under that prefix of the checkpoint folder/<stage>/final into the module (all of its
    weights, shapes checked): Vary-base takes its new vision vocabulary from Vary-tiny."""
    for target, origin in mapping.items():
        stage, _, prefix = origin.partition(":")
        state = load_checkpoint(folder / stage / "final").model.state_dict()
        sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not sub:
            raise ValueError(f"init_from_stages: no weights under {prefix!r} in {folder / stage / 'final'}")
        model.get_submodule(target).load_state_dict(sub)


def stage_template(preset: LVLMPreset, data: str | None) -> ChatTemplate:
    """The preset's template, with the task identifier of `data` (a stage's data file, or None
    for VQA evaluation) when the template has identifiers (MiniGPT-v2)."""
    task = preset.vqa_task if data is None else preset.task_by_data.get(data)
    return with_task(get_template(preset.template), task)


def scaled(stage: StageConfig, scale: float, seed: int) -> StageConfig:
    """The stage shortened by `scale` (tests and smoke runs), seeded by the run's seed plus its own
    (0 unless the preset sets one, so a preset can reseed one stage without changing the others).
    The warm-up shrinks with it, so a short run keeps the schedule's shape instead of warming up
    throughout."""
    steps = max(2, int(stage.steps * scale))
    warmup = min(int(stage.warmup_steps * scale), steps - 1)
    return stage.model_copy(update={"steps": steps, "warmup_steps": warmup, "seed": seed + stage.seed})


@dataclass
class PipelineResult:
    model: LVLM
    tokenizer: Tokenizer
    stages: list[StageResult] = field(default_factory=list)
    skips: SkipStats = field(default_factory=SkipStats)
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)  # imported parts: what was imported, stages not run


def train_llava(
    preset: LLaVAPreset, data_dir: str | Path, out: str | Path, *, stages: Sequence[str] | None = None,
    step_scale: float = 1.0, seed: int = 0, progress: bool = True, resume: dict[str, Path] | None = None,
    vision_from: str | Path | None = None, language_from: str | Path | None = None,
) -> PipelineResult:
    """`train_lvlm` on a LLaVA preset: stages clip, lm, align, instruct; LLaVA checkpoints in
    out/llava/<stage> (all four by default, less those of imported parts)."""
    return train_lvlm(from_llava(preset), data_dir, out, stages=stages,
                      step_scale=step_scale, seed=seed, progress=progress, resume=resume,
                      vision_from=vision_from, language_from=language_from)


def train_lvlm(
    preset: LVLMPreset, data_dir: str | Path, out: str | Path, *, stages: Sequence[str] | None = None,
    step_scale: float = 1.0, seed: int = 0, progress: bool = True, resume: dict[str, Path] | None = None,
    pretrained: str | Path | None = None, vision_from: str | Path | None = None,
    language_from: str | Path | None = None,
) -> PipelineResult:
    """Train the named stages in order (all by default: "clip", "lm", then the preset's own),
    each from the previous one's weights. Stages left out load their result from `out` (e.g.
    rerun only the last stage after a change). `resume` maps a stage name to a step
    checkpoint to continue it from. `pretrained` is another run's folder to take the
    tokenizer and the "clip" and "lm" results from (the zoo shares one pretraining among
    presets with the same towers); those two stages are then not run here. `vision_from` /
    `language_from` (a Hugging Face or Tessera folder, see `tessera.imported_parts`) replace
    the ViT / the LM and its tokenizer by imported ones, whose stages are then not run.
    A stage whose objective is "char_slots" trains the main vision tower alone, in place, with
    a `SlotReader` over the stage's (image, answer) pairs (Vary-tiny's "read" stage); its
    checkpoint holds the reader, and the next stage takes the tower from it."""
    data_dir, out = Path(data_dir), Path(out)
    parts = import_parts(preset, vision=vision_from, language=language_from)
    preset = parts.preset
    default = tuple(s for s in preset.stage_names if s not in parts.skipped_stages)
    stages = default if stages is None else tuple(stages)
    clash = sorted(set(stages) & set(parts.skipped_stages))
    if clash:
        raise ValueError(f"stages {clash} come from imported parts; do not ask to train them too")
    unknown = set(stages) - set(preset.stage_names)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; allowed: {list(preset.stage_names)}")
    resume = resume or {}
    seed_everything(seed)  # model initialisation depends on the run's seed, not the caller's RNG
    skips = SkipStats()
    if pretrained is not None and set(stages) & {"clip", "lm"}:
        raise ValueError("stages 'clip' and 'lm' come from `pretrained`; do not ask to train them too")
    source = out if pretrained is None else Path(pretrained)  # where tokenizer, clip and lm results are
    tok_file = source / "tokenizer" / "tokenizer.json"
    if pretrained is not None and parts.tokenizer is None and not tok_file.is_file():
        raise FileNotFoundError(f"pretrained run {source} has no tokenizer ({tok_file})")
    # Under torchrun every rank would write the same tokenizer: rank 0 does, the others wait.
    if parts.tokenizer is not None:  # the imported LLM's tokenizer
        tok_file = out / "tokenizer" / "tokenizer.json"
        if is_main_process():
            tok_file = parts.tokenizer.save(out / "tokenizer")
    elif "clip" in stages or (vision_from is not None and "lm" in stages) or not tok_file.is_file():
        if is_main_process():
            extra = {"extra_special_tokens": preset.special_tokens} if preset.special_tokens else {}
            tokenizer = train_bpe(corpus_texts(data_dir), vocab_size=preset.tokenizer_vocab_size, **extra)
            tokenizer.save(tok_file.parent)
    wait_for_everyone()
    tokenizer = Tokenizer.load(tok_file)
    size = preset.image_size
    transform = parts.image_transform(size)  # an imported tower's size and statistics
    images = ImageCache(transform, skips)
    train_paths = shapes_split_paths(data_dir, "train")
    meta = {"preset": preset.name, "template": preset.template, "image_size": list(transform.size),
            "image_mean": list(transform.mean), "image_std": list(transform.std)}
    if preset.vqa_task:
        meta["vqa_task"] = preset.vqa_task
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
        # The ViT pretrains at its own size even when the LVLM is fed larger images (tiling).
        side = preset.vision.image_size
        clip_images = images if size == side else ImageCache(ImageTransform(size=(side, side)), skips)
        # NegCLIP's hard negatives: each caption with one colour / shape / size word swapped.
        words = WordSwapper.for_shapesworld(load_meta(data_dir))
        swapper = words if preset.clip_hard_negatives else None
        grayscale = GrayscaleViews(preset.clip_grayscale, words) if preset.clip_grayscale > 0 else None
        regions = None
        if set(preset.clip_stage.objectives) & set(REGION_OBJECTIVES):
            regions, region_skips = read_coco_regions(train_paths["objects"], data_dir)
            skips.merge(region_skips)
        counts = count_phrases_for(data_dir, preset.clip_stage.objectives)
        task = ContrastiveTask(group_captions(captions), tokenizer, clip_images, preset.text_tower.max_position_embeddings,
                               dict(preset.clip_stage.objectives), hard_negatives=swapper, regions=regions,
                               grayscale=grayscale, counts=counts)
        run(clip, preset.clip_stage, task, out / "clip")
    if "lm" in stages:
        lm = LlamaDecoder(preset.llm.model_copy(update={"vocab_size": tokenizer.vocab_size}))
        run(lm, preset.lm_stage, LanguageModelTask(corpus_texts(data_dir), tokenizer, 128), out / "lm")

    model = build_lvlm(preset, tokenizer, vocab_size=preset.llm.vocab_size if parts.language is not None else None)

    def start_from_pretrained() -> None:
        # A NaViT tower starts from the ViT, a visual expert from the LLM's text weights.
        vision = parts.vision
        if vision is None:
            vision = load_checkpoint(source / "clip" / "final").model.vision_model.state_dict()
        language = parts.language
        if language is None:
            language = load_checkpoint(source / "lm" / "final").model.state_dict()
        model.load_pretrained_parts(vision, language)
        load_stage_modules(model, out / preset.folder, preset.init_from_stages)

    lvlm_stages = [s for s in preset.stages if s.name in stages]
    if lvlm_stages:
        first = [s.name for s in preset.stages].index(lvlm_stages[0].name)
        if first > 0:
            previous = load_checkpoint(out / preset.folder / preset.stages[first - 1].name / "final").model
            if isinstance(previous, SlotReader):  # a reading stage trained the vision tower alone
                start_from_pretrained()
                model.vision_tower.load_state_dict(previous.encoder.state_dict())
            else:
                if lora_config(previous) is not None:  # LoRA stages (MiniGPT-v2): continue the same adapters
                    apply_lora(model, lora_config(previous))
                model.load_state_dict(previous.state_dict())
        else:
            start_from_pretrained()
    for stage in lvlm_stages:
        convs = read_stage_conversations(train_paths, stage.data, data_dir, skips)
        if READING_OBJECTIVE in stage.objectives:
            # The main vision tower alone, trained in place by a reader of the stage's texts.
            pairs = reading_pairs(convs, skips)
            reader = SlotReader(SlotReaderConfig.for_texts(model.cfg.vision, [text for _, text in pairs],
                                                           presence_head=PRESENCE_OBJECTIVE in stage.objectives),
                                encoder=model.vision_tower)
            run(reader, stage, ReadingTask(pairs, images, stage.objectives), out / preset.folder / stage.name)
            continue
        if stage.group_by_image:
            convs = group_by_image(convs, seed=seed)
        template = stage_template(preset, stage.data) if preset.task_by_data else preset.template
        dataset = ConversationDataset(convs, tokenizer, template, images, model.num_image_tokens, stage.max_length)
        run(model, stage, ConversationTask(dataset, packing=stage.packing, objectives=stage.objectives),
            out / preset.folder / stage.name)
    last = out / preset.folder / lvlm_stages[-1].name / "final" if lvlm_stages else None
    return PipelineResult(model=model, tokenizer=tokenizer, stages=results, skips=skips, checkpoint=last,
                          notes=parts.notes)


def reading_pairs(convs: Sequence[Conversation], skips: SkipStats) -> list[tuple[Path, str]]:
    """(image, text) of each one-image conversation of a reading stage: the image and its last
    answer (rendered text → the text); other conversations are skipped and counted."""
    pairs = []
    for conv in convs:
        if len(conv.images) == 1 and conv.turns[-1].role == "assistant":
            pairs.append((conv.images[0], conv.turns[-1].text))
        else:
            skips.skip("reading stage: not one image with an answer", conv.id)
    if not pairs:
        raise ValueError("a reading stage's data has no one-image conversation ending in an answer")
    return pairs


# Derived training sets a preset registers by name (Vary-tiny's prompt-free reading data):
# name → (data_dir, split, skips) → conversations.
STAGE_DATA: dict[str, Callable[[Path, str, SkipStats], list[Conversation]]] = {}


def read_stage_conversations(
    paths: dict[str, Path], data: str, data_dir: Path, skips: SkipStats
) -> list[Conversation]:
    """The conversations of a stage's data: a LLaVA-format file of the split (`paths`:
    "llava_pretrain", "llava_instruct"), a reading-task file of the split
    (`tessera.data.shapes_reading`: "rec_cogvlm", "ocr", "chart", ...), a derived set
    registered in `STAGE_DATA`, or several of these joined by "+" (one mixed set). A part
    ending in "?" is optional: left out, and counted in `skips`, when the data set lacks its
    file (the reading tasks are a generation step of their own)."""
    split = next(iter(paths.values())).parent.name
    files = {**reading_task_paths(data_dir, split), **paths}
    convs: list[Conversation] = []
    for part in data.split("+"):
        name, optional = part.removesuffix("?"), part.endswith("?")
        if name in STAGE_DATA:
            convs += STAGE_DATA[name](data_dir, split, skips)
            continue
        if name not in files:
            raise ValueError(f"stage data {name!r} is not a conversation file of the dataset; "
                             f"known: {sorted(files) + sorted(STAGE_DATA)}")
        if not files[name].is_file():
            if optional:
                skips.skip("optional stage data missing", str(files[name]))
                continue
            hint = "" if name in paths else " (write the reading tasks with `tessera data reading --root DIR`)"
            raise FileNotFoundError(f"stage data {name!r}: {files[name]} does not exist{hint}")
        part_convs, conv_skips = read_llava(files[name], data_dir)
        skips.merge(conv_skips)
        convs += part_convs
    return convs


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


def evaluate_shapes_reading(
    model: LVLM, tokenizer: Tokenizer, template: ChatTemplate | str, data_dir: str | Path, task_file: str, *,
    splits: Sequence[str] = tuple(SPLIT_LABELS), limit: int | Callable[[int], int | None] | None = None,
    progress: bool = True, skips: SkipStats | None = None, meta: dict | None = None,
) -> tuple[dict[str, dict[str, Any]], float]:
    """A reading-task file's scores per split (labelled like `evaluate_shapes_vqa`): for each,
    {"task", "count", "scores", "baseline"} with the task's metrics (rec → grounding_acc50, ocr →
    ocr_cer, ...) and the trivial baseline's, taken from the train split; and the seconds it took.
    `task_file` is a key of `READING_FILES` ("rec_qwen", "rec_cogvlm", "ocr", "chart", ...).
    `limit` caps the items per split, or maps a split's item count to its cap; a split left
    without items is left out."""
    if task_file not in READING_FILES:
        raise ValueError(f"unknown reading task {task_file!r}; allowed: {sorted(READING_FILES)}")
    start = time.perf_counter()
    data_dir = Path(data_dir)
    skips = skips if skips is not None else SkipStats()
    images = ImageCache(transform_from_meta(meta or {}, model.cfg.vision.image_size), skips)
    train_file = reading_task_paths(data_dir, "train")[task_file]
    if not train_file.is_file():
        raise FileNotFoundError(f"{train_file} not found: write the reading tasks with "
                                f"`tessera data reading --root {data_dir}`")
    train_items, train_skips = read_reading_items(train_file, data_dir)
    skips.merge(train_skips)
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        items, split_skips = read_reading_items(reading_task_paths(data_dir, split)[task_file], data_dir)
        skips.merge(split_skips)
        cap = limit(len(items)) if callable(limit) else limit
        items = items[:cap] if cap else items
        if not items:
            continue
        scores, baseline = evaluate_reading(model, tokenizer, template, items, train_items, images,
                                            progress=progress, desc=f"{task_file} {split}")
        results[SPLIT_LABELS.get(split, split)] = {"task": items[0].task, "count": len(items), "scores": scores,
                                                   "baseline": baseline}
    return results, time.perf_counter() - start
