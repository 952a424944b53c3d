"""MiniGPT-4 preset: frozen ViT → BLIP-2's pretrained Q-Former, FROZEN → ONE trainable linear layer
→ frozen Vicuna-style LLM. Only `connector.language_projection` ever trains.

Recipe (one stage list, as SYSTEMS.md describes it):
    "qformer"  BLIP-2's stage 1, shared with the blip2 preset (the same cached run): MiniGPT-4
               starts from BLIP-2's pretrained Q-Former. (MiniGPT-4 took the Q-Former of BLIP-2's
               FlanT5 stage-2 checkpoint; Tessera's BLIP-2 stage 2 is tied to its own LLM, so the
               stage-1 Q-Former, which no LLM shaped, is the one shared.)
    "llm_chat" the frozen LLM's own preparation (Vicuna is a LLaMA tuned on conversations in
               this template): Tessera's tiny LLM, pretrained on plain text, is tuned on the train
               split's conversations with each image replaced by its description, in the "minigpt4" template; it stays
               frozen afterwards (presets/blip2.tune_llm_chat).
    "align"    stage 1 of MiniGPT-4: the linear layer alone on image-caption pairs (paper: 5M
               pairs, batch 256, 20k steps; tiny: ShapesWorld's llava_pretrain conversations).
    "detail"   stage 2: a short fine-tune of the linear layer on curated detailed descriptions
               (paper: 3.5K, 400 steps, batch 12). On ShapesWorld the curated descriptions are each
               train image's FULL caption (every object with size, colour and shape: the first
               caption ShapesWorld writes), asked for with "Describe this image in detail."; they
               are made from the captions file by `detailed_description_conversations` and trained
               with the one Trainer's ConversationTask (train_lvlm reads only the dataset's files).
Template "minigpt4": "###Human: <Img><image…></Img> {instruction} ###Assistant: {answer}</s>".

Each image costs `num_queries` LLM tokens (tiny 8, paper 32), the cheapest of the LLM presets.
Nothing in the recipe teaches question answering, as in the paper: its VQA accuracy measures what
the frozen LLM makes of the aligned visual tokens zero-shot, next to its captioning scores.
"""

from __future__ import annotations

from pathlib import Path

from tessera.config import Config
from tessera.data.datasets import ConversationDataset, ImageCache
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, shapes_split_paths
from tessera.data.records import Conversation, SkipStats, Turn
from tessera.pipeline import PipelineResult, scaled, stage_template
from tessera.presets.base import LVLMPreset, tiny_towers
from tessera.presets.blip2 import (
    PAPER_QFORMER,
    TINY_QFORMER,
    Blip2Recipe,
    run_blip2_family,
    tiny_chat_stage,
    tiny_qformer_stage,
)
from tessera.presets.blip2 import paper as blip2_paper
from tessera.train.stage import StageConfig
from tessera.train.tasks import ConversationTask
from tessera.train.trainer import Trainer
from tessera.zoo.core import ZooContext, ZooResult

DETAIL_PROMPT = "Describe this image in detail."
DETAIL_DATA = "detailed_descriptions"  # made from the train captions, see the module docstring
PROJECTION = ["connector.language_projection"]


def detailed_description_conversations(data_dir: str | Path, split: str = "train") -> tuple[list[Conversation], SkipStats]:
    """One conversation per image: "<image>\\nDescribe this image in detail." → the image's first
    (full) caption."""
    data_dir = Path(data_dir)
    captions, skips = read_coco_captions(shapes_split_paths(data_dir, split)["captions"], data_dir)
    first: dict[Path, str] = {}
    for c in captions:
        first.setdefault(c.image, c.caption)  # ShapesWorld writes the full caption first
    convs = [Conversation(id=f"{image.stem}_detail", images=(image,),
                          turns=(Turn("user", f"<image>\n{DETAIL_PROMPT}"), Turn("assistant", caption)))
             for image, caption in first.items()]
    return convs, skips


def tiny() -> Blip2Recipe:
    lvlm = LVLMPreset(
        name="minigpt4-tiny",
        **tiny_towers(),
        connector=TINY_QFORMER,
        template="minigpt4",
        vision_feature_select="full",
        vision_feature_layer=-2,
        folder="minigpt4",
        stages=[
            tiny_qformer_stage(),
            tiny_chat_stage(),
            StageConfig(name="align", trainable=PROJECTION, data="llava_pretrain", steps=300, batch_size=32,
                        lr=3e-3, warmup_steps=20),
            StageConfig(name="detail", trainable=PROJECTION, data=DETAIL_DATA, steps=100, batch_size=12,
                        lr=1e-3, warmup_steps=10),
        ],
    )
    return Blip2Recipe(lvlm=lvlm)


def paper() -> dict[str, Config]:
    """MiniGPT-4: BLIP-2's ViT-g and Q-Former (32 queries), Vicuna-13B (here the 7B LLaMA shape of
    the BLIP-2 paper dict), one linear layer; stage 1 20k steps at batch 256 (5M pairs), stage 2
    400 steps at batch 12 (3.5K descriptions)."""
    base = blip2_paper()
    return {
        "vision": base["vision"], "connector": PAPER_QFORMER, "llm": base["llm"],
        "align_stage": StageConfig(name="align", trainable=PROJECTION, data="llava_pretrain", steps=20_000,
                                   batch_size=256, lr=1e-4, warmup_steps=5000, bf16=True),
        "detail_stage": StageConfig(name="detail", trainable=PROJECTION, data=DETAIL_DATA, steps=400,
                                    batch_size=12, lr=3e-5, warmup_steps=40, bf16=True),
    }


def detail_stage(recipe: Blip2Recipe, result: PipelineResult, ctx: ZooContext) -> PipelineResult:
    """Stage "detail" on the detailed descriptions, continuing the model of the earlier stages."""
    stage = scaled(next(s for s in recipe.lvlm.stages if s.name == "detail"), ctx.scale, ctx.seed)
    convs, skips = detailed_description_conversations(ctx.data_dir)
    result.skips.merge(skips)
    size = recipe.lvlm.image_size
    images = ImageCache(ImageTransform(size=(size, size)), result.skips)
    dataset = ConversationDataset(convs, result.tokenizer, stage_template(recipe.lvlm, stage.data), images,
                                  result.model.num_image_tokens, stage.max_length)
    out = Path(ctx.out_dir) / recipe.lvlm.folder / stage.name
    meta = {"preset": recipe.lvlm.name, "template": recipe.lvlm.template, "image_size": [size, size]}
    tokenizer_file = result.checkpoint / "tokenizer.json" if result.checkpoint is not None else None
    trainer = Trainer(result.model, stage, ConversationTask(dataset, packing=stage.packing, objectives=stage.objectives),
                      out_dir=out, checkpoint_meta=meta, tokenizer_file=tokenizer_file, progress=ctx.progress)
    result.stages.append(trainer.fit())
    result.checkpoint = out / "final"
    return result


def run(ctx: ZooContext) -> ZooResult:
    return run_blip2_family(tiny(), ctx, lvlm_stages=["align"], extra_stage=detail_stage,
                            caption_prompt=DETAIL_PROMPT)


ZOO = {"minigpt4": run}
