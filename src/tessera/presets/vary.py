"""Vary presets: a second "vision vocabulary" for dense perception (text, charts), made by
Vary-tiny and then run beside CLIP in Vary-base. ChatML template.

    Vary-tiny  ("read", "vary_tiny")  a new vocabulary network, a SAM/ViTDet-style encoder with
               a conv neck (`tessera.vision.vitdet`), + a linear layer + a small decoder,
               trained autoregressively image → text with NO text input: rendered text →
               the text, bar charts → their Python-dict text, and natural ShapesWorld images
               as negatives → a fixed short answer (data `tessera.data.shapes_reading`).
               Everything trains; the decoder is then thrown away. The tiny recipe first
               trains the network alone to read ("read": `tessera.models.slot_reader`), in
               place of Vary's start from SAM's pretrained weights.
    Vary-base  the new network (from Vary-tiny) and the CLIP-style ViT in parallel, each with
               its own linear input embedding, their tokens joined before the LLM; both
               vision networks frozen, the embeddings and the LLM train: "pretrain" on
               captions + text (the pretraining texts too) + charts, "sft" on instructions +
               the OCR task's text + charts (with prompts).

`tiny`: the ViTDet reads the 64 px image with 4 px patches (16×16 grid, windows of 4×4 and
two global blocks), its neck and two stride-2 convs give 4×4 = 16 tokens of width 128; the
CLIP branch gives the shared tiny ViT's 64 tokens. With so few tokens from each vocabulary
the tiny preset joins them as one sequence (64 + 16 = 80 tokens); the released Vary-base
instead projects both 256-token sets to 2048 channels and joins them side by side
(`tower_merge="channels"`, as `paper` records). Vary-tiny's "small decoder" (OPT-125M in the
paper, pretrained) is a copy of the shared pretrained tiny LM, so Vary-base's LLM starts from
the same pretrained weights as every other tiny preset.
"""

from __future__ import annotations

import random
from pathlib import Path

from tessera.config import Config
from tessera.connectors.projector import ProjectorConfig
from tessera.data.readers import read_llava, shapes_split_paths
from tessera.data.records import Conversation, SkipStats, Turn
from tessera.data.shapes_reading import reading_task_paths
from tessera.models.lvlm import VisionBranchConfig
from tessera.models.slot_reader import PRESENCE_OBJECTIVE, READING_OBJECTIVE
from tessera.pipeline import STAGE_DATA
from tessera.presets.base import LVLMPreset, tiny_towers
from tessera.presets.lvlm_runner import reading_eval, zoo_runner
from tessera.text.llama import LlamaConfig
from tessera.train.stage import StageConfig
from tessera.vision.vit import ViTConfig
from tessera.vision.vitdet import ViTDetConfig

# What Vary-tiny learns to say for a natural image: nothing about its content, so the new
# vocabulary spends its capacity on text and charts.
NEGATIVE_ANSWER = "a natural image"
NEGATIVE_SHARE = 0.25  # natural images per reading (text or chart) image


def vary_tiny_conversations(data_dir: Path, split: str, skips: SkipStats) -> list[Conversation]:
    """Vary-tiny's training set: every rendered-text item (the OCR task's and, in the train split,
    the larger pretraining set's) and chart item with its prompt removed (the user turn holds
    only the image) and, as negatives, natural ShapesWorld images (from the caption file, a
    seeded sample of NEGATIVE_SHARE × as many) answered with NEGATIVE_ANSWER."""
    paths = reading_task_paths(data_dir, split)
    reading: list[Conversation] = []
    for name in ("ocr", "ocr_pretrain", "chart"):
        if name not in paths:  # the pretraining texts exist in the train split only
            continue
        if not paths[name].is_file():
            raise FileNotFoundError(f"Vary-tiny needs the reading tasks: {paths[name]} does not exist "
                                    "(write them with `tessera data reading --root DIR`)")
        convs, conv_skips = read_llava(paths[name], data_dir)
        skips.merge(conv_skips)
        reading += [Conversation(id=c.id, images=c.images, turns=(Turn("user", "<image>"), c.turns[-1]))
                    for c in convs]
    captions, cap_skips = read_llava(shapes_split_paths(data_dir, split)["llava_pretrain"], data_dir)
    skips.merge(cap_skips)
    natural = sorted({c.images[0] for c in captions if len(c.images) == 1})
    count = min(len(natural), round(NEGATIVE_SHARE * len(reading)))
    negatives = [Conversation(id=f"{split}_natural_{i:06d}", images=(image,),
                              turns=(Turn("user", "<image>"), Turn("assistant", NEGATIVE_ANSWER)))
                 for i, image in enumerate(random.Random(f"vary-negatives/{split}").sample(natural, count))]
    return reading + negatives


STAGE_DATA["vary_tiny"] = vary_tiny_conversations

VARY_TINY_STAGE = "vary_tiny"
READING_STAGE = "read"  # Vary-tiny's first stage: the vocabulary network learns to read on its own


def tiny_vocabulary_network() -> ViTDetConfig:
    """Vary's SAM-base at toy size. Vary starts it from SAM's weights; trained from scratch on a few
    thousand text images, SAM's single-convolution patch embedding memorised them (first-word
    probe 0.23), so the tiny network reads through a convolutional stem (0.67; RESULTS.md,
    session 11). `paper()` keeps SAM's patch embedding."""
    return ViTDetConfig(image_size=64, patch_size=4, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                        window_size=4, global_attn_indexes=(1, 3), neck_channels=32, downsample_channels=(64, 128),
                        patch_embed="conv_stem")


