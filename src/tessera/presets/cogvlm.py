"""CogVLM preset: ViT with its last layer removed → two-layer MLP adapter → an LLM with a VISUAL
EXPERT in every layer: image tokens use their own QKV and FFN (same shapes, initialised as
copies of the LLM's), text tokens the original ones, attention over all tokens at once; all
image tokens of one image share one position id (`tessera.data.collate.share_image_positions`).

Stages, as in the paper:
    1 "pretrain"      image captioning; the adapter and the visual expert train, ViT and LLM frozen
    2 "pretrain_rec"  captioning + referring expression comprehension, boxes written
                      "[[x0,y0,x1,y1]]" with coordinates normalised to 0-999 (the
                      `rec_cogvlm` file of `tessera.data.shapes_reading`; left out when the
                      data set has no grounding tasks); same trainables
    3 "sft"           instruction data (+ REC); everything but the ViT trains, the LLM at a
                      tenth of the learning rate of the rest (adapter and visual expert)
`tiny` shares its ViT, LLM and their pretraining with the other tiny LVLM presets (the "lm"
stage pretrains the plain decoder; the expert is copied from it when the LVLM is built), so
the comparison is about the visual expert. `paper` records CogVLM-17B's published dimensions
(EVA2-CLIP-E at 490 px, Vicuna-7B) for use with imported weights; CogVLM's adapter is a
SwiGLU MLP, the tiny one the LLaVA-1.5 GELU MLP.
"""

from __future__ import annotations

from tessera.config import Config
from tessera.connectors.projector import ProjectorConfig
from tessera.presets.base import LVLMPreset, tiny_towers
from tessera.presets.lvlm_runner import reading_eval, zoo_runner
from tessera.text.llama import LlamaConfig
from tessera.train.stage import StageConfig
from tessera.vision.vit import ViTConfig


def expert_prefixes(llm: LlamaConfig) -> list[str]:
    """Parameter-name prefixes of the visual expert inside an LVLM (every layer's
    self_attn.vision_expert and vision_mlp), for a stage's `trainable` and `lr_scale`."""
    return [f"language_model.layers.{i}.{part}" for i in range(llm.num_layers)
            for part in ("self_attn.vision_expert", "vision_mlp")]


def stages(llm: LlamaConfig, steps: tuple[int, int, int], batch: tuple[int, int, int],
           lr: tuple[float, float, float]) -> list[StageConfig]:
    """CogVLM's three stages for an LLM of this depth."""
    expert = expert_prefixes(llm)
    # The LLM's own weights learn at 0.1× lr in SFT; the (new) visual expert at the full rate.
    sft_scale = {"language_model": 0.1, **dict.fromkeys(expert, 1.0)}
    return [
        StageConfig(name="pretrain", trainable=["connector", *expert], data="llava_pretrain", steps=steps[0],
                    batch_size=batch[0], lr=lr[0], warmup_steps=steps[0] // 10),
        StageConfig(name="pretrain_rec", trainable=["connector", *expert], data="llava_pretrain+rec_cogvlm?",
                    steps=steps[1], batch_size=batch[1], lr=lr[1], warmup_steps=steps[1] // 10),
        StageConfig(name="sft", trainable=["connector", "language_model"], data="llava_instruct+rec_cogvlm?",
                    group_by_image=True, steps=steps[2], batch_size=batch[2], lr=lr[2],
                    warmup_steps=steps[2] // 20, lr_scale=sft_scale),
    ]


def tiny() -> LVLMPreset:
    towers = tiny_towers()
    return LVLMPreset(
        name="cogvlm-tiny",
        **towers,
        connector=ProjectorConfig(kind="mlp"),
        template="vicuna",
        vision_feature_layer=-2,  # the ViT with its last layer removed
        visual_expert=True,
        image_positions="shared",
        folder="cogvlm",
        # 1,200 SFT steps, not 300: with 300 the LLM had not yet learnt to read the image (VQA 0.478,
        # colour questions 0.46); with 1,200 VQA is 0.747 / 0.622 (ZOO.md).
        stages=stages(towers["llm"], steps=(100, 100, 1200), batch=(32, 32, 16), lr=(2e-3, 1e-3, 4e-3)),
    )


def paper() -> dict[str, Config]:
    """CogVLM-17B dimensions: EVA2-CLIP-E (64 layers of width 1792, 14 px patches at 490 px:
    35×35 = 1,225 image tokens; the last layer removed), Vicuna-7B-v1.5 with a visual expert."""
    return {
        "vision": ViTConfig(image_size=490, patch_size=14, hidden_size=1792, num_layers=64, num_heads=16,
                            intermediate_size=15360, act="gelu"),
        "vision_feature_layer": -2,
        "connector": ProjectorConfig(kind="mlp", act="silu"),
        "llm": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                           num_heads=32, num_kv_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           visual_expert=True),
    }


ZOO = {"cogvlm": zoo_runner(tiny, extra_evals=[reading_eval("rec_cogvlm")])}
