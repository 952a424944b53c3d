"""BLIP-2 preset: frozen image encoder → Q-Former (learned queries) → one linear layer → frozen LLM.

The recipe is one stage list (`Blip2Recipe.lvlm.stages`), as SYSTEMS.md describes it:
    "qformer"   stage 1, no LLM: ViT frozen; the Q-Former (with its text transformer and a
                BERT-style tokenizer of its own, as BLIP-2's Q-Former has BERT's) learns ITC / ITG /
                ITM on image-caption pairs (models/blip2.py); run by `train_qformer` with the one
                Trainer and the fusion models' ImageTextTask. Its `trainable` names the stage-1
                model's parameters (everything but vision_model).
    "llm_chat"  the frozen LLM's own preparation: BLIP-2 relies on an LLM that already reads its
                prompt format; Tessera's tiny LLM (pretrained on plain text, shared with the other
                presets) is tuned on conversations whose image is replaced by its description, in
                the "blip2" template (`tune_llm_chat`), then stays frozen for good.
    "generate"  stage 2: ViT and LLM frozen; the Q-Former (without its text side) and the
                projection learn to make the LLM write the caption (ShapesWorld's
                llava_pretrain: image → caption conversations).
    "instruct"  stage 2 continued on ShapesWorld's questions and chats, still with the LLM frozen
                (BLIP-2 fine-tunes the Q-Former, not the LLM, for VQA).
Stages 2+ run through `tessera.pipeline.train_lvlm`: `train_blip2` writes the LVLM as stage 1
leaves it (ViT and LLM from the shared pretraining, Q-Former from stage 1, projection new) as
the "qformer" stage's checkpoint, tunes the LLM ("llm_chat"), and train_lvlm continues from there.

Every image becomes `num_queries` tokens (tiny: 8; paper: 32) whatever its size. BLIP-2 prepends
them to the text as soft visual prompts; Tessera's "blip2" template opens the user message with
the image placeholder, so scattering the queries there is the same computation.

`tiny` shares its ViT, LLM and their pretraining with the other tiny LVLM presets. `paper`
records BLIP-2's dimensions (EVA ViT-g/14 without its last layer, 257 × 1408 features; Q-Former
BERT-base with 32 queries; OPT / FlanT5 in the paper — Tessera imports the LLaMA-family variants).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import model_validator

from tessera.config import Config
from tessera.connectors.qformer import QFormerConfig, QFormerConnector
from tessera.data.datasets import ConversationDataset, ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, read_llava, shapes_split_paths
from tessera.data.records import Conversation, SkipStats, Turn
from tessera.data.templates import encode_prompt, stop_token_ids
from tessera.eval.caption_metrics import score_captions
from tessera.infer.generate import GenerationConfig, generate
from tessera.models.blip2 import Blip2PretrainConfig, Blip2QFormerPretrain
from tessera.models.lvlm import LVLM
from tessera.pipeline import (
    STAGE_DATA,
    PipelineResult,
    build_lvlm,
    read_stage_conversations,
    scaled,
    stage_template,
    train_lvlm,
)
from tessera.presets.base import LVLMPreset, tiny_towers
from tessera.presets.lvlm_runner import eval_limit, evaluate_vqa_zoo, shared_pretraining
from tessera.text.llama import LlamaConfig
from tessera.text.tokenizer import IMAGE_TOKEN, Tokenizer
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.fusion_tasks import DEC_TOKEN, shapes_pretrain_task, train_fusion_tokenizer
from tessera.train.stage import StageConfig
from tessera.train.tasks import ConversationTask
from tessera.train.trainer import StageResult, Trainer, seed_everything
from tessera.vision.vit import ViTConfig
from tessera.zoo.core import SPLITS, ZooContext, ZooResult

STAGE1 = "qformer"
CHAT = "llm_chat"  # the frozen LLM's own preparation: text-only conversations in the template
STAGE1_TRAINABLE = ["ln_vision", "query_tokens", "qformer", "embeddings", "vision_projection", "text_projection",
                    "itm_head", "cls", "temp"]
CAPTION_PROMPT = "Describe the image briefly."  # one of ShapesWorld's caption instructions


class Blip2Recipe(Config):
    """An LVLM preset whose first stage pretrains the Q-Former, plus that stage's own sizes."""

    lvlm: LVLMPreset
    embed_dim: int = 64  # ITC projection width (paper: 256)
    qformer_text_positions: int = 64
    qformer_tokenizer_vocab_size: int = 1024
    caption_prompt: str = CAPTION_PROMPT
    caption_max_new_tokens: int = 24

    @model_validator(mode="after")
    def _check(self) -> Blip2Recipe:
        if not isinstance(self.lvlm.connector, QFormerConfig):
            raise ValueError(f"a BLIP-2 recipe needs a Q-Former connector, got {self.lvlm.connector.kind!r}")
        if self.lvlm.connector.text_input:
            raise ValueError("the LVLM's Q-Former takes no text (connector.text_input=False); stage 1 adds it")
        if self.lvlm.vision_feature_select != "full":
            raise ValueError("the Q-Former reads every vision token: vision_feature_select must be 'full'")
        if self.lvlm.stages[0].name != STAGE1 or len(self.lvlm.stages) < 2:
            raise ValueError(f"the first stage must be {STAGE1!r} (Q-Former pretraining), followed by LVLM stages")
        if any(s.name == CHAT for s in self.lvlm.stages[2:]):
            raise ValueError(f"stage {CHAT!r} (the LLM's conversation tuning) can only come right after {STAGE1!r}")
        return self

    @property
    def chat_stage(self) -> StageConfig | None:
        return self.lvlm.stages[1] if self.lvlm.stages[1].name == CHAT else None

    @property
    def qformer_stage(self) -> StageConfig:
        return self.lvlm.stages[0]

    @property
    def lvlm_stage_names(self) -> list[str]:
        """The stages train_lvlm runs: everything after stage 1 and the LLM's conversation tuning."""
        return [s.name for s in self.lvlm.stages[1:] if s.name != CHAT]

    def stage1_config(self, tokenizer: Tokenizer) -> Blip2PretrainConfig:
        """The stage-1 model: the LVLM's ViT and Q-Former, with the Q-Former's text side."""
        assert isinstance(self.lvlm.connector, QFormerConfig)
        return Blip2PretrainConfig(
            vision=self.lvlm.vision, qformer=self.lvlm.connector.model_copy(update={"text_input": True}),
            vocab_size=tokenizer.vocab_size, max_position_embeddings=self.qformer_text_positions,
            embed_dim=self.embed_dim, vision_feature_layer=self.lvlm.vision_feature_layer,
            pad_token_id=tokenizer.pad_id, dec_token_id=tokenizer.token_id(DEC_TOKEN),
        )