def tiny_vary_tiny() -> LVLMPreset:
    """Vary-tiny: the new vocabulary network + a linear layer + the small decoder."""
    return LVLMPreset(
        name="vary-tiny-tiny",
        **tiny_towers(),
        encoder=tiny_vocabulary_network(),
        connector=ProjectorConfig(kind="linear"),
        template="chatml",
        vision_feature_layer=-1,
        folder="vary",
        stages=[
            # Vary starts its vocabulary network from SAM; the tiny one first learns to read directly
            # (`SlotReader`: character slots from the image alone). Through the decoder alone it
            # never does: the decoder predicts the text from its own prefix and ignores the image
            # (32,000 rendered texts, 1,500 steps: CER 0.97 against 0.81 for the commonest text).
            # This stage reads the OCR task's 4,000 texts (its own CER 0.38): on 36,000 it stays on
            # its plateau for 1,300 of the 2,000 steps (CER 0.74; RESULTS.md, session 14). When it
            # leaves the plateau depends on the seed (seed 0: step ~400; seed 1: ~1,900, CER 0.73;
            # session 15). The presence objective (which characters the image shows, anywhere) and
            # 3,000 steps take it off the plateau on every seed tried: reader CER 0.22-0.25 on
            # test, 0.28-0.31 on test_comp, seeds 0-2 (RESULTS.md, session 17). From
            # its encoder Vary-tiny reads when it also sees the train-only pretraining texts (4 per
            # train image; CER 0.16-0.20), not given the task's 4,000 alone (0.77; session 13).
            StageConfig(name=READING_STAGE, trainable=["*"], data="ocr",
                        objectives={READING_OBJECTIVE: 1.0, PRESENCE_OBJECTIVE: 1.0},
                        steps=3000, batch_size=64, lr=1e-3, warmup_steps=50, weight_decay=0.05),
            # 1,000 steps, not 300 (loss 0.49 -> 0.28): chart-to-dict relaxed accuracy 0.45 -> 0.99 in
            # Vary-base (ZOO.md); 1,500 since the pretraining texts made the mixture 5x larger.
            StageConfig(name=VARY_TINY_STAGE, trainable=["*"], data="vary_tiny", steps=1500, batch_size=32,
                        lr=1e-3, warmup_steps=20),
        ],
    )


def tiny() -> LVLMPreset:
    """Vary-base: CLIP-style ViT + the new vocabulary from Vary-tiny, each with its own linear layer."""
    frozen_vision = ["connector", "extra_towers.0.connector", "language_model"]
    return LVLMPreset(
        name="vary-base-tiny",
        **tiny_towers(),
        connector=ProjectorConfig(kind="linear"),
        extra_towers=[VisionBranchConfig(vision=tiny_vocabulary_network(), connector=ProjectorConfig(kind="linear"))],
        tower_merge="sequence",
        template="chatml",
        vision_feature_layer=-2,  # Vary reads CLIP's second-to-last layer
        folder="vary",
        init_from_stages={"extra_towers.0.vision_tower": f"{VARY_TINY_STAGE}:vision_tower"},
        stages=[
            # With the train-only pretraining texts and 600 steps, not 150 without them: OCR CER
            # 0.386 / 0.540 -> 0.250 / 0.305, VQA 0.748 / 0.652 -> 0.771 / 0.687 (RESULTS.md, session 14).
            StageConfig(name="pretrain", trainable=frozen_vision, data="llava_pretrain+ocr?+ocr_pretrain?+chart?",
                        steps=600, batch_size=32, lr=1e-3, warmup_steps=20),
            # 1,200 SFT steps, not 300: VQA 0.496 -> 0.725 (ZOO.md), as for the other LLM-based rows.
            StageConfig(name="sft", trainable=frozen_vision, data="llava_instruct+ocr?+chart?", group_by_image=True,
                        steps=1200, batch_size=16, lr=1e-3, warmup_steps=20),
        ],
    )


def paper() -> dict[str, Config]:
    """Vary-base dimensions: the new vocabulary is SAM-base (ViTDet, 1024 px, 16 px patches:
    64×64×768 → neck 64×64×256 → two stride-2 convs → 16×16 = 256 tokens of width 1024) and
    CLIP ViT-L/14 at 224 px (256 tokens, second-to-last layer); each gets a linear layer to
    2048 channels, joined side by side into 256 tokens of 4096 for Qwen-7B."""
    return {
        "vision": ViTConfig(image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            intermediate_size=4096),
        "vision_image_size": 224,
        "connector": ProjectorConfig(kind="linear"),
        "extra_towers": [VisionBranchConfig(
            vision=ViTDetConfig(image_size=1024, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                                intermediate_size=3072, window_size=14, global_attn_indexes=(2, 5, 8, 11),
                                use_rel_pos=True, neck_channels=256, downsample_channels=(512, 1024)),
            connector=ProjectorConfig(kind="linear"))],
        "tower_merge": "channels",
        "llm": LlamaConfig(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, attention_bias=True, max_position_embeddings=8192,
                           rms_norm_eps=1e-6),
    }


ZOO = {"vary": zoo_runner(tiny, extra_evals=[reading_eval("ocr"), reading_eval("chart")], before=[tiny_vary_tiny])}
