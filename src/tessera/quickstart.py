"""The quickstart: ShapesWorld → tokenizer → CLIP-style ViT → LM → LLaVA stages 1 and 2 →
VQA evaluation (in-distribution and compositional) → a few answers from the trained model.

Every step is an ordinary library call; this module only strings them together and
writes OUT/results.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tessera.data.datasets import ConversationDataset, ImageCache, group_captions
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, read_llava, read_vqa, shapes_split_paths
from tessera.data.records import SkipStats
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.eval.report import format_table, vqa_results_table, write_json_atomic
from tessera.eval.vqa_eval import evaluate_vqa
from tessera.models.dual_encoder import DualEncoder, DualEncoderConfig
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.presets.llava import LLaVAPreset, get_preset
from tessera.text.llama import LlamaDecoder
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.tasks import ContrastiveTask, ConversationTask, LanguageModelTask
from tessera.train.trainer import StageResult, Trainer

SPLIT_NAMES = {"test": "in-distribution", "test_comp": "compositional"}


def _say(msg: str) -> None:
    print(f"[tessera] {msg}", flush=True)


def corpus_texts(data_dir: Path) -> list[str]:
    """Text for the tokenizer and LM pretraining: train captions and conversation turns."""
    paths = shapes_split_paths(data_dir, "train")
    captions, _ = read_coco_captions(paths["captions"], data_dir)
    convs, _ = read_llava(paths["llava_instruct"], data_dir)
    texts = [c.caption for c in captions]
    for conv in convs:
        turns = [t.text.replace("<image>", "").strip() for t in conv.turns]
        texts.append(" ".join(turns))
    return texts


def build_lvlm(preset: LLaVAPreset, tokenizer: Tokenizer) -> LVLM:
    llm = preset.llm.model_copy(update={"vocab_size": tokenizer.vocab_size})
    return LVLM(LVLMConfig(vision=preset.vision, connector=preset.connector, llm=llm,
                           image_token_id=tokenizer.image_id,
                           vision_feature_layer=preset.vision_feature_layer))


def run_quickstart(
    out: str | Path, preset_name: str = "llava-1.5-tiny", *, num_train: int = 8000, seed: int = 0,
    progress: bool = True, step_scale: float = 1.0, eval_limit: int | None = None,
) -> dict[str, Any]:
    """Run the whole LLaVA pipeline at tiny scale; `step_scale` < 1 shortens every stage
    (tests use it), `eval_limit` caps evaluated questions per split."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    start = time.perf_counter()
    preset = get_preset(preset_name)
    timings: dict[str, float] = {}
    skips = SkipStats()

    def stage(cfg):
        return cfg.model_copy(update={"steps": max(2, int(cfg.steps * step_scale)),
                                      "warmup_steps": min(cfg.warmup_steps, max(0, int(cfg.steps * step_scale) - 1)),
                                      "seed": seed})

    # 1. Data
    t = time.perf_counter()
    data_dir = out / "data"
    n_eval = max(50, num_train // 8)
    shapes_cfg = ShapesConfig(seed=seed, image_size=preset.vision.image_size, num_train=num_train,
                              num_val=n_eval // 2, num_test=n_eval, num_test_comp=n_eval)
    _say(f"generating ShapesWorld ({num_train} train images) in {data_dir}")
    generate_shapes(shapes_cfg, data_dir, progress=progress)
    timings["data"] = time.perf_counter() - t

    # 2. Tokenizer
    t = time.perf_counter()
    texts = corpus_texts(data_dir)
    tokenizer = train_bpe(texts, vocab_size=preset.tokenizer_vocab_size)
    tok_file = tokenizer.save(out / "tokenizer")
    _say(f"tokenizer: {tokenizer.vocab_size} tokens trained on {len(texts)} texts")
    timings["tokenizer"] = time.perf_counter() - t

    transform = ImageTransform(size=(preset.vision.image_size, preset.vision.image_size))
    images = ImageCache(transform, skips)
    train_paths = shapes_split_paths(data_dir, "train")
    meta = {"preset": preset.name, "template": preset.template,
            "image_size": [preset.vision.image_size, preset.vision.image_size]}
    results_stages: list[StageResult] = []

    # 3. Contrastive pretraining of the ViT
    clip_stage = stage(preset.clip_stage)
    clip = DualEncoder(DualEncoderConfig(
        vision=preset.vision,
        text=preset.text_tower.model_copy(update={"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id}),
        projection_dim=preset.clip_projection_dim,
    ))
    captions, cap_skips = read_coco_captions(train_paths["captions"], data_dir)
    skips.merge(cap_skips)
    task = ContrastiveTask(group_captions(captions), tokenizer, images, preset.text_tower.max_position_embeddings)
    results_stages.append(Trainer(clip, clip_stage, task, out_dir=out / "clip", checkpoint_meta=meta,
                                  tokenizer_file=tok_file, progress=progress).fit())

    # 4. Language-model pretraining
    lm = LlamaDecoder(preset.llm.model_copy(update={"vocab_size": tokenizer.vocab_size}))
    results_stages.append(Trainer(lm, stage(preset.lm_stage), LanguageModelTask(texts, tokenizer, 128),
                                  out_dir=out / "lm", checkpoint_meta=meta, tokenizer_file=tok_file,
                                  progress=progress).fit())

    # 5. LLaVA: stage 1 (align) and stage 2 (instruct)
    model = build_lvlm(preset, tokenizer)
    model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    for st in (preset.align_stage, preset.instruct_stage):
        st = stage(st)
        convs, conv_skips = read_llava(train_paths[st.data], data_dir)
        skips.merge(conv_skips)
        dataset = ConversationDataset(convs, tokenizer, preset.template, images, model.num_image_tokens, st.max_length)
        task = ConversationTask(dataset, packing=st.packing, objectives=st.objectives)
        results_stages.append(Trainer(model, st, task, out_dir=out / "llava" / st.name, checkpoint_meta=meta,
                                      tokenizer_file=tok_file, progress=progress).fit())
    for r in results_stages:
        timings[f"train_{r.stage}"] = r.seconds
        _say(f"stage {r.stage}: {r.steps} steps in {r.seconds:.0f}s, final loss {r.final_loss:.4f}; {r.trainable}")
    final_ckpt = out / "llava" / "instruct" / "final"

    # 6. Evaluation
    t = time.perf_counter()
    scores = {}
    for split, label in SPLIT_NAMES.items():
        paths = shapes_split_paths(data_dir, split)
        items, vqa_skips = read_vqa(paths["vqa_questions"], paths["vqa_annotations"], data_dir)
        skips.merge(vqa_skips)
        items = items[:eval_limit] if eval_limit else items
        scores[label], _ = evaluate_vqa(model, tokenizer, preset.template, items, images,
                                        progress=progress, desc=f"eval {split}")
    timings["eval"] = time.perf_counter() - t
    wall = time.perf_counter() - start

    results = {
        "preset": preset.name,
        "vqa_accuracy_in_distribution": scores["in-distribution"].accuracy,
        "vqa_accuracy_compositional": scores["compositional"].accuracy,
        "vqa": {k: v.to_dict() for k, v in scores.items()},
        "wall_seconds": wall,
        "seconds_by_step": timings,
        "stages": [{"stage": r.stage, "steps": r.steps, "seconds": r.seconds, "final_loss": r.final_loss,
                    "trainable_params": r.trainable.trainable, "frozen_params": r.trainable.frozen}
                   for r in results_stages],
        "skipped": dict(skips.reasons),
        "checkpoint": str(final_ckpt),
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    write_json_atomic(out / "results.json", results)
    print()
    print(vqa_results_table(scores))
    print()
    print(format_table([{"step": k, "seconds": v} for k, v in timings.items()] +
                       [{"step": "total (wall)", "seconds": wall}], floatfmt=".1f"))
    _say(skips.summary())
    _say(f"results: {out / 'results.json'}; model: {final_ckpt}")
    _say(f"try: tessera chat {final_ckpt} --image {data_dir / 'images' / 'test' / 'test_000000.png'} "
         "\"what color is the circle?\"")
    return results


def load_results(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "results.json").read_text())