TINY_QFORMER = QFormerConfig(num_queries=8, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
PAPER_QFORMER = QFormerConfig(num_queries=32, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                              vision_layernorm_eps=1e-6)


def tiny_qformer_stage() -> StageConfig:
    return StageConfig(name=STAGE1, trainable=STAGE1_TRAINABLE, objectives={"itc": 1.0, "itg": 1.0, "itm": 1.0},
                       data="captions", steps=300, batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.05,
                       max_length=32)


def tiny_chat_stage() -> StageConfig:
    return StageConfig(name=CHAT, trainable=["language_model"], data=DESCRIBED_CONVERSATIONS, steps=300,
                       batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.0, max_length=256)


def tiny() -> Blip2Recipe:
    lvlm = LVLMPreset(
        name="blip2-tiny",
        **tiny_towers(),
        connector=TINY_QFORMER,
        template="blip2",
        vision_feature_select="full",
        vision_feature_layer=-2,  # LAVIS drops EVA's last layer
        folder="blip2",
        stages=[
            tiny_qformer_stage(),
            tiny_chat_stage(),
            StageConfig(name="generate", trainable=["connector"], data="llava_pretrain", steps=150, batch_size=32,
                        lr=2e-3, warmup_steps=10),
            # 1,200 instruction steps, not 500: VQA 0.470 -> 0.506 and CIDEr 1.11 -> 1.37 (ZOO.md); the
            # frozen LLM reads only what the 8 queries carry, so it gains less than the LLaVA rows did.
            StageConfig(name="instruct", trainable=["connector"], data="llava_instruct", group_by_image=True,
                        steps=1200, batch_size=16, lr=1e-3, warmup_steps=30),
        ],
    )
    return Blip2Recipe(lvlm=lvlm)


def paper() -> dict[str, Config]:
    """BLIP-2 dimensions: EVA ViT-g/14 at 224 px with its last layer removed (39 layers, 257 × 1408
    features), Q-Former BERT-base (188M with the queries) with 32 queries of 768, a LLaMA-family
    LLM of the Vicuna-7B size in place of OPT / FlanT5; stage 1 250k steps at batch 2320 (ViT-g),
    stage 2 80k steps at batch 1920, lr 1e-4, cosine."""
    return {
        "vision": ViTConfig(image_size=224, patch_size=14, hidden_size=1408, num_layers=39, num_heads=16,
                            intermediate_size=6144, act="gelu", class_token=True, pre_layernorm=False,
                            patch_bias=True, layer_norm_eps=1e-6),
        "connector": PAPER_QFORMER,
        "llm": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
        "qformer_stage": StageConfig(name=STAGE1, trainable=STAGE1_TRAINABLE,
                                     objectives={"itc": 1.0, "itg": 1.0, "itm": 1.0}, data="captions",
                                     steps=250_000, batch_size=2320, lr=1e-4, warmup_steps=2000, weight_decay=0.05,
                                     bf16=True, max_length=32),
        "generate_stage": StageConfig(name="generate", trainable=["connector"], data="captions", steps=80_000,
                                      batch_size=1920, lr=1e-4, warmup_steps=2000, weight_decay=0.05, bf16=True),
    }


# ------------------------------------------------------------------------------ stage 1


def train_qformer(
    recipe: Blip2Recipe, data_dir: str | Path, out: str | Path, vision_state: dict[str, torch.Tensor], *,
    step_scale: float = 1.0, seed: int = 0, progress: bool = True,
) -> tuple[Blip2QFormerPretrain, StageResult, Path]:
    """Stage 1 on the train split's captions: the Q-Former's tokenizer (fusion tokenizer, with
    <dec>) is trained into out/tokenizer, the model (ViT weights `vision_state`, frozen) into
    out/<stage>/final. Returns the model, the stage result and the checkpoint."""
    data_dir, out = Path(data_dir), Path(out)
    seed_everything(seed)
    tokenizer = train_fusion_tokenizer(data_dir, recipe.qformer_tokenizer_vocab_size)
    tokenizer_file = tokenizer.save(out / "tokenizer")
    model = Blip2QFormerPretrain(recipe.stage1_config(tokenizer))
    model.vision_model.load_state_dict(vision_state)
    stage = scaled(recipe.qformer_stage, step_scale, seed)
    task = shapes_pretrain_task(data_dir, tokenizer, stage, image_size=recipe.lvlm.vision.image_size)
    meta = {"preset": recipe.lvlm.name, "stage": stage.name,
            "image_size": [recipe.lvlm.vision.image_size] * 2}
    result = Trainer(model, stage, task, out_dir=out / stage.name, checkpoint_meta=meta, tokenizer_file=tokenizer_file,
                     progress=progress).fit()
    return model, result, out / stage.name / "final"


def lvlm_from_stage1(recipe: Blip2Recipe, pretrained: Path, stage1: Blip2QFormerPretrain) -> tuple[LVLM, Tokenizer]:
    """The LVLM as stage 1 leaves it: ViT and LLM from the shared pretraining (pretrained/clip,
    pretrained/lm, LLM tokenizer pretrained/tokenizer), Q-Former (ln_vision, queries, layers) from
    stage 1, language projection newly initialised."""
    tokenizer = Tokenizer.load(pretrained / "tokenizer" / "tokenizer.json")
    model = build_lvlm(recipe.lvlm, tokenizer)
    model.vision_tower.load_state_dict(load_checkpoint(pretrained / "clip" / "final").model.vision_model.state_dict())
    model.language_model.load_state_dict(load_checkpoint(pretrained / "lm" / "final").model.state_dict())
    assert isinstance(model.connector, QFormerConnector)
    ours, theirs = model.vision_tower.state_dict(), stage1.vision_model.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise ValueError("stage 1 ran on another vision tower than the shared pretraining's")
    model.connector.load_shared_state_dict(stage1.shared_state_dict())
    return model, tokenizer


def _cached_stage1(recipe: Blip2Recipe, ctx: ZooContext, pretrained: Path) -> tuple[Path, dict[str, Any]]:
    """Stage 1 depends only on the ViT, the Q-Former's sizes, its stage, the data, seed and scale:
    trained once and shared (BLIP-2 and MiniGPT-4 both start from it), like the LVLM pretraining."""
    parts = {"recipe": recipe.model_dump(mode="json", include={"embed_dim", "qformer_text_positions",
                                                                "qformer_tokenizer_vocab_size"}),
             "vision": recipe.lvlm.vision.to_dict(), "qformer": recipe.lvlm.connector.to_dict(),
             "layer": recipe.lvlm.vision_feature_layer, "stage": recipe.qformer_stage.to_dict(),
             "pretrained": str(pretrained.resolve()), "data": str(Path(ctx.data_dir).resolve()),
             "seed": ctx.seed, "scale": ctx.scale}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    folder = ctx.out_dir.parent / "_blip2_qformer" / key
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return folder / STAGE1 / "final", {"qformer_stage": f"shared, from {folder}", **json.loads(done.read_text())}
        vision = load_checkpoint(pretrained / "clip" / "final").model.vision_model.state_dict()
        _, result, path = train_qformer(recipe, ctx.data_dir, folder, vision, step_scale=ctx.scale, seed=ctx.seed,
                                        progress=ctx.progress)
        info = {"qformer_seconds": result.seconds, "qformer_trainable": result.trainable.trainable,
                "qformer_first_losses": result.history[0] if result.history else {},
                "qformer_final_losses": result.history[-1] if result.history else {}}
        done.write_text(json.dumps(info, indent=2) + "\n")
    return path, {"qformer_stage": f"trained here, shared from {folder}", **info}


# ------------------------------------------------------------------------------ stage 2


def described_conversations(
    data_dir: str | Path, split: str = "train", sources: tuple[str, ...] = ("llava_pretrain", "llava_instruct"),
) -> tuple[list[Conversation], SkipStats]:
    """The split's caption and instruction conversations (`sources`) with each image placeholder
    replaced by that image's full description (its first caption: every object with size, colour,
    shape): text the LLM must read to answer, as it will later read the Q-Former's soft prompt."""
    data_dir = Path(data_dir)
    paths = shapes_split_paths(data_dir, split)
    captions, skips = read_coco_captions(paths["captions"], data_dir)
    description: dict[Path, str] = {}
    for c in captions:
        description.setdefault(c.image, c.caption)  # ShapesWorld writes the full caption first
    convs: list[Conversation] = []
    for key in sources:
        records, more = read_llava(paths[key], data_dir)
        skips.merge(more)
        for c in records:
            if len(c.images) != 1 or c.images[0] not in description:
                skips.skip("conversation without one described image", c.id)
                continue
            text = description[c.images[0]]
            turns = tuple(Turn(t.role, t.text.replace(IMAGE_TOKEN, text)) for t in c.turns)
            convs.append(Conversation(id=f"{c.id}_described", images=(), turns=turns))
    return convs, skips


def _described(sources: tuple[str, ...]) -> Callable[[Path, str, SkipStats], list[Conversation]]:
    def read(data_dir: Path, split: str, skips: SkipStats) -> list[Conversation]:
        convs, more = described_conversations(data_dir, split, sources=sources)
        skips.merge(more)
        return convs

    return read


# Stage data of the LLMs' chat preparation, registered with train_lvlm's other derived sets:
# captions and instructions (BLIP-2's and MiniGPT-4's "llm_chat"), or the instructions alone in
# one task's template (MiniGPT-v2's LLaMA-2-chat stand-in), each image written out.
DESCRIBED_CONVERSATIONS = "described_conversations"
DESCRIBED_INSTRUCTIONS = "described_instructions"
STAGE_DATA[DESCRIBED_CONVERSATIONS] = _described(("llava_pretrain", "llava_instruct"))
STAGE_DATA[DESCRIBED_INSTRUCTIONS] = _described(("llava_instruct",))


def tune_llm_chat(
    recipe: Blip2Recipe, model: LVLM, tokenizer_file: Path, data_dir: str | Path, out: Path, *,
    step_scale: float = 1.0, seed: int = 0, progress: bool = True,
) -> StageResult:
    """Stage "llm_chat": the language model alone (no image) on `described_conversations` in the
    preset's template, checkpoint in out/<folder>/llm_chat/final.

    BLIP-2 and MiniGPT-4 keep their LLM frozen and rely on what it can already do: follow the
    prompt format (OPT / FlanT5 with "Question: … Answer:", Vicuna with its ###Human / ###Assistant
    conversations) and answer from what its context says. Tessera's tiny LLM, pretrained on plain
    short texts, does neither: given an image's exact caption in its prompt it predicts that caption
    no better than without it (measured: answer loss 0.926 → 0.920 with the caption, 0.914 with
    another image's), so no connector could make it read an image. This stage gives it both (it is
    Vicuna's conversation tuning in MiniGPT-4's case); afterwards the LLM stays frozen, and stage 2
    teaches the Q-Former to write, as soft tokens, the context the LLM learnt to read."""
    assert recipe.chat_stage is not None
    stage = scaled(recipe.chat_stage, step_scale, seed)
    data_dir, skips = Path(data_dir), SkipStats()
    convs = read_stage_conversations(shapes_split_paths(data_dir, "train"), stage.data, data_dir, skips)
    size = recipe.lvlm.image_size
    tokenizer = Tokenizer.load(tokenizer_file)
    dataset = ConversationDataset(convs, tokenizer, stage_template(recipe.lvlm, None),
                                  ImageCache(ImageTransform(size=(size, size)), skips), model.num_image_tokens,
                                  stage.max_length)
    meta = {"preset": recipe.lvlm.name, "template": recipe.lvlm.template, "image_size": [size, size]}
    trainer = Trainer(model, stage, ConversationTask(dataset, packing=stage.packing, objectives=stage.objectives),
                      out_dir=out / recipe.lvlm.folder / CHAT, checkpoint_meta=meta, tokenizer_file=tokenizer_file,
                      progress=progress)
    return trainer.fit()


def train_blip2(
    recipe: Blip2Recipe, data_dir: str | Path, out: str | Path, *, pretrained: Path, stage1: Path,
    stages: list[str] | None = None, step_scale: float = 1.0, seed: int = 0, progress: bool = True,
) -> PipelineResult:
    """Everything after stage 1, from the stage-1 checkpoint `stage1` and the shared pretraining
    `pretrained`: the LVLM as stage 1 leaves it is written to out/<folder>/qformer/final, the LLM's
    conversation tuning (when the recipe has it) to out/<folder>/llm_chat/final, then train_lvlm
    runs `stages` (default: the rest) from there. The result lists the llm_chat stage first."""
    out = Path(out)
    q = load_checkpoint(stage1)
    assert isinstance(q.model, Blip2QFormerPretrain)
    model, tokenizer = lvlm_from_stage1(recipe, pretrained, q.model)
    tokenizer_file = pretrained / "tokenizer" / "tokenizer.json"
    meta = {"preset": recipe.lvlm.name, "template": recipe.lvlm.template, "stage": STAGE1,
            "image_size": [recipe.lvlm.image_size] * 2, "qformer_checkpoint": str(stage1)}
    save_checkpoint(out / recipe.lvlm.folder / STAGE1 / "final", model, meta=meta, tokenizer_file=tokenizer_file)
    before: list[StageResult] = []
    if recipe.chat_stage is not None:
        seed_everything(seed)
        before.append(tune_llm_chat(recipe, model, tokenizer_file, data_dir, out, step_scale=step_scale, seed=seed,
                                    progress=progress))
    result = train_lvlm(recipe.lvlm, data_dir, out, stages=stages or recipe.lvlm_stage_names, step_scale=step_scale,
                        seed=seed, progress=progress, pretrained=pretrained)
    result.stages[:0] = before
    return result


@torch.no_grad()
def evaluate_captions_zoo(
    model: LVLM, tokenizer: Tokenizer, recipe: Blip2Recipe, ctx: ZooContext, prompt: str | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, Any]]:
    """caption_cider / caption_bleu4 per split label: greedy answers to the caption prompt, scored
    against every caption of the image; baseline: the train split's most common caption for all."""
    from tessera.presets.blip import most_common_caption

    prompt = prompt or recipe.caption_prompt
    template = stage_template(recipe.lvlm, None)
    stops = stop_token_ids(tokenizer, template)
    size = recipe.lvlm.image_size
    images = ImageCache(ImageTransform(size=(size, size)), SkipStats())
    data = Path(ctx.data_dir)
    baseline_caption = most_common_caption(shapes_split_paths(data, "train")["captions"], data)
    metrics: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    notes: dict[str, Any] = {"caption_prompt": prompt, "caption_baseline": baseline_caption}
    model.eval()
    for split, label in SPLITS.items():
        captions, _ = read_coco_captions(shapes_split_paths(data, split)["captions"], data)
        references: dict[int, list[str]] = {}
        paths: dict[int, Path] = {}
        for c in captions:
            references.setdefault(c.image_id, []).append(c.caption)
            paths[c.image_id] = c.image
        ids = list(references)
        limit = eval_limit(ctx.scale, len(ids))
        ids = ids[:limit] if limit else ids
        references = {i: references[i] for i in ids}
        predictions: dict[int, str] = {}
        for start in range(0, len(ids), 64):
            chunk = [i for i in ids[start : start + 64] if images.get(paths[i]) is not None]
            if not chunk:
                continue
            pixels = [images.get(paths[i]) for i in chunk]
            prompts = [encode_prompt(tokenizer, template, [Turn("user", f"<image>\n{prompt}")],
                                     [model.num_image_tokens(px.shape[1], px.shape[2])]) for px in pixels]
            outs = generate(model, prompts, [images.normalize(px) for px in pixels], stop_ids=stops,
                            pad_id=tokenizer.pad_id,
                            config=GenerationConfig(max_new_tokens=recipe.caption_max_new_tokens))
            for image_id, out in zip(chunk, outs, strict=True):
                predictions[image_id] = tokenizer.decode(out).strip()
        scores = score_captions(predictions, references)
        base = score_captions(dict.fromkeys(references, baseline_caption), references)
        metrics[label] = {"caption_cider": scores.cider_d, "caption_bleu4": scores.bleu[4]}
        baselines[label] = {"caption_cider": base.cider_d, "caption_bleu4": base.bleu[4]}
        notes[f"caption_examples/{label}"] = {str(i): predictions.get(i, "") for i in ids[:4]}
    return metrics, baselines, notes


