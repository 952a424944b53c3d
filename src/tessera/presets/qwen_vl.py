"""Qwen-VL preset: ViT → position-aware adapter (ONE cross-attention layer, learnable queries,
2D sin-cos positions) → a fixed number of tokens per image → LLM; images wrapped in
<img> … </img> (ChatML, "qwen_vl" template).

Three stages as in the paper:
    1 "pretrain"   image-caption pairs; ViT + adapter train, LLM frozen (`tiny`: adapter only)
    2 "multitask"  multi-task data, sequences packed; everything trains (`tiny`: ViT frozen,
                   its 4-layer ViT degrades under these losses; see `tiny`)
    3 "sft"        instruction tuning (multi-turn); ViT frozen, adapter + LLM train. Qwen-VL-Chat's
                   SFT data mixes localisation dialogues into the instructions; the tiny recipe
                   keeps its grounding file (rec_qwen) in this stage too, because the zoo scores
                   grounding on this stage's weights: trained on instructions alone, the model
                   forgets the box format it learnt in stage 2 (degenerate boxes, mean IoU 0).
`tiny` shares its ViT, LLM and their pretraining with the other tiny LVLM presets; 16 queries
(4×4) read the 8×8 patch grid of a 64 px image, 4× fewer tokens than LLaVA's 64. The paper
raises the resolution from 224 to 448 px in stage 2; the tiny recipe keeps 64 px throughout
(the adapter's token count does not change with resolution either way). Qwen's tokenizer has
<img>/</img> as special tokens; the tiny one writes them as ordinary text so that it can share
the tokenizer (and LM) with the other tiny presets — the model sees the same markers.
`paper` records the published dimensions (ViT-bigG/14, 256 queries, Qwen-7B) for use with
imported weights.
"""

from __future__ import annotations

from tessera.config import Config
from tessera.connectors.resampler import ResamplerConfig
from tessera.presets.base import LVLMPreset, tiny_towers
from tessera.presets.lvlm_runner import reading_eval, zoo_runner
from tessera.text.llama import LlamaConfig
from tessera.train.stage import StageConfig
from tessera.vision.vit import ViTConfig


def tiny() -> LVLMPreset:
    return LVLMPreset(
        name="qwen-vl-tiny",
        **tiny_towers(),
        connector=ResamplerConfig(num_queries=16, num_heads=4),
        template="qwen_vl",
        vision_feature_layer=-1,  # Qwen-VL's adapter reads the ViT's last layer
        stages=[
            # The tiny recipe keeps the ViT FROZEN in stages 1 and 2 (the paper trains it): trained on
            # the caption loss the tiny ViT's features degrade; VQA 0.523 / 0.448 with it trainable
            # (at 0.1x the rate) against 0.710 / 0.530 frozen (ZOO.md), as for POINTS.
            StageConfig(name="pretrain", trainable=["connector"], data="llava_pretrain",
                        steps=100, batch_size=32, lr=2e-3, warmup_steps=10),
            # Qwen-VL's multi-task stage includes grounding: "<ref>…</ref><box>(x1,y1),(x2,y2)</box>";
            # grouped by image, every sequence holds one referring expression beside the image's
            # questions. 2,000 steps: VQA 0.395 with 150, 0.710 with 400, 0.833 with 2,000 (ZOO.md).
            # Grounding stays at the constant-box baseline even so (boxes of the right size in
            # the wrong place), also with a ViT that keeps position (RESULTS.md, session 10).
            StageConfig(name="multitask", trainable=["connector", "language_model"], data="llava_instruct+rec_qwen?",
                        group_by_image=True, packing=True, steps=2000, batch_size=16, lr=1e-3, warmup_steps=20),
            StageConfig(name="sft", trainable=["connector", "language_model"], data="llava_instruct+rec_qwen?",
                        group_by_image=True, steps=800, batch_size=16, lr=5e-4, warmup_steps=20),
        ],
    )


def paper() -> dict[str, Config]:
    """Qwen-VL (7B) dimensions: OpenCLIP ViT-bigG/14 (448 px in stages 2-3: 32×32 patches),
    256 queries of width 4096 (32 heads of 128), Qwen-7B. Stage learning rates, batch sizes and
    steps as in the paper's training table (stage 1 at 224 px)."""
    return {
        "vision": ViTConfig(image_size=448, patch_size=14, hidden_size=1664, num_layers=48, num_heads=16,
                            intermediate_size=8192, act="gelu", class_token=False),
        "connector": ResamplerConfig(num_queries=256, num_heads=32),
        "llm": LlamaConfig(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-6),
        "stages": [
            StageConfig(name="pretrain", trainable=["vision_tower", "connector"], data="llava_pretrain",
                        steps=50000, batch_size=30720, lr=2e-4, warmup_steps=500, weight_decay=0.05,
                        betas=(0.9, 0.98), bf16=True, max_length=512),
            StageConfig(name="multitask", trainable=["*"], data="llava_instruct", packing=True, steps=19000,
                        batch_size=4096, lr=5e-5, warmup_steps=400, weight_decay=0.05, bf16=True,
                        max_length=2048),
            StageConfig(name="sft", trainable=["connector", "language_model"], data="llava_instruct",
                        steps=8000, batch_size=128, lr=1e-5, warmup_steps=3000, weight_decay=0.1, bf16=True,
                        max_length=2048),
        ],
    }


ZOO = {"qwen-vl": zoo_runner(tiny, extra_evals=[reading_eval("rec_qwen")])}