ExtraStage = Callable[[Blip2Recipe, PipelineResult, ZooContext], PipelineResult]


def run_blip2_family(recipe: Blip2Recipe, ctx: ZooContext, *, lvlm_stages: list[str] | None = None,
                     extra_stage: ExtraStage | None = None, caption_prompt: str | None = None) -> ZooResult:
    """Zoo runner of BLIP-2 and MiniGPT-4: shared ViT / LLM pretraining, shared stage 1, the LVLM
    stages (`lvlm_stages` through train_lvlm, then `extra_stage` when given), then VQA accuracy
    and captioning scores on both test splits, with their baselines."""
    pretrained, notes = shared_pretraining(recipe.lvlm, ctx)
    stage1, stage1_notes = _cached_stage1(recipe, ctx, pretrained)
    notes.update(stage1_notes)
    result = train_blip2(recipe, ctx.data_dir, ctx.out_dir, pretrained=pretrained, stage1=stage1,
                         stages=lvlm_stages, step_scale=ctx.scale, seed=ctx.seed, progress=ctx.progress)
    if extra_stage is not None:
        result = extra_stage(recipe, result, ctx)
    start = time.perf_counter()
    metrics, baselines, vqa_notes = evaluate_vqa_zoo(result, recipe.lvlm, ctx)
    cap_metrics, cap_baselines, cap_notes = evaluate_captions_zoo(result.model, result.tokenizer, recipe, ctx,
                                                                  caption_prompt)
    for label in cap_metrics:
        metrics.setdefault(label, {}).update(cap_metrics[label])
        baselines.setdefault(label, {}).update(cap_baselines[label])
    seconds = {STAGE1: float(notes.get("qformer_seconds", 0.0))}
    seconds.update({r.stage: r.seconds for r in result.stages})
    seconds["eval"] = time.perf_counter() - start
    params = {STAGE1: int(notes.get("qformer_trainable", 0))}
    params.update({r.stage: r.trainable.trainable for r in result.stages})
    notes.update(vqa_notes)
    notes.update(cap_notes)
    notes.update({
        "final_loss_by_stage": {r.stage: r.final_loss for r in result.stages},
        "first_logged_loss_by_stage": {r.stage: r.history[0]["loss"] for r in result.stages if r.history},
        "connector": "qformer", "template": recipe.lvlm.template, "image_size": recipe.lvlm.image_size,
        "llm_frozen_after": CHAT if recipe.chat_stage is not None else "pretraining",
        "llm_chat": "the LLM alone, on train conversations whose image is replaced by its full description "
                    "(tune_llm_chat); ViT, LLM frozen in every vision-language stage",
        "skips": result.skips.summary(),
    })
    size = recipe.lvlm.image_size
    return ZooResult(metrics=metrics, baselines=baselines, trainable_params_by_stage=params,
                     seconds_by_stage=seconds, visual_tokens_per_image=result.model.num_image_tokens(size, size),
                     notes=notes)


def run(ctx: ZooContext) -> ZooResult:
    return run_blip2_family(tiny(), ctx)


ZOO = {"blip2": run}
